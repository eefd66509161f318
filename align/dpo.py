"""Preference optimisation losses: the DPO family, SimPO, ORPO, R-DPO, RPO, and KTO.

Shapes: B batch (pairs, or unpaired completions for KTO).

With policy and reference log-probs of the chosen (w) and rejected (l) completions,
  rho_w = log pi(y_w) - log pi_ref(y_w),  rho_l likewise,  Delta = rho_w - rho_l,
and sig the logistic function, the per-pair losses (spec: shared/papers/alignment.md) are

  sigmoid    -(1 - eps) log sig(b Delta) - eps log sig(-b Delta)        (DPO; cDPO for eps > 0)
  robust     [-(1 - eps) log sig(b Delta) + eps log sig(-b Delta)] / (1 - 2 eps)
  hinge      relu(1 - b Delta)                                            (SLiC)
  ipo        (Delta - 1 / (2 b))^2                                        (averaged log-probs)
  exo_pair   sig(b Delta)[log sig(b Delta) - log(1 - eps)] + sig(-b Delta)[log sig(-b Delta) - log eps]
  nca_pair   -log sig(b rho_w) - 1/2 log sig(-b rho_w) - 1/2 log sig(-b rho_l)
  bco_pair   -log sig(b rho_w - s) - log sig(-(b rho_l - s))                (s: reward shift)
  sppo_hard  (rho_w - 1 / (2 b))^2 + (rho_l + 1 / (2 b))^2
  aot_pair   sigmoid loss on sort(rho_w) - sort(rho_l) over the batch
  aot        sigmoid loss on sort(log pi(y_w) - log pi(y_l)) - sort(ref differences)
  apo_zero   1 - sig(b rho_w) + sig(b rho_l)
  apo_down   sig(b rho_w) + 1 - sig(b Delta)
  discopop   (1 - m)(-log sig z) + m e^{-z},  z = b Delta, m = sig(z / tau)
  rdpo       -log sig(b Delta - alpha (|y_w| - |y_l|))                     (R-DPO)
  simpo      -log sig(b (a_w - a_l) - gamma)                            (reference-free, averaged)
  orpo       -a_w - lambda log sig((a_w - a_l) - [log(1 - e^{a_w}) - log(1 - e^{a_l})])  (ref-free, averaged)

where a_* are length-averaged policy log-probs. Every loss may add rpo_alpha times the
chosen response's length-normalised NLL (RPO; Llama 3's DPO recipe). Losses are chosen by
name from one registry (`LOSSES`) that also records which need a reference model and
which use averaged log-probs. KTO takes unpaired completions: `kto_loss`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Annotated, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from paperjax.align.logprobs import SequenceLogProbs
from paperjax.ops import checks

log_sig = jax.nn.log_sigmoid
sig = jax.nn.sigmoid


class PairLogProbs(NamedTuple):
  """Policy (and, for reference-based losses, reference) log-probs of each pair."""

  chosen: SequenceLogProbs
  rejected: SequenceLogProbs
  ref_chosen: SequenceLogProbs | None = None
  ref_rejected: SequenceLogProbs | None = None


class Terms(NamedTuple):
  """What a loss reads: log-probs in the form its spec asks for (sums or averages)."""

  chosen_B: jax.Array
  rejected_B: jax.Array
  ref_chosen_B: jax.Array
  ref_rejected_B: jax.Array
  chosen_len_B: jax.Array
  rejected_len_B: jax.Array

  @property
  def rho_w(self):
    return self.chosen_B - self.ref_chosen_B

  @property
  def rho_l(self):
    return self.rejected_B - self.ref_rejected_B

  @property
  def delta(self):
    return self.rho_w - self.rho_l


@checks.config
class PreferenceConfig:
  """Which loss and its hyperparameters; every field is checked for type and range at
  construction (`ops.checks.config`), `loss` against the registry `LOSSES`."""

  loss: str = "sigmoid"
  beta: checks.PositiveFloat = 0.1
  label_smoothing: Annotated[float, checks.Range(low=0, high=1, high_open=True)] = 0.0  # eps
  gamma: float = 1.375  # SimPO target margin (paper recipe: beta 2.5, gamma 1.375)
  orpo_lambda: checks.NonNegativeFloat = 0.1
  discopop_tau: checks.PositiveFloat = 0.05
  length_alpha: float = 0.0  # R-DPO length penalty
  bco_shift: float = 0.0  # BCO: running mean of rewards, kept by the caller
  rpo_alpha: checks.NonNegativeFloat = 0.0  # weight of the chosen response's NLL (RPO / Llama 3)

  def __post_init__(self):
    if self.loss not in LOSSES:
      raise ValueError(f"loss: unknown {self.loss!r}; registered: {sorted(LOSSES)}")
    eps = self.label_smoothing
    if self.loss == "exo_pair":
      if not 0 < eps < 1:
        raise ValueError(f"label_smoothing: exo_pair needs 0 < eps < 1 (e.g. 1e-3), got {eps}")
    elif not 0 <= eps < 0.5:
      raise ValueError(f"label_smoothing: expected 0 <= eps < 0.5, got {eps}")


@checks.config
class LossSpec:
  fn: Callable[[Terms, PreferenceConfig], jax.Array]  # per-pair losses [B]
  reference: bool  # needs reference log-probs
  averaged: bool  # reads length-averaged log-probs


LOSSES: dict[str, LossSpec] = {}


def _register(name: str, *, reference: bool = True, averaged: bool = False):
  def add(fn):
    LOSSES[name] = LossSpec(fn=fn, reference=reference, averaged=averaged)
    return fn

  return add


def _smoothed_sigmoid(logits_B: jax.Array, eps: float) -> jax.Array:
  return -(1 - eps) * log_sig(logits_B) - eps * log_sig(-logits_B)


@_register("sigmoid")
def _sigmoid(t: Terms, c: PreferenceConfig):
  return _smoothed_sigmoid(c.beta * t.delta, c.label_smoothing)


@_register("robust")
def _robust(t, c):
  z, eps = c.beta * t.delta, c.label_smoothing
  return (-(1 - eps) * log_sig(z) + eps * log_sig(-z)) / (1 - 2 * eps)


@_register("hinge")
def _hinge(t, c):
  return jax.nn.relu(1 - c.beta * t.delta)


@_register("ipo", averaged=True)
def _ipo(t, c):
  return (t.delta - 1 / (2 * c.beta)) ** 2


@_register("exo_pair")
def _exo_pair(t, c):
  z, eps = c.beta * t.delta, c.label_smoothing
  return sig(z) * (log_sig(z) - math.log(1 - eps)) + sig(-z) * (log_sig(-z) - math.log(eps))


@_register("nca_pair")
def _nca_pair(t, c):
  w, l = c.beta * t.rho_w, c.beta * t.rho_l
  return -log_sig(w) - 0.5 * log_sig(-w) - 0.5 * log_sig(-l)


@_register("bco_pair")
def _bco_pair(t, c):
  return -log_sig(c.beta * t.rho_w - c.bco_shift) - log_sig(-(c.beta * t.rho_l - c.bco_shift))


@_register("sppo_hard")
def _sppo_hard(t, c):
  return (t.rho_w - 1 / (2 * c.beta)) ** 2 + (t.rho_l + 1 / (2 * c.beta)) ** 2


@_register("aot_pair")
def _aot_pair(t, c):
  return _smoothed_sigmoid(c.beta * (jnp.sort(t.rho_w) - jnp.sort(t.rho_l)), c.label_smoothing)


@_register("aot")
def _aot(t, c):
  policy = jnp.sort(t.chosen_B - t.rejected_B)
  reference = jnp.sort(t.ref_chosen_B - t.ref_rejected_B)
  return _smoothed_sigmoid(c.beta * (policy - reference), c.label_smoothing)


@_register("apo_zero")
def _apo_zero(t, c):
  return 1 - sig(c.beta * t.rho_w) + sig(c.beta * t.rho_l)


@_register("apo_down")
def _apo_down(t, c):
  return sig(c.beta * t.rho_w) + 1 - sig(c.beta * t.delta)


@_register("discopop")
def _discopop(t, c):
  z = c.beta * t.delta
  m = sig(z / c.discopop_tau)
  return (1 - m) * -log_sig(z) + m * jnp.exp(-z)


@_register("rdpo")
def _rdpo(t, c):
  z = c.beta * t.delta - c.length_alpha * (t.chosen_len_B - t.rejected_len_B)
  return _smoothed_sigmoid(z, c.label_smoothing)


@_register("simpo", reference=False, averaged=True)
def _simpo(t, c):
  return _smoothed_sigmoid(c.beta * (t.chosen_B - t.rejected_B) - c.gamma, c.label_smoothing)


@_register("orpo", reference=False, averaged=True)
def _orpo(t, c):
  def log1m_exp(a):  # log(1 - e^a) for a < 0, accurate near 0
    return jnp.log(-jnp.expm1(jnp.minimum(a, -1e-6)))

  log_odds = (t.chosen_B - t.rejected_B) - (log1m_exp(t.chosen_B) - log1m_exp(t.rejected_B))
  return -t.chosen_B - c.orpo_lambda * log_sig(log_odds)


def preference_loss(lp: PairLogProbs, cfg: PreferenceConfig) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Mean loss over pairs and the metrics a trainer logs.

  Metrics: rewards_chosen / rewards_rejected (implicit rewards b * rho, or b * a for
  reference-free losses), reward_accuracy (share of pairs with reward_w > reward_l),
  reward_margin, logps_chosen / logps_rejected (summed), nll_chosen (length-normalised).

  Value checks (log-probs finite and <= 0, counts >= 0) run on concrete inputs, or inside
  `ops.checks.checked`.
  """
  if not isinstance(cfg, PreferenceConfig):
    raise TypeError(f"cfg: expected a dpo.PreferenceConfig, got {type(cfg).__name__}")
  if not isinstance(lp, PairLogProbs):
    raise TypeError(f"lp: expected a dpo.PairLogProbs, got {type(lp).__name__}")
  spec = LOSSES[cfg.loss]
  _check(lp, spec, cfg)
  zeros = jnp.zeros_like(lp.chosen.sum_B)

  def form(s: SequenceLogProbs | None, averaged: bool):
    return zeros if s is None else (s.mean_B if averaged else s.sum_B)

  def terms(averaged: bool) -> Terms:
    refs = (lp.ref_chosen, lp.ref_rejected) if spec.reference else (None, None)
    return Terms(
      form(lp.chosen, averaged),
      form(lp.rejected, averaged),
      form(refs[0], averaged),
      form(refs[1], averaged),
      lp.chosen.count_B,
      lp.rejected.count_B,
    )

  losses_B = spec.fn(terms(spec.averaged), cfg)
  nll_B = -lp.chosen.mean_B
  if cfg.rpo_alpha:
    losses_B = losses_B + cfg.rpo_alpha * nll_B
  reward_terms = terms(averaged=not spec.reference)  # DPO's implicit reward uses sums
  reward_w, reward_l = cfg.beta * reward_terms.rho_w, cfg.beta * reward_terms.rho_l
  metrics = {
    "rewards_chosen": reward_w.mean(),
    "rewards_rejected": reward_l.mean(),
    "reward_accuracy": (reward_w > reward_l).astype(jnp.float32).mean(),
    "reward_margin": (reward_w - reward_l).mean(),
    "logps_chosen": lp.chosen.sum_B.mean(),
    "logps_rejected": lp.rejected.sum_B.mean(),
    "nll_chosen": nll_B.mean(),
  }
  return losses_B.mean(), metrics


