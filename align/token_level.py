"""Token-level objectives on full next-token distributions: TDPO and CRINGE.

Shapes: B batch (pairs, or sequences with binary feedback), T time, V vocabulary, C the
top-k shortlist a CRINGE positive is sampled from (k + 1 entries before the negative is
masked out).

Logits at position t predict token t + 1 (as in `logprobs`): token t is scored, and its
per-position KL taken, at logits t - 1, so a mask must be False at position 0.

TDPO (Token-level DPO, Zeng et al. 2024, arXiv 2404.11999). With the sequential KL

  D_SeqKL(x, y; pi_ref || pi) = sum_t m_t KL(pi_ref(. | x, y_<t) || pi(. | x, y_<t))

and rho = log pi(y) - log pi_ref(y) (summed over the mask) for chosen (w) and rejected (l):

  u     = beta (rho_w - rho_l)
  TDPO1: delta = beta (D_SeqKL(y_l) - D_SeqKL(y_w))
  TDPO2: delta = alpha (beta D_SeqKL(y_l) - sg(beta D_SeqKL(y_w)))
  loss  = -log sig(u - delta)

sg is the stop-gradient, on the chosen side's KL: TDPO2 still pushes the rejected
response's KL down, but stops the loss from raising the chosen KL to widen the margin
(the paper's TDPO2 and the authors' code, which detaches the chosen side's KL, agree). alpha
weights the whole KL difference; in TDPO1 both KL terms carry gradient.

CRINGE (Adolphs et al. 2022, arXiv 2211.05826): binary feedback on whole sequences.
Tokens of desirable sequences get the usual NLL; each token y_t of an undesirable sequence
is contrasted with a positive token sampled from the model's own top-k prediction at that
position (the negative token itself excluded):

  s- = logit of y_t,  s+ = logit of c ~ softmax(top-k logits without y_t)
  L_cr = -log(exp(s+) / (exp(s+) + exp(s-))) = softplus(s- - s+)
  L = (sum over desirable tokens of NLL + alpha * sum over undesirable tokens of L_cr) / tokens

The sampling takes an explicit PRNG key. As in the authors' ParlAI code, the shortlist is
the top k + 1 with the negative removed (its (k + 1)-th entry dropped when the negative is
not in it), the positive's logit keeps its gradient, and the loss is one mean over every
kept token of the batch.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from paperjax.align import logprobs
from paperjax.align import train as align_train
from paperjax.align.data import PreferenceBatch, UnpairedBatch
from paperjax.models import protocol
from paperjax.models.training import train
from paperjax.ops import checks

log_sig = jax.nn.log_sigmoid


# ---- TDPO ----


@checks.config
class TDPOConfig:
  """TDPO's hyperparameters (defaults: the authors' code, beta 0.1, alpha 0.5, TDPO2)."""

  beta: checks.PositiveFloat = 0.1
  alpha: Annotated[float, checks.Range(low=0)] = 0.5  # TDPO2's weight on the KL difference (unused by TDPO1)
  variant: Literal[1, 2] = 2


class TokenTerms(NamedTuple):
  """What TDPO reads of one side (chosen or rejected) of each pair."""

  rho_B: jax.Array  # sum_t m_t (log pi - log pi_ref)(y_t)
  seq_kl_B: jax.Array  # D_SeqKL(x, y; pi_ref || pi)
  logps_B: jax.Array  # sum_t m_t log pi(y_t), for the metrics
  count_B: jax.Array  # kept tokens


def _check_pair_logits(policy_logits_BTV: Any, ref_logits_BTV: Any) -> None:
  logprobs.check_logits(policy_logits_BTV, "policy_logits_BTV")
  logprobs.check_logits(ref_logits_BTV, "ref_logits_BTV")
  if policy_logits_BTV.shape != ref_logits_BTV.shape:
    raise ValueError(
      f"ref_logits_BTV: expected shape {tuple(policy_logits_BTV.shape)} like policy_logits_BTV, "
      f"got {tuple(ref_logits_BTV.shape)}"
    )


def _kl_BT(policy_logits_BTV: jax.Array, ref_logits_BTV: jax.Array) -> jax.Array:
  """kl[b, t] = KL(softmax(ref[b, t - 1]) || softmax(policy[b, t - 1])) for t >= 1, kl[b, 0] = 0 (float32)."""
  logp_BTV = jax.nn.log_softmax(policy_logits_BTV[:, :-1].astype(jnp.float32), axis=-1)
  logq_BTV = jax.nn.log_softmax(ref_logits_BTV[:, :-1].astype(jnp.float32), axis=-1)
  kl_BT = jnp.sum(jnp.exp(logq_BTV) * (logq_BTV - logp_BTV), axis=-1)
  return jnp.pad(kl_BT, ((0, 0), (1, 0)))


def sequential_kl(policy_logits_BTV: jax.Array, ref_logits_BTV: jax.Array, mask_BT: jax.Array) -> jax.Array:
  """D_SeqKL(x, y; pi_ref || pi) [B] = sum_t m_t sum_v q_t(v) (log q_t(v) - log p_t(v)), float32,

  with p_t = softmax(policy_logits[t - 1]) and q_t = softmax(ref_logits[t - 1]), the
  distributions that predict token t (TDPO's sequential KL over the completion).

  Value checks (mask False at position 0) run on concrete inputs, or inside `ops.checks.checked`."""
  _check_pair_logits(policy_logits_BTV, ref_logits_BTV)
  logprobs.check_mask("mask_BT", mask_BT, policy_logits_BTV.shape[:2], position_0=True)
  return jnp.sum(_kl_BT(policy_logits_BTV, ref_logits_BTV) * mask_BT, axis=1)


def token_terms(
  policy_logits_BTV: jax.Array, ref_logits_BTV: jax.Array, tokens_BT: jax.Array, mask_BT: jax.Array
) -> TokenTerms:
  """One side's TDPO terms: rho (summed log-ratio of the tokens), D_SeqKL, the policy's summed
  log-probs and the token count, all [B] float32.

  Value checks (ids in [0, V), mask False at position 0) run on concrete inputs, or inside
  `ops.checks.checked`."""
  _check_pair_logits(policy_logits_BTV, ref_logits_BTV)
  logprobs.check_mask("mask_BT", mask_BT, policy_logits_BTV.shape[:2], position_0=True)
  mask = mask_BT.astype(jnp.float32)
  lp_BT = logprobs.token_logprobs(policy_logits_BTV, tokens_BT)
  ref_lp_BT = logprobs.token_logprobs(ref_logits_BTV, tokens_BT)
  return TokenTerms(
    jnp.sum((lp_BT - ref_lp_BT) * mask, axis=1),
    jnp.sum(_kl_BT(policy_logits_BTV, ref_logits_BTV) * mask, axis=1),
    jnp.sum(lp_BT * mask, axis=1),
    mask.sum(axis=1),
  )


def tdpo_loss(chosen: TokenTerms, rejected: TokenTerms, cfg: TDPOConfig) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Mean TDPO loss over pairs, -log sig(u - delta) (module docstring: TDPO1, or TDPO2's stop-gradient),
  and metrics: rewards_chosen / rewards_rejected (beta (rho + D_SeqKL), the authors' implicit
  reward), reward_accuracy, reward_margin, kl_chosen / kl_rejected (D_SeqKL), logps_chosen /
  logps_rejected. Terms [B] each.

  Value checks (finite terms, KL >= 0) run on concrete inputs, or inside `ops.checks.checked`."""
  if not isinstance(cfg, TDPOConfig):
    raise TypeError(f"cfg: expected a token_level.TDPOConfig, got {type(cfg).__name__}")
  sides = {"chosen": chosen, "rejected": rejected}
  for name, t in sides.items():
    if not isinstance(t, TokenTerms):
      raise TypeError(f"{name}: expected token_level.TokenTerms (from token_terms), got {type(t).__name__}")
  shapes = {f"{name}.{field}": tuple(np.shape(x)) for name, t in sides.items() for field, x in t._asdict().items()}
  if len(set(shapes.values())) != 1 or len(chosen.rho_B.shape) != 1:
    raise ValueError(f"chosen, rejected: expected one batch shape [B] for every term, got {shapes}")
  for name, t in sides.items():
    for field, x in t._asdict().items():
      checks.check_finite(f"{name}.{field}", x)
    # Float rounding can leave a zero KL slightly negative, by up to ~1e-6 a token; more is not a KL.
    xp, (kl_B, count_B) = checks.on_host(t.seq_kl_B, t.count_B)
    slack_B = 1e-4 * xp.maximum(count_B, 1.0)

    def negative(v, slack_B=slack_B):
      return v < -slack_B

    checks.check_values(f"{name}.seq_kl_B", kl_B, negative, "KL divergences >= 0")
  u_B = cfg.beta * (chosen.rho_B - rejected.rho_B)
  if cfg.variant == 1:
    delta_B = cfg.beta * (rejected.seq_kl_B - chosen.seq_kl_B)
  else:
    delta_B = cfg.alpha * (cfg.beta * rejected.seq_kl_B - jax.lax.stop_gradient(cfg.beta * chosen.seq_kl_B))
  losses_B = -log_sig(u_B - delta_B)
  reward_w = jax.lax.stop_gradient(cfg.beta * (chosen.rho_B + chosen.seq_kl_B))
  reward_l = jax.lax.stop_gradient(cfg.beta * (rejected.rho_B + rejected.seq_kl_B))
  metrics = {
    "rewards_chosen": reward_w.mean(),
    "rewards_rejected": reward_l.mean(),
    "reward_accuracy": (reward_w > reward_l).astype(jnp.float32).mean(),
    "reward_margin": (reward_w - reward_l).mean(),
    "kl_chosen": chosen.seq_kl_B.mean(),
    "kl_rejected": rejected.seq_kl_B.mean(),
    "logps_chosen": chosen.logps_B.mean(),
    "logps_rejected": rejected.logps_B.mean(),
  }
  return losses_B.mean(), metrics


def tdpo_objective(
  params: Any, ref_params: Any, batch: PreferenceBatch, *, model_cfg: Any, cfg: TDPOConfig
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """`tdpo_loss` of a PreferenceBatch under any protocol model (`protocol.model_for(model_cfg).forward`):
  (params, ref_params, batch) -> (loss, metrics), the reference's logits held constant. For
  `models.training.train.make_step` (`make_tdpo_step` wraps it, with the batch's host checks).

  Shapes are checked always; the batch's values only when concrete: under a step, check them on
  the host first (`align.train.check_batch`, as `make_tdpo_step` does)."""
  if not isinstance(batch, PreferenceBatch):
    raise TypeError(f"batch: expected an align.data.PreferenceBatch, got {type(batch).__name__}")
  forward = protocol.model_for(model_cfg).forward

  def side(tokens_BT, mask_BT) -> TokenTerms:
    tokens_BT, mask_BT = jnp.asarray(tokens_BT), jnp.asarray(mask_BT)
    logits_BTV, _ = forward(params, tokens_BT, model_cfg)
    ref_logits_BTV, _ = forward(ref_params, tokens_BT, model_cfg)
    return token_terms(logits_BTV, jax.lax.stop_gradient(ref_logits_BTV), tokens_BT, mask_BT)

  chosen = side(batch.chosen_BT, batch.chosen_mask_BT)
  rejected = side(batch.rejected_BT, batch.rejected_mask_BT)
  return tdpo_loss(chosen, rejected, cfg)


def make_tdpo_step(model_cfg: Any, tcfg: train.TrainConfig, cfg: TDPOConfig) -> Callable:
  """(state, ref_params, PreferenceBatch) -> (state, metrics): one `train.make_step` AdamW step
  on `tdpo_objective`. The batch is checked on the host (`align.train.check_batch`) before the
  jitted step runs."""
  if not isinstance(cfg, TDPOConfig):
    raise TypeError(f"cfg: expected a token_level.TDPOConfig, got {type(cfg).__name__}")
  protocol.model_for(model_cfg)  # an unknown config raises now, not at the first step

  def objective(params, ref_params, batch):
    return tdpo_objective(params, ref_params, batch, model_cfg=model_cfg, cfg=cfg)

  return train.make_step(
    objective, tcfg, check_args=lambda ref_params, batch: align_train.check_batch(batch, model_cfg.vocab_size)
  )


# ---- CRINGE ----


@checks.config
class CringeConfig:
  """CRINGE's hyperparameters: the shortlist size k and the contrastive term's weight alpha
  (ParlAI's `num_pos_predictions` and `ct_loss_weight`; its defaults are k 1, alpha 1)."""

  k: checks.PositiveInt = 5
  alpha: checks.NonNegativeFloat = 1.0


def _check_tokens_like(logits_BTV: Any, tokens_BT: Any) -> None:
  checks.check_array("tokens_BT", tokens_BT, 2, integer=True, shape="[B, T]")
  if tuple(tokens_BT.shape) != tuple(logits_BTV.shape[:2]):
    raise ValueError(f"tokens_BT: expected shape {tuple(logits_BTV.shape[:2])}, got {tuple(tokens_BT.shape)}")
  checks.check_tokens(tokens_BT, logits_BTV.shape[2])


def cringe_positives(key: jax.Array, logits_BTV: jax.Array, tokens_BT: jax.Array, k: int) -> jax.Array:
  """int32 [B, T]: for each token t >= 1, a token c sampled from softmax over the top k logits
  of logits[t - 1] with token t itself left out (the top k + 1 less token t, or less the
  (k + 1)-th when token t is not among them); -1 at t = 0, which has no prediction.

  Value checks (ids in [0, V)) run on concrete inputs, or inside `ops.checks.checked`."""
  logprobs.check_logits(logits_BTV)
  _check_tokens_like(logits_BTV, tokens_BT)
  k = checks.check_int("k", k, 1)
  vocab = logits_BTV.shape[2]
  if k >= vocab:
    raise ValueError(f"k: expected an int < V = {vocab} (a shortlist of k others besides the negative), got {k}")
  logits_BTV = jax.lax.stop_gradient(logits_BTV[:, :-1].astype(jnp.float32))
  negative_BT = tokens_BT[:, 1:]
  top_BTC, ids_BTC = jax.lax.top_k(logits_BTV, k + 1)
  is_negative_BTC = ids_BTC == negative_BT[..., None]
  # Without the negative among the k + 1, drop the last, so the sample is always from k tokens.
  last_C = jnp.arange(k + 1) == k
  dropped_BTC = is_negative_BTC | (~is_negative_BTC.any(-1, keepdims=True) & last_C)
  pick_BT = jax.random.categorical(key, jnp.where(dropped_BTC, -jnp.inf, top_BTC), axis=-1)
  positives_BT = jnp.take_along_axis(ids_BTC, pick_BT[..., None], axis=-1)[..., 0]
  return jnp.pad(positives_BT.astype(jnp.int32), ((0, 0), (1, 0)), constant_values=-1)


def cringe_loss(
  key: jax.Array,
  logits_BTV: jax.Array,
  tokens_BT: jax.Array,
  mask_BT: jax.Array,
  desirable_B: jax.Array,
  cfg: CringeConfig,
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """CRINGE loss (module docstring): NLL on the kept tokens of desirable rows, alpha * softplus(s- - s+)
  on those of undesirable rows, s+ the logit of `cringe_positives(key, ...)`'s token; one mean
  over every kept token. Metrics: nll (mean over desirable tokens), contrastive (mean over
  undesirable tokens), positive_share (share of undesirable tokens whose logit already trails
  the sampled positive's).

  Value checks (ids in [0, V), mask False at position 0) run on concrete inputs, or inside
  `ops.checks.checked`."""
  if not isinstance(cfg, CringeConfig):
    raise TypeError(f"cfg: expected a token_level.CringeConfig, got {type(cfg).__name__}")
  logprobs.check_logits(logits_BTV)
  _check_tokens_like(logits_BTV, tokens_BT)
  logprobs.check_mask("mask_BT", mask_BT, tokens_BT.shape, position_0=True)
  if not hasattr(desirable_B, "dtype") or desirable_B.dtype != jnp.bool_:
    # Labels of +-1 or 0/1 floats would pass through jnp.where as "desirable" wherever nonzero.
    raise TypeError(
      f"desirable_B: expected a bool array [B], got {getattr(desirable_B, 'dtype', type(desirable_B).__name__)}"
    )
  if tuple(desirable_B.shape) != (tokens_BT.shape[0],):
    raise ValueError(f"desirable_B: expected shape ({tokens_BT.shape[0]},), got {tuple(desirable_B.shape)}")
  positives_BT = cringe_positives(key, logits_BTV, tokens_BT, cfg.k)
  logits_BTV = logits_BTV.astype(jnp.float32)
  nll_BT = -logprobs.token_logprobs(logits_BTV, tokens_BT)
  # Scores of token t live at logits t - 1; position 0 gets 0 and is masked out.
  s_neg_BT = jnp.take_along_axis(logits_BTV[:, :-1], tokens_BT[:, 1:, None], axis=-1)[..., 0]
  s_pos_BT = jnp.take_along_axis(logits_BTV[:, :-1], positives_BT[:, 1:, None], axis=-1)[..., 0]
  contrastive_BT = jnp.pad(jax.nn.softplus(s_neg_BT - s_pos_BT), ((0, 0), (1, 0)))
  trails_BT = jnp.pad((s_neg_BT < s_pos_BT).astype(jnp.float32), ((0, 0), (1, 0)))
  good_BT = (mask_BT & desirable_B[:, None]).astype(jnp.float32)
  bad_BT = (mask_BT & ~desirable_B[:, None]).astype(jnp.float32)
  tokens = jnp.maximum(good_BT.sum() + bad_BT.sum(), 1.0)
  loss = (jnp.sum(nll_BT * good_BT) + cfg.alpha * jnp.sum(contrastive_BT * bad_BT)) / tokens
  metrics = {
    "nll": jnp.sum(nll_BT * good_BT) / jnp.maximum(good_BT.sum(), 1.0),
    "contrastive": jnp.sum(contrastive_BT * bad_BT) / jnp.maximum(bad_BT.sum(), 1.0),
    "positive_share": jnp.sum(trails_BT * bad_BT) / jnp.maximum(bad_BT.sum(), 1.0),
  }
  return loss, metrics


def cringe_objective(
  params: Any, key: jax.Array, batch: UnpairedBatch, *, model_cfg: Any, cfg: CringeConfig
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """`cringe_loss` of an UnpairedBatch (label = desirable) under any protocol model:
  (params, key, batch) -> (loss, metrics), for `models.training.train.make_step` (pass a new
  key each step). Values are checked only when concrete: under a step, check the batch on the
  host first."""
  if not isinstance(batch, UnpairedBatch):
    raise TypeError(f"batch: expected an align.data.UnpairedBatch, got {type(batch).__name__}")
  tokens_BT = jnp.asarray(batch.tokens_BT)
  logits_BTV, _ = protocol.model_for(model_cfg).forward(params, tokens_BT, model_cfg)
  return cringe_loss(key, logits_BTV, tokens_BT, jnp.asarray(batch.mask_BT), jnp.asarray(batch.label_B), cfg)
