"""Rotary position embedding (RoPE) with Llama 3.1 frequency scaling.

Shapes: B batch, T time, H heads, K head dim, A = K/2 rotation angles (frequencies).

Pairing: Meta's interleaved layout, dimensions (2i, 2i+1) rotate together by angle
pos * inv_freq_i. Hugging Face checkpoints use the rotate-half layout (i, i + K/2) and
permute the q/k projection rows to match; `models.transformer.llama_import` undoes that permutation.
"""

from __future__ import annotations

from typing import Annotated

import jax
import jax.numpy as jnp
import numpy as np

from paperjax.ops import checks


@checks.config
class RopeScaling:
  """Llama 3.1's frequency-dependent stretch ("values obtained from grid search"); fields are
  checked for type and range at construction (`ops.checks.config`)."""

  factor: Annotated[float, checks.Range(low=1)] = 8.0
  low_freq_factor: checks.PositiveFloat = 1.0
  high_freq_factor: checks.PositiveFloat = 4.0
  original_max_position: checks.PositiveInt = 8192

  def __post_init__(self):
    if not self.low_freq_factor < self.high_freq_factor:
      raise ValueError(
        "low_freq_factor, high_freq_factor: expected 0 < low < high, got "
        f"{self.low_freq_factor}, {self.high_freq_factor}"
      )


def inv_frequencies(head_dim: int, theta: float = 500_000.0, scaling: RopeScaling | None = None) -> np.ndarray:
  """inv_freq_i = theta^(-2i/K), i < K/2, then the Llama 3.1 bands when `scaling` is set.

  With wavelen = 2 pi / inv_freq, low_wavelen = L / low_freq_factor and
  high_wavelen = L / high_freq_factor (L the original context):
    wavelen < high_wavelen: unchanged (high frequencies);
    wavelen > low_wavelen:  inv_freq / factor (low frequencies);
    otherwise:              (1 - s) inv_freq / factor + s inv_freq,
                            s = (L / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor).
  Computed in float64 on the host (static), returned as float32 [F].
  """
  if not isinstance(head_dim, (int, np.integer)) or isinstance(head_dim, bool) or head_dim <= 0 or head_dim % 2:
    raise ValueError(f"head_dim: expected a positive even int, got {head_dim!r}")
  if isinstance(theta, bool) or not isinstance(theta, (int, float, np.integer, np.floating)) or not theta > 1:
    raise ValueError(f"theta: expected a float > 1, got {theta!r}")  # NaN fails too
  if scaling is not None and not isinstance(scaling, RopeScaling):
    raise TypeError(f"scaling: expected a RopeScaling or None, got {type(scaling).__name__}")
  inv_freq = theta ** (-np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
  if scaling is not None:
    wavelen = 2 * np.pi / inv_freq
    context = scaling.original_max_position
    smooth = (context / wavelen - scaling.low_freq_factor) / (scaling.high_freq_factor - scaling.low_freq_factor)
    blended = (1 - smooth) * inv_freq / scaling.factor + smooth * inv_freq
    inv_freq = np.where(
      wavelen < context / scaling.high_freq_factor,
      inv_freq,
      np.where(wavelen > context / scaling.low_freq_factor, inv_freq / scaling.factor, blended),
    )
  return inv_freq.astype(np.float32)


def apply_rope(x_BTHK: jax.Array, positions_BT: jax.Array, inv_freq_A: jax.Array) -> jax.Array:
  """Rotates each pair (x_2i, x_2i+1) by angle positions[b, t] * inv_freq_i:
  `rotate(x, *tables(positions, inv_freq))`.

  (x_2i, x_2i+1) -> (x_2i cos - x_2i+1 sin, x_2i sin + x_2i+1 cos), in float32, cast back
  to x's dtype. Explicit integer positions make packed documents, decode steps and
  left-padded rows work alike. A model that rotates several tensors at the same positions
  (q and k of every layer) computes `tables` once and calls `rotate`.
  """
  batch, time, head_dim = _check_x(x_BTHK)
  if inv_freq_A.shape != (head_dim // 2,):
    raise ValueError(f"inv_freq_A: expected shape ({head_dim // 2},) for K={head_dim}, got {inv_freq_A.shape}")
  if positions_BT.shape != (batch, time):
    raise ValueError(f"positions_BT: expected shape {(batch, time)}, got {positions_BT.shape}")
  return rotate(x_BTHK, *tables(positions_BT, inv_freq_A))


def tables(positions_BT: jax.Array, inv_freq_A: jax.Array) -> tuple[jax.Array, jax.Array]:
  """cos and sin of angle[b, t, i] = positions[b, t] * inv_freq_i, each [B, T, A] float32."""
  checks.check_array("positions_BT", positions_BT, 2, shape="[B, T]")
  if not jnp.issubdtype(positions_BT.dtype, jnp.integer):
    raise TypeError(f"positions_BT: expected integer positions, got {positions_BT.dtype}")
  checks.check_array("inv_freq_A", inv_freq_A, 1, shape="[A]")
  angle_BTA = positions_BT.astype(jnp.float32)[..., None] * inv_freq_A
  return jnp.cos(angle_BTA), jnp.sin(angle_BTA)


def rotate(x_BTHK: jax.Array, cos_BTA: jax.Array, sin_BTA: jax.Array) -> jax.Array:
  """`apply_rope` from precomputed `tables`: pair (x_2i, x_2i+1) of row [b, t] of every head
  rotated by the angle whose cos and sin are cos_BTA[b, t, i], sin_BTA[b, t, i]."""
  batch, time, head_dim = _check_x(x_BTHK)
  for name, table in (("cos_BTA", cos_BTA), ("sin_BTA", sin_BTA)):
    checks.check_array(name, table, 3, shape="[B, T, A]")
    if not jnp.issubdtype(table.dtype, jnp.floating):
      raise TypeError(f"{name}: expected a floating dtype (rope.tables), got {table.dtype}")
  want = (batch, time, head_dim // 2)
  if cos_BTA.shape != want or sin_BTA.shape != want:
    raise ValueError(
      f"cos_BTA, sin_BTA: expected shape {want} for x of shape {x_BTHK.shape}, got {cos_BTA.shape}, {sin_BTA.shape}"
    )
  cos_BT1A, sin_BT1A = cos_BTA[:, :, None], sin_BTA[:, :, None]
  pairs = x_BTHK.astype(jnp.float32).reshape(*x_BTHK.shape[:-1], head_dim // 2, 2)
  even, odd = pairs[..., 0], pairs[..., 1]
  rotated = jnp.stack([even * cos_BT1A - odd * sin_BT1A, even * sin_BT1A + odd * cos_BT1A], axis=-1)
  return rotated.reshape(x_BTHK.shape).astype(x_BTHK.dtype)


def _check_x(x_BTHK: jax.Array) -> tuple[int, int, int]:
  """x's rank, floating dtype and even head dim; returns B, T, K."""
  checks.check_array("x_BTHK", x_BTHK, 4, shape="[B, T, H, K]")
  if not jnp.issubdtype(x_BTHK.dtype, jnp.floating):
    raise TypeError(f"x_BTHK: expected a floating dtype, got {x_BTHK.dtype}")
  batch, time, _, head_dim = x_BTHK.shape
  if head_dim % 2:
    raise ValueError(f"x_BTHK: expected an even head dim K (pairs rotate together), got shape {x_BTHK.shape}")
  return batch, time, head_dim
