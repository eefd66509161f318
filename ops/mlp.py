"""Feed-forward blocks. Shapes: B batch, T time, D model width, F hidden width."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def swiglu(x_BTD: jax.Array, w1_DF: jax.Array, w3_DF: jax.Array, w2_FD: jax.Array) -> jax.Array:
  """SwiGLU FFN (Llama): W2( silu(x W1) * (x W3) ), matmuls accumulated in float32."""
  if w1_DF.shape != w3_DF.shape or w1_DF.shape[::-1] != w2_FD.shape or w1_DF.shape[0] != x_BTD.shape[-1]:
    raise ValueError(
      f"w1_DF, w3_DF, w2_FD: expected [D, F], [D, F], [F, D] with D={x_BTD.shape[-1]}, got "
      f"{w1_DF.shape}, {w3_DF.shape}, {w2_FD.shape}"
    )
  gate = jnp.einsum("btd,df->btf", x_BTD, w1_DF, preferred_element_type=jnp.float32)
  up = jnp.einsum("btd,df->btf", x_BTD, w3_DF, preferred_element_type=jnp.float32)
  hidden = (jax.nn.silu(gate) * up).astype(x_BTD.dtype)
  return jnp.einsum("btf,fd->btd", hidden, w2_FD, preferred_element_type=jnp.float32).astype(x_BTD.dtype)
