"""Paged decode attention as a Pallas kernel (Triton lowering), flash-decoding style.

Shapes: B batch rows, H query heads, G kv heads, R = H / G query heads per kv head (padded
to Rp >= 16 for Triton's dot), K head dim, P pages (of the pool, or of a row's block table),
S slots of a page, C splits of a row's pages (programs that share one row).

Grid (B, G, C): a program takes the R query heads of one kv group of one row (so each
K/V page it loads serves all R of them) and walks its share of the row's block table,
`pages_per_step` pages (up to 128 keys) at a time, gathering them from the pool through the
table. An online softmax keeps float32 running (max m, sum l, output o) per head. Only the
steps that hold tokens before the row's length run; slots past it are masked (scores -inf,
values 0, so NaN in a stale page cannot leak). Each split writes its unnormalised (o, m, l);
`combine` merges the splits with log-sum-exp weights:

  m = max_c m_c,  l = sum_c e^(m_c - m) l_c,  out = sum_c e^(m_c - m) o_c / l   (0 where l = 0)

Splitting a long row over C programs keeps the GPU busy when B * G is small (few sequences,
long contexts); `default_splits` picks C. The defaults (steps, splits, warps) follow the
tiling sweep `bench.gpu_check` ran on an H200.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

MIN_DOT = 16  # Triton's dot needs every dimension >= 16
TARGET_PROGRAMS = 264  # two waves of an H100/H200's 132 multiprocessors
STEP_TOKENS = 128  # keys per loop step, at most (jax's bundled kernel: 8 pages of 16)
STEP_BYTES = 64 * 1024  # one step's K and V tiles, so two pipeline stages fit Hopper's shared memory


def pages_per_step(page_size: int, head_dim: int = MIN_DOT, itemsize: int = 2) -> int:
  """Pages gathered per loop step: up to STEP_TOKENS keys whose K and V fit STEP_BYTES, and
  always >= MIN_DOT keys for the dot (a power of two for power-of-two pages)."""
  pages = max(1, STEP_TOKENS // page_size)
  while pages > 1 and 2 * pages * page_size * head_dim * itemsize > STEP_BYTES:
    pages //= 2
  return max(pages, -(-MIN_DOT // page_size))


def default_splits(batch: int, groups: int, pages: int, step_pages: int) -> int:
  """C: enough programs for TARGET_PROGRAMS when B * G is small, but at least two steps per
  split (each split adds a partial result to merge)."""
  steps = -(-pages // step_pages)
  return max(1, min(-(-steps // 2), -(-TARGET_PROGRAMS // (batch * groups))))


def _kernel(q_ref, k_ref, v_ref, table_ref, length_ref, o_ref, m_ref, l_ref, *, step_pages: int, scale: float):
  q_RK = q_ref[...]
  num_r, head_dim = q_RK.shape
  page_size = k_ref.shape[1]
  step_tokens = step_pages * page_size
  split_pages = table_ref.shape[0]
  first = pl.program_id(2) * split_pages * page_size  # this split's first token position
  length = length_ref[0]
  steps = jnp.clip((length - first + step_tokens - 1) // step_tokens, 0, split_pages // step_pages)

  def step(i, carry):
    o_RK, m_R, l_R = carry
    pages = table_ref[pl.ds(i * step_pages, step_pages)]
    k_SK = k_ref[pages].reshape(step_tokens, head_dim)
    v_SK = v_ref[pages].reshape(step_tokens, head_dim)
    valid_S = first + i * step_tokens + jnp.arange(step_tokens) < length
    s_RS = jax.lax.dot_general(q_RK, k_SK, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32) * scale
    s_RS = jnp.where(valid_S[None, :], s_RS, -jnp.inf)
    m_new = jnp.maximum(m_R, s_RS.max(axis=1))  # finite: every step run holds a valid token
    alpha_R = jnp.exp(m_R - m_new)
    p_RS = jnp.exp(s_RS - m_new[:, None])
    v_SK = jnp.where(valid_S[:, None], v_SK, 0)
    pv_RK = jax.lax.dot_general(
      p_RS.astype(v_SK.dtype), v_SK, (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32
    )
    return alpha_R[:, None] * o_RK + pv_RK, m_new, alpha_R * l_R + p_RS.sum(axis=1)

  init = (
    jnp.zeros((num_r, head_dim), jnp.float32),
    jnp.full((num_r,), -jnp.inf, jnp.float32),
    jnp.zeros((num_r,), jnp.float32),
  )
  o_RK, m_R, l_R = jax.lax.fori_loop(0, steps, step, init)
  o_ref[...] = o_RK
  m_ref[...] = m_R
  l_ref[...] = l_R


def _next_pow2(n: int) -> int:
  return 1 << (max(n, 1) - 1).bit_length()


def default_warps(batch: int, groups: int) -> int:
  """8 warps when B * G is under one wave of an H200 (132 multiprocessors), else 4. Measured by
  gpu_check at Llama 3 8B's attention shapes over 4096 tokens: 8 warps ran 1.3-1.7x faster at
  B = 1 and 8, and 0.9x at B = 32 and 128."""
  return 8 if batch * groups < 132 else 4


def combine(o_BGCRK: jax.Array, m_BGCR: jax.Array, l_BGCR: jax.Array) -> jax.Array:
  """Merges the C splits' (o, m, l) into normalised outputs [B, G, R, K] (module equation)."""
  m_BGR = m_BGCR.max(axis=2)
  w_BGCR = jnp.where(m_BGCR == -jnp.inf, 0.0, jnp.exp(m_BGCR - jnp.where(m_BGR == -jnp.inf, 0.0, m_BGR)[:, :, None]))
  l_BGR = (w_BGCR * l_BGCR).sum(axis=2)
  o_BGRK = (w_BGCR[..., None] * o_BGCRK).sum(axis=2)
  return jnp.where(l_BGR[..., None] > 0, o_BGRK / jnp.where(l_BGR > 0, l_BGR, 1.0)[..., None], 0.0)


