"""Grouped-query attention with causal, document and key-length masks.

Shapes: B batch, T query time, S key time, H query heads, G kv heads (H % G == 0),
K head dim, R = H / G query heads per kv head, Q = R * T query rows of one kv head.

  out[b, t, h] = sum_s softmax_s(q[b, t, h] . k[b, s, h // R] / sqrt(K) + mask) v[b, s, h // R]

Query head h reads kv head h // R (Llama 3: G = 8; MHA is G = H, MQA is G = 1). Scores and
softmax are float32 whatever the input dtype. Masked scores get the float32 minimum rather
than -inf, so a query with no visible key (a padding row) yields a finite average instead
of NaN; such rows are the caller's to ignore.
"""

from __future__ import annotations

from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np

from paperjax.ops import checks

Impl = Literal["reference", "xla"]


def make_mask(
  q_index_BT: jax.Array,
  kv_index_BS: jax.Array,
  *,
  causal: bool = True,
  q_segment_ids_BT: jax.Array | None = None,
  kv_segment_ids_BS: jax.Array | None = None,
  kv_length_B: jax.Array | None = None,
) -> jax.Array:
  """mask[b, t, s] = True where query t may attend key s:

  causal:    kv_index[b, s] <= q_index[b, t]   (indices are sequence slots / positions)
  document:  q_segment[b, t] == kv_segment[b, s]
  length:    s < kv_length[b]                   (valid cache entries)

  Value checks (kv_length_B in 0 .. S) run on concrete inputs, or inside `ops.checks.checked`.
  """
  checks.check_array("q_index_BT", q_index_BT, 2, shape="[B, T]")
  checks.check_array("kv_index_BS", kv_index_BS, 2, shape="[B, S]")
  if not isinstance(causal, (bool, np.bool_)):  # a string or an int would read as truthy
    raise TypeError(f"causal: expected a bool, got {type(causal).__name__} {causal!r}")
  batch, time, kv_time = q_index_BT.shape[0], q_index_BT.shape[1], kv_index_BS.shape[1]
  if kv_index_BS.shape[0] != batch:
    raise ValueError(f"kv_index_BS: expected batch {batch} like q_index_BT, got shape {kv_index_BS.shape}")
  for name, x, shape in (
    ("q_segment_ids_BT", q_segment_ids_BT, (batch, time)),
    ("kv_segment_ids_BS", kv_segment_ids_BS, (batch, kv_time)),
  ):
    if x is not None:
      checks.check_array(name, x, 2, shape=f"[{'B, T' if name.startswith('q') else 'B, S'}]")
    if x is not None and tuple(x.shape) != shape:
      raise ValueError(f"{name}: expected shape {shape}, got {tuple(x.shape)}")
  if kv_length_B is not None:
    checks.check_lengths(kv_length_B, batch, kv_time, name="kv_length_B", low=0)
  mask_BTS = jnp.ones((q_index_BT.shape[0], q_index_BT.shape[1], kv_index_BS.shape[1]), bool)
  if causal:
    mask_BTS &= kv_index_BS[:, None, :] <= q_index_BT[:, :, None]
  if (q_segment_ids_BT is None) != (kv_segment_ids_BS is None):
    raise ValueError("q_segment_ids_BT, kv_segment_ids_BS: give both or neither")
  if q_segment_ids_BT is not None and kv_segment_ids_BS is not None:
    mask_BTS &= q_segment_ids_BT[:, :, None] == kv_segment_ids_BS[:, None, :]
  if kv_length_B is not None:
    mask_BTS &= jnp.arange(kv_index_BS.shape[1])[None, None, :] < kv_length_B[:, None, None]
  return mask_BTS


def attention(
  q_BTHK: jax.Array,
  k_BSGK: jax.Array,
  v_BSGK: jax.Array,
  mask_BTS: jax.Array | None = None,
  *,
  impl: Impl = "reference",
) -> jax.Array:
  """Grouped-query attention (module equation); returns [B, T, H, K] in q's dtype.

  impl="reference": explicit einsums over each kv head's Q = R * T query rows.
  impl="xla": `jax.nn.dot_product_attention` (XLA's fused path; the same numbers).
  """
  _check(q_BTHK, k_BSGK, v_BSGK, mask_BTS)
  if impl not in ("reference", "xla"):
    raise ValueError(f"impl: expected 'reference' or 'xla', got {impl!r}")
  if impl == "xla":
    mask = None if mask_BTS is None else mask_BTS[:, None, :, :]
    return jax.nn.dot_product_attention(q_BTHK, k_BSGK, v_BSGK, mask=mask, implementation="xla")
  batch, time, heads, head_dim = q_BTHK.shape
  kv_time, groups = k_BSGK.shape[1:3]
  r = heads // groups
  # A kv head's R query heads and T times are one axis of Q = R * T rows, so both einsums and
  # their gradients are batched matmuls over (b, g) with one contracting axis (ops.dense's module
  # docstring says why XLA:CPU wants that).
  q_BGQK = (
    q_BTHK.reshape(batch, time, groups, r, head_dim).transpose(0, 2, 3, 1, 4).reshape(batch, groups, r * time, head_dim)
  )
  k_BGSK, v_BGSK = k_BSGK.transpose(0, 2, 1, 3), v_BSGK.transpose(0, 2, 1, 3)
  scores_BGQS = jnp.einsum("bgqk,bgsk->bgqs", q_BGQK, k_BGSK, preferred_element_type=jnp.float32) * (head_dim**-0.5)
  if mask_BTS is not None:
    scores_BGRTS = scores_BGQS.reshape(batch, groups, r, time, kv_time)
    scores_BGRTS = jnp.where(mask_BTS[:, None, None], scores_BGRTS, jnp.finfo(jnp.float32).min)
    scores_BGQS = scores_BGRTS.reshape(scores_BGQS.shape)
  probs_BGQS = jax.nn.softmax(scores_BGQS, axis=-1)
  out_BGQK = jnp.einsum("bgqs,bgsk->bgqk", probs_BGQS.astype(v_BSGK.dtype), v_BGSK, preferred_element_type=jnp.float32)
  out_BTGRK = out_BGQK.reshape(batch, groups, r, time, head_dim).transpose(0, 3, 1, 2, 4)
  return out_BTGRK.reshape(q_BTHK.shape).astype(q_BTHK.dtype)


