"""Late interaction (ColBERT MaxSim), tensor arrays, binary codes and reranking.

Shapes: Q queries, T query tokens, N documents, S document tokens, K embedding dim,
I = ceil(K / 32) packed uint32 words, X the last dim of either form (K or I), Z passages,
C shortlist candidates, B a block of documents.

  score[q, n] = sum_{l : q_mask[q, l]} max_{s : d_mask[n, s]} <q[q, l], d[n, s]>

Padded document tokens never win the max and padded query tokens add nothing; a
document with no valid token adds 0 per query token. Dot products accumulate in float32
for float32/bfloat16/float16 inputs.

Every scorer has a jnp reference (`*_reference`, the CPU path and the truth for tests)
and a Pallas kernel (`ops.pallas.maxsim`) behind one dispatcher: impl="auto" picks the
kernel on GPU and the reference elsewhere.

Binary codes (Infinity): each coordinate becomes its sign bit (x > 0 -> 1, else 0), packed
32 per uint32 word, 1/32 of float32 storage; for the +-1 vectors they stand for,
<a, b> = K - 2 * hamming(a, b), computed with XOR + popcount.
"""

from __future__ import annotations

import functools
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np

from paperjax.ops import checks, pallas
from paperjax.ops.pallas import maxsim as kernels

Impl = Literal["auto", "reference", "pallas"]
_FLOATS = (jnp.float32, jnp.bfloat16, jnp.float16)
_REFERENCE_BLOCK_BYTES = 256 * 2**20  # bound on the [Q, block, T, S] score tensor


def maxsim(
  q_QTK: jax.Array,
  d_NSK: jax.Array,
  *,
  q_mask_QT: jax.Array | None = None,
  d_mask_NS: jax.Array | None = None,
  d_lengths_N: jax.Array | None = None,
  normalize: bool = False,
  impl: Impl = "auto",
  interpret: bool = False,
  **kernel_options,
) -> jax.Array:
  """MaxSim scores float32 [Q, N] (module equation).

  Args:
    q_QTK, d_NSK: query and document token embeddings (float32/bfloat16/float16).
    q_mask_QT: True at real query tokens (default all).
    d_mask_NS or d_lengths_N: real document tokens, as a mask or as prefix lengths.
    normalize: L2-normalise every token vector first (cosine, as ColBERT does).
    impl: "auto" | "reference" | "pallas".
    interpret: run the Pallas kernel in interpret mode (CPU testing).
    kernel_options: the kernel's tiling (`ops.pallas.maxsim.maxsim_pallas`: block_q, block_n,
      block_s, num_warps); the defaults are what `bench.gpu_check` measured fastest.

  Value checks (d_lengths_N in 0 .. S) run on concrete inputs, or inside `ops.checks.checked`.
  """
  _check_float(q_QTK, d_NSK)
  pallas.resolve(impl)
  q_mask_QT, d_mask_NS = _masks(q_QTK, d_NSK, q_mask_QT, d_mask_NS, d_lengths_N)
  if normalize:
    q_QTK, d_NSK = _l2_normalize(q_QTK), _l2_normalize(d_NSK)
  if pallas.resolve(impl) == "reference":
    return maxsim_reference(q_QTK, q_mask_QT, d_NSK, d_mask_NS)
  q, qm, d, dm, n = _pad_for_kernel(q_QTK, q_mask_QT, d_NSK, d_mask_NS, last_multiple=16, **_blocks(kernel_options))
  return kernels.maxsim_pallas(q, qm, d, dm, interpret=interpret, **kernel_options)[:, :n]


