"""Sparse autoencoders on one site's activations: five architectures as pure functions.

Shapes: B batch rows (one token's activation each), D the site's width, F dictionary
features (latents), N points (a sample of activations).

Every architecture reads x_BD as x' = x - b_dec and decodes x_hat = f W_dec + b_dec:

  standard   pi = x' W_enc + b_enc;  f = ReLU(pi)
             loss = mean_B sum_D (x_hat - x)^2 + lambda mean_B sum_F f_F ||W_dec[F]||
  topk       f = ReLU(TopK_k(pi)) (exactly k latents chosen per row)
             loss = mse + aux_coefficient * AuxK, AuxK = mean_B ||e - e_hat||^2 where
             e = sg(x - x_hat) and e_hat = TopK_kaux(pi over dead latents) W_dec
  batchtopk  f = ReLU(pi) * 1[among the top k*B of ReLU(pi) over the whole batch] (training);
             f = ReLU(pi) * 1[pi > threshold] at inference, threshold an EMA of the smallest
             kept activation; loss as topk
  gated      pi_gate = x' W_enc + b_gate; pi_mag = x' (W_enc * exp(r_mag)) + b_mag
             f = 1[pi_gate > 0] ReLU(pi_mag)
             loss = mse + lambda mean_B sum_F ReLU(pi_gate)_F ||W_dec[F]||
                    + mean_B ||ReLU(pi_gate) sg(W_dec) + sg(b_dec) - x||^2
  jumprelu   f = pi * H(pi - theta), theta = exp(log_threshold)
             loss = mse + lambda mean_B sum_F H(pi - theta)
             d/dtheta through the rectangle-kernel pseudo-derivative of bandwidth eps:
             dJumpReLU/dtheta = -(theta / eps) K((pi - theta) / eps),
             dH/dtheta = -(1 / eps) K((pi - theta) / eps), K(u) = 1[|u| < 1/2]

Parameter names and shapes are SAELens' (W_enc [D, F], W_dec [F, D], b_enc, b_dec, ...), so
`interp.sae_io` writes its files without renaming. Architectures with `unit_norm_decoder`
keep decoder rows at norm 1: `project_decoder_grads` removes each row's parallel gradient
before the step and `normalize_decoder` renormalises after it; the standard SAE instead
weights its L1 by the decoder norms (Anthropic's April 2024 update; SAELens v6).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Annotated, Any, Literal

import jax
import jax.numpy as jnp
import numpy as np

from paperjax.ops import checks

Architecture = Literal["standard", "topk", "batchtopk", "gated", "jumprelu"]
ARCHITECTURES: tuple[str, ...] = ("standard", "topk", "batchtopk", "gated", "jumprelu")
_SPARSITY_PENALTY = {"standard", "gated", "jumprelu"}  # the architectures with a lambda
_TOPK = {"topk", "batchtopk"}
# The fields only some architectures read; setting one for another architecture is an error.
_READ_BY = {
  "k_aux": _TOPK,
  "aux_coefficient": _TOPK,
  "bandwidth": {"jumprelu"},
  "init_threshold": {"jumprelu"},
  "threshold_rate": {"batchtopk"},
  "decoder_init_norm": {"standard"},
}


_FinitePositive = Annotated[float, checks.Range(low=0, high=math.inf, low_open=True, high_open=True)]
_FiniteNonNegative = Annotated[float, checks.Range(low=0, high=math.inf, high_open=True)]


@checks.config
class SAEConfig:
  """One SAE's shape and loss; hashable, so it is a static jit argument. Every field is
  checked for type and range at construction (`ops.checks.config`).

  coefficient: lambda, the L1 (standard, gated) or L0 (jumprelu) penalty weight (0 in a
    config loaded for inference, which has none).
  k: latents per row (topk; batchtopk keeps k*B per batch), 1 <= k <= d_sae.
  k_aux, aux_coefficient: AuxK's latent count (default D // 2) and weight (1/32, the paper's).
  dead_tokens: a latent is dead after this many training tokens without firing (AuxK).
  bandwidth, init_threshold: JumpReLU's eps and starting theta.
  threshold_rate: BatchTopK's EMA rate for the inference threshold, in (0, 1].
  decoder_init_norm: the standard SAE's initial decoder row norm (the others start at 1).
  A field that the architecture does not read must keep its default.
  """

  architecture: Architecture
  d_in: checks.PositiveInt
  d_sae: checks.PositiveInt
  coefficient: _FiniteNonNegative = 0.0
  k: checks.NonNegativeInt = 0
  k_aux: checks.PositiveInt | None = None
  aux_coefficient: _FinitePositive = 1 / 32
  dead_tokens: checks.PositiveInt = 100_000
  bandwidth: _FinitePositive = 0.05
  init_threshold: _FinitePositive = 0.01
  threshold_rate: Annotated[float, checks.Range(low=0, high=1, low_open=True)] = 0.01
  decoder_init_norm: _FinitePositive = 0.1

  def __post_init__(self):
    if self.architecture in _TOPK:
      if not 1 <= self.k <= self.d_sae:
        raise ValueError(f"k: expected 1 <= k <= d_sae={self.d_sae} for {self.architecture}, got {self.k}")
      if not 1 <= self.aux_k <= self.d_sae:
        raise ValueError(f"k_aux: expected 1 <= k_aux <= d_sae={self.d_sae}, got {self.aux_k}")
    elif self.k:
      raise ValueError(f"k: only topk and batchtopk use k, got k={self.k} for {self.architecture}")
    if self.coefficient and self.architecture not in _SPARSITY_PENALTY:
      raise ValueError(f"coefficient: {self.architecture} has no sparsity penalty, got {self.coefficient}")
    for name, readers in _READ_BY.items():
      field = next(f for f in dataclasses.fields(self) if f.name == name)
      if self.architecture not in readers and getattr(self, name) != field.default:
        raise ValueError(f"{name}: only {sorted(readers)} read it, got {getattr(self, name)} for {self.architecture}")

  @property
  def aux_k(self) -> int:
    return min(max(1, self.d_in // 2), self.d_sae) if self.k_aux is None else self.k_aux

  @property
  def unit_norm_decoder(self) -> bool:
    """Decoder rows held at norm 1 (every architecture except standard, whose L1 is
    weighted by the decoder norms instead)."""
    return self.architecture != "standard"


def inference_config(cfg: SAEConfig) -> SAEConfig:
  """cfg with every field that only training reads at its default, so configs that encode
  alike compare equal (one compiled encoder for every lambda of an architecture)."""
  return SAEConfig(architecture=cfg.architecture, d_in=cfg.d_in, d_sae=cfg.d_sae, k=cfg.k)


def init(key: jax.Array, cfg: SAEConfig, b_dec_D: jax.Array | None = None) -> dict:
  """W_dec rows in random directions at norm decoder_init_norm (1 for unit-norm decoders),
  W_enc = W_dec^T, biases 0, b_dec = b_dec_D (e.g. `geometric_median` of a batch)."""
  _check_cfg(cfg)
  w_FD = jax.random.normal(key, (cfg.d_sae, cfg.d_in), jnp.float32)
  norm = 1.0 if cfg.unit_norm_decoder else cfg.decoder_init_norm
  w_FD = norm * w_FD / jnp.linalg.norm(w_FD, axis=-1, keepdims=True)
  if b_dec_D is None:
    b_dec_D = jnp.zeros((cfg.d_in,), jnp.float32)
  elif jnp.shape(b_dec_D) != (cfg.d_in,):
    raise ValueError(f"b_dec_D: expected shape ({cfg.d_in},), got {jnp.shape(b_dec_D)}")
  else:
    checks.check_finite("b_dec_D", b_dec_D)
  zeros_F = jnp.zeros((cfg.d_sae,), jnp.float32)
  params = {"W_enc": w_FD.T, "W_dec": w_FD, "b_dec": jnp.asarray(b_dec_D, jnp.float32)}
  if cfg.architecture == "gated":
    return params | {"b_gate": zeros_F, "r_mag": zeros_F, "b_mag": zeros_F}
  params["b_enc"] = zeros_F
  if cfg.architecture == "jumprelu":
    params["log_threshold"] = jnp.full((cfg.d_sae,), np.log(cfg.init_threshold), jnp.float32)
  if cfg.architecture == "batchtopk":
    params["threshold"] = jnp.zeros((), jnp.float32)  # inference only: an EMA, never a gradient
  return params


def param_shapes(cfg: SAEConfig) -> dict[str, tuple[int, ...]]:
  """The shape of every leaf `init(key, cfg)` makes."""
  d, f = cfg.d_in, cfg.d_sae
  shapes = {"W_enc": (d, f), "W_dec": (f, d), "b_dec": (d,)}
  if cfg.architecture == "gated":
    return shapes | {"b_gate": (f,), "r_mag": (f,), "b_mag": (f,)}
  shapes["b_enc"] = (f,)
  if cfg.architecture == "jumprelu":
    shapes["log_threshold"] = (f,)
  if cfg.architecture == "batchtopk":
    shapes["threshold"] = ()
  return shapes


def check_params(params: Any, cfg: SAEConfig) -> None:
  """params has exactly the leaves of `init(key, cfg)`, at their shapes (names the leaf)."""
  _check_cfg(cfg)
  if not isinstance(params, dict):
    raise TypeError(f"params: expected the dict of sae.init(key, cfg), got {type(params).__name__}")
  expected = {name: jax.ShapeDtypeStruct(shape, jnp.float32) for name, shape in param_shapes(cfg).items()}
  checks.check_tree("params", params, expected)


def _check_cfg(cfg: Any) -> None:
  if not isinstance(cfg, SAEConfig):
    raise TypeError(f"cfg: expected an SAEConfig, got {type(cfg).__name__}")


def check_input(x_BD: jax.Array, cfg: SAEConfig, *, name: str = "x_BD") -> None:
  """x_BD is a float array [B, d_in] of finite values (the values when concrete, or inside
  `ops.checks.checked`)."""
  if not hasattr(x_BD, "ndim") or not hasattr(x_BD, "dtype"):
    raise TypeError(f"{name}: expected an array [B, {cfg.d_in}] (jnp.asarray(...)), got {type(x_BD).__name__}")
  if x_BD.ndim != 2 or x_BD.shape[1] != cfg.d_in:
    raise ValueError(f"{name}: expected shape [B, {cfg.d_in}] (d_in), got {tuple(x_BD.shape)}")
  if not jnp.issubdtype(x_BD.dtype, jnp.floating):
    raise TypeError(f"{name}: expected float activations, got dtype {x_BD.dtype}")
  checks.check_finite(name, x_BD)


def pre_activations(params: dict, x_BD: jax.Array) -> jax.Array:
  """pi = (x - b_dec) W_enc + b_enc [B, F] (the gate's for gated)."""
  bias_F = params["b_gate"] if "b_gate" in params else params["b_enc"]
  return (x_BD - params["b_dec"]) @ params["W_enc"] + bias_F


def topk_mask(pi_BF: jax.Array, k: int) -> jax.Array:
  """bool [B, F]: the k largest entries of each row (exactly k; ties to the lower index)."""
  _check_k(k, pi_BF.shape[-1])
  _, idx_Bk = jax.lax.top_k(pi_BF, k)
  return jnp.zeros(pi_BF.shape, bool).at[jnp.arange(pi_BF.shape[0])[:, None], idx_Bk].set(True)


def batch_topk_mask(acts_BF: jax.Array, k: int) -> jax.Array:
  """bool [B, F]: the k * B largest entries of the whole batch."""
  _check_k(k, acts_BF.shape[-1])
  _, idx = jax.lax.top_k(acts_BF.reshape(-1), k * acts_BF.shape[0])
  return jnp.zeros(acts_BF.size, bool).at[idx].set(True).reshape(acts_BF.shape)


def _check_k(k: Any, features: int) -> None:
  if not isinstance(k, (int, np.integer)) or isinstance(k, (bool, np.bool_)) or not 1 <= k <= features:
    raise ValueError(f"k: expected an int in [1, {features}] (the features per row), got {k!r}")


@jax.custom_vjp
def jumprelu(pi_BF: jax.Array, theta_F: jax.Array, bandwidth: float) -> jax.Array:
  """pi * H(pi - theta), with the straight-through rectangle pseudo-derivative for theta."""
  return pi_BF * (pi_BF > theta_F)


def _jumprelu_fwd(pi_BF, theta_F, bandwidth):
  return jumprelu(pi_BF, theta_F, bandwidth), (pi_BF, theta_F, bandwidth)


def _jumprelu_bwd(res, g_BF):
  pi_BF, theta_F, bandwidth = res
  kernel_BF = jnp.abs((pi_BF - theta_F) / bandwidth) < 0.5
  d_theta_F = jnp.sum(-(theta_F / bandwidth) * kernel_BF * g_BF, axis=0)
  return g_BF * (pi_BF > theta_F), d_theta_F, None


jumprelu.defvjp(_jumprelu_fwd, _jumprelu_bwd)


@jax.custom_vjp
def step(pi_BF: jax.Array, theta_F: jax.Array, bandwidth: float) -> jax.Array:
  """H(pi - theta) as float; no gradient to pi, the rectangle pseudo-derivative to theta."""
  return (pi_BF > theta_F).astype(pi_BF.dtype)


def _step_fwd(pi_BF, theta_F, bandwidth):
  return step(pi_BF, theta_F, bandwidth), (pi_BF, theta_F, bandwidth)


def _step_bwd(res, g_BF):
  pi_BF, theta_F, bandwidth = res
  kernel_BF = jnp.abs((pi_BF - theta_F) / bandwidth) < 0.5
  return jnp.zeros_like(pi_BF), jnp.sum(-(1.0 / bandwidth) * kernel_BF * g_BF, axis=0), None


step.defvjp(_step_fwd, _step_bwd)


def _gated(params: dict, x_BD: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(f [B, F], pi_gate [B, F]) of a gated SAE."""
  xc_BD = x_BD - params["b_dec"]
  pi_gate_BF = xc_BD @ params["W_enc"] + params["b_gate"]
  pi_mag_BF = xc_BD @ (params["W_enc"] * jnp.exp(params["r_mag"])) + params["b_mag"]
  return (pi_gate_BF > 0) * jax.nn.relu(pi_mag_BF), pi_gate_BF


def _features(params: dict, x_BD: jax.Array, cfg: SAEConfig, *, training: bool) -> tuple[jax.Array, jax.Array]:
  """(f [B, F], pi [B, F]); training selects BatchTopK's batch-wide top k*B instead of its
  inference threshold."""
  arch = cfg.architecture
  if arch == "gated":
    return _gated(params, x_BD)
  pi_BF = pre_activations(params, x_BD)
  if arch == "standard":
    return jax.nn.relu(pi_BF), pi_BF
  if arch == "topk":
    return jax.nn.relu(pi_BF) * topk_mask(pi_BF, cfg.k), pi_BF
  if arch == "batchtopk":
    acts_BF = jax.nn.relu(pi_BF)
    keep_BF = batch_topk_mask(acts_BF, cfg.k) if training else pi_BF > params["threshold"]
    return acts_BF * keep_BF, pi_BF
  return jumprelu(pi_BF, jnp.exp(params["log_threshold"]), cfg.bandwidth), pi_BF


def encode(params: dict, x_BD: jax.Array, cfg: SAEConfig) -> jax.Array:
  """Inference features f [B, F] (BatchTopK through its learned threshold).

  Value checks (finite x_BD) run on concrete inputs, or inside `ops.checks.checked`."""
  check_params(params, cfg)
  check_input(x_BD, cfg)
  return _features(params, x_BD, cfg, training=False)[0]


def decode(params: dict, f_BF: jax.Array) -> jax.Array:
  """x_hat = f W_dec + b_dec [B, D]."""
  w_dec: Any = params.get("W_dec") if isinstance(params, dict) else None
  if not hasattr(w_dec, "shape") or len(w_dec.shape) != 2:
    raise ValueError(f"params: expected SAE params with a W_dec [d_sae, D], got {type(params).__name__}")
  if not hasattr(f_BF, "shape") or not hasattr(f_BF, "dtype"):
    raise TypeError(f"f_BF: expected an array [B, d_sae] (jnp.asarray(...)), got {type(f_BF).__name__}")
  if f_BF.ndim < 1 or f_BF.shape[-1] != w_dec.shape[0]:
    raise ValueError(f"f_BF: expected features [B, d_sae={w_dec.shape[0]}], got shape {tuple(f_BF.shape)}")
  return f_BF @ params["W_dec"] + params["b_dec"]


def reconstruct(params: dict, x_BD: jax.Array, cfg: SAEConfig) -> jax.Array:
  """x_hat = decode(encode(x)) [B, D]: what splicing puts in place of x."""
  return decode(params, encode(params, x_BD, cfg))


def loss(
  params: dict,
  x_BD: jax.Array,
  cfg: SAEConfig,
  *,
  penalty_scale: jax.Array | float = 1.0,
  dead_F: jax.Array | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """The architecture's training loss (module docstring) and its terms.

  penalty_scale multiplies lambda (the L1 / L0 warm-up); dead_F (bool [F]) marks the dead
  latents AuxK revives (topk, batchtopk; none dead -> AuxK = 0).
  Returns (loss, {"mse", "sparsity", "aux", "l0", "f_BF", "pi_BF"}); mse is
  mean_B sum_D (x_hat - x)^2 and l0 the mean count of nonzero features per row.
  Value checks (finite x_BD, penalty_scale finite and >= 0) run on concrete inputs, or
  inside `ops.checks.checked`.
  """
  check_params(params, cfg)
  check_input(x_BD, cfg)
  if dead_F is not None and (jnp.shape(dead_F) != (cfg.d_sae,) or jnp.result_type(dead_F) != jnp.bool_):
    raise ValueError(
      f"dead_F: expected a bool mask of shape ({cfg.d_sae},), got {jnp.result_type(dead_F)} {jnp.shape(dead_F)}"
    )
  if jnp.ndim(penalty_scale) != 0:
    raise ValueError(f"penalty_scale: expected a scalar, got shape {jnp.shape(penalty_scale)}")
  checks.check_finite("penalty_scale", penalty_scale)
  checks.check_in("penalty_scale", penalty_scale, 0, math.inf)
  f_BF, pi_BF = _features(params, x_BD, cfg, training=True)
  x_hat_BD = decode(params, f_BF)
  mse = jnp.mean(jnp.sum((x_hat_BD - x_BD) ** 2, axis=-1))
  zero = jnp.zeros((), jnp.float32)
  sparsity, aux = zero, zero
  arch = cfg.architecture
  dec_norm_F = jnp.linalg.norm(params["W_dec"], axis=-1)
  if arch == "standard":
    sparsity = cfg.coefficient * jnp.mean(jnp.sum(f_BF * dec_norm_F, axis=-1))
  elif arch == "gated":
    gate_BF = jax.nn.relu(pi_BF)
    sparsity = cfg.coefficient * jnp.mean(jnp.sum(gate_BF * dec_norm_F, axis=-1))
    frozen = jax.lax.stop_gradient(params)
    aux = jnp.mean(jnp.sum((decode(frozen, gate_BF) - x_BD) ** 2, axis=-1))
  elif arch == "jumprelu":
    l0_B = jnp.sum(step(pi_BF, jnp.exp(params["log_threshold"]), cfg.bandwidth), axis=-1)
    sparsity = cfg.coefficient * jnp.mean(l0_B)
  elif dead_F is not None:
    aux = cfg.aux_coefficient * auxk(params, x_BD, x_hat_BD, pi_BF, dead_F, cfg.aux_k)
  total = mse + penalty_scale * sparsity + aux
  l0 = jnp.mean(jnp.sum(f_BF != 0, axis=-1).astype(jnp.float32))
  return total, {"mse": mse, "sparsity": sparsity, "aux": aux, "l0": l0, "f_BF": f_BF, "pi_BF": pi_BF}


def auxk(
  params: dict, x_BD: jax.Array, x_hat_BD: jax.Array, pi_BF: jax.Array, dead_F: jax.Array, k_aux: int
) -> jax.Array:
  """mean_B ||e - e_hat||^2, e = sg(x - x_hat), e_hat = ReLU(TopK_kaux(pi restricted to dead
  latents)) W_dec; 0 when no latent is dead (fewer than k_aux dead: only those)."""
  e_BD = jax.lax.stop_gradient(x_BD - x_hat_BD)
  masked_BF = jnp.where(dead_F, pi_BF, -jnp.inf)
  keep_BF = topk_mask(masked_BF, k_aux) & dead_F
  e_hat_BD = (jax.nn.relu(pi_BF) * keep_BF) @ params["W_dec"]
  err = jnp.mean(jnp.sum((e_hat_BD - e_BD) ** 2, axis=-1))
  return jnp.where(dead_F.any(), err, 0.0)


def project_decoder_grads(grads: dict, params: dict) -> dict:
  """grads with each decoder row's component along that (unit) row removed:
  g_F <- g_F - (g_F . w_F) w_F, so a step moves the rows tangentially."""
  w_FD = params["W_dec"]
  g_FD = grads["W_dec"]
  return grads | {"W_dec": g_FD - jnp.sum(g_FD * w_FD, axis=-1, keepdims=True) * w_FD}


def normalize_decoder(params: dict) -> dict:
  """params with decoder rows rescaled to norm 1."""
  w_FD = params["W_dec"]
  return params | {"W_dec": w_FD / jnp.linalg.norm(w_FD, axis=-1, keepdims=True)}


def batchtopk_threshold(threshold: jax.Array, f_BF: jax.Array, rate: float) -> jax.Array:
  """The EMA (1 - rate) threshold + rate min(positive f); a threshold of 0 (not yet set)
  starts at the first batch's min(positive f), so the EMA carries no bias towards 0;
  unchanged when nothing fired."""
  positive = f_BF > 0
  smallest = jnp.min(jnp.where(positive, f_BF, jnp.inf))
  updated = jnp.where(threshold > 0, (1 - rate) * threshold + rate * smallest, smallest)
  return jnp.where(positive.any(), updated, threshold)


def geometric_median(x_ND: Any, *, iters: int = 100, eps: float = 1e-8) -> jax.Array:
  """argmin_y sum_N ||x_N - y|| by Weiszfeld's iteration from the mean:
  y <- sum_N x_N / ||x_N - y|| / sum_N 1 / ||x_N - y||."""
  x_ND = jnp.asarray(x_ND, jnp.float32)
  if x_ND.ndim != 2 or x_ND.shape[0] < 1:
    raise ValueError(f"x_ND: expected points [N, D] with N >= 1, got {x_ND.shape}")
  checks.check_finite("x_ND", x_ND)
  if not isinstance(iters, (int, np.integer)) or iters < 0 or not eps > 0:
    raise ValueError(f"iters, eps: expected an int >= 0 and a float > 0, got {iters!r}, {eps!r}")

  def body(_, y_D):
    w_N = 1.0 / jnp.maximum(jnp.linalg.norm(x_ND - y_D, axis=-1), eps)
    return (w_N @ x_ND) / jnp.sum(w_N)

  return jax.lax.fori_loop(0, iters, body, jnp.mean(x_ND, axis=0))


def normalization_scale(x_ND: Any) -> float:
  """s with E||s x||^2 = D over the sample: s = sqrt(D / mean_N ||x_N||^2)."""
  x_ND = np.asarray(x_ND, np.float64)
  if x_ND.ndim != 2 or x_ND.shape[0] < 1:
    raise ValueError(f"x_ND: expected activations [N, D] with N >= 1, got shape {x_ND.shape}")
  checks.check_finite("x_ND", x_ND)
  mean_sq = float(np.mean(np.sum(x_ND**2, axis=-1)))
  if not mean_sq > 0:
    raise ValueError(f"x_ND: expected activations with nonzero norm, got mean ||x||^2 = {mean_sq}")
  return float(np.sqrt(x_ND.shape[-1] / mean_sq))


def fold_scale(params: dict, scale: float) -> dict:
  """The parameters of the same SAE on unscaled inputs, for an SAE trained on x * scale:
  W_enc * s, W_dec / s, b_dec / s (pre-activations, thresholds and gates are unchanged),
  so reconstruct(folded, x) = reconstruct(params, s x) / s."""
  checks.check_scalar("scale", scale, checks.Range(low=0, low_open=True))
  return params | {"W_enc": params["W_enc"] * scale, "W_dec": params["W_dec"] / scale, "b_dec": params["b_dec"] / scale}
