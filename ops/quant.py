"""Absmax INT8 and FP8 (E4M3) quantization, and the matmul that consumes it.

Shapes: B batch, T time, N rows (B x T flattened), D input features (the contraction), E output
features.

  scale = Q / max|x| over the reduced axes      (Q = 127 for INT8, 448 for E4M3)
  q     = saturate(round(x * scale))            (INT8: to [-127, 127]; E4M3: to [-448, 448], then the cast)
  x_hat = q / scale

max|x| is clamped below at 1e-12 (as Meta's FP8 code does), so an all-zero or denormal
group gets a finite scale and q = 0, x_hat = 0: never NaN or inf. Granularity names
which axes share a scale, for a matrix W [N, E]: "tensor" (one scale), "row" (one per row,
the max over the last axis) and "channel" (one per column, the max over the rows). A
weight used as x @ W [D, E] quantized per channel has one scale per output feature (Meta's
"row-wise" FP8 weights, whose layout is [E, D]); an activation x [..., D] is quantized per
row (per token). FP8 activation scales take an upper bound on max|x| (`scale_ub`, 1200 in
Meta's Llama 3 code): an outlier above it saturates instead of shrinking its whole row's
scale until the rest of the row underflows.

`matmul(x, w)` takes a float or a `QuantizedTensor` weight. A weight with `activations`
set ("int8" W8A8, or "fp8") quantizes x per row on the fly and multiplies the low-precision
values with float32 accumulation (int8 x int8 -> int32, exact), applying both scales
afterwards: x @ W ~ (q_x @ q_W) / (s_x s_W), which needs the weight's scale constant along
the contraction (granularity "tensor" or "channel"). Otherwise the weight is dequantized to
x's dtype first (weight-only quantization).
"""

from __future__ import annotations

from typing import Literal

import jax
import jax.numpy as jnp
from flax import struct

from paperjax.ops import checks
from paperjax.ops.dense import dense

Format = Literal["int8", "fp8"]
Granularity = Literal["tensor", "row", "channel"]
FP8_MAX = float(jnp.finfo(jnp.float8_e4m3fn).max)  # 448
_QMAX = {"int8": 127.0, "fp8": FP8_MAX}
_DTYPES = {"int8": jnp.int8, "fp8": jnp.float8_e4m3fn}
AMAX_FLOOR = 1e-12


@struct.dataclass
class QuantizedTensor:
  """q (int8 or float8_e4m3fn) and the float32 scale broadcast against it: x ~ q / scale.

  `activations` ("int8", "fp8" or None) says how `matmul` treats the input when this is a
  weight; `scale_ub` bounds FP8 activation scales (None: unbounded).
  """

  q: jax.Array
  scale: jax.Array
  activations: Format | None = struct.field(pytree_node=False, default=None)
  scale_ub: float | None = struct.field(pytree_node=False, default=None)

  @property
  def shape(self) -> tuple[int, ...]:
    return self.q.shape

  @property
  def nbytes(self) -> int:
    return self.q.size * self.q.dtype.itemsize + self.scale.size * self.scale.dtype.itemsize


def _reduced_axes(ndim: int, granularity: Granularity) -> tuple[int, ...]:
  if granularity == "tensor":
    return tuple(range(ndim))
  if granularity == "row":
    return (ndim - 1,)
  if granularity == "channel":
    return tuple(range(ndim - 1))
  raise ValueError(f"granularity: expected 'tensor', 'row' or 'channel', got {granularity!r}")


def quantize(
  x: jax.Array, fmt: Format, granularity: Granularity = "tensor", *, scale_ub: float | None = None
) -> QuantizedTensor:
  """Absmax quantization of x (module equation); float32 arithmetic whatever x's dtype.

  Args:
    x: a float array of rank >= 1.
    fmt: "int8" (round to nearest, saturate to +-127) or "fp8" (E4M3, saturate to +-448).
    granularity: which axes share a scale (module docstring).
    scale_ub: upper bound on max|x| when computing the scale (values above it saturate).

  Value checks (x finite: NaN or inf would turn its whole group's scale and codes into garbage)
  run on concrete inputs, or inside `ops.checks.checked`.
  """
  if not isinstance(fmt, str) or fmt not in _QMAX:
    raise ValueError(f"fmt: expected 'int8' or 'fp8', got {fmt!r}")
  if not isinstance(granularity, str) or granularity not in ("tensor", "row", "channel"):
    raise ValueError(f"granularity: expected 'tensor', 'row' or 'channel', got {granularity!r}")
  if not hasattr(x, "dtype") or not jnp.issubdtype(x.dtype, jnp.floating) or x.ndim < 1:
    got = f"{x.dtype} of shape {x.shape}" if hasattr(x, "dtype") else type(x).__name__
    raise TypeError(f"x: expected a float array of rank >= 1, got {got}")
  if scale_ub is not None and (isinstance(scale_ub, bool) or not scale_ub > 0):  # NaN fails too
    raise ValueError(f"scale_ub: expected a positive bound or None, got {scale_ub}")
  checks.check_finite("x", x)
  x = x.astype(jnp.float32)
  amax = jnp.max(jnp.abs(x), axis=_reduced_axes(x.ndim, granularity), keepdims=True)
  if scale_ub is not None:
    amax = jnp.minimum(amax, scale_ub)
  qmax = _QMAX[fmt]
  scale = qmax / jnp.maximum(amax, AMAX_FLOOR)
  scaled = x * scale
  if fmt == "int8":
    scaled = jnp.round(scaled)
  q = jnp.clip(scaled, -qmax, qmax).astype(_DTYPES[fmt])  # E4M3 has no inf: out-of-range casts become NaN
  return QuantizedTensor(q, scale)


