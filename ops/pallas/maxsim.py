"""MaxSim Pallas kernels: float (tensor-core dot) and binary (XOR + popcount).

Shapes: Q queries, T query tokens, N documents, S document tokens (a chunk of them per
step), K dim, I packed uint32 words, X the last dim of either form (K or I), R = BQ * T
query-token rows of a program; block sizes: BQ queries and BN documents per program, BS
document tokens per loop step.

One program scores BQ queries against BN documents: it stacks the queries' tokens into R
rows (so each document chunk it loads serves all BQ queries: the first H200 run, at BQ = 1,
was 2-3x slower than XLA's one big matmul), walks the document tokens in chunks of BS,
keeps the running max over tokens of every (row, document) pair in float32 registers, then
sums each query's rows. Inputs must be pre-padded (the dispatcher in `ops.maxsim` does it):
T and K powers of two >= 16 (Triton's dot minimum), N a multiple of BN, S a multiple of BS;
`maxsim_pallas` pads Q to a multiple of BQ itself. Masks are dense int32/float32 arrays;
padding never wins a max (-inf) and padded query tokens weigh 0. A document with no valid
token contributes 0 per query token.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

BLOCK_N = 16  # documents per program
ROWS = 128  # query-token rows per program for float scores: BQ = ROWS // T (codes: BQ = 1)
BLOCK_S = 32  # document tokens per loop step, at most: `block_s` halves it to fit TILE_BYTES
# One loop step's document chunk [BN, BS, K] (for codes, its XOR tile [T, BN * BS, I]) stays
# within this, so that with two pipeline stages it fits Hopper's 227 KiB of shared memory
# (float32 K=128 at BS=32 asked for 274 KiB on an H200) and registers do not spill.
TILE_BYTES = 32 * 1024


def block_s(*, block_n: int, num_t: int, last: int, itemsize: int, binary: bool) -> int:
  """The largest power of two <= BLOCK_S whose step tile fits TILE_BYTES (at least 1); num_t
  counts a program's rows (BQ * T)."""
  per_token = block_n * last * itemsize * (num_t if binary else 1)
  size = BLOCK_S
  while size > 1 and size * per_token > TILE_BYTES:
    size //= 2
  return size


