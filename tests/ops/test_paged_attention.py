"""Paged attention: the reference against a numpy loop over the dense cache, the Pallas kernel
(interpret mode, and lowered for CUDA) against the reference, page writes and copies, stale
pages, errors."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from paperjax.ops import paged_attention as pa
from paperjax.ops.pallas import paged_attention as kernels

POOL_PAGES, HEAD_DIM, HEADS = 23, 16, 8


def _case(np_rng, *, groups, page_size, dtype, batch=4, table_width=5):
  """A pool, shuffled block tables (distinct pages per row) and ragged lengths (0, 1, full)."""
  shape = (groups, POOL_PAGES, page_size, HEAD_DIM)
  k = jnp.asarray(np_rng.normal(size=shape), dtype)
  v = jnp.asarray(np_rng.normal(size=shape), dtype)
  tables = np.stack([np_rng.permutation(POOL_PAGES)[:table_width] for _ in range(batch)]).astype(np.int32)
  lengths = np.concatenate([[0, 1, table_width * page_size], np_rng.integers(2, table_width * page_size, batch)])[
    :batch
  ]
  q = jnp.asarray(np_rng.normal(size=(batch, HEADS, HEAD_DIM)), dtype)
  return q, k, v, jnp.asarray(tables), jnp.asarray(lengths, jnp.int32)


def _numpy_decode(q, k, v, tables, lengths):
  """Row by row, head by head: gather the row's tokens from its pages, softmax, average."""
  q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
  groups, _, _, head_dim = k.shape
  out = np.zeros(q.shape)
  for b, n in enumerate(np.asarray(lengths)):
    for h in range(q.shape[1]):
      g = h // (q.shape[1] // groups)
      keys = np.concatenate([k[g, p] for p in np.asarray(tables[b])])[:n]
      values = np.concatenate([v[g, p] for p in np.asarray(tables[b])])[:n]
      if n:
        s = keys @ q[b, h] / np.sqrt(head_dim)
        w = np.exp(s - s.max())
        out[b, h] = w @ values / w.sum()
  return out


GRID = [(g, s, d) for g in (8, 2, 1) for s in (8, 16, 32) for d in (jnp.float32, jnp.bfloat16)]  # GQA ratio 1/4/8


@pytest.mark.parametrize("groups,page_size,dtype", GRID)
def test_reference_and_kernel_match_dense_attention(np_rng, groups, page_size, dtype):
  q, k, v, tables, lengths = _case(np_rng, groups=groups, page_size=page_size, dtype=dtype)
  expected = _numpy_decode(q, k, v, tables, lengths)
  tol = 1e-5 if dtype == jnp.float32 else 3e-2
  ref = pa.paged_attention(q, k, v, tables, lengths, impl="reference")
  assert ref.dtype == dtype
  np.testing.assert_allclose(np.asarray(ref, np.float64), expected, atol=tol, rtol=tol)
  got = pa.paged_attention(q, k, v, tables, lengths, impl="pallas", interpret=True)
  np.testing.assert_allclose(np.asarray(got, np.float64), np.asarray(ref, np.float64), atol=tol, rtol=tol)


@pytest.mark.parametrize("num_splits", [1, 2, 3])
def test_kernel_splits_agree(np_rng, num_splits):
  # Splitting a row's pages over programs (flash decoding) and merging by log-sum-exp changes
  # nothing: at 2 pages of 8 per step, 5 pages make 3 steps, so splits hold real pages (and,
  # for short rows, none).
  q, k, v, tables, lengths = _case(np_rng, groups=2, page_size=8, dtype=jnp.float32)
  ref = pa.paged_attention(q, k, v, tables, lengths, impl="reference")
  got = pa.paged_attention(q, k, v, tables, lengths, impl="pallas", interpret=True, num_splits=num_splits, step_pages=2)
  np.testing.assert_allclose(got, ref, atol=1e-5)


