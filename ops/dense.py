"""Projections as one 2-D matmul, the form XLA's CPU backend runs fastest in both passes.

  y[m..., o...] = sum_{i...} x[m..., i...] w[i..., o...]

x's last `n_in` axes contract with w's first `n_in` axes. Shapes: N rows (x's leading axes
flattened, B x T, as in `ops.quant`); the contracted axes flatten to one of size d_in (D, or
H x K for wo) and w's other axes to one of size d_out (E, H x K or V). Both operands are
reshaped (free for row-major arrays) to x [N, d_in] and w [d_in, d_out], multiplied once
with float32 accumulation, and the result is reshaped to [m..., o...].

Why not `einsum("btd,dhk->bthk")`: its weight gradient contracts two axes (b and t), as
does wo's forward (h and k); XLA:CPU lays such dots out with transposing copies of the
activations, which cost more than the matmuls (README "Training speed": the `small`
preset's training step went from about 2,200 to 3,400 tokens/s, `scripts/train_step_times.py`
before and after). As one [N, d_in] @ [d_in, d_out], the forward and both gradients are
plain GEMMs. The parameters keep their shapes ([D, H, K], [H, K, D]), so sharding rules and
checkpoints do not change.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp


def dense(x: jax.Array, w: jax.Array, *, n_in: int = 1, out_dtype=None) -> jax.Array:
  """x [m..., i...] times w [i..., o...] over the `n_in` axes i: y [m..., o...] in `out_dtype`
  (default: x's and w's promoted dtype) (module equation).

  `out_dtype` float32 asks the dot for float32 results (bf16 inputs accumulate in float32);
  otherwise the dot runs in the output dtype, as the einsum it replaces did, so a bf16
  model's backward pass stays in bf16 (XLA accumulates bf16 dots in float32 on CPU and GPU)."""
  for name, a in (("x", x), ("w", w)):
    if not hasattr(a, "ndim") or not hasattr(a, "dtype"):
      raise TypeError(f"{name}: expected an array (jnp.asarray(...)), got {type(a).__name__}")
  if not isinstance(n_in, int) or isinstance(n_in, bool) or not 1 <= n_in <= min(x.ndim, w.ndim):
    raise ValueError(f"n_in: expected 1 .. min(x.ndim, w.ndim) = {min(x.ndim, w.ndim)}, got {n_in}")
  lead, inner, out = x.shape[: x.ndim - n_in], x.shape[x.ndim - n_in :], w.shape[n_in:]
  if w.shape[:n_in] != inner:
    raise ValueError(f"x, w: x's last {n_in} axes {inner} must equal w's first {n_in}, got w of shape {w.shape}")
  size = math.prod(inner)
  out_dtype = jnp.result_type(x, w) if out_dtype is None else jnp.dtype(out_dtype)
  y = jnp.matmul(
    x.reshape(math.prod(lead), size),
    w.reshape(size, math.prod(out)),
    preferred_element_type=jnp.float32 if out_dtype == jnp.float32 else None,
  )
  return y.reshape(*lead, *out).astype(out_dtype)
