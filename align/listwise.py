"""Listwise preference optimisation: LiPO-lambda, RRHF and PRO over Y ranked completions per prompt.

Shapes: B prompts, Y completions per prompt, T time.

Each prompt has Y completions with scores psi (higher is better; a ranked list scores Y-1 .. 0)
and, under the policy (and, for LiPO, a frozen reference), summed log-probs logp and token
counts n. With rho_i = logp_i - logp_ref_i and p_i = logp_i / n_i (length-averaged), the
per-prompt losses are

  lipo_lambda  sum_{psi_i > psi_j} Delta_ij log(1 + exp(-(s_i - s_j))),  s = beta rho   (LiPO, 2402.01878 Sec. 4)
               Delta_ij = |G_i - G_j| |1/D(tau_i) - 1/D(tau_j)|, D(tau) = log2(1 + tau),
               tau the rank of s (1 = highest), G_i = 2^psi_i - 1; the weights get no gradient
  rrhf         sum_{psi_i < psi_j} max(0, p_i - p_j)                                    (RRHF, 2304.05302)
  pro          sum_k -log [exp(p_k / T_kk) / sum_{i in S_k} exp(p_i / T_ki)]             (PRO, 2306.17492)
               S_k = {k} and the completions scored below k; dynamic T (the default):
               1 / T_ki = psi_k - psi_i, 1 / T_kk = max_{i in S_k} (psi_k - psi_i); constant: T_ki = T

plus `sft_weight` times the NLL (summed over tokens, as both papers write L_ft and L_SFT) of
the best-scored completion, averaged over completions tied for best. Batch loss: the mean
over prompts. Sums run over all ordered pairs / prefixes: nothing is divided by their number.

Ties (psi_i = psi_j) contribute nothing to any term: LiPO and RRHF sum over strictly ordered
pairs only, and PRO's S_k leaves out completions tied with k, so any order among tied
completions gives the same loss and a list whose scores all tie costs 0 (SFT aside).

Decisions where the papers leave room, stated:
- LiPO normalises (`ndcg_normalized`, the default) to LambdaLoss's NDCG form: Delta is divided
  by the list's ideal DCG (sum_k sort(G)_k / D(k), best first) and the gains are taken on
  psi - min(psi), so a ranked list's gains are the paper's, a score offset cancels, and Delta_ij
  is the |Delta NDCG| of swapping i and j under the current ranking. `ndcg_normalized=False`
  is the paper's Delta as printed (gains 2^psi - 1 of the raw scores, no division). The paper
  prints the sum with a leading minus sign; minimised, the loss is the positive logistic sum
  above. Ties in s (every s is 0 while the policy equals the reference) rank by list position.
- PRO's dynamic temperature multiplies p (negative) by score gaps, so p_k max-gap competes
  with p_i gap_i: the best completion must beat the others by a ratio, not a difference (PRO's
  own code does the same). PRO's code keeps tied completions in the denominator (with
  1 / T = 0); here they drop out, which changes nothing for strict rankings.
- Default SFT weights (`sft_weight=None`): LiPO 0, RRHF 1 (L = L_rank + L_ft), PRO 0.05 (Y - 1)^2
  (the authors' training script: --sft_weight 0.05, scaled by (Y - 1)^2 in their loss).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from paperjax.align import logprobs
from paperjax.align.data import ListwiseBatch
from paperjax.models.training import train
from paperjax.ops import checks


class ListLogProbs(NamedTuple):
  """Summed completion log-probs and kept-token counts of Y completions per prompt."""

  sum_BY: jax.Array  # float32
  count_BY: jax.Array  # float32

  @property
  def mean_BY(self) -> jax.Array:
    return self.sum_BY / jnp.maximum(self.count_BY, 1.0)


class ListwiseLogProbs(NamedTuple):
  """Policy (and, for reference-based losses, frozen reference) log-probs of each list."""

  policy: ListLogProbs
  reference: ListLogProbs | None = None


@checks.config
class ListwiseConfig:
  """Which listwise loss and its hyperparameters; fields are checked at construction
  (`ops.checks.config`), `loss` against the registry `LOSSES`."""

  loss: str = "lipo_lambda"
  beta: checks.PositiveFloat = 0.1  # LiPO: s = beta (logp - logp_ref)
  ndcg_normalized: bool = True  # LiPO: Delta / ideal DCG, gains on psi - min psi (the module docstring)
  pro_temperature: Annotated[float, checks.Range(low=0, low_open=True)] | Literal["dynamic"] = "dynamic"
  # NLL weight of the best completion; None: the paper's (lipo 0, rrhf 1, pro 0.05 (Y - 1)^2 as PRO's code).
  sft_weight: checks.NonNegativeFloat | None = None

  def __post_init__(self):
    if self.loss not in LOSSES:
      raise ValueError(f"loss: unknown {self.loss!r}; registered: {sorted(LOSSES)}")


@checks.config
class ListLossSpec:
  fn: Callable[[ListwiseLogProbs, jax.Array, ListwiseConfig], jax.Array]  # per-prompt losses [B]
  reference: bool  # needs reference log-probs
  sft_weight: Callable[[int], float]  # the paper's SFT weight for Y completions


LOSSES: dict[str, ListLossSpec] = {}


def _register(name: str, *, reference: bool, sft_weight: Callable[[int], float]):
  def add(fn):
    LOSSES[name] = ListLossSpec(fn=fn, reference=reference, sft_weight=sft_weight)
    return fn

  return add


def ranks(s_BY: jax.Array) -> jax.Array:
  """tau[b, i] = 1 + #{j : s_j > s_i} + #{j < i : s_j = s_i}: 1-based rank of s_i, highest
  first, ties broken by position (float32 [B, Y])."""
  s_i, s_j = s_BY[:, :, None], s_BY[:, None, :]
  earlier_YY = jnp.arange(s_BY.shape[1])[None, :] < jnp.arange(s_BY.shape[1])[:, None]  # [i, j]: j < i
  above = (s_j > s_i) | ((s_j == s_i) & earlier_YY[None])
  return 1.0 + above.sum(axis=2).astype(jnp.float32)


def lambda_weights(s_BY: jax.Array, scores_BY: jax.Array, *, ndcg_normalized: bool = True) -> jax.Array:
  """LiPO's Lambda weights Delta[b, i, j] = |G_i - G_j| |1/D(tau_i) - 1/D(tau_j)| (float32
  [B, Y, Y], no gradient), D(tau) = log2(1 + tau), tau = `ranks(s)`, G = 2^psi - 1.

  ndcg_normalized: gains on psi - min(psi) per list and Delta divided by the ideal DCG
  sum_k sort(G)_k / D(k) (0 weights for a list whose scores all tie)."""
  s_BY, scores_BY = jax.lax.stop_gradient(s_BY), jnp.asarray(scores_BY, jnp.float32)
  if ndcg_normalized:
    scores_BY = scores_BY - scores_BY.min(axis=1, keepdims=True)
  gains_BY = jnp.exp2(scores_BY) - 1.0
  inv_discount_BY = 1.0 / jnp.log2(1.0 + ranks(s_BY))
  weights_BYY = jnp.abs(gains_BY[:, :, None] - gains_BY[:, None, :]) * jnp.abs(
    inv_discount_BY[:, :, None] - inv_discount_BY[:, None, :]
  )
  if ndcg_normalized:
    ideal_Y = 1.0 / jnp.log2(2.0 + jnp.arange(scores_BY.shape[1], dtype=jnp.float32))
    idcg_B = jnp.sum(-jnp.sort(-gains_BY, axis=1) * ideal_Y, axis=1)
    weights_BYY = weights_BYY / jnp.where(idcg_B > 0, idcg_B, 1.0)[:, None, None]
  return jax.lax.stop_gradient(weights_BYY)


def _ordered(scores_BY: jax.Array) -> jax.Array:
  """[b, i, j]: psi_i > psi_j (strictly: ties are no preference)."""
  return scores_BY[:, :, None] > scores_BY[:, None, :]


@_register("lipo_lambda", reference=True, sft_weight=lambda y: 0.0)
def _lipo_lambda(lp: ListwiseLogProbs, scores_BY: jax.Array, c: ListwiseConfig) -> jax.Array:
  assert lp.reference is not None
  s_BY = c.beta * (lp.policy.sum_BY - lp.reference.sum_BY)
  weights_BYY = lambda_weights(s_BY, scores_BY, ndcg_normalized=c.ndcg_normalized)
  logistic_BYY = jax.nn.softplus(-(s_BY[:, :, None] - s_BY[:, None, :]))
  return jnp.sum(jnp.where(_ordered(scores_BY), weights_BYY * logistic_BYY, 0.0), axis=(1, 2))


@_register("rrhf", reference=False, sft_weight=lambda y: 1.0)
def _rrhf(lp: ListwiseLogProbs, scores_BY: jax.Array, c: ListwiseConfig) -> jax.Array:
  p_BY = lp.policy.mean_BY
  # [b, i, j] = psi_i > psi_j: the worse j pays max(0, p_j - p_i).
  hinge_BYY = jax.nn.relu(p_BY[:, None, :] - p_BY[:, :, None])
  return jnp.sum(jnp.where(_ordered(scores_BY), hinge_BYY, 0.0), axis=(1, 2))


@_register("pro", reference=False, sft_weight=lambda y: 0.05 * (y - 1) ** 2)
def _pro(lp: ListwiseLogProbs, scores_BY: jax.Array, c: ListwiseConfig) -> jax.Array:
  p_BY = lp.policy.mean_BY
  below_BYY = _ordered(scores_BY)  # [b, k, i]: i in S_k \ {k}
  if c.pro_temperature == "dynamic":
    gaps_BYY = jnp.where(below_BYY, scores_BY[:, :, None] - scores_BY[:, None, :], 0.0)
    logits_BYY = p_BY[:, None, :] * gaps_BYY  # p_i / T_ki
    own_BY = p_BY * gaps_BYY.max(axis=2)  # p_k / T_kk, T_kk = min_i T_ki
  else:
    logits_BYY = jnp.broadcast_to(p_BY[:, None, :] / c.pro_temperature, below_BYY.shape)
    own_BY = p_BY / c.pro_temperature
  eye_YY = jnp.eye(p_BY.shape[1], dtype=bool)
  logits_BYY = jnp.where(eye_YY, own_BY[:, :, None], logits_BYY)
  # k itself is always in S_k, so no row is empty; S_k = {k} gives log 1 = 0.
  terms_BY = jax.nn.logsumexp(jnp.where(below_BYY | eye_YY, logits_BYY, -jnp.inf), axis=2) - own_BY
  return terms_BY.sum(axis=1)


def best_nll(policy: ListLogProbs, scores_BY: jax.Array) -> jax.Array:
  """nll[b] = -mean_{i : psi_i = max psi} logp_i: the summed NLL of the best-scored completion,
  averaged over completions tied for best (float32 [B])."""
  best_BY = scores_BY == scores_BY.max(axis=1, keepdims=True)
  return -jnp.sum(jnp.where(best_BY, policy.sum_BY, 0.0), axis=1) / best_BY.sum(axis=1)


def listwise_loss(
  lp: ListwiseLogProbs, scores_BY: jax.Array, cfg: ListwiseConfig
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Mean over prompts of `cfg.loss` (the module docstring's table) plus sft_weight x `best_nll`,
  and the metrics a trainer logs: rank_loss (without the NLL), nll_best, pair_accuracy (share
  of strictly ordered pairs whose model score, s for LiPO and p otherwise, is ordered alike),
  logps (mean summed log-prob).

  lp.reference must be given for lipo_lambda and None for the reference-free rrhf and pro.

  Shapes always; value checks (log-probs finite and <= 0, counts finite and >= 0, scores finite)
  run on concrete inputs, or inside `ops.checks.checked`, not under a plain jit."""
  if not isinstance(cfg, ListwiseConfig):
    raise TypeError(f"cfg: expected a listwise.ListwiseConfig, got {type(cfg).__name__}")
  if not isinstance(lp, ListwiseLogProbs):
    raise TypeError(f"lp: expected a listwise.ListwiseLogProbs, got {type(lp).__name__}")
  spec = LOSSES[cfg.loss]
  if spec.reference and lp.reference is None:
    raise ValueError(f"lp: loss {cfg.loss!r} needs reference log-probs (lp.reference)")
  if not spec.reference and lp.reference is not None:
    raise ValueError(f"lp.reference: loss {cfg.loss!r} reads no reference log-probs; pass reference=None")
  shape = _check_logprobs("lp.policy", lp.policy)
  if spec.reference:
    assert lp.reference is not None
    if _check_logprobs("lp.reference", lp.reference) != shape:
      raise ValueError(f"lp.reference: expected shape {shape} like lp.policy, got {tuple(lp.reference.sum_BY.shape)}")
  scores_BY = check_scores(scores_BY, shape)
  rank_B = spec.fn(lp, scores_BY, cfg)
  nll_B = best_nll(lp.policy, scores_BY)
  weight = spec.sft_weight(shape[1]) if cfg.sft_weight is None else cfg.sft_weight
  losses_B = rank_B + weight * nll_B if weight else rank_B
  if spec.reference:
    assert lp.reference is not None
    model_BY = cfg.beta * (lp.policy.sum_BY - lp.reference.sum_BY)
  else:
    model_BY = lp.policy.mean_BY
  ordered_BYY = _ordered(scores_BY)
  agree = jnp.sum(ordered_BYY & (model_BY[:, :, None] > model_BY[:, None, :]))
  metrics = {
    "rank_loss": rank_B.mean(),
    "nll_best": nll_B.mean(),
    "pair_accuracy": agree / jnp.maximum(ordered_BYY.sum(), 1),
    "logps": lp.policy.sum_BY.mean(),
  }
  return losses_B.mean(), metrics


