"""Attention over a paged KV cache (PagedAttention, vLLM), and the writes that fill it.

Shapes: B batch rows (sequences), T query time (new tokens), H query heads, G kv heads,
R = H / G query heads per kv head, K head dim, P pages (a pool's pages, or a row's
block-table entries), S slots of a page (its tokens), N page copies.

The pool of one layer is k_pages_GPSK / v_pages_GPSK: kv head g of page p holds the K/V of
S consecutive tokens. Row b's token at position t lives in page block_tables_BP[b, t // S],
slot t % S. The layout keeps one (kv head, page) tile of S x K contiguous, so a program
that serves the R query heads of one kv group loads each page once (the layout of jax's
bundled `pallas.ops.gpu.paged_attention`, so both read the same arrays). A model keeps all
layers' pages in one pool [G, L * P, S, K] and offsets each layer's block tables, so the
kernel reads the pool itself, never a copied slice of it.

  out[b, t, h] = sum_{s <= q_pos[b, t]} softmax_s(q[b, t, h] . k[b, s, h // R] / sqrt(K)) v[b, s, h // R]

where k[b, s] = k_pages[:, block_tables[b, s // S], s % S]. Decode is T = 1 with
q_pos = length - 1; a row of length 0 gets zeros. Scores and softmax are float32. Slots
past a row's length, and pages its table does not name, may hold anything (stale K/V of a
freed sequence, NaN): they are never read into an output.

Three pieces, as in `ops.maxsim`: the jnp reference (gather the pages, mask, GQA attention
from `ops.attention`), a Pallas kernel for decode (`ops.pallas.paged_attention`), and the
dispatcher `paged_attention(impl="auto"|"reference"|"pallas")`.
"""

from __future__ import annotations

from typing import Literal

import jax
import jax.numpy as jnp

from paperjax.ops import attention, checks, pallas
from paperjax.ops.pallas import paged_attention as kernels

Impl = Literal["auto", "reference", "pallas"]


def paged_attention(
  q_BHK: jax.Array,
  k_pages_GPSK: jax.Array,
  v_pages_GPSK: jax.Array,
  block_tables_BP: jax.Array,
  lengths_B: jax.Array,
  *,
  impl: Impl = "auto",
  interpret: bool = False,
  **kernel_options,
) -> jax.Array:
  """Decode attention [B, H, K] (q's dtype): one query per row over its first lengths_B[b] tokens.

  impl="auto" is the Pallas kernel on GPU and the reference elsewhere. `kernel_options` go to
  `ops.pallas.paged_attention.paged_decode`: num_splits (programs per row, flash-decoding
  style), step_pages, num_warps; the defaults are what `bench.gpu_check` measured fastest.

  Value checks (lengths in 0 .. P * S, the page ids a row's length reads in the pool) run on
  concrete inputs, or inside `ops.checks.checked`.
  """
  if not hasattr(q_BHK, "ndim") or q_BHK.ndim != 3:
    raise ValueError(f"q_BHK: expected one query per row, [B, H, K], got shape {getattr(q_BHK, 'shape', q_BHK)}")
  _check(q_BHK[:, None], k_pages_GPSK, v_pages_GPSK, block_tables_BP)
  resolved = pallas.resolve(impl)
  lengths_B = _check_reads(block_tables_BP, lengths_B, k_pages_GPSK.shape[1], k_pages_GPSK.shape[2])
  if resolved == "reference":
    q_B1HK, positions_B1 = q_BHK[:, None], lengths_B[:, None] - 1
    return _reference(q_B1HK, k_pages_GPSK, v_pages_GPSK, block_tables_BP, positions_B1, lengths_B)[:, 0]
  return kernels.paged_decode(
    q_BHK, k_pages_GPSK, v_pages_GPSK, block_tables_BP, lengths_B, interpret=interpret, **kernel_options
  )