@functools.partial(jax.jit, static_argnames=("num_splits", "step_pages", "num_warps", "interpret"))
def paged_decode(
  q_BHK: jax.Array,
  k_pages_GPSK: jax.Array,
  v_pages_GPSK: jax.Array,
  block_tables_BP: jax.Array,
  lengths_B: jax.Array,
  *,
  num_splits: int | None = None,
  step_pages: int | None = None,
  num_warps: int | None = None,
  interpret: bool = False,
) -> jax.Array:
  """Decode attention [B, H, K] in q's dtype (`ops.paged_attention` is the dispatcher and the
  reference). Any shapes: R is padded to Rp >= 16, the table to C * whole steps; table
  entries are clamped into the pool (entries past a row's length may be anything)."""
  batch, heads, head_dim = q_BHK.shape
  groups, num_pages, page_size, _ = k_pages_GPSK.shape
  if head_dim < MIN_DOT or head_dim != _next_pow2(head_dim) or page_size != _next_pow2(page_size):
    raise ValueError(
      f"q_BHK, k_pages_GPSK: the kernel needs a power-of-two head dim >= {MIN_DOT} and page size, "
      f"got K={head_dim}, S={page_size}"
    )
  step_pages = step_pages or pages_per_step(page_size, head_dim, q_BHK.dtype.itemsize)
  if step_pages * page_size < MIN_DOT or step_pages != _next_pow2(step_pages):
    raise ValueError(f"step_pages: expected a power of two with >= {MIN_DOT} keys per step, got {step_pages}")
  splits = num_splits or default_splits(batch, groups, block_tables_BP.shape[1], step_pages)
  num_warps = num_warps or default_warps(batch, groups)
  if splits < 1:
    raise ValueError(f"num_splits: expected >= 1, got {num_splits}")
  split_pages = step_pages * _next_pow2(-(-block_tables_BP.shape[1] // (step_pages * splits)))  # Triton blocks: 2^n
  table_BP = jnp.pad(
    jnp.clip(block_tables_BP, 0, num_pages - 1), ((0, 0), (0, split_pages * splits - block_tables_BP.shape[1]))
  )
  per_group = heads // groups
  padded_r = max(MIN_DOT, _next_pow2(per_group))
  q_BGRK = jnp.pad(
    q_BHK.reshape(batch, groups, per_group, head_dim), ((0, 0), (0, 0), (0, padded_r - per_group), (0, 0))
  )
  kernel = functools.partial(_kernel, step_pages=step_pages, scale=1 / math.sqrt(head_dim))
  o, m, l = pl.pallas_call(
    kernel,
    out_shape=(
      jax.ShapeDtypeStruct((batch, groups, splits, padded_r, head_dim), jnp.float32),
      jax.ShapeDtypeStruct((batch, groups, splits, padded_r), jnp.float32),
      jax.ShapeDtypeStruct((batch, groups, splits, padded_r), jnp.float32),
    ),
    grid=(batch, groups, splits),
    in_specs=[
      pl.BlockSpec((None, None, padded_r, head_dim), lambda b, g, c: (b, g, 0, 0)),
      pl.BlockSpec((None, num_pages, page_size, head_dim), lambda b, g, c: (g, 0, 0, 0)),
      pl.BlockSpec((None, num_pages, page_size, head_dim), lambda b, g, c: (g, 0, 0, 0)),
      pl.BlockSpec((None, split_pages), lambda b, g, c: (b, c)),
      pl.BlockSpec((1,), lambda b, g, c: (b,)),
    ],
    out_specs=(
      pl.BlockSpec((None, None, None, padded_r, head_dim), lambda b, g, c: (b, g, c, 0, 0)),
      pl.BlockSpec((None, None, None, padded_r), lambda b, g, c: (b, g, c, 0)),
      pl.BlockSpec((None, None, None, padded_r), lambda b, g, c: (b, g, c, 0)),
    ),
    compiler_params=pltriton.CompilerParams(num_warps=num_warps, num_stages=2),
    interpret=interpret,
    name="paged_decode",
  )(q_BGRK, k_pages_GPSK, v_pages_GPSK, table_BP, lengths_B.astype(jnp.int32))
  out_BGRK = combine(o, m, l)[:, :, :per_group]
  return out_BGRK.reshape(batch, heads, head_dim).astype(q_BHK.dtype)