def _check_logprobs(name: str, s: Any) -> tuple[int, int]:
  """(B, Y) of a ListLogProbs whose sums are finite and <= 0 and counts finite and >= 0."""
  if not isinstance(s, ListLogProbs):
    raise TypeError(f"{name}: expected a listwise.ListLogProbs, got {type(s).__name__}")
  for field in ("sum_BY", "count_BY"):
    x = getattr(s, field)
    checks.check_array(f"{name}.{field}", x, 2, shape="[B, Y]")
    if not jnp.issubdtype(x.dtype, jnp.floating):
      raise TypeError(f"{name}.{field}: expected floats, got {x.dtype}")
  if s.sum_BY.shape != s.count_BY.shape:
    raise ValueError(f"{name}.count_BY: expected shape {tuple(s.sum_BY.shape)} like sum_BY, got {s.count_BY.shape}")
  if s.sum_BY.shape[1] < 2:
    raise ValueError(f"{name}.sum_BY: expected Y >= 2 completions per prompt, got shape {tuple(s.sum_BY.shape)}")
  logprobs.check_sequence(name, s, fields=("sum_BY", "count_BY"))
  return (int(s.sum_BY.shape[0]), int(s.sum_BY.shape[1]))


def check_scores(scores_BY: Any, shape: tuple[int, int]) -> jax.Array:
  """scores_BY as float32 [B, Y] of the given shape, finite (values when concrete)."""
  checks.check_array("scores_BY", scores_BY, 2, shape=f"[{shape[0]}, {shape[1]}]")
  if not jnp.issubdtype(scores_BY.dtype, jnp.floating) and not jnp.issubdtype(scores_BY.dtype, jnp.integer):
    raise TypeError(f"scores_BY: expected real scores, got {scores_BY.dtype}")
  if tuple(scores_BY.shape) != shape:
    raise ValueError(f"scores_BY: expected shape {shape} like the log-probs, got {tuple(scores_BY.shape)}")
  checks.check_finite("scores_BY", scores_BY)
  return jnp.asarray(scores_BY, jnp.float32)