def maxsim_binary(
  q_bits_QTI: jax.Array,
  d_bits_NSI: jax.Array,
  dim: int,
  *,
  q_mask_QT: jax.Array | None = None,
  d_mask_NS: jax.Array | None = None,
  d_lengths_N: jax.Array | None = None,
  impl: Impl = "auto",
  interpret: bool = False,
  **kernel_options,
) -> jax.Array:
  """MaxSim of packed sign codes (`pack_bits`) of `dim`-dimensional vectors, float32 [Q, N].

  Equals `maxsim` of the +-1 vectors the codes stand for, exactly. Arguments and value checks
  as in `maxsim`.
  """
  for name, x in (("q_bits_QTI", q_bits_QTI), ("d_bits_NSI", d_bits_NSI)):
    if not hasattr(x, "dtype") or x.dtype != jnp.uint32 or x.ndim != 3:
      raise TypeError(
        f"{name}: expected uint32 codes of rank 3 (from pack_bits), got {getattr(x, 'dtype', type(x).__name__)} "
        f"{getattr(x, 'shape', '')}"
      )
  if not isinstance(dim, (int, np.integer)) or isinstance(dim, bool) or dim < 1:
    raise ValueError(f"dim: expected the embedding dim, an int >= 1, got {dim!r}")
  pallas.resolve(impl)
  words = -(-dim // 32)
  if q_bits_QTI.shape[2] != words or d_bits_NSI.shape[2] != words:
    raise ValueError(
      f"dim: {dim} needs {words} words per token, got q {q_bits_QTI.shape[2]} and d {d_bits_NSI.shape[2]}"
    )
  q_mask_QT, d_mask_NS = _masks(q_bits_QTI, d_bits_NSI, q_mask_QT, d_mask_NS, d_lengths_N)
  if pallas.resolve(impl) == "reference":
    return maxsim_binary_reference(q_bits_QTI, q_mask_QT, d_bits_NSI, d_mask_NS, dim)
  q, qm, d, dm, n = _pad_for_kernel(
    q_bits_QTI, q_mask_QT, d_bits_NSI, d_mask_NS, last_multiple=1, **_blocks(kernel_options)
  )
  return kernels.maxsim_binary_pallas(q, qm, d, dm, dim=dim, interpret=interpret, **kernel_options)[:, :n]


def maxsim_reference(q_QTK, q_mask_QT, d_NSK, d_mask_NS) -> jax.Array:
  """The jnp truth for `kernels.maxsim_pallas` (same signature): einsum, mask, max, sum.

  Documents go through in blocks (lax.map) so the [Q, block, T, S] scores stay bounded.
  """
  return _blocked_reference(q_QTK, q_mask_QT, d_NSK, d_mask_NS, None)


def maxsim_binary_reference(q_bits_QTI, q_mask_QT, d_bits_NSI, d_mask_NS, dim: int) -> jax.Array:
  """The jnp truth for `kernels.maxsim_binary_pallas`: dim - 2 popcount(XOR), then MaxSim."""
  return _blocked_reference(q_bits_QTI, q_mask_QT, d_bits_NSI, d_mask_NS, dim)


def _token_scores(q_QTX, d_BSX, dim: int | None) -> jax.Array:
  """[Q, T, B, S] token-pair scores: float dot products, or dim - 2 hamming for codes."""
  num_q, num_l, last = q_QTX.shape
  num_b, num_s, _ = d_BSX.shape
  if dim is None:  # one 2-D matmul: the fastest form for XLA's CPU and GPU dots
    scores = jax.lax.dot_general(
      q_QTX.reshape(num_q * num_l, last),
      d_BSX.reshape(num_b * num_s, last),
      (((1,), (1,)), ((), ())),
      preferred_element_type=jnp.float32,
    )
    return scores.reshape(num_q, num_l, num_b, num_s)
  xor = q_QTX[:, :, None, None, :] ^ d_BSX[None, None, :, :, :]
  hamming = jax.lax.population_count(xor).astype(jnp.int32).sum(axis=-1)
  return (dim - 2 * hamming).astype(jnp.float32)


@functools.partial(jax.jit, static_argnums=4)
def _blocked_reference(q_QTX, q_mask_QT, d_NSX, d_mask_NS, dim):
  num_q, num_l, _ = q_QTX.shape
  num_n, num_s = d_mask_NS.shape
  block = int(max(1, min(num_n, _REFERENCE_BLOCK_BYTES // (4 * num_q * num_l * max(num_s, 1)))))
  pad = -num_n % block
  d_NSX = jnp.pad(d_NSX, ((0, pad), (0, 0), (0, 0)))
  d_mask_NS = jnp.pad(d_mask_NS, ((0, pad), (0, 0)))

  def one_block(args):
    d_BSX, mask_BS = args
    bias_BS = jnp.where(mask_BS, 0.0, -jnp.inf)  # padding never wins the max
    best_QTB = (_token_scores(q_QTX, d_BSX, dim) + bias_BS).max(axis=-1, initial=-jnp.inf)
    best_QTB = jnp.where(best_QTB == -jnp.inf, 0.0, best_QTB)
    return jnp.einsum("qlb,ql->qb", best_QTB, q_mask_QT.astype(jnp.float32))

  blocks = (d_NSX.reshape(-1, block, *d_NSX.shape[1:]), d_mask_NS.reshape(-1, block, num_s))
  scores_per_block = jax.lax.map(one_block, blocks)
  return scores_per_block.transpose(1, 0, 2).reshape(num_q, -1)[:, :num_n]


def pack_bits(x_K: jax.Array) -> jax.Array:
  """Sign bits of the last axis packed into uint32 words: [..., K] -> [..., ceil(K/32)].

  Bit j of word w is 1 iff x[..., 32 w + j] > 0 (zero counts as negative); the padding
  bits of the last word are 0 in every code, so they never add to a Hamming distance.

  Value checks (no NaN: it would pack as a negative coordinate) run on concrete inputs, or
  inside `ops.checks.checked`.
  """
  if not hasattr(x_K, "dtype") or not jnp.issubdtype(x_K.dtype, jnp.floating) or x_K.ndim < 1:
    raise TypeError(f"x_K: expected float embeddings [..., K], got {getattr(x_K, 'dtype', type(x_K).__name__)}")
  xp, (x,) = checks.on_host(x_K)
  checks.check_values("x_K", x, xp.isnan, "values that are not NaN")
  dim = x_K.shape[-1]
  bits = jnp.pad(x_K > 0, [(0, 0)] * (x_K.ndim - 1) + [(0, -dim % 32)])
  bits = bits.reshape(*x_K.shape[:-1], -1, 32).astype(jnp.uint32)
  return jnp.sum(bits << jnp.arange(32, dtype=jnp.uint32), axis=-1, dtype=jnp.uint32)


def storage_bytes(x: jax.Array | np.ndarray) -> int:
  """Bytes an embedding array occupies (float: K * itemsize per token; codes: 4 * I)."""
  return int(np.prod(x.shape)) * jnp.dtype(x.dtype).itemsize


def tensor_array_maxsim(
  q_QTK: jax.Array,
  passages_ZSK: jax.Array,
  passage_doc_Z: jax.Array,
  num_docs: int,
  *,
  q_mask_QT: jax.Array | None = None,
  p_mask_ZS: jax.Array | None = None,
  p_lengths_Z: jax.Array | None = None,
  normalize: bool = False,
  impl: Impl = "auto",
) -> jax.Array:
  """Long documents as tensor arrays: score[q, n] = max over n's passages of MaxSim, [Q, num_docs].

  Passages of all documents sit in one [Z, S, K] array; passage_doc_Z[p] names the
  document of passage p (any order, ragged counts). A document without passages scores -inf.

  Value checks (passage_doc_Z in 0 .. num_docs - 1, and those of `maxsim`) run on concrete
  inputs, or inside `ops.checks.checked`.
  """
  _check_float(q_QTK, passages_ZSK, names=("q_QTK", "passages_ZSK"))
  checks.check_array("passage_doc_Z", passage_doc_Z, 1, integer=True, shape="[Z]")
  if passage_doc_Z.shape != passages_ZSK.shape[:1]:
    raise ValueError(f"passage_doc_Z: expected shape ({passages_ZSK.shape[0]},), got {passage_doc_Z.shape}")
  if not isinstance(num_docs, (int, np.integer)) or isinstance(num_docs, bool) or num_docs < 1:
    raise ValueError(f"num_docs: expected an int >= 1, got {num_docs!r}")
  checks.check_in("passage_doc_Z", passage_doc_Z, 0, num_docs - 1, what="document ids")
  scores_QZ = maxsim(
    q_QTK,
    passages_ZSK,
    q_mask_QT=q_mask_QT,
    d_mask_NS=p_mask_ZS,
    d_lengths_N=p_lengths_Z,
    normalize=normalize,
    impl=impl,
  )
  return jax.ops.segment_max(scores_QZ.T, passage_doc_Z, num_segments=num_docs).T


def top_k(scores_QN: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
  """The k best documents per query: (scores [Q, k] descending, indices [Q, k]); ties -> lower index."""
  checks.check_array("scores_QN", scores_QN, 2, shape="[Q, N]")
  if not isinstance(k, (int, np.integer)) or isinstance(k, bool) or not 1 <= k <= scores_QN.shape[1]:
    raise ValueError(f"k: expected an int, 1 <= k <= N={scores_QN.shape[1]}, got {k!r}")
  values_Qk, indices_Qk = jax.lax.top_k(scores_QN, k)
  return values_Qk, indices_Qk


def rerank(
  q_QTK: jax.Array,
  d_NSK: jax.Array,
  k: int,
  *,
  q_mask_QT: jax.Array | None = None,
  d_mask_NS: jax.Array | None = None,
  dim: int | None = None,
  impl: Impl = "auto",
) -> tuple[jax.Array, jax.Array]:
  """Top-k documents by MaxSim; uint32 inputs are binary codes of `dim`-dim vectors. Value checks
  as in `maxsim`."""
  if getattr(d_NSK, "dtype", None) == jnp.uint32:
    if dim is None:
      raise ValueError("dim: binary codes need the original embedding dim")
    scores = maxsim_binary(q_QTK, d_NSK, dim, q_mask_QT=q_mask_QT, d_mask_NS=d_mask_NS, impl=impl)
  else:
    scores = maxsim(q_QTK, d_NSK, q_mask_QT=q_mask_QT, d_mask_NS=d_mask_NS, impl=impl)
  return top_k(scores, k)


def two_stage_rerank(
  q_QTK: jax.Array,
  d_NSK: jax.Array,
  k: int,
  shortlist: int,
  *,
  q_mask_QT: jax.Array | None = None,
  d_mask_NS: jax.Array | None = None,
  d_bits_NSI: jax.Array | None = None,
  impl: Impl = "auto",
) -> tuple[jax.Array, jax.Array]:
  """Binary MaxSim keeps `shortlist` candidates per query; float MaxSim ranks those.

  Returns (scores [Q, k], document indices [Q, k]). Pass precomputed `d_bits_NSI`
  (`pack_bits(d_NSK)`) to avoid re-packing the collection. Value checks as in `pack_bits`
  (when it packs here).
  """
  _check_float(q_QTK, d_NSK)
  num_n, dim = d_NSK.shape[0], d_NSK.shape[-1]
  ints = all(isinstance(x, (int, np.integer)) and not isinstance(x, bool) for x in (k, shortlist))
  if not ints or not 1 <= k <= shortlist <= num_n:
    raise ValueError(f"k, shortlist: expected ints, 1 <= k <= shortlist <= N={num_n}, got {k!r}, {shortlist!r}")
  words = -(-dim // 32)
  if d_bits_NSI is not None and tuple(getattr(d_bits_NSI, "shape", ())) != (*d_NSK.shape[:2], words):
    raise ValueError(
      f"d_bits_NSI: expected pack_bits(d_NSK) of shape {(*d_NSK.shape[:2], words)}, got "
      f"{getattr(d_bits_NSI, 'shape', type(d_bits_NSI).__name__)}"
    )
  q_mask_QT, d_mask_NS = _masks(q_QTK, d_NSK, q_mask_QT, d_mask_NS, None)
  d_bits_NSI = pack_bits(d_NSK) if d_bits_NSI is None else d_bits_NSI
  _, cand_QC = rerank(
    pack_bits(q_QTK), d_bits_NSI, shortlist, q_mask_QT=q_mask_QT, d_mask_NS=d_mask_NS, dim=dim, impl=impl
  )

  def one_query(q_TK, q_mask_T, cand_C):
    return maxsim(q_TK[None], d_NSK[cand_C], q_mask_QT=q_mask_T[None], d_mask_NS=d_mask_NS[cand_C], impl="reference")[0]

  scores_QC = jax.vmap(one_query)(q_QTK, q_mask_QT, cand_QC)
  best_scores, best_c = top_k(scores_QC, k)
  return best_scores, jnp.take_along_axis(cand_QC, best_c, axis=1)


def _l2_normalize(x: jax.Array) -> jax.Array:
  x32 = x.astype(jnp.float32)
  return (x32 * jax.lax.rsqrt(jnp.maximum(jnp.sum(x32 * x32, axis=-1, keepdims=True), 1e-12))).astype(x.dtype)


def _check_float(q_QTK, d_NSK, names: tuple[str, str] = ("q_QTK", "d_NSK")) -> None:
  q, d = names
  for name, x in zip(names, (q_QTK, d_NSK)):
    if not hasattr(x, "ndim") or not hasattr(x, "dtype"):
      raise TypeError(f"{name}: expected an array (jnp.asarray(...)), got {type(x).__name__}")
  if q_QTK.ndim != 3 or d_NSK.ndim != 3:
    raise ValueError(f"{q}, {d}: expected rank 3, got shapes {q_QTK.shape}, {d_NSK.shape}")
  if q_QTK.shape[2] != d_NSK.shape[2]:
    raise ValueError(f"{d}: expected dim K={q_QTK.shape[2]} like {q}, got {d_NSK.shape[2]}")
  if q_QTK.dtype not in _FLOATS or d_NSK.dtype != q_QTK.dtype:
    raise TypeError(f"{q}, {d}: expected one dtype of float32/bfloat16/float16, got {q_QTK.dtype}, {d_NSK.dtype}")


def _masks(q, d, q_mask_QT, d_mask_NS, d_lengths_N):
  # Masks are bool (or 0/1 integers); a float mask may be an additive one (0 / -inf), which
  # would read as True wherever it is -inf.
  for name, mask in (("q_mask_QT", q_mask_QT), ("d_mask_NS", d_mask_NS)):
    if mask is not None and not (
      hasattr(mask, "dtype") and (mask.dtype == bool or jnp.issubdtype(mask.dtype, jnp.integer))
    ):
      raise TypeError(f"{name}: expected a bool mask, got {getattr(mask, 'dtype', type(mask).__name__)}")
  if q_mask_QT is None:
    q_mask_QT = jnp.ones(q.shape[:2], bool)
  elif q_mask_QT.shape != q.shape[:2]:
    raise ValueError(f"q_mask_QT: expected shape {q.shape[:2]}, got {q_mask_QT.shape}")
  if d_mask_NS is not None and d_lengths_N is not None:
    raise ValueError("d_mask_NS, d_lengths_N: give one or neither")
  if d_lengths_N is not None:
    d_lengths_N = checks.check_lengths(d_lengths_N, d.shape[0], d.shape[1], name="d_lengths_N", low=0)
    d_mask_NS = jnp.arange(d.shape[1])[None, :] < d_lengths_N[:, None]
  elif d_mask_NS is None:
    d_mask_NS = jnp.ones(d.shape[:2], bool)
  elif d_mask_NS.shape != d.shape[:2]:
    raise ValueError(f"d_mask_NS: expected shape {d.shape[:2]}, got {d_mask_NS.shape}")
  return q_mask_QT.astype(bool), d_mask_NS.astype(bool)


def _blocks(kernel_options: dict) -> dict:
  """The document tiling a kernel call asks for, which the padding must match."""
  return {
    "block_n": kernel_options.get("block_n") or kernels.BLOCK_N,
    "block_s": kernel_options.get("block_s") or kernels.BLOCK_S,
  }


def _next_pow2(n: int, minimum: int) -> int:
  return max(minimum, 1 << (max(n, 1) - 1).bit_length())


def _pad_for_kernel(
  q, q_mask, d, d_mask, *, last_multiple: int, block_n: int = kernels.BLOCK_N, block_s: int = kernels.BLOCK_S
):
  """Pads to the kernel's contract: T, last dim powers of two, N % block_n == 0, S % block_s == 0."""
  num_l, last = q.shape[1], q.shape[2]
  num_n, num_s = d.shape[:2]
  pad_l = _next_pow2(num_l, 16) - num_l
  pad_last = _next_pow2(last, last_multiple) - last
  pad_n, pad_s = -num_n % block_n, -num_s % block_s
  q = jnp.pad(q, ((0, 0), (0, pad_l), (0, pad_last)))
  q_mask = jnp.pad(q_mask.astype(jnp.float32), ((0, 0), (0, pad_l)))
  d = jnp.pad(d, ((0, pad_n), (0, pad_s), (0, pad_last)))
  d_mask = jnp.pad(d_mask.astype(jnp.int32), ((0, pad_n), (0, pad_s)))
  return q, q_mask, d, d_mask, num_n