def paged_attention_reference(
  q_BTHK: jax.Array,
  k_pages_GPSK: jax.Array,
  v_pages_GPSK: jax.Array,
  block_tables_BP: jax.Array,
  q_positions_BT: jax.Array,
  lengths_B: jax.Array,
) -> jax.Array:
  """Causal attention of T queries per row at positions q_positions_BT over the first
  lengths_B[b] tokens of the row's pages (module equation), [B, T, H, K]: the truth for the
  kernel, and the chunked-prefill path.

  The pages are gathered into a contiguous [B, P * S, G, K] cache, and slots past a row's
  length are zeroed first, so whatever a stale page holds (NaN included) cannot reach the
  output (a masked score has probability 0, but 0 * NaN is NaN). A row of length 0 gets
  zeros. Value checks as in `paged_attention`.
  """
  _check(q_BTHK, k_pages_GPSK, v_pages_GPSK, block_tables_BP)
  checks.check_array("q_positions_BT", q_positions_BT, 2, integer=True, shape="[B, T]")
  if q_positions_BT.shape != q_BTHK.shape[:2]:
    raise ValueError(f"q_positions_BT: expected shape {q_BTHK.shape[:2]}, got {q_positions_BT.shape}")
  lengths_B = _check_reads(block_tables_BP, lengths_B, k_pages_GPSK.shape[1], k_pages_GPSK.shape[2])
  return _reference(q_BTHK, k_pages_GPSK, v_pages_GPSK, block_tables_BP, q_positions_BT, lengths_B)


@jax.jit
def _reference(q_BTHK, k_pages_GPSK, v_pages_GPSK, block_tables_BP, q_positions_BT, lengths_B) -> jax.Array:
  num_g, num_p, num_s, head_dim = k_pages_GPSK.shape
  batch, pages = block_tables_BP.shape
  table_BP = jnp.clip(block_tables_BP, 0, num_p - 1)  # unused entries may be anything

  def gather(pages_GPSK):
    return pages_GPSK[:, table_BP].transpose(1, 2, 3, 0, 4).reshape(batch, pages * num_s, num_g, head_dim)

  slots_S = jnp.arange(pages * num_s)
  written_BS = slots_S[None, :] < lengths_B[:, None]
  visible_BTS = (slots_S[None, None, :] <= q_positions_BT[:, :, None]) & written_BS[:, None, :]
  k_BSGK = jnp.where(written_BS[:, :, None, None], gather(k_pages_GPSK), 0)
  v_BSGK = jnp.where(written_BS[:, :, None, None], gather(v_pages_GPSK), 0)
  return attention.attention(q_BTHK, k_BSGK, v_BSGK, visible_BTS)


