"""MaxSim: reference vs a numpy loop, Pallas kernels (interpret mode and CUDA lowering),
masks, tensor arrays, binary codes, reranking, errors."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from paperjax.ops import maxsim
from paperjax.ops.pallas import maxsim as kernels


def _loop_maxsim(q, q_mask, d, d_mask):
  scores = np.zeros((q.shape[0], d.shape[0]))
  for i in range(q.shape[0]):
    for n in range(d.shape[0]):
      valid = np.flatnonzero(d_mask[n])
      for l in np.flatnonzero(q_mask[i]):
        if valid.size:
          scores[i, n] += max(float(q[i, l] @ d[n, s]) for s in valid)
  return scores


@pytest.fixture
def ragged(np_rng):
  """Odd sizes everywhere: Q=3, L=5, N=19, S=37, K=48; ragged lengths including 0 and S."""
  q = np_rng.normal(size=(3, 5, 48)).astype(np.float32)
  d = np_rng.normal(size=(19, 37, 48)).astype(np.float32)
  lengths = np_rng.integers(1, 38, 19)
  lengths[:2] = [0, 37]
  q_mask = np_rng.random((3, 5)) > 0.3
  return q, q_mask, d, lengths


def test_reference_matches_loop(ragged):
  q, q_mask, d, lengths = ragged
  d_mask = np.arange(37)[None] < lengths[:, None]
  got = maxsim.maxsim(
    jnp.asarray(q), jnp.asarray(d), q_mask_QT=jnp.asarray(q_mask), d_lengths_N=jnp.asarray(lengths), impl="reference"
  )
  np.testing.assert_allclose(got, _loop_maxsim(q, q_mask, d, d_mask), rtol=1e-5, atol=1e-4)
  assert (np.asarray(got)[:, 0] == 0).all()  # an empty document adds nothing


def test_reference_blocks_agree(ragged, monkeypatch):
  q, q_mask, d, lengths = ragged
  args = dict(q_mask_QT=jnp.asarray(q_mask[:, :4]), d_lengths_N=jnp.asarray(lengths[:17]), impl="reference")
  whole = maxsim.maxsim(jnp.asarray(q[:, :4]), jnp.asarray(d[:17]), **args)
  monkeypatch.setattr(maxsim, "_REFERENCE_BLOCK_BYTES", 4 * 3 * 4 * 37 * 5)  # blocks of 5 documents
  maxsim._blocked_reference.clear_cache()
  blocked = maxsim.maxsim(jnp.asarray(q[:, :4]), jnp.asarray(d[:17]), **args)
  maxsim._blocked_reference.clear_cache()
  np.testing.assert_allclose(blocked, whole, rtol=1e-6)


@pytest.mark.parametrize("dtype, tol", [(jnp.float32, 1e-4), (jnp.bfloat16, 0.5), (jnp.float16, 0.05)])
def test_kernel_interpret_matches_reference(ragged, dtype, tol):
  q, q_mask, d, lengths = ragged
  args = (jnp.asarray(q, dtype), jnp.asarray(d, dtype))
  kw = dict(q_mask_QT=jnp.asarray(q_mask), d_lengths_N=jnp.asarray(lengths))
  ref = maxsim.maxsim(*args, **kw, impl="reference")
  got = maxsim.maxsim(*args, **kw, impl="pallas", interpret=True)
  np.testing.assert_allclose(got, ref, rtol=1e-3, atol=tol)


def test_binary_kernel_interpret_matches_reference(ragged):
  q, q_mask, d, lengths = ragged
  qb, db = maxsim.pack_bits(jnp.asarray(q)), maxsim.pack_bits(jnp.asarray(d))
  kw = dict(q_mask_QT=jnp.asarray(q_mask), d_lengths_N=jnp.asarray(lengths))
  np.testing.assert_array_equal(
    maxsim.maxsim_binary(qb, db, 48, **kw, impl="pallas", interpret=True),
    maxsim.maxsim_binary(qb, db, 48, **kw, impl="reference"),
  )


@pytest.mark.parametrize("block_q", [1, 2, 4])
def test_queries_per_program_change_nothing(ragged, block_q):
  # Q=3 queries padded to a multiple of block_q; T=5 padded to 16 rows per query.
  q, q_mask, d, lengths = ragged
  q_mask_QT, d_mask_NS = maxsim._masks(q, d, jnp.asarray(q_mask), None, jnp.asarray(lengths))
  args = maxsim._pad_for_kernel(jnp.asarray(q), q_mask_QT, jnp.asarray(d), d_mask_NS, last_multiple=16)
  got = kernels.maxsim_pallas(*args[:4], block_q=block_q, interpret=True)[:, : d.shape[0]]
  ref = maxsim.maxsim(
    jnp.asarray(q), jnp.asarray(d), q_mask_QT=jnp.asarray(q_mask), d_lengths_N=jnp.asarray(lengths), impl="reference"
  )
  np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-4)


def test_kernel_options_reach_the_padding(ragged):
  q, q_mask, d, lengths = (jnp.asarray(x) for x in ragged)
  kw = dict(q_mask_QT=q_mask, d_lengths_N=lengths)
  ref = maxsim.maxsim(q, d, **kw, impl="reference")
  got = maxsim.maxsim(q, d, **kw, impl="pallas", interpret=True, block_n=32, block_s=8)  # N=19, S=37: padded to fit
  np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-4)


def test_swar_popcount_counts_bits(np_rng):
  # The kernel's popcount (Triton on CUDA has no tensor ctpop) against numpy's, edges included.
  words = np.concatenate(
    [np_rng.integers(0, 2**32, 1000, dtype=np.uint32), np.array([0, 1, 2**31, 2**32 - 1], np.uint32)]
  )
  np.testing.assert_array_equal(kernels.popcount(jnp.asarray(words)), np.bitwise_count(words))


def test_block_s_keeps_the_step_tile_small():
  # float32 K=128 at BS=32 asked for 274 KiB of shared memory on an H200 (227 KiB there). The
  # interpret-mode tests above run K=64 float32 at BS=8, so steps below BLOCK_S are exercised.
  size = lambda last, itemsize, binary: kernels.block_s(
    block_n=16, num_t=32, last=last, itemsize=itemsize, binary=binary
  )
  # ColBERT: K=128 in float32 and bfloat16; 128-bit codes are 4 words, and their XOR tile counts T.
  assert (size(128, 4, False), size(128, 2, False), size(4, 4, True)) == (4, 8, 4)
  assert size(1, 4, False) == kernels.BLOCK_S  # never above BLOCK_S, which the dispatcher pads S to


def _custom_calls(fn, *args):
  text = jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
  return set(re.findall(r"custom_call @([\w$.]+)", text))


def test_kernels_lower_for_cuda():
  q, qm = jnp.zeros((2, 32, 128), jnp.bfloat16), jnp.ones((2, 32))
  d, dm = jnp.zeros((32, 128, 128), jnp.bfloat16), jnp.ones((32, 128), jnp.int32)
  assert any("triton" in c for c in _custom_calls(kernels.maxsim_pallas, q, qm, d, dm))
  qb, db = jnp.zeros((2, 32, 4), jnp.uint32), jnp.zeros((32, 128, 4), jnp.uint32)
  binary = lambda *a: kernels.maxsim_binary_pallas(*a, dim=128)
  assert any("triton" in c for c in _custom_calls(binary, qb, qm, db, dm))


def test_kernel_entry_points_check_their_contract(np_rng):
  """Called directly on unpadded shapes the kernels raise; the dispatcher pads the same
  shapes and matches the reference."""
  q, qm = jnp.ones((2, 24, 128)), jnp.ones((2, 24))  # T = 24 is not a power of two
  d, dm = jnp.ones((20, 64, 128)), jnp.ones((20, 64), jnp.int32)  # N = 20 is not a multiple of 16
  with pytest.raises(ValueError, match="q: T and K must be powers of two"):
    kernels.maxsim_pallas(q, qm, d, dm, interpret=True)
  with pytest.raises(ValueError, match="d: N=20 must be a multiple of block_n=16"):
    kernels.maxsim_pallas(q[:, :16], qm[:, :16], d, dm, interpret=True)
  with pytest.raises(ValueError, match="S=64 of block_s=48"):
    kernels.maxsim_pallas(q[:, :16], qm[:, :16], d[:16], dm[:16], block_s=48, interpret=True)
  with pytest.raises(ValueError, match="q_mask, d_mask"):
    kernels.maxsim_pallas(q[:, :16], qm, d[:16], dm[:16], interpret=True)
  qb, db = jnp.zeros((2, 24, 4), jnp.uint32), jnp.zeros((20, 64, 4), jnp.uint32)
  with pytest.raises(ValueError, match="q: T must be powers of two"):
    kernels.maxsim_binary_pallas(qb, qm, db, dm, dim=128, interpret=True)
  # Normal draws of the same shapes: with all-ones inputs every score is 3072 and no tiling or indexing bug shows.
  q, d = jnp.asarray(np_rng.normal(size=q.shape), jnp.float32), jnp.asarray(np_rng.normal(size=d.shape), jnp.float32)
  np.testing.assert_allclose(
    maxsim.maxsim(q, d, impl="pallas", interpret=True), maxsim.maxsim(q, d, impl="reference"), rtol=1e-5
  )


@pytest.mark.parametrize("impl", ["reference", "pallas"])
def test_padding_never_wins(np_rng, impl):
  q = np_rng.normal(size=(2, 4, 16)).astype(np.float32)
  d = np_rng.normal(size=(3, 6, 16)).astype(np.float32)
  score = lambda: maxsim.maxsim(
    jnp.asarray(q),
    jnp.asarray(d),
    d_lengths_N=jnp.array([6, 4, 2]),
    q_mask_QT=jnp.array([[1, 1, 1, 0]] * 2, bool),
    impl=impl,
    interpret=True,
  )
  base = score()
  d[1, 4:] = 1e4 * q[0, 0]  # huge padded document tokens
  q[:, 3] = 1e4  # a huge padded query token
  again = score()
  np.testing.assert_allclose(again, base, rtol=1e-6)


def test_normalize_is_cosine(np_rng):
  q = np_rng.normal(size=(2, 3, 8)).astype(np.float32) * 7
  d = np_rng.normal(size=(4, 5, 8)).astype(np.float32) * 3
  unit = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)
  np.testing.assert_allclose(
    maxsim.maxsim(jnp.asarray(q), jnp.asarray(d), normalize=True, impl="reference"),
    _loop_maxsim(unit(q), np.ones((2, 3), bool), unit(d), np.ones((4, 5), bool)),
    rtol=1e-5,
  )


def test_tensor_array_is_max_over_passages(np_rng):
  q = jnp.asarray(np_rng.normal(size=(2, 4, 16)), jnp.float32)
  passages = jnp.asarray(np_rng.normal(size=(7, 9, 16)), jnp.float32)
  doc_of = jnp.array([2, 0, 2, 2, 1, 0, 2])  # ragged: 2, 1, 4 passages; document 3 has none
  got = np.asarray(maxsim.tensor_array_maxsim(q, passages, doc_of, 4, impl="reference"))
  per_passage = np.asarray(maxsim.maxsim(q, passages, impl="reference"))
  for n in range(3):
    np.testing.assert_allclose(got[:, n], per_passage[:, np.asarray(doc_of) == n].max(axis=1))
  assert (got[:, 3] == -np.inf).all()


def test_pack_bits_and_exact_binary_maxsim(np_rng):
  x = np_rng.normal(size=(3, 5, 70)).astype(np.float32)
  x[0, 0, :3] = 0.0  # zero counts as negative
  codes = np.asarray(maxsim.pack_bits(jnp.asarray(x)))
  assert codes.shape == (3, 5, 3) and codes.dtype == np.uint32
  bits = np.pad(x > 0, ((0, 0), (0, 0), (0, 26)))
  expected = np.packbits(bits, axis=-1, bitorder="little").view("<u4")
  np.testing.assert_array_equal(codes, expected)
  q, d = x[:2], np_rng.normal(size=(6, 8, 70)).astype(np.float32)
  sign = lambda v: jnp.where(jnp.asarray(v) > 0, 1.0, -1.0)
  np.testing.assert_array_equal(
    maxsim.maxsim_binary(maxsim.pack_bits(jnp.asarray(q)), maxsim.pack_bits(jnp.asarray(d)), 70, impl="reference"),
    maxsim.maxsim(sign(q), sign(d), impl="reference"),
  )
  assert maxsim.storage_bytes(jnp.zeros((10, 128), jnp.float32)) == 32 * maxsim.storage_bytes(
    maxsim.pack_bits(jnp.zeros((10, 128)))
  )


def test_rerank_and_two_stage(np_rng):
  q = jnp.asarray(np_rng.normal(size=(4, 6, 32)), jnp.float32)
  d = jnp.asarray(np_rng.normal(size=(30, 10, 32)), jnp.float32)
  mask = jnp.asarray(np.arange(10)[None] < np_rng.integers(1, 11, 30)[:, None])
  full = np.asarray(maxsim.maxsim(q, d, d_mask_NS=mask, impl="reference"))
  scores, idx = maxsim.rerank(q, d, 5, d_mask_NS=mask, impl="reference")
  np.testing.assert_array_equal(idx, np.argsort(-full, axis=1, kind="stable")[:, :5])
  np.testing.assert_allclose(scores, np.sort(full, axis=1)[:, ::-1][:, :5], rtol=1e-6)
  # With the whole collection shortlisted, two-stage equals float reranking.
  scores2, idx2 = maxsim.two_stage_rerank(q, d, 5, 30, d_mask_NS=mask, impl="reference")
  np.testing.assert_array_equal(idx2, idx)
  np.testing.assert_allclose(scores2, scores, rtol=1e-6)
  # A shortlist only ever returns shortlisted documents.
  _, short = maxsim.rerank(maxsim.pack_bits(q), maxsim.pack_bits(d), 8, d_mask_NS=mask, dim=32, impl="reference")
  _, idx3 = maxsim.two_stage_rerank(q, d, 3, 8, d_mask_NS=mask, impl="reference")
  for row, cands, scores_N in zip(np.asarray(idx3), np.asarray(short), full):
    assert set(row) <= set(cands)
    # and orders them by the float scores: the top 3 of the shortlist.
    np.testing.assert_array_equal(row, cands[np.argsort(-scores_N[cands], kind="stable")[:3]])


def test_errors():
  q, d = jnp.zeros((2, 3, 8)), jnp.zeros((4, 5, 8))
  with pytest.raises(ValueError, match="dim K=8"):
    maxsim.maxsim(q, jnp.zeros((4, 5, 6)))
  with pytest.raises(TypeError, match="one dtype"):
    maxsim.maxsim(q, d.astype(jnp.bfloat16))
  with pytest.raises(ValueError, match="d_mask_NS, d_lengths_N"):
    maxsim.maxsim(q, d, d_mask_NS=jnp.ones((4, 5), bool), d_lengths_N=jnp.ones(4, int))
  with pytest.raises(ValueError, match="q_mask_QT"):
    maxsim.maxsim(q, d, q_mask_QT=jnp.ones((2, 4), bool))
  with pytest.raises(ValueError, match="impl"):
    maxsim.maxsim(q, d, impl="cuda")
  with pytest.raises(ValueError, match="k: expected"):
    maxsim.rerank(q, d, 5, impl="reference")
  with pytest.raises(TypeError, match="uint32 codes"):
    maxsim.maxsim_binary(q, d, 8)
  with pytest.raises(ValueError, match="dim: 40 needs 2 words"):
    maxsim.maxsim_binary(maxsim.pack_bits(q), maxsim.pack_bits(d), 40)
  with pytest.raises(ValueError, match="dim: binary codes"):
    maxsim.rerank(maxsim.pack_bits(q), maxsim.pack_bits(d), 2)
  with pytest.raises(ValueError, match="shortlist"):
    maxsim.two_stage_rerank(q, d, 3, 2)
