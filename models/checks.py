"""Input checks every model shares: token ids and row lengths.

Shapes: B batch, T time.

Shapes are static, so their checks hold under `jax.jit`; the value checks (ids in range,
lengths in 1 .. T) run where the values are known, eagerly, and see only tracers inside
a trace.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


def concrete(x: Any) -> np.ndarray | None:
  """x as numpy when it has a value now (not inside a trace), else None: value checks run
  eagerly and are skipped under jit, where shapes are all that is known."""
  if x is None or isinstance(x, jax.core.Tracer):
    return None
  return np.asarray(x)


def check_tokens(tokens_BT: jax.Array, vocab_size: int) -> tuple[int, int]:
  """(B, T) of integer ids [B, T], each in [0, vocab_size) when concrete."""
  if tokens_BT.ndim != 2 or not jnp.issubdtype(tokens_BT.dtype, jnp.integer):
    raise ValueError(f"tokens_BT: expected integer ids of shape [B, T], got {tokens_BT.dtype} {tokens_BT.shape}")
  ids = concrete(tokens_BT)
  if ids is not None and ids.size and (ids.min() < 0 or ids.max() >= vocab_size):
    raise ValueError(f"tokens_BT: ids must lie in [0, {vocab_size}), got {ids.min()} .. {ids.max()}")
  return tokens_BT.shape[0], tokens_BT.shape[1]


def check_lengths(lengths_B: Any, batch: int, width: int, *, name: str = "lengths_B") -> jax.Array:
  """Row lengths as int32 [B], each in 1 .. width when concrete."""
  lengths_B = jnp.asarray(lengths_B)
  if lengths_B.shape != (batch,) or not jnp.issubdtype(lengths_B.dtype, jnp.integer):
    raise ValueError(f"{name}: expected integer shape ({batch},), got {lengths_B.dtype} {lengths_B.shape}")
  lengths = concrete(lengths_B)
  if lengths is not None and ((lengths < 1).any() or (lengths > width).any()):
    raise ValueError(f"{name}: expected 1 <= length <= {width}, got {lengths.tolist()}")
  return lengths_B.astype(jnp.int32)