def default_block_q(num_t: int, binary: bool) -> int:
  return 1 if binary else max(1, ROWS // num_t)


def _finish(best_RN: jax.Array, q_mask_R: jax.Array, block_q: int) -> jax.Array:
  """Each query's sum over its T rows of the masked best scores, [BQ, BN]."""
  best_RN = jnp.where(best_RN == -jnp.inf, 0.0, best_RN) * q_mask_R[:, None]
  return jnp.sum(best_RN.reshape(block_q, -1, best_RN.shape[1]), axis=1)


def _dot_scores(q_TK: jax.Array, d_SK: jax.Array) -> jax.Array:
  return jax.lax.dot_general(q_TK, d_SK, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)


def popcount(x: jax.Array) -> jax.Array:
  """Set bits of each uint32, by shifts, masks and one multiply (SWAR): Triton on CUDA does not
  legalise `lax.population_count` (math.ctpop) on tensors."""
  x = x - ((x >> 1) & jnp.uint32(0x55555555))  # 2-bit fields hold their counts
  x = (x & jnp.uint32(0x33333333)) + ((x >> 2) & jnp.uint32(0x33333333))  # 4-bit fields
  x = (x + (x >> 4)) & jnp.uint32(0x0F0F0F0F)  # bytes
  return (x * jnp.uint32(0x01010101)) >> 24  # the top byte sums the four (the multiply wraps mod 2^32)


def _code_scores(q_TI: jax.Array, d_SI: jax.Array, *, dim: int) -> jax.Array:
  hamming_TS = popcount(q_TI[:, None, :] ^ d_SI[None, :, :]).astype(jnp.int32).sum(axis=-1)
  return (dim - 2 * hamming_TS).astype(jnp.float32)


def _kernel(q_ref, q_mask_ref, d_ref, d_mask_ref, out_ref, *, block_s: int, pair_scores):
  """Running max over document-token chunks of pair_scores(q [R, X], d [S, X]) -> [R, S]."""
  block_q, num_t, last = q_ref.shape
  rows = block_q * num_t
  q_RX = q_ref[...].reshape(rows, last)
  block_n, num_tokens, _ = d_ref.shape

  def chunk(c, best_RN):
    s0 = pl.multiple_of(c * block_s, block_s)
    d_SX = d_ref[:, pl.ds(s0, block_s), :].reshape(block_n * block_s, last)
    valid_NS = d_mask_ref[:, pl.ds(s0, block_s)] != 0
    scores_RNS = jnp.where(valid_NS[None], pair_scores(q_RX, d_SX).reshape(rows, block_n, block_s), -jnp.inf)
    return jnp.maximum(best_RN, scores_RNS.max(axis=-1))

  init = jnp.full((rows, block_n), -jnp.inf, jnp.float32)
  best_RN = jax.lax.fori_loop(0, num_tokens // block_s, chunk, init)
  out_ref[...] = _finish(best_RN, q_mask_ref[...].reshape(rows), block_q)


def _check_contract(q, q_mask, d, d_mask, *, block_n: int, block_s: int, dot: bool) -> None:
  """Raises unless the inputs are padded as the kernel needs; otherwise the grid would round
  down and leave outputs unwritten. `ops.maxsim`'s dispatcher pads any shape to this."""
  if q.ndim != 3 or d.ndim != 3 or q.shape[2] != d.shape[2]:
    raise ValueError(f"q, d: expected [Q, T, X] and [N, S, X] with one X, got {q.shape}, {d.shape}")
  (num_q, num_t, last), (num_n, num_s) = q.shape, d.shape[:2]
  if q_mask.shape != (num_q, num_t) or d_mask.shape != (num_n, num_s):
    raise ValueError(f"q_mask, d_mask: expected {(num_q, num_t)}, {(num_n, num_s)}, got {q_mask.shape}, {d_mask.shape}")
  pow2 = lambda n: n >= 16 and n & (n - 1) == 0
  if not pow2(num_t) or (dot and not pow2(last)):
    which = "T and K" if dot else "T"
    raise ValueError(f"q: {which} must be powers of two >= 16 (Triton's dot), got shape {q.shape}; pad with ops.maxsim")
  if block_n < 1 or block_s < 1 or num_n % block_n or num_s % block_s:
    raise ValueError(
      f"d: N={num_n} must be a multiple of block_n={block_n} and S={num_s} of block_s={block_s}; pad with ops.maxsim"
    )


def _call(kernel, q, q_mask, d, d_mask, *, block_q: int, block_n: int, num_warps: int, interpret: bool, name: str):
  """The kernel over a grid of (query blocks, document blocks); Q is padded to a multiple of BQ
  with masked-out queries, whose scores are dropped."""
  if block_q < 1 or block_q & (block_q - 1):
    raise ValueError(f"block_q: expected a power of two >= 1, got {block_q}")
  num_q, num_l, last = q.shape
  num_n, num_s, _ = d.shape
  pad_q = -num_q % block_q
  q = jnp.pad(q, ((0, pad_q), (0, 0), (0, 0)))
  q_mask = jnp.pad(q_mask, ((0, pad_q), (0, 0)))
  out = pl.pallas_call(
    kernel,
    out_shape=jax.ShapeDtypeStruct((num_q + pad_q, num_n), jnp.float32),
    grid=((num_q + pad_q) // block_q, num_n // block_n),
    in_specs=[
      pl.BlockSpec((block_q, num_l, last), lambda i, j: (i, 0, 0)),
      pl.BlockSpec((block_q, num_l), lambda i, j: (i, 0)),
      pl.BlockSpec((block_n, num_s, last), lambda i, j: (j, 0, 0)),
      pl.BlockSpec((block_n, num_s), lambda i, j: (j, 0)),
    ],
    out_specs=pl.BlockSpec((block_q, block_n), lambda i, j: (i, j)),
    compiler_params=pltriton.CompilerParams(num_warps=num_warps, num_stages=2),
    interpret=interpret,
    name=name,
  )(q, q_mask, d, d_mask)
  return out[:num_q]


_STATIC = ("block_q", "block_n", "block_s", "num_warps", "interpret")


@functools.partial(jax.jit, static_argnames=_STATIC)
def maxsim_pallas(
  q_QTK,
  q_mask_QT,
  d_NSK,
  d_mask_NS,
  *,
  block_q: int | None = None,
  block_n: int = BLOCK_N,
  block_s: int | None = None,
  num_warps: int = 4,
  interpret: bool = False,
):
  """scores[q, n] = sum_l q_mask[q, l] max_{s: d_mask[n, s]} <q[q, l], d[n, s]>, float32 [Q, N].

  float32 inputs go through the tensor cores as TF32 (10 mantissa bits, like float16), as XLA's
  own float32 dots do on GPUs by default. None picks `default_block_q` and `block_s(...)`.
  """
  block_q = block_q or default_block_q(q_QTK.shape[1], binary=False)
  if block_s is None:
    block_s = block_s_for(q_QTK, block_q, block_n, binary=False)
  _check_contract(q_QTK, q_mask_QT, d_NSK, d_mask_NS, block_n=block_n, block_s=block_s, dot=True)
  kernel = functools.partial(_kernel, block_s=block_s, pair_scores=_dot_scores)
  return _call(
    kernel,
    q_QTK,
    q_mask_QT,
    d_NSK,
    d_mask_NS,
    block_q=block_q,
    block_n=block_n,
    num_warps=num_warps,
    interpret=interpret,
    name="maxsim",
  )


@functools.partial(jax.jit, static_argnames=("dim", *_STATIC))
def maxsim_binary_pallas(
  q_bits_QTI,
  q_mask_QT,
  d_bits_NSI,
  d_mask_NS,
  *,
  dim: int,
  block_q: int | None = None,
  block_n: int = BLOCK_N,
  block_s: int | None = None,
  num_warps: int = 4,
  interpret: bool = False,
):
  """MaxSim of +-1 codes: <a, b> = dim - 2 popcount(a XOR b), float32 [Q, N]."""
  block_q = block_q or default_block_q(q_bits_QTI.shape[1], binary=True)
  if block_s is None:
    block_s = block_s_for(q_bits_QTI, block_q, block_n, binary=True)
  _check_contract(q_bits_QTI, q_mask_QT, d_bits_NSI, d_mask_NS, block_n=block_n, block_s=block_s, dot=False)
  kernel = functools.partial(_kernel, block_s=block_s, pair_scores=functools.partial(_code_scores, dim=dim))
  return _call(
    kernel,
    q_bits_QTI,
    q_mask_QT,
    d_bits_NSI,
    d_mask_NS,
    block_q=block_q,
    block_n=block_n,
    num_warps=num_warps,
    interpret=interpret,
    name="maxsim_binary",
  )


def block_s_for(q_QTX: jax.Array, block_q: int, block_n: int, *, binary: bool) -> int:
  """`block_s` for these queries at BQ queries per program."""
  _, num_t, last = q_QTX.shape
  return block_s(block_n=block_n, num_t=block_q * num_t, last=last, itemsize=q_QTX.dtype.itemsize, binary=binary)
