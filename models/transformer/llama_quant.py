"""Quantization policies for Llama parameters: params -> quantized params, used by the same forward.

Shapes: L layers, D model width, E MLP hidden width.

Llama 3's FP8 recipe (the report, Sec. 6): quantize the FFN matmuls (W1, W3, W2: weights
per output channel, activations per token, E4M3), not self-attention, and not the first
and last layers; activation scales bounded at max|x| <= 1200. `POLICIES` holds it beside
INT8 weight-only (per tensor, per row) and W8A8 (INT8 weights per channel, INT8
activations per token).

`quantize_params` returns the params pytree with `layers` split into consecutive
segments, a tuple (first layer, quantized middle layers, last layer) when the first and
last are exempt; `llama.forward`, `prefill`, `decode` and `serving.generate` take it
unchanged (each segment is one scan; `ops.quant.matmul` reads the quantized weights).
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import jax
import numpy as np

from paperjax.models.transformer import llama
from paperjax.models.transformer.llama import LlamaConfig
from paperjax.ops import checks, quant
from paperjax.ops.quant import Format, Granularity

Target = Literal["w1", "w3", "w2"]
# The matmuls a policy may quantize (attention's projections take float weights).
FFN: tuple[Target, ...] = ("w1", "w3", "w2")


@checks.config
class QuantPolicy:
  """Which layer weights are quantized and how (ops.quant's equations).

  weights: "int8" or "fp8"; granularity: "tensor", "row" or "channel" of each [D, E] matrix.
  activations: None (weight-only: dequantize, then a float matmul) or the weights' format
  (quantize each token's activations; needs granularity "tensor" or "channel").
  scale_ub: bound on max|x| of FP8 activations (None: unbounded).
  targets: the FFN weights quantized; skip_first_last: keep layers 0 and L - 1 in float.
  """

  weights: Format
  granularity: Granularity = "channel"
  activations: Format | None = None
  scale_ub: checks.PositiveFloat | None = None
  targets: tuple[Target, ...] = FFN
  skip_first_last: bool = True

  def __post_init__(self):
    if self.activations not in (None, self.weights):
      raise ValueError(f"activations: expected None or the weights' format {self.weights!r}, got {self.activations!r}")
    if self.activations is not None and self.granularity == "row":
      raise ValueError("granularity: quantized activations need one weight scale per output ('tensor' or 'channel')")
    if not self.targets:
      raise ValueError(f"targets: expected a non-empty subset of the FFN weights {FFN}, got {self.targets}")
    if self.scale_ub is not None and self.activations != "fp8":
      raise ValueError(f"scale_ub: bounds FP8 activation scales, but activations={self.activations!r}")


POLICIES = {
  "llama3_fp8": QuantPolicy(weights="fp8", activations="fp8", scale_ub=1200.0),
  "int8_weight_tensor": QuantPolicy(weights="int8", granularity="tensor"),
  "int8_weight_row": QuantPolicy(weights="int8", granularity="row"),
  "w8a8": QuantPolicy(weights="int8", activations="int8"),
}


def quantize_params(params: dict, cfg: LlamaConfig, policy: QuantPolicy) -> dict:
  """The params with the policy's weights quantized (an offline step: runs eagerly).

  Raises ValueError naming the leaf when a quantized weight holds NaN or inf, and when the
  policy would quantize nothing (n_layers < 3 with the first and last layers exempt).
  """
  llama.check_params(params, cfg)
  if not isinstance(policy, QuantPolicy):
    raise TypeError(
      f"policy: expected a QuantPolicy (e.g. POLICIES['llama3_fp8']), got {type(policy).__name__} {policy!r}"
    )
  layers = params["layers"]
  if not isinstance(layers, dict):
    raise TypeError("params: expected float params (a single layer stack), got already-quantized segments")
  lo, hi = (1, cfg.n_layers - 1) if policy.skip_first_last else (0, cfg.n_layers)
  if hi <= lo:
    raise ValueError(f"policy: exempting the first and last of {cfg.n_layers} layers leaves none to quantize")
  for name in policy.targets:
    bad = ~np.isfinite(np.asarray(layers[name][lo:hi], np.float32)).reshape(hi - lo, -1).all(axis=1)
    if bad.any():
      raise ValueError(f"params['layers']['{name}']: NaN or inf in layers {(lo + np.flatnonzero(bad)).tolist()}")

  def quantized(w):
    t = jax.vmap(lambda m: quant.quantize(m, policy.weights, policy.granularity))(w)
    return dataclasses.replace(t, activations=policy.activations, scale_ub=policy.scale_ub)

  span = lambda a, b: jax.tree.map(lambda w: w[a:b], layers)
  middle = {k: quantized(w) if k in policy.targets else w for k, w in span(lo, hi).items()}
  segments = tuple(s for s in (span(0, lo), middle, span(hi, cfg.n_layers)) if jax.tree.leaves(s)[0].shape[0])
  return {**params, "layers": segments[0] if len(segments) == 1 else segments}


def weight_bytes(params: dict) -> int:
  """Bytes of every array in the params (quantized values and their scales included)."""
  return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(params))
