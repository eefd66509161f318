"""Feed-forward blocks. Shapes: B batch, T time, D model width, E hidden width (expansion)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from paperjax.ops import checks
from paperjax.ops.quant import QuantizedTensor, matmul

Weight = jax.Array | QuantizedTensor


def swiglu(x_BTD: jax.Array, w1_DE: Weight, w3_DE: Weight, w2_ED: Weight) -> jax.Array:
  """SwiGLU FFN (Llama): W2( silu(x W1) * (x W3) ), matmuls accumulated in float32.

  Any weight may be a `QuantizedTensor` (`ops.quant.matmul` says how it multiplies)."""
  if not hasattr(x_BTD, "dtype") or x_BTD.ndim < 1 or not jnp.issubdtype(x_BTD.dtype, jnp.floating):
    raise TypeError(f"x_BTD: expected a float array [..., D], got {getattr(x_BTD, 'dtype', type(x_BTD).__name__)}")
  for name, w, shape in (("w1_DE", w1_DE, "[D, E]"), ("w3_DE", w3_DE, "[D, E]"), ("w2_ED", w2_ED, "[E, D]")):
    if not isinstance(w, QuantizedTensor):
      checks.check_array(name, w, 2, shape=shape)
  if w1_DE.shape != w3_DE.shape or w1_DE.shape[::-1] != w2_ED.shape or w1_DE.shape[0] != x_BTD.shape[-1]:
    raise ValueError(
      f"w1_DE, w3_DE, w2_ED: expected [D, E], [D, E], [E, D] with D={x_BTD.shape[-1]}, got "
      f"{w1_DE.shape}, {w3_DE.shape}, {w2_ED.shape}"
    )
  gate, up = matmul(x_BTD, w1_DE, out_dtype=jnp.float32), matmul(x_BTD, w3_DE, out_dtype=jnp.float32)
  hidden = (jax.nn.silu(gate) * up).astype(x_BTD.dtype)
  return matmul(hidden, w2_ED)