def test_stale_pages_never_reach_the_output(np_rng):
  # Every slot no row may read holds NaN (keys and values: a masked probability is 0, and
  # 0 * NaN is NaN): slots past each length, and pages no table names. Outputs must equal
  # those over a clean pool, for the reference and the kernel.
  q, k, v, tables, lengths = _case(np_rng, groups=2, page_size=8, dtype=jnp.float32)
  readable = np.zeros(k.shape[1:3], bool)
  for b, n in enumerate(np.asarray(lengths)):
    for i in range(n):
      readable[tables[b, i // 8], i % 8] = True
  stale_k = jnp.where(readable[None, :, :, None], k, jnp.nan)
  stale_v = jnp.where(readable[None, :, :, None], v, jnp.nan)
  for impl, kw in (("reference", {}), ("pallas", {"interpret": True})):
    clean = pa.paged_attention(q, k, v, tables, lengths, impl=impl, **kw)
    stale = pa.paged_attention(q, stale_k, stale_v, tables, lengths, impl=impl, **kw)
    np.testing.assert_array_equal(stale, clean)
    assert np.isfinite(np.asarray(stale)).all()


def test_causal_reference_matches_per_query_decode(np_rng):
  # A chunk of T queries at positions p attends like T decodes of lengths p + 1.
  _, k, v, tables, _ = _case(np_rng, groups=2, page_size=8, dtype=jnp.float32)
  q_BTHK = jnp.asarray(np_rng.normal(size=(3, 4, HEADS, HEAD_DIM)), jnp.float32)
  positions = jnp.asarray([[0, 1, 2, 3], [10, 11, 12, 13], [30, 31, 32, 33]], jnp.int32)
  got = pa.paged_attention_reference(q_BTHK, k, v, tables[:3], positions, positions[:, -1] + 1)
  for t in range(4):
    expected = _numpy_decode(q_BTHK[:, t], k, v, tables[:3], positions[:, t] + 1)
    np.testing.assert_allclose(got[:, t], expected, atol=1e-5)


def test_write_puts_tokens_in_their_pages_and_drops_padding(np_rng):
  groups, page_size = 2, 4
  k = jnp.zeros((groups, 10, page_size, HEAD_DIM))
  tables = jnp.asarray([[7, 2, 5], [1, 9, 0]], jnp.int32)
  new_k = jnp.asarray(np_rng.normal(size=(2, 3, groups, HEAD_DIM)), jnp.float32)
  positions = jnp.asarray([[3, 4, 5], [8, 9, 10]], jnp.int32)  # row 0 crosses a page boundary
  valid = jnp.asarray([[True, True, True], [True, True, False]])
  got_k, got_v = pa.write(k, k, new_k, -new_k, tables, positions, valid)
  expected = np.zeros(k.shape)
  for b in range(2):
    for t in range(3):
      if valid[b, t]:
        page, slot = int(tables[b, positions[b, t] // page_size]), int(positions[b, t] % page_size)
        expected[:, page, slot] = np.asarray(new_k[b, t])
  np.testing.assert_array_equal(got_k, expected)
  np.testing.assert_array_equal(got_v, -expected)


def test_copy_pages_copies_every_layer(np_rng):
  pool = jnp.asarray(np_rng.normal(size=(2, 3 * 6, 4, HEAD_DIM)), jnp.float32)  # [G, L * P, S, K], L=3, P=6
  got = pa.copy_pages(pool, jnp.asarray([1, 4], jnp.int32), jnp.asarray([5, 0], jnp.int32), layers=3)
  expected = np.asarray(pool).copy()
  for layer in range(3):
    base = 6 * layer
    expected[:, base + 5], expected[:, base + 0] = expected[:, base + 1], expected[:, base + 4]
  np.testing.assert_array_equal(got, expected)
  with pytest.raises(ValueError, match="layers: expected a divisor"):
    pa.copy_pages(pool, jnp.zeros((1,), jnp.int32), jnp.zeros((1,), jnp.int32), layers=4)


def test_step_and_split_sizes():
  # 128 keys per step when K and V fit 64 KiB (bfloat16 K=128: 8 pages of 16); float32 halves it.
  assert kernels.pages_per_step(16, 128, 2) == 8 and kernels.pages_per_step(16, 128, 4) == 4
  assert kernels.pages_per_step(8) == 16 and kernels.pages_per_step(32, 512, 4) == 1  # >= 16 keys;
  assert kernels.pages_per_step(32, 128, 4) == 2  # 64 float32 keys
  assert kernels.default_splits(batch=1, groups=8, pages=256, step_pages=8) == 16  # 32 steps, two per split
  assert kernels.default_splits(batch=8, groups=8, pages=256, step_pages=8) == 5  # 264 programs / 64
  assert kernels.default_splits(batch=64, groups=8, pages=256, step_pages=8) == 1
  assert (kernels.default_warps(8, 8), kernels.default_warps(32, 8)) == (8, 4)  # the H200 sweep's choice


@pytest.mark.parametrize("step_pages", [2, 4])
def test_kernel_step_sizes_agree(np_rng, step_pages):
  q, k, v, tables, lengths = _case(np_rng, groups=2, page_size=8, dtype=jnp.float32)
  ref = pa.paged_attention(q, k, v, tables, lengths, impl="reference")
  got = kernels.paged_decode(q, k, v, tables, lengths, step_pages=step_pages, num_splits=2, interpret=True)
  np.testing.assert_allclose(got, ref, atol=1e-5)


def test_kernel_lowers_for_cuda():
  q = jnp.zeros((2, 32, 128), jnp.bfloat16)
  k = jnp.zeros((8, 64, 16, 128), jnp.bfloat16)
  tables, lengths = jnp.zeros((2, 16), jnp.int32), jnp.ones((2,), jnp.int32)
  text = jax.jit(kernels.paged_decode).trace(q, k, k, tables, lengths).lower(lowering_platforms=("cuda",)).as_text()
  assert any("triton" in c for c in re.findall(r"custom_call @([\w$.]+)", text))


def test_errors(np_rng):
  q, k, v, tables, lengths = _case(np_rng, groups=2, page_size=8, dtype=jnp.float32)
  with pytest.raises(ValueError, match=r"q_BHK: expected one query per row, \[B, H, K\]"):
    pa.paged_attention(q[0], k, v, tables, lengths)
  with pytest.raises(ValueError, match="v_pages_GPSK: expected the shape"):
    pa.paged_attention(q, k, v[:, :3], tables, lengths)
  with pytest.raises(ValueError, match="H=8 a multiple of G"):
    pa.paged_attention(q, jnp.concatenate([k, k[:1]]), jnp.concatenate([v, v[:1]]), tables, lengths)
  with pytest.raises(TypeError, match="one dtype"):
    pa.paged_attention(q.astype(jnp.bfloat16), k, v, tables, lengths)
  with pytest.raises(TypeError, match="block_tables_BP: expected int32"):
    pa.paged_attention(q, k, v, tables.astype(jnp.int16), lengths)
  with pytest.raises(ValueError, match=r"lengths_B: expected shape \(4,\), got \(2,\)"):
    pa.paged_attention(q, k, v, tables, lengths[:2])
  with pytest.raises(ValueError, match=r"lengths_B: expected lengths \(5 pages of 8\) in \[0, 40\], got \[41\]"):
    pa.paged_attention(q, k, v, tables, lengths.at[0].set(41))
  with pytest.raises(ValueError, match="impl: expected"):
    pa.paged_attention(q, k, v, tables, lengths, impl="cuda")  # type: ignore[arg-type]
  with pytest.raises(ValueError, match="power-of-two head dim"):
    kernels.paged_decode(q[..., :12], k[..., :12], v[..., :12], tables, lengths, interpret=True)
  with pytest.raises(ValueError, match="src_N, dst_N"):
    pa.copy_pages(k, jnp.zeros((2,), jnp.int32), jnp.zeros((3,), jnp.int32))
