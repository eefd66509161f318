"""The ExCP codec against numpy transcriptions of the paper's formulas, and its file format."""

import math

import numpy as np
import pytest

from paperjax.compress import excp

CFG = excp.ExcpConfig()


def _tensors(rng, shape=(64, 48), names=("a", "b")):
  """Weights, m and v with Adam-like scales: heavy-tailed weights, v ~ 1e-9 (below float16's range)."""
  w = {n: (0.02 * rng.standard_t(3, shape)).astype(np.float32) for n in names}
  m = {n: (1e-4 * rng.standard_t(3, shape)).astype(np.float32) for n in names}
  v = {n: (1e-9 * rng.exponential(1.0, shape)).astype(np.float32) for n in names}
  return w, m, v


def _step(rng, w, scale=1e-3):
  return {n: (x + scale * rng.standard_normal(x.shape)).astype(np.float32) for n, x in w.items()}


def test_median_is_the_lower_middle_value():
  assert excp.median_lower(np.array([4.0, 1.0, 3.0, 2.0])) == 2.0  # np.median says 2.5
  assert excp.median_lower(np.array([5.0, 1.0, 3.0])) == 3.0


def test_masks_follow_the_formulas(np_rng):
  w, m, v = _tensors(np_rng)
  dw = _step(np_rng, w)["a"] - w["a"]
  for alpha, beta in ((5e-5, 2.0), (1e-7, 0.5), (1.0, 0.0)):
    keep, keep_o = excp.masks(dw, m["a"], v["a"], alpha=alpha, beta=beta)
    # Transcription: torch.median is sorted[(n - 1) // 2]; the means are over the whole tensor.
    flat = np.sort(np.abs(dw).astype(np.float64).ravel())
    r_w = min(2.5, alpha / math.sqrt(v["a"].astype(np.float64).mean())) * flat[(flat.size - 1) // 2]
    expected = np.abs(dw.astype(np.float64)) > r_w
    expected_o = expected & (np.abs(m["a"].astype(np.float64)) > beta * np.abs(m["a"].astype(np.float64)).mean())
    np.testing.assert_array_equal(keep, expected)
    np.testing.assert_array_equal(keep_o, expected_o)
  keep, _ = excp.masks(dw, m["a"], np.zeros_like(v["a"]), alpha=5e-5, beta=2.0)  # mean v = 0: the 2.5 cap
  np.testing.assert_array_equal(keep, np.abs(dw.astype(np.float64)) > 2.5 * flat[(flat.size - 1) // 2])


def test_masks_use_the_lower_median_and_a_strict_threshold():
  ones = np.ones(4, np.float32)
  keep, _ = excp.masks(np.array([1.0, 2, 3, 4], np.float32), ones, ones, alpha=1.25, beta=0.0)
  np.testing.assert_array_equal(keep, [False, False, True, True])  # 1.25 * 2 (np.median's 2.5 would keep only 4)
  keep, keep_o = excp.masks(np.array([1.0, 2, 2, 4], np.float32), np.array([1.0, 1, 1, 9]), ones, alpha=1.0, beta=1.0)
  np.testing.assert_array_equal(keep, [False, False, False, True])  # > 2, not >= 2
  np.testing.assert_array_equal(keep_o, [False, False, False, True])  # |m| = 9 > mean 3, and kept


def _lloyd_loop(x, centres, iters):
  """Lloyd's algorithm written plainly: argmin assignment over all centres, then means."""
  x = x.astype(np.float64)
  for _ in range(iters):
    labels = np.argmin(np.abs(x[:, None] - centres[None, :]), axis=1)
    centres = np.array([x[labels == j].mean() if np.any(labels == j) else centres[j] for j in range(centres.size)])
  return centres


def test_kmeans_equals_a_plain_lloyd_loop_and_beats_uniform(np_rng):
  x = np_rng.standard_t(2, 4000)
  k = 15
  xs = np.sort(x)
  start = xs[((np.arange(k) + 0.5) * x.size / k).astype(int)]
  np.testing.assert_allclose(excp.kmeans_1d(x, k, iters=25), _lloyd_loop(x, start, 25), rtol=1e-6)

  def mse(centres):
    return np.mean((x - centres[excp.assign(x, centres)]) ** 2)

  uniform = np.linspace(x.min(), x.max(), k).astype(np.float32)  # uniform 4-bit over the range
  assert mse(excp.kmeans_1d(x, k)) < 0.1 * mse(uniform)


def test_pack_bits_round_trips_and_puts_two_4_bit_indices_per_byte(np_rng):
  assert excp.pack_bits(np.array([1, 2, 15]), 4) == bytes([0x21, 0x0F])
  for bits in range(1, 9):
    values = np_rng.integers(0, 2**bits, 101).astype(np.uint8)
    packed = excp.pack_bits(values, bits)
    assert len(packed) == math.ceil(101 * bits / 8)
    np.testing.assert_array_equal(excp.unpack_bits(packed, bits, 101), values)


def test_decoded_values_are_the_kept_values_codebook_entries(np_rng):
  w, m, v = _tensors(np_rng)
  w1 = _step(np_rng, w)
  _, recon = excp.encode(excp.Checkpoint(w1, m, v, {}), w, CFG)
  for name in w:
    dw = w1[name] - w[name]
    keep, keep_o = excp.masks(dw, m[name], v[name], alpha=CFG.alpha, beta=CFG.beta)
    assert keep.sum() > 2**CFG.bits and keep_o.sum() > 2**CFG.bits  # the codebook path, not the raw one
    centres = excp.kmeans_1d(dw[keep], 2**CFG.bits - 1)
    np.testing.assert_array_equal(recon.weights[name][keep], w[name][keep] + centres[excp.assign(dw[keep], centres)])
    centres = excp.kmeans_1d(m[name][keep_o], 2**CFG.bits - 1)
    np.testing.assert_array_equal(recon.m[name][keep_o], centres[excp.assign(m[name][keep_o], centres)])
    np.testing.assert_array_equal(recon.m[name][~keep_o], 0)
    np.testing.assert_array_equal(recon.weights[name][~keep], w[name][~keep])
    # v ~ 1e-9 survives: float32 codebooks (float16 would decode it to 0).
    assert np.all(recon.v[name][keep_o] > 0)
    np.testing.assert_allclose(recon.v[name][keep_o].mean(), v[name][keep_o].mean(), rtol=0.05)


def _closed_loop_step(w_hat, w, m, v):
  """W_hat_t = W_hat_{t-1} + codebook[index] of the kept residual, written from the formulas."""
  out = {}
  for name in w:
    dw = w[name] - w_hat[name]
    keep, _ = excp.masks(dw, m[name], v[name], alpha=CFG.alpha, beta=CFG.beta)
    centres = excp.kmeans_1d(dw[keep], 2**CFG.bits - 1)
    step = np.zeros_like(dw)
    step[keep] = centres[excp.assign(dw[keep], centres)]
    out[name] = w_hat[name] + step
  return out


def test_the_stored_chain_decodes_to_the_closed_loop_reconstruction(np_rng):
  w, m, v = _tensors(np_rng)
  truth = [w]
  blobs = [excp.encode(excp.Checkpoint(w, m, v, {"count": np.int32(7)}), None, CFG)[0]]
  reference = excp.decode(blobs[0], None).weights
  for _ in range(6):  # the encoder's caller threads its reconstructions, as the manager does
    truth.append(_step(np_rng, truth[-1]))
    blob, recon = excp.encode(excp.Checkpoint(truth[-1], m, v, {}), reference, CFG)
    blobs.append(blob)
    reference = recon.weights
  decoded = excp.decode(blobs[0], None)  # a reader: only the files, in order
  assert decoded.other["count"] == 7
  for name in w:  # a keyframe is exact
    np.testing.assert_array_equal(decoded.weights[name], w[name])
  expected, errors = w, []
  for blob, t in zip(blobs[1:], truth[1:], strict=True):
    decoded = excp.decode(blob, decoded.weights)
    expected = _closed_loop_step(expected, t, m, v)
    for name in w:
      np.testing.assert_array_equal(decoded.weights[name], expected[name])
    errors.append(max(np.abs(decoded.weights[n] - t[n]).max() for n in w))
  assert max(errors) < 2 * errors[0], errors  # closed loop: each error is one step's quantisation error


def test_a_part_with_few_kept_values_is_stored_raw(np_rng):
  w = {"s": np.zeros(40, np.float32)}
  w1 = {"s": w["s"].copy()}
  w1["s"][:5] = [0.5, -0.25, 0.125, 1.0, 3.0]  # 5 nonzero residuals, the rest 0: the median is 0
  m = {"s": np.zeros(40, np.float32)}
  m["s"][:3] = 1.0
  v = {"s": np.ones(40, np.float32)}
  _, recon = excp.encode(excp.Checkpoint(w1, m, v, {}), w, CFG)
  np.testing.assert_array_equal(recon.weights["s"], w1["s"])
  np.testing.assert_array_equal(recon.m["s"], m["s"])
  np.testing.assert_array_equal(recon.v["s"], np.where(m["s"] > 0, 1.0, 0.0))


@pytest.mark.parametrize("coder", ["lzma", "zstd", "none"])
def test_corrupt_or_truncated_files_raise(np_rng, coder):
  w, m, v = _tensors(np_rng)
  blob, _ = excp.encode(excp.Checkpoint(_step(np_rng, w), m, v, {}), w, excp.ExcpConfig(coder=coder))
  header = excp.read_header(blob)
  assert header["coder"] == coder and set(header["streams"]) == set(excp.COMPONENTS)
  flipped = bytearray(blob)
  flipped[len(blob) // 2] ^= 0x10
  for bad in (bytes(flipped), blob[: len(blob) - 100], blob[:20]):
    with pytest.raises(ValueError, match="checksum"):
      excp.decode(bad, w)
  with pytest.raises(ValueError, match="fingerprint"):
    excp.decode(blob, None)
  with pytest.raises(ValueError, match="fingerprint"):  # another step's weights: never a silently wrong result
    excp.decode(blob, {n: x + 1e-3 for n, x in w.items()})


def test_bfloat16_and_empty_tensors_round_trip(np_rng):
  import ml_dtypes

  w, m, v = _tensors(np_rng, names=("a",))
  w = {"a": w["a"].astype(ml_dtypes.bfloat16), "empty": np.zeros((0, 3), ml_dtypes.bfloat16)}
  m, v = {**m, "empty": np.zeros((0, 3), np.float32)}, {**v, "empty": np.zeros((0, 3), np.float32)}
  _, keyframe = excp.encode(excp.Checkpoint(w, m, v, {}), None, CFG)
  assert keyframe.weights["a"].dtype == ml_dtypes.bfloat16
  np.testing.assert_array_equal(keyframe.weights["a"], w["a"])
  # A heavy-tailed step: a constant one has every residual at the median, so pruning would keep nothing.
  w1 = {
    n: (x.astype(np.float32) + 0.01 * np_rng.standard_t(3, x.shape)).astype(ml_dtypes.bfloat16) for n, x in w.items()
  }
  blob, recon = excp.encode(excp.Checkpoint(w1, m, v, {}), keyframe.weights, CFG)
  decoded = excp.decode(blob, keyframe.weights)
  assert decoded.weights["a"].dtype == ml_dtypes.bfloat16 and decoded.weights["empty"].shape == (0, 3)
  np.testing.assert_array_equal(decoded.weights["a"], recon.weights["a"])
  got, key, target = (x["a"].astype(np.float32) for x in (decoded.weights, keyframe.weights, w1))
  assert np.mean(got != key) > 0.05  # the residual was applied (measured 0.31)
  assert np.abs(got - target).mean() < 0.5 * np.abs(key - target).mean()  # and moves toward w1 (measured 0.38x)


def test_bad_configs_and_inputs_raise(np_rng):
  for kwargs, match in (
    ({"bits": 0}, "bits"),
    ({"alpha": -1.0}, "alpha"),
    ({"beta": float("nan")}, "beta"),
    ({"coder": "gzip"}, "coder"),
    ({"coder": "zstd", "level": 30}, "level"),
    ({"kmeans_iters": -1}, "kmeans_iters"),
    ({"level": 9.0}, "level"),
  ):
    with pytest.raises(ValueError, match=match):
      excp.ExcpConfig(**kwargs)
  w, m, v = _tensors(np_rng)
  cases = (
    (excp.Checkpoint(w, {"a": m["a"]}, v, {}), w, "m: expected the weights' names"),
    (excp.Checkpoint(w, m, v, {}), {n: x[:2] for n, x in w.items()}, r"reference\['a'\]: expected shape"),
    (excp.Checkpoint({**w, "a": np.full_like(w["a"], np.nan)}, m, v, {}), None, r"weights\['a'\]: expected finite"),
    (excp.Checkpoint({**w, "a": w["a"].astype(np.int32)}, m, v, {}), None, "floating dtype"),
  )
  for ckpt, reference, match in cases:
    with pytest.raises(ValueError, match=match):
      excp.encode(ckpt, reference, CFG)