def write(
  k_pages: jax.Array,
  v_pages: jax.Array,
  k_BTGK: jax.Array,
  v_BTGK: jax.Array,
  block_tables_BP: jax.Array,
  positions_BT: jax.Array,
  valid_BT: jax.Array,
) -> tuple[jax.Array, jax.Array]:
  """The pools [G, P, S, K] with token t of row b written at position positions_BT[b, t]:
  page block_tables[b, pos // S], slot pos % S; tokens where valid_BT is False are dropped.
  Prefill writes a chunk (T > 1), decode one token (T = 1).

  Value checks (each valid token's position inside its row's table, and the page it lands on
  inside the pool) run on concrete inputs, or inside `ops.checks.checked`; padding is dropped by
  an out-of-range scatter, which checkify's index checks flag, so check a call with padding
  under `checked(..., errors=checkify.user_checks)`."""
  _check_write(k_pages, v_pages, k_BTGK, v_BTGK, block_tables_BP, positions_BT, valid_BT)
  num_p, num_s = k_pages.shape[1], k_pages.shape[2]
  # Clipped here, not by the gather's mode, so checkify's index checks see no read out of range.
  entry_BT = jnp.clip(positions_BT // num_s, 0, block_tables_BP.shape[1] - 1)
  page_BT = jnp.take_along_axis(block_tables_BP, entry_BT, axis=1)
  page_BT = jnp.where(valid_BT, page_BT, num_p)  # out of range: dropped
  slot_BT = positions_BT % num_s
  k_pages = k_pages.at[:, page_BT, slot_BT].set(k_BTGK.transpose(2, 0, 1, 3), mode="drop")
  v_pages = v_pages.at[:, page_BT, slot_BT].set(v_BTGK.transpose(2, 0, 1, 3), mode="drop")
  return k_pages, v_pages


def copy_pages(pool_GPSK: jax.Array, src_N: jax.Array, dst_N: jax.Array, *, layers: int = 1) -> jax.Array:
  """Pages dst_N[i] become copies of src_N[i] (copy-on-write). The pool's P axis may hold
  `layers` consecutive blocks of per-layer pages (a model's [G, L * P, S, K]); the ids are
  per-layer, and the copy is made in every layer.

  Value checks (page ids in 0 .. P / layers - 1) run on concrete inputs, or inside
  `ops.checks.checked`."""
  checks.check_array("pool_GPSK", pool_GPSK, 4, shape="[G, P, S, K]")
  checks.check_array("src_N", src_N, 1, integer=True, shape="[N]")
  checks.check_array("dst_N", dst_N, 1, integer=True, shape="[N]")
  if src_N.shape != dst_N.shape:
    raise ValueError(f"src_N, dst_N: expected equal 1-D shapes, got {src_N.shape}, {dst_N.shape}")
  if not isinstance(layers, int) or isinstance(layers, bool) or layers < 1 or pool_GPSK.shape[1] % layers:
    raise ValueError(f"layers: expected a divisor of the pool's {pool_GPSK.shape[1]} pages, got {layers!r}")
  per_layer = pool_GPSK.shape[1] // layers
  checks.check_in("src_N", src_N, 0, per_layer - 1, what="page ids")
  checks.check_in("dst_N", dst_N, 0, per_layer - 1, what="page ids")
  offsets_L1 = (jnp.arange(layers) * (pool_GPSK.shape[1] // layers))[:, None]
  src, dst = (src_N[None] + offsets_L1).ravel(), (dst_N[None] + offsets_L1).ravel()
  return pool_GPSK.at[:, dst].set(pool_GPSK[:, src])


def _check_reads(block_tables_BP, lengths_B, num_pages: int, page_size: int) -> jax.Array:
  """lengths_B as int32 after checking each is in 0 .. P * S, and that the table entries a row's
  length reads (its first ceil(length / S)) are pages of the pool; later entries may be anything."""
  batch, pages = block_tables_BP.shape
  checks.check_array("lengths_B", lengths_B, 1, integer=True, shape="[B]")
  if lengths_B.shape != (batch,):
    raise ValueError(f"lengths_B: expected shape ({batch},), got {lengths_B.shape}")
  what = f"lengths ({pages} pages of {page_size})"
  checks.check_in("lengths_B", lengths_B, 0, pages * page_size, what=what)
  lengths_B = jnp.asarray(lengths_B, jnp.int32)
  checks.check_in(
    "block_tables_BP", _read_entries(block_tables_BP, lengths_B, page_size), 0, num_pages - 1, what="page ids"
  )
  return lengths_B


def _read_entries(block_tables_BP, lengths_B, page_size: int):
  """The table with the entries no token reads set to 0 (a valid id): numpy when both are
  concrete (an eager check costs no dispatch), jnp in a trace."""
  xp, (tables, lengths) = checks.on_host(block_tables_BP, lengths_B)
  return xp.where(xp.arange(tables.shape[1]) * page_size < lengths[:, None], tables, 0)


def _check_write(k_pages, v_pages, k_BTGK, v_BTGK, block_tables_BP, positions_BT, valid_BT) -> None:
  checks.check_array("k_pages", k_pages, 4, shape="[G, P, S, K]")
  if v_pages.shape != k_pages.shape:
    raise ValueError(f"v_pages: expected the shape of k_pages {k_pages.shape}, got {v_pages.shape}")
  checks.check_array("k_BTGK", k_BTGK, 4, shape="[B, T, G, K]")
  batch, time, groups, head_dim = k_BTGK.shape
  if v_BTGK.shape != k_BTGK.shape:
    raise ValueError(f"v_BTGK: expected the shape of k_BTGK {k_BTGK.shape}, got {v_BTGK.shape}")
  if (groups, head_dim) != (k_pages.shape[0], k_pages.shape[3]):
    raise ValueError(f"k_BTGK: expected [B, T, G={k_pages.shape[0]}, K={k_pages.shape[3]}], got {k_BTGK.shape}")
  checks.check_array("block_tables_BP", block_tables_BP, 2, integer=True, shape="[B, P]")
  checks.check_array("positions_BT", positions_BT, 2, integer=True, shape="[B, T]")
  checks.check_array("valid_BT", valid_BT, 2, shape="[B, T]")
  if block_tables_BP.shape[0] != batch or positions_BT.shape != (batch, time) or valid_BT.shape != (batch, time):
    raise ValueError(
      f"block_tables_BP, positions_BT, valid_BT: expected [B={batch}, P], [{batch}, {time}] twice, got "
      f"{block_tables_BP.shape}, {positions_BT.shape}, {valid_BT.shape}"
    )
  if valid_BT.dtype != jnp.bool_:
    raise TypeError(f"valid_BT: expected a bool mask, got {valid_BT.dtype}")
  num_s = k_pages.shape[2]
  xp, (tables, positions, valid) = checks.on_host(block_tables_BP, positions_BT, valid_BT)
  # Only valid tokens are written: padding may sit anywhere.
  capacity = block_tables_BP.shape[1] * num_s
  checks.check_in("positions_BT", xp.where(valid, positions, 0), 0, capacity - 1, what="positions of valid tokens")
  page_index_BT = xp.clip(positions // num_s, 0, block_tables_BP.shape[1] - 1)
  pages_BT = xp.take_along_axis(tables, page_index_BT, axis=1)
  checks.check_in(
    "block_tables_BP", xp.where(valid, pages_BT, 0), 0, k_pages.shape[1] - 1, what="page ids of valid tokens' pages"
  )


def _check(q_BTHK, k_pages_GPSK, v_pages_GPSK, block_tables_BP) -> None:
  if q_BTHK.ndim != 4 or k_pages_GPSK.ndim != 4:
    raise ValueError(
      f"q, k_pages_GPSK: expected ranks 4 ([B, T, H, K], [G, P, S, K]), got {q_BTHK.shape}, {k_pages_GPSK.shape}"
    )
  if k_pages_GPSK.shape != v_pages_GPSK.shape:
    raise ValueError(f"v_pages_GPSK: expected the shape of k_pages_GPSK {k_pages_GPSK.shape}, got {v_pages_GPSK.shape}")
  heads, head_dim, groups = q_BTHK.shape[2], q_BTHK.shape[3], k_pages_GPSK.shape[0]
  if k_pages_GPSK.shape[3] != head_dim or heads % groups:
    raise ValueError(
      f"k_pages_GPSK: expected [G, P, S, K={head_dim}] with H={heads} a multiple of G, got {k_pages_GPSK.shape}"
    )
  if q_BTHK.dtype != k_pages_GPSK.dtype or k_pages_GPSK.dtype != v_pages_GPSK.dtype:
    raise TypeError(
      f"q, k_pages, v_pages: expected one dtype, got {q_BTHK.dtype}, {k_pages_GPSK.dtype}, {v_pages_GPSK.dtype}"
    )
  if not jnp.issubdtype(q_BTHK.dtype, jnp.floating):
    raise TypeError(f"q, k_pages, v_pages: expected a floating dtype, got {q_BTHK.dtype}")
  if not hasattr(block_tables_BP, "dtype") or block_tables_BP.dtype != jnp.int32:
    got = getattr(block_tables_BP, "dtype", type(block_tables_BP).__name__)
    raise TypeError(f"block_tables_BP: expected int32 page ids, got {got}")
  if block_tables_BP.ndim != 2 or block_tables_BP.shape[0] != q_BTHK.shape[0]:
    raise ValueError(f"block_tables_BP: expected int32 [B={q_BTHK.shape[0]}, P], got shape {block_tables_BP.shape}")