def window_mask(q_positions_BT: jax.Array, k_positions_BS: jax.Array, window: int) -> jax.Array:
  """mask[b, t, s] = True where q_pos - window < k_pos <= q_pos and k_pos >= 0.

  A negative key position marks an empty slot (a window not yet full, left padding).
  """
  if not isinstance(window, (int, np.integer)) or isinstance(window, bool) or window < 1:
    raise ValueError(f"window: expected an int >= 1, got {window!r}")
  checks.check_array("q_positions_BT", q_positions_BT, 2, shape="[B, T]")
  checks.check_array("k_positions_BS", k_positions_BS, 2, shape="[B, S]")
  q_BT1, k_B1S = q_positions_BT[:, :, None], k_positions_BS[:, None, :]
  return (k_B1S <= q_BT1) & (k_B1S > q_BT1 - window) & (k_B1S >= 0)


def sliding_window_attention(
  q_BTHK: jax.Array,
  k_BSGK: jax.Array,
  v_BSGK: jax.Array,
  window: int,
  *,
  q_positions_BT: jax.Array | None = None,
  k_positions_BS: jax.Array | None = None,
  impl: Impl = "reference",
) -> jax.Array:
  """Causal softmax attention over the last `window` positions: keys with
  q_pos - window < k_pos <= q_pos (`window_mask`).

  Positions default to 0 .. T-1 for queries and 0 .. S-1 for keys (a parallel pass over one
  sequence, S = T); a decoder passes its window cache's positions followed by the new ones.
  """
  batch, time, kv_time = q_BTHK.shape[0], q_BTHK.shape[1], k_BSGK.shape[1]
  if q_positions_BT is None:
    q_positions_BT = jnp.broadcast_to(jnp.arange(time), (batch, time))
  if k_positions_BS is None:
    k_positions_BS = jnp.broadcast_to(jnp.arange(kv_time), (batch, kv_time))
  checks.check_array("q_positions_BT", q_positions_BT, 2, shape="[B, T]")
  checks.check_array("k_positions_BS", k_positions_BS, 2, shape="[B, S]")
  if q_positions_BT.shape != (batch, time) or k_positions_BS.shape != (batch, kv_time):
    raise ValueError(
      f"q_positions_BT, k_positions_BS: expected shapes {(batch, time)}, {(batch, kv_time)}, "
      f"got {q_positions_BT.shape}, {k_positions_BS.shape}"
    )
  return attention(q_BTHK, k_BSGK, v_BSGK, window_mask(q_positions_BT, k_positions_BS, window), impl=impl)


def _check(q_BTHK, k_BSGK, v_BSGK, mask_BTS) -> None:
  for name, x in (("q_BTHK", q_BTHK), ("k_BSGK", k_BSGK), ("v_BSGK", v_BSGK)):
    if not hasattr(x, "ndim") or not hasattr(x, "dtype"):
      raise TypeError(f"{name}: expected an array (jnp.asarray(...)), got {type(x).__name__}")
  if q_BTHK.ndim != 4 or k_BSGK.ndim != 4:
    raise ValueError(f"q_BTHK, k_BSGK: expected rank 4, got shapes {q_BTHK.shape}, {k_BSGK.shape}")
  if k_BSGK.shape != v_BSGK.shape:
    raise ValueError(f"v_BSGK: expected the shape of k_BSGK {k_BSGK.shape}, got {v_BSGK.shape}")
  batch, _, heads, head_dim = q_BTHK.shape
  kv_batch, kv_time, groups, kv_dim = k_BSGK.shape
  if (kv_batch, kv_dim) != (batch, head_dim):
    raise ValueError(f"k_BSGK: expected batch {batch} and head dim {head_dim}, got shape {k_BSGK.shape}")
  if groups == 0 or heads % groups:
    raise ValueError(f"q_BTHK, k_BSGK: query heads H={heads} must be a multiple of kv heads G={groups}")
  if q_BTHK.dtype != k_BSGK.dtype or k_BSGK.dtype != v_BSGK.dtype:
    raise TypeError(f"q, k, v: expected one dtype, got {q_BTHK.dtype}, {k_BSGK.dtype}, {v_BSGK.dtype}")
  if not jnp.issubdtype(q_BTHK.dtype, jnp.floating):
    raise TypeError(f"q_BTHK: expected a floating dtype, got {q_BTHK.dtype}")
  if mask_BTS is not None:
    checks.check_array("mask_BTS", mask_BTS, 3, shape="[B, T, S]")
  if mask_BTS is not None and mask_BTS.shape != (batch, q_BTHK.shape[1], kv_time):
    raise ValueError(f"mask_BTS: expected shape {(batch, q_BTHK.shape[1], kv_time)}, got {mask_BTS.shape}")
  if mask_BTS is not None and mask_BTS.dtype != jnp.bool_:
    # An additive float mask (0 / -inf) would read as "True" wherever it is -inf: the mask inverted.
    raise TypeError(f"mask_BTS: expected a bool mask (True where a query may attend), got {mask_BTS.dtype}")