def kto_loss(
  policy: SequenceLogProbs,
  reference: SequenceLogProbs,
  desirable_B: jax.Array,
  kl_policy: SequenceLogProbs,
  kl_reference: SequenceLogProbs,
  *,
  beta: float = 0.1,
  desirable_weight: float = 1.0,
  undesirable_weight: float = 1.0,
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """KTO on unpaired completions with binary feedback.

  rho = log pi(y) - log pi_ref(y); z = max(0, mean(log pi - log pi_ref) on mismatched
  (prompt, completion) pairs), held constant (no gradient);
  desirable: w_D (1 - sig(b (rho - z))), undesirable: w_U (1 - sig(b (z - rho))); mean over B.
  """
  for name, value in (
    ("beta", beta),
    ("desirable_weight", desirable_weight),
    ("undesirable_weight", undesirable_weight),
  ):
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
      raise TypeError(f"{name}: expected a float, got {type(value).__name__} {value!r}")
  if not beta > 0:  # NaN fails too
    raise ValueError(f"beta: expected > 0, got {beta}")
  if not (desirable_weight >= 0 and undesirable_weight >= 0):
    raise ValueError(
      f"desirable_weight, undesirable_weight: expected >= 0, got {desirable_weight}, {undesirable_weight}"
    )
  parts = {"policy": policy, "reference": reference, "kl_policy": kl_policy, "kl_reference": kl_reference}
  for name, s in parts.items():
    if not isinstance(s, SequenceLogProbs):
      raise TypeError(f"{name}: expected logprobs.SequenceLogProbs, got {type(s).__name__}")
  if not hasattr(desirable_B, "dtype") or desirable_B.dtype != jnp.bool_:
    # Labels of +-1 or 0/1 floats would pass through jnp.where as "desirable" wherever nonzero.
    raise TypeError(
      f"desirable_B: expected a bool array [B], got {getattr(desirable_B, 'dtype', type(desirable_B).__name__)}"
    )
  if not policy.sum_B.shape == reference.sum_B.shape == desirable_B.shape or desirable_B.ndim != 1:
    raise ValueError(
      f"policy, reference, desirable_B: expected one batch shape [B], got {policy.sum_B.shape}, "
      f"{reference.sum_B.shape}, {desirable_B.shape}"
    )
  if kl_policy.sum_B.shape != kl_reference.sum_B.shape:
    raise ValueError(
      f"kl_policy, kl_reference: expected one shape, got {kl_policy.sum_B.shape}, {kl_reference.sum_B.shape}"
    )
  for name, s in parts.items():
    _check_values(name, s)
  z = jax.lax.stop_gradient(jnp.maximum(jnp.mean(kl_policy.sum_B - kl_reference.sum_B), 0.0))
  rho_B = policy.sum_B - reference.sum_B
  losses_B = jnp.where(
    desirable_B, desirable_weight * (1 - sig(beta * (rho_B - z))), undesirable_weight * (1 - sig(beta * (z - rho_B)))
  )
  return losses_B.mean(), {"kl": z, "rewards": (beta * rho_B).mean()}


def _check(lp: PairLogProbs, spec: LossSpec, cfg: PreferenceConfig) -> None:
  parts = {"chosen": lp.chosen, "rejected": lp.rejected}
  if spec.reference:
    if lp.ref_chosen is None or lp.ref_rejected is None:
      raise ValueError(f"lp: loss {cfg.loss!r} needs ref_chosen and ref_rejected log-probs")
    parts |= {"ref_chosen": lp.ref_chosen, "ref_rejected": lp.ref_rejected}
  for name, s in parts.items():
    if not isinstance(s, SequenceLogProbs):
      raise TypeError(f"lp.{name}: expected logprobs.SequenceLogProbs, got {type(s).__name__}")
  shapes = {name: (s.sum_B.shape, s.count_B.shape) for name, s in parts.items()}
  if len(set(shapes.values())) != 1 or lp.chosen.sum_B.ndim != 1:
    raise ValueError(f"lp: expected one batch shape [B] for every part, got {shapes}")
  for name, s in parts.items():
    _check_values(f"lp.{name}", s)


def _check_values(name: str, s: SequenceLogProbs) -> None:
  """Log-probs are finite and <= 0 (a positive one is a logit or a probability passed by
  mistake), counts >= 0."""
  checks.check_finite(f"{name}.sum_B", s.sum_B)
  checks.check_in(f"{name}.sum_B", s.sum_B, -np.inf, 0, what="log-probs")
  checks.check_in(f"{name}.count_B", s.count_B, 0, np.inf, what="token counts")