# ---- batches and models ----


def check_batch(batch: ListwiseBatch, vocab_size: int) -> None:
  """Raises unless `batch` is a ListwiseBatch of one [B, Y, T] grid (Y >= 2) whose ids are in
  [0, vocab_size), lengths in 1 .. T, prompt lengths in 1 .. each row's length, masks bool and
  False in the prompt (so at position 0) and past each row's length, scores float and finite. Shapes always;
  values when concrete (the step checks on the host before its jitted core)."""
  if not isinstance(batch, ListwiseBatch):
    raise TypeError(f"batch: expected an align.data.ListwiseBatch, got {type(batch).__name__}")
  tokens = batch.tokens_BYT
  checks.check_array("batch.tokens_BYT", tokens, 3, integer=True, shape="[B, Y, T]")
  b, y, t = tokens.shape
  if y < 2:
    raise ValueError(f"batch.tokens_BYT: expected Y >= 2 completions per prompt, got shape {tuple(tokens.shape)}")
  checks.check_tokens(tokens.reshape(b * y, t), vocab_size, name="batch.tokens_BYT")
  mask = batch.mask_BYT
  checks.check_array("batch.mask_BYT", mask, 3, shape="[B, Y, T]")
  if mask.dtype != np.bool_:
    raise TypeError(f"batch.mask_BYT: expected a bool mask (True at completion tokens), got {mask.dtype}")
  if tuple(mask.shape) != (b, y, t):
    raise ValueError(f"batch.mask_BYT: expected shape {(b, y, t)} like the tokens, got {tuple(mask.shape)}")
  lengths = batch.lengths_BY
  checks.check_array("batch.lengths_BY", lengths, 2, integer=True, shape=f"[{b}, {y}]")
  if tuple(lengths.shape) != (b, y):
    raise ValueError(f"batch.lengths_BY: expected shape {(b, y)}, got {tuple(lengths.shape)}")
  checks.check_in("batch.lengths_BY", lengths, 1, t, what="lengths")
  prompts = checks.check_lengths(batch.prompt_lengths_B, b, t, name="batch.prompt_lengths_B")
  xp, (mask_BYT, lengths_BY, prompts_B) = checks.on_host(mask, lengths, prompts)
  checks.check_values(
    "batch.lengths_BY", lengths_BY - prompts_B[:, None], lambda v: v < 0, "lengths >= the prompt's length"
  )
  # True in the prompt (position 0, which has no prediction, included) or past the row's length
  # (padding) would score a token that is not part of the completion.
  slots_T = xp.arange(t)
  scored = mask_BYT & ((slots_T >= lengths_BY[:, :, None]) | (slots_T < prompts_B[:, None, None]))
  checks.check_values(
    "batch.mask_BYT", scored, lambda v: v, "False at position 0, in the prompt and past each row's length"
  )
  scores = batch.scores_BY
  checks.check_array("batch.scores_BY", scores, 2, shape=f"[{b}, {y}]")
  if not jnp.issubdtype(scores.dtype, jnp.floating):
    raise TypeError(f"batch.scores_BY: expected float scores, got {scores.dtype}")
  if tuple(scores.shape) != (b, y):
    raise ValueError(f"batch.scores_BY: expected shape {(b, y)}, got {tuple(scores.shape)}")
  checks.check_finite("batch.scores_BY", scores)