def map_unquantized(fn, tree):
  """jax.tree.map of fn over the leaves that are not inside a QuantizedTensor (those stay as they are)."""
  is_quantized = lambda x: isinstance(x, QuantizedTensor)
  return jax.tree.map(lambda x: x if is_quantized(x) else fn(x), tree, is_leaf=is_quantized)


def dot(a_ND: jax.Array, b_DE: jax.Array) -> jax.Array:
  """a @ b with the exact accumulator of the inputs: int32 for int8, float32 otherwise."""
  return jnp.dot(a_ND, b_DE, preferred_element_type=jnp.int32 if a_ND.dtype == jnp.int8 else jnp.float32)


def dequantize(t: QuantizedTensor, dtype=jnp.float32) -> jax.Array:
  """x_hat = q / scale, in `dtype` (a float dtype: an int one would truncate x_hat)."""
  if not isinstance(t, QuantizedTensor):
    raise TypeError(f"t: expected a QuantizedTensor, got {type(t).__name__}")
  try:
    floating = jnp.issubdtype(dtype, jnp.floating)
  except TypeError:
    floating = False
  if not floating:
    raise TypeError(f"dtype: expected a float dtype, got {dtype!r}")
  return (t.q.astype(jnp.float32) / t.scale).astype(dtype)


def matmul(x_BTD: jax.Array, w_DE: jax.Array | QuantizedTensor, *, out_dtype=None) -> jax.Array:
  """x @ W over the last axis of x, float32 accumulation, returned in `out_dtype` (default x's
  dtype); module docstring for quantized weights. Value checks as in `quantize` for the
  activations it quantizes."""
  if not hasattr(x_BTD, "dtype") or not jnp.issubdtype(x_BTD.dtype, jnp.floating) or x_BTD.ndim < 1:
    got = f"{x_BTD.dtype} of shape {x_BTD.shape}" if hasattr(x_BTD, "dtype") else type(x_BTD).__name__
    raise TypeError(f"x_BTD: expected a float array [..., D], got {got}")  # an int x would truncate the product
  out_dtype = x_BTD.dtype if out_dtype is None else out_dtype
  if not hasattr(w_DE, "shape") or len(w_DE.shape) != 2 or w_DE.shape[0] != x_BTD.shape[-1]:
    raise ValueError(f"w_DE: expected a matrix [D={x_BTD.shape[-1]}, E], got {getattr(w_DE, 'shape', w_DE)}")
  if not isinstance(w_DE, QuantizedTensor):
    return dense(x_BTD, w_DE, out_dtype=out_dtype)
  if w_DE.activations is not None and w_DE.activations not in _QMAX:
    raise ValueError(f"w_DE.activations: expected 'int8', 'fp8' or None, got {w_DE.activations!r}")
  if w_DE.activations is None:
    return matmul(x_BTD, dequantize(w_DE, x_BTD.dtype), out_dtype=out_dtype)
  if w_DE.scale.shape[0] != 1:
    raise ValueError(
      f"w_DE: {w_DE.activations} activations need a weight scale constant along D (granularity 'tensor' or "
      f"'channel'), got scale shape {w_DE.scale.shape}"
    )
  if w_DE.q.dtype != _DTYPES[w_DE.activations]:
    raise ValueError(f"w_DE: {w_DE.activations} activations need {w_DE.activations} weights, got {w_DE.q.dtype}")
  bound = w_DE.scale_ub if w_DE.activations == "fp8" else None
  x_q = quantize(x_BTD, w_DE.activations, "row", scale_ub=bound)
  out = dot(x_q.q.reshape(-1, x_q.shape[-1]), w_DE.q).reshape(*x_q.shape[:-1], -1)
  return (out.astype(jnp.float32) / (x_q.scale * w_DE.scale[0])).astype(out_dtype)
