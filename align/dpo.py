"""Preference optimisation losses: the DPO family, SimPO, ORPO, R-DPO, RPO, CPO, SLiC-HF, NPO, and KTO.

Shapes: B batch (pairs, or unpaired completions for KTO), T time (per-token log-probs).

With policy and reference log-probs of the chosen (w) and rejected (l) completions,
  rho_w = log pi(y_w) - log pi_ref(y_w),  rho_l likewise,  Delta = rho_w - rho_l,
and sig the logistic function, the per-pair losses (spec: shared/papers/alignment.md) are

  sigmoid       -log sig(b Delta)                                        (DPO; TRL's: no label smoothing)
  cdpo          -(1 - eps) log sig(b Delta) - eps log sig(-b Delta)        (conservative DPO, cDPO)
  robust        [-(1 - eps) log sig(b Delta) + eps log sig(-b Delta)] / (1 - 2 eps)
  hinge         relu(1 - b Delta)                                        (TRL's SLiC: the hinge alone)
  ipo           (Delta - 1 / (2 b))^2                                    (averaged log-probs)
  exo_pair      sig(b Delta)[log sig(b Delta) - log(1 - eps)] + sig(-b Delta)[log sig(-b Delta) - log eps]
  nca_pair      -log sig(b rho_w) - 1/2 log sig(-b rho_w) - 1/2 log sig(-b rho_l)
  bco_pair      -log sig(b rho_w - s) - log sig(-(b rho_l - s))          (s: reward shift)
  sppo_hard     (rho_w - 1 / (2 b))^2 + (rho_l + 1 / (2 b))^2
  aot_unpaired  smoothed sigmoid loss on sort(rho_w) - sort(rho_l) over the batch (alias: aot_pair)
  aot           smoothed sigmoid loss on sort(log pi(y_w) - log pi(y_l)) - sort(ref differences)
  apo_zero      1 - sig(b rho_w) + sig(b rho_l)
  apo_down      sig(b rho_w) + 1 - sig(b Delta)
  discopop      (1 - m)(-log sig z) + m e^{-z},  z = b Delta, m = sig(z / tau)
  rdpo          -(1 - eps) log sig(z) - eps log sig(-z),  z = b Delta - alpha (|y_w| - |y_l|)
                (R-DPO; not in TRL: the paper's loss for eps = 0, smoothed as cdpo for eps > 0)
  sigmoid_norm  -log sig(b Delta)                                        (TRL; averaged log-probs)
  sft           -sum_b sum_t m log pi(y_w,t) / sum_b |y_w|                (TRL; one token mean per batch)
  dpop          -log sig(b (Delta - lambda max(0, -rho_w)))                (DPO-Positive, Smaug)
  beta_dpo      -log sig(b_batch Delta),  b_batch = b (1 + alpha (mean_batch Delta - M0))  (beta-DPO)
  npo           -(2 / b) log sig(-b rho_l)                                (NPO: the rejected side only)
  simpo         -(1 - eps) log sig(u) - eps log sig(-u),  u = b (a_w - a_l) - gamma  (ref-free, averaged;
                label smoothing as TRL's CPOTrainer applies it, the paper's loss for eps = 0)
  orpo          -a_w - lambda log sig((a_w - a_l) - [log(1 - e^{a_w}) - log(1 - e^{a_l})])  (ref-free, averaged)
  cpo           -(1 - eps) log sig(b (lp_w - lp_l)) - eps log sig(-b (lp_w - lp_l)) + alpha_cpo * sft  (ref-free)
  slic          max(0, delta - lp_w + lp_l) - lambda_slic lp_w           (SLiC-HF, reference-free)

where a_* are length-averaged and lp_* summed policy log-probs. Every loss may add rpo_alpha
times the chosen response's length-normalised NLL (RPO; Llama 3's DPO recipe). Losses are
chosen by name from one registry (`LOSSES`) that also records which need a reference model,
which use averaged log-probs, which accept an f-divergence, which sort the batch and which
read label_smoothing (eps). KTO takes unpaired completions: `kto_loss`.

TRL 1.16's DPOConfig options are `PreferenceConfig` fields under TRL's names and act as TRL's
DPOTrainer does: a tuple of losses with `loss_weights` (MPO), `ld_alpha` (LD-DPO),
`f_divergence_type` (f-DPO), `use_weighting` (WPO) and the TR-DPO reference updates
(`train.mix_reference`, `train.sync_reference`). Where TRL departs from a paper, the
departure is said at the field or the loss. TRL 1.16's sigmoid ignores label_smoothing; we
refuse label_smoothing > 0 with `sigmoid` (and with any set of losses none of which reads it)
rather than ignore it, and offer cDPO under its own name, `cdpo`.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from typing import Annotated, Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from paperjax.align.logprobs import SequenceLogProbs, check_sequence
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
  """What a loss reads: log-probs in the form its spec asks for (sums or averages).

  scores_w_B / scores_l_B: with a non-default f-divergence, f'-scores of the summed log-ratios
  (divided by the lengths for averaged losses) that replace rho_w and rho_l in `delta`."""

  chosen_B: jax.Array
  rejected_B: jax.Array
  ref_chosen_B: jax.Array
  ref_rejected_B: jax.Array
  chosen_len_B: jax.Array
  rejected_len_B: jax.Array
  scores_w_B: jax.Array | None = None
  scores_l_B: jax.Array | None = None

  @property
  def rho_w(self):
    return self.chosen_B - self.ref_chosen_B

  @property
  def rho_l(self):
    return self.rejected_B - self.ref_rejected_B

  @property
  def delta(self):
    if self.scores_w_B is not None and self.scores_l_B is not None:
      return self.scores_w_B - self.scores_l_B
    return self.rho_w - self.rho_l


FDivergence = Literal["reverse_kl", "forward_kl", "js_divergence", "alpha_divergence"]


@checks.config
class PreferenceConfig:
  """Which loss (or tuple of losses) and its hyperparameters; every field is checked for type
  and range at construction (`ops.checks.config`), each loss name against the registry `LOSSES`.

  TRL 1.16's DPOConfig options, acting as TRL's DPOTrainer does:
  - loss as a tuple with loss_weights (MPO): sum_k w_k mean_B(loss_k); weights default to 1.
    As in TRL, the BCO term (bco_pair) then has no running-mean shift unless bco_shift is set,
    and the SFT term is one token mean over the batch without LD weighting.
  - ld_alpha (LD-DPO, arXiv 2409.06411): every reference-based loss reads
    log pi(y) = sum_{t <= n_s} lp_t + alpha sum_{t > n_s} lp_t for policy and reference, with
    t counting completion tokens and n_s = min(|y_w|, |y_l|) of the pair; lengths stay |y|.
    Reference-free losses (sft, simpo, orpo, cpo, slic) read the plain sums, so ld_alpha with
    only those is refused (it would have no effect). Needs per-token log-probs
    (`logprobs.sequence_logprobs(..., per_token=True)`). We refuse alpha outside [0, 1]
    (TRL accepts it silently).
  - label_smoothing (eps): read by robust, exo_pair, aot and aot_unpaired as in TRL's DPOTrainer,
    by cpo and simpo as in TRL's CPOTrainer, and by our cdpo and rdpo (`LossSpec.smoothing`).
    TRL's sigmoid ignores it: eps > 0 with sigmoid is refused (use cdpo), as is eps > 0 when
    no loss of the config reads it.
  - f_divergence_type (f-DPO, arXiv 2309.16240): rho is replaced by TRL's shifted f'(pi/pi_ref),
    f'(1) = 0: forward_kl 1 - e^{-rho}; js_divergence log 2 + log sig(rho); alpha_divergence
    (e^{(c-1) rho} - 1) / (c - 1) with c = f_alpha_divergence_coef (the paper's alpha is 1 - c;
    c = 1 falls back to reverse_kl; (c-1) rho is clipped at 80). The shift cancels in
    sigmoid-type losses but not in ipo and sigmoid_norm, where TRL divides the score of the
    summed log-ratio by the length. Only losses built on Delta accept it (`LossSpec.f_divergence`).
  - use_weighting (WPO, arXiv 2406.11827): each loss term of each pair is multiplied by
    w_w w_l, w = exp(mean_t [log pi(y_t) - log sum_v pi(v)^2]) under the policy, held constant
    (TRL's sampled-alignment form; LD weighting is ignored). RPO's NLL is not weighted.
    Refused with losses that sort the batch (aot, aot_unpaired); works with sft (TRL crashes).
  - sync_ref_model, ref_model_mixup_alpha, ref_model_sync_steps (TR-DPO, arXiv 2404.09656):
    read by `train.sync_reference`, not by the loss.
  """

  loss: str | tuple[str, ...] = "sigmoid"
  loss_weights: tuple[float, ...] | None = None  # MPO: one weight per loss; None: all 1
  beta: checks.PositiveFloat = 0.1
  label_smoothing: Annotated[float, checks.Range(low=0, high=1, high_open=True)] = 0.0  # eps
  gamma: float = 1.375  # SimPO target margin (paper recipe: beta 2.5, gamma 1.375)
  orpo_lambda: checks.NonNegativeFloat = 0.1
  discopop_tau: checks.PositiveFloat = 0.05
  length_alpha: float = 0.0  # R-DPO length penalty
  bco_shift: float = 0.0  # BCO: running mean of rewards, kept by the caller
  rpo_alpha: checks.NonNegativeFloat = 0.0  # weight of the chosen response's NLL (RPO / Llama 3)
  dpop_lambda: checks.NonNegativeFloat = 50.0  # DPO-Positive penalty weight (Smaug's lambda)
  beta_dpo_alpha: checks.NonNegativeFloat = 0.5  # beta-DPO: how strongly the batch margin moves beta
  beta_dpo_m0: float = 0.0  # beta-DPO threshold M0 (log-ratio units), a running mean kept by the caller
  cpo_alpha: checks.NonNegativeFloat = 1.0  # CPO: weight of the NLL (behaviour cloning) term, TRL's default
  slic_delta: checks.NonNegativeFloat = 1.0  # SLiC-HF calibration margin
  slic_lambda: checks.NonNegativeFloat = 0.5  # SLiC-HF regulariser weight (NLL of the chosen target)
  ld_alpha: Annotated[float, checks.Range(low=0, high=1)] | None = None  # LD-DPO; None: off
  f_divergence_type: FDivergence = "reverse_kl"
  f_alpha_divergence_coef: float = 0.5
  use_weighting: bool = False  # WPO
  sync_ref_model: bool = False  # TR-DPO
  ref_model_mixup_alpha: checks.Fraction = 0.6
  ref_model_sync_steps: checks.PositiveInt = 512

  def __post_init__(self):
    names = self.losses
    if not names:
      raise ValueError("loss: expected a loss name or a non-empty tuple of names, got ()")
    for name in names:
      if name not in LOSSES:
        raise ValueError(f"loss: unknown {name!r}; registered: {sorted(LOSSES)}")
      if name in ALIASES:
        warnings.warn(
          f"loss: {name!r} is an alias of {ALIASES[name]!r} (TRL's name); use {ALIASES[name]!r}",
          DeprecationWarning,
          stacklevel=4,
        )
    if self.loss_weights is not None and len(self.loss_weights) != len(names):
      raise ValueError(
        f"loss_weights: expected one weight per loss type ({len(names)} for {names}), "
        f"got {len(self.loss_weights)} weights {self.loss_weights}"
      )
    eps = self.label_smoothing
    if "exo_pair" in names and not 0 < eps < 1:
      raise ValueError(f"label_smoothing: exo_pair needs 0 < eps < 1 (the EXO paper recommends 1e-3), got {eps}")
    if any(n != "exo_pair" for n in names) and not 0 <= eps < 0.5:
      raise ValueError(f"label_smoothing: expected 0 <= eps < 0.5, got {eps}")
    if eps > 0 and "sigmoid" in names:
      raise ValueError(
        f"label_smoothing: TRL 1.16's sigmoid ignores label_smoothing (no cDPO), and we refuse a key rather "
        f"than ignore it; for conservative DPO, -(1 - eps) log sig(b Delta) - eps log sig(-b Delta), use "
        f"loss='cdpo'. Got label_smoothing={eps} with loss {self.loss!r}"
      )
    if eps > 0 and not any(LOSSES[n].smoothing for n in names):
      readers = sorted(n for n, spec in LOSSES.items() if spec.smoothing and n not in ALIASES)
      raise ValueError(
        f"label_smoothing: none of loss {self.loss!r} reads it (as in TRL 1.16), so {eps} would have no "
        f"effect; the losses that read it: {readers}"
      )
    if self.ld_alpha is not None and not any(LOSSES[n].reference for n in names):
      raise ValueError(
        f"ld_alpha: LD-DPO weights the log-probs of reference-based losses only, and loss {self.loss!r} is "
        f"reference-free (it reads the plain sums, as TRL's sft does), so ld_alpha={self.ld_alpha} would have "
        f"no effect; set ld_alpha=None or add a reference-based loss"
      )
    if self.f_divergence_type != "reverse_kl":
      refused = [n for n in names if not LOSSES[n].f_divergence]
      if refused:
        accepted = sorted(n for n, spec in LOSSES.items() if spec.f_divergence)
        raise ValueError(
          f"f_divergence_type: {self.f_divergence_type!r} is only supported for loss types built on the "
          f"chosen-rejected reward difference ({accepted}): the f-DPO reparameterization leaves a beta log Z(x) "
          f"term that cancels only in that difference; got loss {names}. Use the default 'reverse_kl' with "
          f"{refused}."
        )
    if self.use_weighting:
      sorting = [n for n in names if LOSSES[n].sorts]
      if sorting:
        raise ValueError(
          f"use_weighting: WPO weighting is not implemented for {sorting}: those losses sort the batch, which "
          f"would misalign per-pair weights"
        )

  @property
  def losses(self) -> tuple[str, ...]:
    """The loss names, a tuple even for one."""
    return (self.loss,) if isinstance(self.loss, str) else self.loss

  @property
  def weights(self) -> tuple[float, ...]:
    return self.loss_weights if self.loss_weights is not None else (1.0,) * len(self.losses)

  @property
  def reference(self) -> bool:
    """Whether any of the losses needs reference log-probs."""
    return any(LOSSES[n].reference for n in self.losses)

  @property
  def per_token(self) -> bool:
    """Whether the loss needs per-token log-probs (ld_alpha, use_weighting):
    `train.pair_logprobs` / `reference_logprobs` then take per_token=True."""
    return self.ld_alpha is not None or self.use_weighting


@checks.config
class LossSpec:
  fn: Callable[[Terms, PreferenceConfig], jax.Array]  # per-pair losses [B]
  reference: bool  # needs reference log-probs
  averaged: bool  # reads length-averaged log-probs
  f_divergence: bool = False  # built on Delta alone: accepts a non-default f_divergence_type
  sorts: bool = False  # sorts over the batch: per-pair weights (WPO) would be misaligned
  smoothing: bool = False  # reads label_smoothing (eps)


LOSSES: dict[str, LossSpec] = {}
# Old names that resolve to the same LossSpec (constructing a config with one warns).
ALIASES: dict[str, str] = {"aot_pair": "aot_unpaired"}


def _register(
  name: str,
  *,
  reference: bool = True,
  averaged: bool = False,
  f_divergence: bool = False,
  sorts: bool = False,
  smoothing: bool = False,
):
  def add(fn):
    LOSSES[name] = LossSpec(
      fn=fn, reference=reference, averaged=averaged, f_divergence=f_divergence, sorts=sorts, smoothing=smoothing
    )
    return fn

  return add


def _smoothed_sigmoid(logits_B: jax.Array, eps: float) -> jax.Array:
  return -(1 - eps) * log_sig(logits_B) - eps * log_sig(-logits_B)


@_register("sigmoid", f_divergence=True)
def _sigmoid(t: Terms, c: PreferenceConfig):
  # TRL 1.16's sigmoid: no label smoothing (PreferenceConfig refuses eps > 0 with it; cDPO is cdpo).
  return -log_sig(c.beta * t.delta)


@_register("cdpo", f_divergence=True, smoothing=True)
def _cdpo(t: Terms, c: PreferenceConfig):
  # Conservative DPO (Mitchell 2023): labels flipped with probability eps; not a TRL loss type.
  return _smoothed_sigmoid(c.beta * t.delta, c.label_smoothing)


@_register("robust", f_divergence=True, smoothing=True)
def _robust(t, c):
  z, eps = c.beta * t.delta, c.label_smoothing
  return (-(1 - eps) * log_sig(z) + eps * log_sig(-z)) / (1 - 2 * eps)


@_register("hinge", f_divergence=True)
def _hinge(t, c):
  return jax.nn.relu(1 - c.beta * t.delta)


@_register("ipo", averaged=True, f_divergence=True)
def _ipo(t, c):
  return (t.delta - 1 / (2 * c.beta)) ** 2


@_register("exo_pair", f_divergence=True, smoothing=True)
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


@_register("aot_unpaired", sorts=True, smoothing=True)
def _aot_unpaired(t, c):
  # TRL adds label smoothing to the paper's logistic loss.
  return _smoothed_sigmoid(c.beta * (jnp.sort(t.rho_w) - jnp.sort(t.rho_l)), c.label_smoothing)


LOSSES["aot_pair"] = LOSSES["aot_unpaired"]


@_register("aot", sorts=True, smoothing=True)
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


@_register("discopop", f_divergence=True)
def _discopop(t, c):
  z = c.beta * t.delta
  m = sig(z / c.discopop_tau)
  return (1 - m) * -log_sig(z) + m * jnp.exp(-z)


@_register("rdpo", f_divergence=True, smoothing=True)  # the length term sits outside the log-ratios
def _rdpo(t, c):
  # R-DPO is not a TRL loss type: the paper's loss for eps = 0, smoothed as cdpo for eps > 0.
  z = c.beta * t.delta - c.length_alpha * (t.chosen_len_B - t.rejected_len_B)
  return _smoothed_sigmoid(z, c.label_smoothing)


@_register("sigmoid_norm", averaged=True, f_divergence=True)
def _sigmoid_norm(t, c):
  # TRL: DPO on length-averaged log-ratios; no label smoothing.
  return -log_sig(c.beta * t.delta)


def _batch_nll(t: Terms) -> jax.Array:
  """-sum_b lp_w / sum_b |y_w|: one token-level mean over the batch (TRL's sft, CPO's NLL), as [B]."""
  nll = -jnp.sum(t.chosen_B) / jnp.maximum(jnp.sum(t.chosen_len_B), 1.0)
  return jnp.broadcast_to(nll, t.chosen_B.shape)


@_register("sft", reference=False, f_divergence=True)
def _sft(t, c):
  return _batch_nll(t)


@_register("dpop")
def _dpop(t, c):
  # Smaug Eq. 3: the penalty is active only while the policy's chosen log-prob is below the reference's.
  return -log_sig(c.beta * (t.delta - c.dpop_lambda * jax.nn.relu(-t.rho_w)))


@_register("beta_dpo")
def _beta_dpo(t, c):
  # The authors' code measures M in log-ratio units (Delta, no beta), holds beta_batch constant
  # and clips it at 1e-3. Their beta-guided filtering (sampling pairs by a Gaussian weight on M) is omitted.
  margin = jax.lax.stop_gradient(jnp.mean(t.delta))
  beta_batch = jnp.maximum(c.beta * (1 + c.beta_dpo_alpha * (margin - c.beta_dpo_m0)), 1e-3)
  return -log_sig(beta_batch * t.delta)


@_register("npo")
def _npo(t, c):
  return -(2 / c.beta) * log_sig(-c.beta * t.rho_l)


@_register("simpo", reference=False, averaged=True, smoothing=True)
def _simpo(t, c):
  return _smoothed_sigmoid(c.beta * (t.chosen_B - t.rejected_B) - c.gamma, c.label_smoothing)


@_register("orpo", reference=False, averaged=True)
def _orpo(t, c):
  def log1m_exp(a):  # log(1 - e^a) for a < 0, accurate near 0
    return jnp.log(-jnp.expm1(jnp.minimum(a, -1e-6)))

  log_odds = (t.chosen_B - t.rejected_B) - (log1m_exp(t.chosen_B) - log1m_exp(t.rejected_B))
  return -t.chosen_B - c.orpo_lambda * log_sig(log_odds)


@_register("cpo", reference=False, smoothing=True)
def _cpo(t, c):
  # TRL's CPOTrainer: summed log-probs with label smoothing; its NLL is one token mean over the batch.
  return _smoothed_sigmoid(c.beta * (t.chosen_B - t.rejected_B), c.label_smoothing) + c.cpo_alpha * _batch_nll(t)


@_register("slic", reference=False)
def _slic(t, c):
  return jax.nn.relu(c.slic_delta - (t.chosen_B - t.rejected_B)) - c.slic_lambda * t.chosen_B


def f_scores(rho_B: jax.Array, cfg: PreferenceConfig) -> jax.Array:
  """TRL 1.16's f-DPO score of a log-ratio rho = log(pi / pi_ref), f'(1) = 0 (see PreferenceConfig):
  reverse_kl rho; forward_kl 1 - e^{-rho}; js_divergence log 2 + log sig(rho);
  alpha_divergence (e^{(c - 1) rho} - 1) / (c - 1), (c - 1) rho clipped at 80, rho when |c - 1| < 1e-6."""
  kind = cfg.f_divergence_type
  if kind == "reverse_kl":
    return rho_B
  if kind == "forward_kl":
    return 1 - jnp.exp(-rho_B)
  if kind == "js_divergence":
    return math.log(2) + log_sig(rho_B)
  c = cfg.f_alpha_divergence_coef
  if abs(c - 1.0) < 1e-6:
    return rho_B
  return (jnp.exp(jnp.minimum((c - 1.0) * rho_B, 80.0)) - 1.0) / (c - 1.0)


def ld_weighted(
  chosen: SequenceLogProbs, rejected: SequenceLogProbs, alpha: float
) -> tuple[SequenceLogProbs, SequenceLogProbs]:
  """LD-DPO's (arXiv 2409.06411) length-desensitised log-probs of a pair, as TRL 1.16 computes them:

    log pi(y) = sum_t lp_t [k_t <= n_s] + alpha sum_t lp_t [k_t > n_s],  k_t = sum_{s <= t} m_s,
    n_s = min(|y_w|, |y_l|)

  for both sides (the verbose tail of the longer one is scaled by alpha; counts unchanged).
  Needs per-token fields (`sequence_logprobs(..., per_token=True)`), token_BT and mask_BT [B, T]."""
  for name, s in (("chosen", chosen), ("rejected", rejected)):
    if s.token_BT is None or s.mask_BT is None:
      raise ValueError(
        f"{name}: ld_alpha needs per-token log-probs (token_BT, mask_BT): "
        f"logprobs.sequence_logprobs(..., per_token=True) or train.pair_logprobs(..., per_token=True)"
      )
  assert chosen.mask_BT is not None and rejected.mask_BT is not None  # checked above, for mypy
  shared_B = jnp.minimum(chosen.mask_BT.sum(axis=1), rejected.mask_BT.sum(axis=1))

  def weigh(s: SequenceLogProbs) -> SequenceLogProbs:
    token_BT, mask_BT = jnp.asarray(s.token_BT), jnp.asarray(s.mask_BT)
    tail_BT = jnp.cumsum(mask_BT, axis=1) > shared_B[:, None]
    return s._replace(sum_B=jnp.sum(jnp.where(tail_BT, alpha * token_BT, token_BT), axis=1))

  return weigh(chosen), weigh(rejected)


def wpo_weights(chosen: SequenceLogProbs, rejected: SequenceLogProbs) -> jax.Array:
  """WPO's (arXiv 2406.11827) pair weights in TRL 1.16's sampled-alignment form, held constant:

    w = exp(sum_t m_t [log pi(y_t) - log sum_v pi(v)^2] / max(|y|, 1)),  weight_B = w_w w_l

  from the policy's per-token fields (`sequence_logprobs(..., per_token=True)`). [B]"""
  for name, s in (("chosen", chosen), ("rejected", rejected)):
    if s.token_BT is None or s.log_sum_sq_BT is None:
      raise ValueError(
        f"lp.{name}: use_weighting needs the policy's per-token log-probs (token_BT, log_sum_sq_BT): "
        f"logprobs.sequence_logprobs(..., per_token=True) or train.pair_logprobs(..., per_token=True)"
      )

  def weight(s: SequenceLogProbs) -> jax.Array:
    aligned_B = jnp.sum(jnp.asarray(s.token_BT) - jnp.asarray(s.log_sum_sq_BT), axis=1) / jnp.maximum(s.count_B, 1.0)
    return jnp.exp(aligned_B)

  return jax.lax.stop_gradient(weight(chosen) * weight(rejected))


def preference_loss(lp: PairLogProbs, cfg: PreferenceConfig) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Mean loss over pairs and the metrics a trainer logs.

  loss = sum_k w_k mean_B(loss_k [* WPO weight]) + rpo_alpha mean_B(NLL_w) for the config's
  losses k (one, or a tuple with loss_weights); LD-DPO and f-DPO change what the losses read
  (PreferenceConfig says how).

  Metrics: rewards_chosen / rewards_rejected (implicit rewards b * rho, or b * a for
  reference-free losses; LD-weighted under ld_alpha, as TRL logs them), reward_accuracy
  (share of pairs with reward_w > reward_l), reward_margin, logps_chosen / logps_rejected
  (summed, as the losses read them), nll_chosen (length-normalised), and wpo_weight (mean
  pair weight) under use_weighting.

  Value checks (`logprobs.check_sequence`: log-probs finite and <= 0, counts finite and >= 0)
  run on concrete inputs, or inside `ops.checks.checked`.
  """
  if not isinstance(cfg, PreferenceConfig):
    raise TypeError(f"cfg: expected a dpo.PreferenceConfig, got {type(cfg).__name__}")
  if not isinstance(lp, PairLogProbs):
    raise TypeError(f"lp: expected a dpo.PairLogProbs, got {type(lp).__name__}")
  _check(lp, cfg)
  raw = lp
  if cfg.ld_alpha is not None:
    chosen, rejected = ld_weighted(lp.chosen, lp.rejected, cfg.ld_alpha)
    lp = PairLogProbs(chosen, rejected, lp.ref_chosen, lp.ref_rejected)
    if cfg.reference and lp.ref_chosen is not None and lp.ref_rejected is not None:
      ref_chosen, ref_rejected = ld_weighted(lp.ref_chosen, lp.ref_rejected, cfg.ld_alpha)
      lp = PairLogProbs(lp.chosen, lp.rejected, ref_chosen, ref_rejected)
  zeros = jnp.zeros_like(lp.chosen.sum_B)

  def form(s: SequenceLogProbs | None, averaged: bool):
    return zeros if s is None else (s.mean_B if averaged else s.sum_B)

  def terms(spec_reference: bool, averaged: bool) -> Terms:
    # LD weighting applies to the reference-based losses only (TRL: not to sft).
    pairs = lp if spec_reference else raw
    refs = (pairs.ref_chosen, pairs.ref_rejected) if spec_reference else (None, None)
    t = Terms(
      form(pairs.chosen, averaged),
      form(pairs.rejected, averaged),
      form(refs[0], averaged),
      form(refs[1], averaged),
      lp.chosen.count_B,
      lp.rejected.count_B,
    )
    if cfg.f_divergence_type == "reverse_kl" or not spec_reference:
      return t
    scale_w = jnp.maximum(lp.chosen.count_B, 1.0) if averaged else 1.0
    scale_l = jnp.maximum(lp.rejected.count_B, 1.0) if averaged else 1.0
    rho_w = pairs.chosen.sum_B - refs[0].sum_B  # type: ignore[union-attr]
    rho_l = pairs.rejected.sum_B - refs[1].sum_B  # type: ignore[union-attr]
    return t._replace(scores_w_B=f_scores(rho_w, cfg) / scale_w, scores_l_B=f_scores(rho_l, cfg) / scale_l)

  weight_B = wpo_weights(raw.chosen, raw.rejected) if cfg.use_weighting else None
  loss = jnp.zeros((), jnp.float32)
  for name, w in zip(cfg.losses, cfg.weights, strict=True):
    spec = LOSSES[name]
    losses_B = spec.fn(terms(spec.reference, spec.averaged), cfg)
    if weight_B is not None:
      losses_B = losses_B * weight_B
    loss = loss + w * losses_B.mean()
  nll_B = -raw.chosen.mean_B
  if cfg.rpo_alpha:
    loss = loss + cfg.rpo_alpha * nll_B.mean()
  reward_terms = terms(cfg.reference, averaged=not cfg.reference)  # DPO's implicit reward uses sums
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
  if weight_B is not None:
    metrics["wpo_weight"] = weight_B.mean()
  return loss, metrics


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
    check_sequence(name, s)
  z = jax.lax.stop_gradient(jnp.maximum(jnp.mean(kl_policy.sum_B - kl_reference.sum_B), 0.0))
  rho_B = policy.sum_B - reference.sum_B
  losses_B = jnp.where(
    desirable_B, desirable_weight * (1 - sig(beta * (rho_B - z))), undesirable_weight * (1 - sig(beta * (z - rho_B)))
  )
  return losses_B.mean(), {"kl": z, "rewards": (beta * rho_B).mean()}


def _check(lp: PairLogProbs, cfg: PreferenceConfig) -> None:
  parts = {"chosen": lp.chosen, "rejected": lp.rejected}
  if cfg.reference:
    if lp.ref_chosen is None or lp.ref_rejected is None:
      raise ValueError(f"lp: loss {cfg.loss!r} needs ref_chosen and ref_rejected log-probs")
    parts |= {"ref_chosen": lp.ref_chosen, "ref_rejected": lp.ref_rejected}
  for name, s in parts.items():
    if not isinstance(s, SequenceLogProbs):
      raise TypeError(f"lp.{name}: expected logprobs.SequenceLogProbs, got {type(s).__name__}")
  shapes = {name: (s.sum_B.shape, s.count_B.shape) for name, s in parts.items()}
  if len(set(shapes.values())) != 1 or lp.chosen.sum_B.ndim != 1:
    raise ValueError(f"lp: expected one batch shape [B] for every part, got {shapes}")
  needs = dict.fromkeys(parts, ("token_BT", "mask_BT") if cfg.ld_alpha is not None else ())
  if cfg.use_weighting:
    for name in ("chosen", "rejected"):
      needs[name] = tuple(dict.fromkeys((*needs[name], "token_BT", "log_sum_sq_BT")))
  for name, s in parts.items():
    check_sequence(f"lp.{name}", s)
    missing = [f for f in needs[name] if getattr(s, f) is None]
    if missing:
      why = " and ".join(
        o for o, on in (("ld_alpha", cfg.ld_alpha is not None), ("use_weighting", cfg.use_weighting)) if on
      )
      raise ValueError(
        f"lp.{name}: {why} needs per-token log-probs ({', '.join(missing)} are None): "
        f"logprobs.sequence_logprobs(..., per_token=True), or train.pair_logprobs / reference_logprobs with "
        f"per_token=True"
      )
    present = [f for f in ("token_BT", "mask_BT", "log_sum_sq_BT") if getattr(s, f) is not None]
    for field in present:
      x = getattr(s, field)
      if x.ndim != 2 or x.shape[0] != s.sum_B.shape[0]:
        raise ValueError(f"lp.{name}.{field}: expected shape [B, T] with B = {s.sum_B.shape[0]}, got {x.shape}")