def list_logprobs(params: Any, cfg: Any, batch: ListwiseBatch) -> ListLogProbs:
  """[B, Y] completion log-probs of any protocol model: the B Y rows run as one [B Y, T] batch
  through `logprobs.model_logprobs`. The batch is checked as in `check_batch` (values when
  concrete)."""
  check_batch(batch, cfg.vocab_size)
  b, y, t = batch.tokens_BYT.shape
  s = logprobs.model_logprobs(
    params, cfg, jnp.asarray(batch.tokens_BYT).reshape(b * y, t), jnp.asarray(batch.mask_BYT).reshape(b * y, t)
  )
  return ListLogProbs(s.sum_B.reshape(b, y), s.count_B.reshape(b, y))


_list_logprobs_jit = jax.jit(list_logprobs, static_argnums=1)


def reference_logprobs(ref_params: Any, cfg: Any, batch: ListwiseBatch) -> ListLogProbs:
  """Frozen reference log-probs [B, Y]: computed once per batch, never differentiated. The batch
  is checked on the host (`check_batch`) before the jitted call."""
  check_batch(batch, cfg.vocab_size)
  return jax.lax.stop_gradient(_list_logprobs_jit(ref_params, cfg, batch))


def check_reference(reference: Any, shape: tuple[int, int], *, loss: str = "") -> None:
  """Raises unless `reference` is a ListLogProbs of shape [B, Y] = shape (what
  `reference_logprobs` returns), log-probs finite and <= 0, counts finite and >= 0 (values when concrete)."""
  if not isinstance(reference, ListLogProbs):
    for_loss = f" (loss {loss!r} compares against a frozen reference)" if loss else ""
    raise TypeError(
      f"reference: expected listwise.ListLogProbs from listwise.reference_logprobs{for_loss}, "
      f"got {type(reference).__name__}"
    )
  if _check_logprobs("reference", reference) != tuple(shape):
    raise ValueError(f"reference: expected shape {tuple(shape)} like the batch, got {tuple(reference.sum_BY.shape)}")


