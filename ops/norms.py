"""Normalisation layers. Shapes: B batch, T time (any leading axes), D model width."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from paperjax.ops import checks


def rms_norm(x_BTD: jax.Array, scale_D: jax.Array, eps: float = 1e-5) -> jax.Array:
  """RMSNorm(x) = x / sqrt(mean(x^2) + eps) * g, computed in float32, cast back to x's dtype."""
  if not hasattr(x_BTD, "dtype") or x_BTD.ndim < 1 or not jnp.issubdtype(x_BTD.dtype, jnp.floating):
    raise TypeError(f"x_BTD: expected a float array [..., D], got {getattr(x_BTD, 'dtype', type(x_BTD).__name__)}")
  checks.check_array("scale_D", scale_D, 1, shape="[D]")
  if scale_D.shape != x_BTD.shape[-1:]:
    raise ValueError(f"scale_D: expected shape {x_BTD.shape[-1:]}, got {scale_D.shape}")
  checks.check_scalar("eps", eps, checks.Range(low=0, low_open=True))  # 0 divides an all-zero row by 0
  x = x_BTD.astype(jnp.float32)
  normed = x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + eps)
  return (normed * scale_D.astype(jnp.float32)).astype(x_BTD.dtype)