def make_listwise_step(cfg: Any, tcfg: train.TrainConfig, lcfg: ListwiseConfig) -> Callable:
  """(state, ListwiseBatch, reference ListLogProbs or None) -> (state, metrics) minimising
  `listwise_loss`. The batch (`check_batch`) and the reference (`check_reference`; None for a
  reference-free loss, which refuses one) are checked on the host before the jitted step
  (`step.jitted`) runs."""
  if not isinstance(lcfg, ListwiseConfig):
    raise TypeError(f"lcfg: expected a listwise.ListwiseConfig, got {type(lcfg).__name__}")
  needs_reference = LOSSES[lcfg.loss].reference

  def loss_fn(params, batch: ListwiseBatch, reference):
    policy = list_logprobs(params, cfg, batch)
    return listwise_loss(ListwiseLogProbs(policy, reference), jnp.asarray(batch.scores_BY), lcfg)

  def check_args(batch: ListwiseBatch, reference=None) -> None:
    check_batch(batch, cfg.vocab_size)
    if needs_reference:
      check_reference(reference, tuple(np.shape(batch.scores_BY)), loss=lcfg.loss)
    elif reference is not None:
      raise ValueError(
        f"reference: loss {lcfg.loss!r} reads no reference log-probs (it is reference-free), got "
        f"{type(reference).__name__}; pass reference=None"
      )

  step = train.make_step(loss_fn, tcfg, check_args=check_args)

  def listwise_step(state: train.TrainState, batch: ListwiseBatch, reference: ListLogProbs | None = None):
    return step(state, batch, reference)

  listwise_step.jitted = step.jitted  # type: ignore[attr-defined]
  return listwise_step
