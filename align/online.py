"""Online alignment: rollouts, PPO, RLOO and iterative DPO.

Shapes: B rows (prompt x sample; prompts in the [B, Y] views), T time (prompt width + N), N new
tokens, Y samples per prompt, D width, V vocabulary.

A rollout samples each row with its own key, key_b = fold_in(key, b), so a row's sample does
not depend on the other rows; it scores the samples with a reward function (a reward model,
or a task's checker) and records the per-token log-probs of the sampling policy pi_old and of
the frozen reference pi_ref on the completion tokens (mask m_t).

PPO (InstructGPT, arXiv 2203.02155; the per-token recipe of Ziegler et al. 2019 and TRL's
PPOTrainer), with a separate value model V (a Llama trunk and a scalar head, like
`align.reward`; InstructGPT initialises it from the reward model):
  r_t      = -c (log pi_old(y_t) - log pi_ref(y_t)) + [t = last] R(x, y)      (KL-penalised reward)
  delta_t  = r_t + gamma V_{t+1} - V_t,   A_t = delta_t + gamma lambda A_{t+1}  (GAE; 0 past the end)
  G_t      = A_t + V_t                                                         (value targets)
  L_pi     = mean_t max(-A_t p_t, -A_t clip(p_t, 1 - eps, 1 + eps)),  p_t = pi(y_t) / pi_old(y_t)
  L_V      = 1/2 mean_t max((V_t - G_t)^2, (clip(V_t, V_old,t - eps_V, V_old,t + eps_V) - G_t)^2)
  L        = L_pi + c_V L_V, over several epochs of minibatches per rollout.
Means are over the completion tokens of the (mini)batch; A is whitened over them
(`whiten_advantages`), and R over the batch (`whiten_rewards`: (R - mean) / std).

RLOO (REINFORCE leave-one-out, Ahmadian et al. 2024, arXiv 2402.14740), Y >= 2 samples per
prompt:
  R_i = R(x, y_i) - c sum_t (log pi_old(y_i,t) - log pi_ref(y_i,t))
  A_i = R_i - 1 / (Y - 1) sum_{j != i} R_j,    L = -mean_i A_i log pi(y_i)
(TRL's RLOOTrainer clips a sequence-level ratio as PPO does; one on-policy step per rollout, as
here, has ratio 1 and the same gradient.)

Iterative DPO (Xiong et al. 2024, arXiv 2312.11456; Llama 3's rounds): each round samples Y
completions per prompt from the current policy, labels the best and the worst by reward as
(chosen, rejected) (prompts whose samples all tie are dropped) and runs DPO from the current
policy, against the round's starting policy as reference (or the initial one).

Each method is a pure step (`make_ppo_step`, `make_rloo_step`, `align.train.make_preference_step`)
plus a loop (`train_ppo`, `train_rloo`, `train_iterative_dpo`) that checkpoints with orbax after
every iteration when given a directory, and resumes from it: iteration i's prompts and keys
depend only on i, so a resumed run equals an uninterrupted one.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from paperjax.align import dpo, logprobs, rejection_sampling
from paperjax.align import train as align_train
from paperjax.align.data import PreferenceBatch
from paperjax.models import protocol
from paperjax.models.serving import generate
from paperjax.models.training import checkpoints, train
from paperjax.models.transformer import llama
from paperjax.ops import checks

# (prompts_BT, prompt_lengths_B, completions_BN, completion_lengths_B) -> rewards_B
RewardFn = rejection_sampling.RewardFn
# iteration -> (prompts_BT, prompt_lengths_B): the prompts of one iteration
PromptFn = Callable[[int], tuple[np.ndarray, np.ndarray]]


@checks.config
class RolloutConfig:
  """How a rollout samples: up to `max_new_tokens` per completion at `temperature`, stopping
  after any of `stop_ids`, `samples_per_prompt` (Y) completions per prompt."""

  max_new_tokens: checks.PositiveInt
  stop_ids: tuple[int, ...] = ()
  temperature: checks.PositiveFloat = 1.0
  samples_per_prompt: checks.PositiveInt = 1


@checks.config
class PPOConfig:
  """PPO's coefficients (the module docstring's c, gamma, lambda, eps, eps_V, c_V)."""

  kl_coef: checks.NonNegativeFloat = 0.05
  gamma: checks.Fraction = 1.0
  lam: checks.Fraction = 0.95
  clip: checks.PositiveFloat = 0.2
  value_clip: checks.PositiveFloat = 0.2
  vf_coef: checks.NonNegativeFloat = 0.1
  epochs: checks.PositiveInt = 4
  minibatches: checks.PositiveInt = 1
  whiten_rewards: bool = False
  whiten_advantages: bool = True


@checks.config
class RLOOConfig:
  """RLOO's KL coefficient c and whether A is whitened over the batch."""

  kl_coef: checks.NonNegativeFloat = 0.05
  whiten_advantages: bool = False


@checks.config
class IterativeDPOConfig:
  """Per round: `steps` DPO steps of `loss` on the round's pairs; `reference` is the round's
  starting policy ("round") or the initial policy ("initial")."""

  steps: checks.PositiveInt
  loss: dpo.PreferenceConfig = dpo.PreferenceConfig()
  reference: Literal["round", "initial"] = "round"


class Rollout(NamedTuple):
  """Samples and what the updates read; rows are prompt-major (row b * Y + y)."""

  tokens_BT: jax.Array  # prompt + completion, right-padded, int32
  mask_BT: jax.Array  # completion tokens (bool)
  prompt_lengths_B: jax.Array
  lengths_B: jax.Array  # prompt + completion
  logps_BT: jax.Array  # log pi_old(y_t), 0 off the mask (float32)
  ref_logps_BT: jax.Array  # log pi_ref(y_t), 0 off the mask
  rewards_B: jax.Array  # R(x, y), float32

  @property
  def completions(self) -> tuple[jax.Array, jax.Array]:
    """(completions_BN right-padded with 0, completion lengths_B)."""
    width = self.tokens_BT.shape[1] - int(self.prompt_lengths_B.max())
    n_B = self.lengths_B - self.prompt_lengths_B
    slots_BN = self.prompt_lengths_B[:, None] + jnp.arange(max(width, 1))
    tokens = jnp.take_along_axis(self.tokens_BT, jnp.minimum(slots_BN, self.tokens_BT.shape[1] - 1), axis=1)
    return jnp.where(jnp.arange(tokens.shape[1]) < n_B[:, None], tokens, 0), n_B

  def kl_B(self) -> jax.Array:
    """sum_t log pi_old(y_t) - log pi_ref(y_t): the k1 estimate of KL(pi_old || pi_ref) per sample."""
    return jnp.sum((self.logps_BT - self.ref_logps_BT) * self.mask_BT, axis=1)


def masked_mean(x: jax.Array, mask: jax.Array) -> jax.Array:
  """sum(x m) / max(sum m, 1)."""
  mask = mask.astype(jnp.float32)
  return jnp.sum(x * mask) / jnp.maximum(mask.sum(), 1.0)


def masked_whiten(x: jax.Array, mask: jax.Array) -> jax.Array:
  """(x - mean) / sqrt(var + 1e-8) over the masked entries (population variance); 0 off the mask."""
  mean = masked_mean(x, mask)
  var = masked_mean((x - mean) ** 2, mask)
  return jnp.where(mask, (x - mean) * jax.lax.rsqrt(var + 1e-8), 0.0)


# --- rollouts ---------------------------------------------------------------------------------


def rollout(
  key: jax.Array,
  params: dict,
  ref_params: dict,
  cfg: Any,
  prompts_BT: np.ndarray,
  prompt_lengths_B: np.ndarray,
  reward_fn: RewardFn,
  rcfg: RolloutConfig,
) -> Rollout:
  """Y = rcfg.samples_per_prompt samples per prompt (row b * Y + y, key fold_in(key, row)), their
  rewards and the log-probs of policy and reference. Prompts are checked on the host; the
  reward function must return finite floats [B * Y]. The log-probs are at temperature 1: they
  are the sampling distribution's only when rcfg.temperature is 1 (`train_ppo` and `train_rloo`,
  whose updates read them as pi_old's, refuse any other)."""
  if not isinstance(rcfg, RolloutConfig):
    raise TypeError(f"rcfg: expected an online.RolloutConfig, got {type(rcfg).__name__}")
  prompts = generate.as_prompts(prompts_BT)
  generate.check_args(cfg, prompts, prompt_lengths_B, rcfg.max_new_tokens, rcfg.stop_ids, rcfg.temperature, None, None)
  y = rcfg.samples_per_prompt
  prompts = jnp.repeat(jnp.asarray(prompts), y, axis=0)
  prompt_lengths = jnp.repeat(jnp.asarray(prompt_lengths_B, jnp.int32), y)
  keys = jax.vmap(functools.partial(jax.random.fold_in, key))(jnp.arange(prompts.shape[0]))
  completions, n_B = _sample(keys, params, prompts, prompt_lengths, cfg, rcfg)
  rewards = reward_fn(prompts, prompt_lengths, completions, n_B)
  rewards = jnp.asarray(rewards)
  if rewards.shape != (prompts.shape[0],) or not jnp.issubdtype(rewards.dtype, jnp.floating):
    raise ValueError(
      f"reward_fn: expected float rewards of shape ({prompts.shape[0]},), one per sample, got "
      f"{rewards.dtype} {rewards.shape}"
    )
  checks.check_finite("reward_fn's rewards", rewards)
  tokens, lengths = rejection_sampling.concat(prompts, prompt_lengths, completions, n_B)
  mask = logprobs.completion_mask(tokens, prompt_lengths, lengths)
  logps, ref_logps = _token_logps(params, tokens, mask, cfg), _token_logps(ref_params, tokens, mask, cfg)
  return Rollout(tokens, mask, prompt_lengths, lengths, logps, ref_logps, rewards.astype(jnp.float32))


@functools.partial(jax.jit, static_argnums=(4, 5))
def _sample(keys_B, params, prompts_BT, prompt_lengths_B, cfg, rcfg: RolloutConfig):
  """One `generate` per row under vmap, each row with its own key."""

  model, n = protocol.model_for(cfg), rcfg.max_new_tokens

  def one(key, prompt_T, length):
    logits_1V, state = model.prefill(
      params, prompt_T[None], cfg, lengths_B=length[None], capacity=prompt_T.shape[0] + n
    )
    tokens_1N, n_1 = generate.decode(key, params, cfg, state, logits_1V, n, rcfg.stop_ids, rcfg.temperature, None, None)
    return tokens_1N[0], n_1[0]

  return jax.vmap(one)(keys_B, prompts_BT, prompt_lengths_B)


@functools.partial(jax.jit, static_argnums=3)
def _token_logps(params, tokens_BT, mask_BT, cfg):
  logits_BTV, _ = protocol.model_for(cfg).forward(params, tokens_BT, cfg)
  return logprobs.token_logprobs(logits_BTV, tokens_BT) * mask_BT


# --- PPO ---------------------------------------------------------------------------------------


def values(value_params: dict, tokens_BT: jax.Array, cfg: llama.LlamaConfig) -> jax.Array:
  """V_t for each token t: the value head on the hidden state before it (position t - 1), so
  V_t is aligned with log pi(y_t) (`logprobs.token_logprobs`); V_0 = 0. float32 [B, T]."""
  hidden_BTD, _ = llama.forward_hidden(value_params["model"], tokens_BT, cfg)
  v_BT = hidden_BTD.astype(jnp.float32) @ value_params["head"]["w"] + value_params["head"]["b"]
  return jnp.pad(v_BT[:, :-1], ((0, 0), (1, 0)))


def gae(rewards_BT: jax.Array, values_BT: jax.Array, mask_BT: jax.Array, gamma: float, lam: float):
  """(advantages_BT, returns_BT) by generalised advantage estimation over the masked tokens:
  delta_t = r_t + gamma V_{t+1} m_{t+1} - V_t,  A_t = delta_t + gamma lambda A_{t+1} m_{t+1},
  G_t = A_t + V_t; both 0 off the mask."""
  m = mask_BT.astype(jnp.float32)
  v = values_BT * m
  next_v = jnp.pad(v[:, 1:], ((0, 0), (0, 1)))
  next_m = jnp.pad(m[:, 1:], ((0, 0), (0, 1)))
  delta_BT = rewards_BT + gamma * next_v - v

  def back(carry_B, xs):
    delta_B, next_m_B = xs
    a_B = delta_B + gamma * lam * next_m_B * carry_B
    return a_B, a_B

  _, adv_TB = jax.lax.scan(back, jnp.zeros(delta_BT.shape[0]), (delta_BT.T, next_m.T), reverse=True)
  adv_BT = adv_TB.T * m
  return adv_BT, (adv_BT + v) * m


def ppo_rewards(ro: Rollout, pcfg: PPOConfig) -> jax.Array:
  """r_t = -c (log pi_old - log pi_ref) on the completion, plus R (whitened over the batch if
  asked) at each row's last completion token. float32 [B, T]."""
  r_B = ro.rewards_B
  if pcfg.whiten_rewards:
    r_B = (r_B - r_B.mean()) * jax.lax.rsqrt(r_B.var() + 1e-8)
  per_token = -pcfg.kl_coef * (ro.logps_BT - ro.ref_logps_BT) * ro.mask_BT
  last_BT = jnp.arange(ro.tokens_BT.shape[1])[None, :] == (ro.lengths_B - 1)[:, None]
  return per_token + jnp.where(last_BT & ro.mask_BT, r_B[:, None], 0.0)


class PPOBatch(NamedTuple):
  """One minibatch of PPO's update: the rollout's tokens and the old policy's quantities."""

  tokens_BT: jax.Array
  mask_BT: jax.Array
  logps_BT: jax.Array  # log pi_old
  values_BT: jax.Array  # V_old
  advantages_BT: jax.Array
  returns_BT: jax.Array


def ppo_batch(ro: Rollout, value_params: dict, cfg: llama.LlamaConfig, pcfg: PPOConfig) -> PPOBatch:
  """The whole rollout's PPOBatch: V_old, then GAE on the KL-penalised rewards."""
  values_BT = _values_jit(value_params, ro.tokens_BT, cfg) * ro.mask_BT
  adv_BT, returns_BT = gae(ppo_rewards(ro, pcfg), values_BT, ro.mask_BT, pcfg.gamma, pcfg.lam)
  if pcfg.whiten_advantages:
    adv_BT = masked_whiten(adv_BT, ro.mask_BT)
  return PPOBatch(ro.tokens_BT, ro.mask_BT, ro.logps_BT, values_BT, adv_BT, returns_BT)


_values_jit = jax.jit(values, static_argnums=2)


def ppo_loss(params: dict, batch: PPOBatch, cfg: llama.LlamaConfig, pcfg: PPOConfig):
  """(L_pi + c_V L_V, metrics) for params {"policy": Llama params, "value": {"model", "head"}}."""
  logits_BTV, _ = llama.forward(params["policy"], batch.tokens_BT, cfg)
  m = batch.mask_BT
  logps_BT = logprobs.token_logprobs(logits_BTV, batch.tokens_BT) * m
  ratio_BT = jnp.exp(logps_BT - batch.logps_BT)
  a_BT = batch.advantages_BT
  clipped_BT = jnp.clip(ratio_BT, 1 - pcfg.clip, 1 + pcfg.clip)
  policy_loss = masked_mean(jnp.maximum(-a_BT * ratio_BT, -a_BT * clipped_BT), m)
  v_BT = values(params["value"], batch.tokens_BT, cfg)
  v_clipped_BT = jnp.clip(v_BT, batch.values_BT - pcfg.value_clip, batch.values_BT + pcfg.value_clip)
  value_loss = 0.5 * masked_mean(jnp.maximum((v_BT - batch.returns_BT) ** 2, (v_clipped_BT - batch.returns_BT) ** 2), m)
  metrics = {
    "policy_loss": policy_loss,
    "value_loss": value_loss,
    "approx_kl": masked_mean(batch.logps_BT - logps_BT, m),  # KL(pi_old || pi), k1
    "clip_fraction": masked_mean((jnp.abs(ratio_BT - 1) > pcfg.clip).astype(jnp.float32), m),
  }
  return policy_loss + pcfg.vf_coef * value_loss, metrics


def make_ppo_step(cfg: llama.LlamaConfig, tcfg: train.TrainConfig, pcfg: PPOConfig) -> Callable:
  """(state over {"policy", "value"}, PPOBatch) -> (state, metrics): one AdamW step on `ppo_loss`.
  The batch's shapes and ids are checked on the host before the jitted step."""
  if not isinstance(pcfg, PPOConfig):
    raise TypeError(f"pcfg: expected an online.PPOConfig, got {type(pcfg).__name__}")

  def check(batch: PPOBatch) -> None:
    if not isinstance(batch, PPOBatch):
      raise TypeError(f"batch: expected an online.PPOBatch (from ppo_batch), got {type(batch).__name__}")
    checks.check_tokens(batch.tokens_BT, cfg.vocab_size, name="batch.tokens_BT")
    for name in PPOBatch._fields[1:]:
      x = getattr(batch, name)
      if tuple(x.shape) != tuple(batch.tokens_BT.shape):
        raise ValueError(f"batch.{name}: expected shape {tuple(batch.tokens_BT.shape)}, got {tuple(x.shape)}")
      if name != "mask_BT":
        checks.check_finite(f"batch.{name}", x)

  return train.make_step(lambda p, b: ppo_loss(p, b, cfg, pcfg), tcfg, check_args=check)


def ppo_update(step: Callable, state: train.TrainState, batch: PPOBatch, key: jax.Array, pcfg: PPOConfig):
  """pcfg.epochs passes over `batch` in pcfg.minibatches shuffled minibatches (key: the shuffles);
  returns the state and the last minibatch's metrics."""
  rows = batch.tokens_BT.shape[0]
  if rows % pcfg.minibatches:
    raise ValueError(f"pcfg.minibatches: expected a divisor of the rollout's {rows} rows, got {pcfg.minibatches}")
  size = rows // pcfg.minibatches
  metrics: dict = {}
  for epoch in range(pcfg.epochs):
    order = jax.random.permutation(jax.random.fold_in(key, epoch), rows)
    for i in range(pcfg.minibatches):
      rows_b = order[i * size : (i + 1) * size]
      state, metrics = step(state, PPOBatch(*(x[rows_b] for x in batch)))
  return state, metrics


# --- RLOO --------------------------------------------------------------------------------------


def rloo_advantages(ro: Rollout, samples_per_prompt: int, rcfg: RLOOConfig) -> jax.Array:
  """A_i = R_i - mean_{j != i} R_j within each prompt's Y samples, R_i = R(x, y_i) - c KL_i. [B]"""
  y = samples_per_prompt
  if y < 2 or ro.rewards_B.shape[0] % y:
    raise ValueError(
      f"samples_per_prompt: RLOO needs Y >= 2 samples per prompt dividing the {ro.rewards_B.shape[0]} rows, got {y}"
    )
  r_BY = (ro.rewards_B - rcfg.kl_coef * ro.kl_B()).reshape(-1, y)
  baseline_BY = (r_BY.sum(axis=1, keepdims=True) - r_BY) / (y - 1)
  adv_B = (r_BY - baseline_BY).reshape(-1)
  return masked_whiten(adv_B, jnp.ones_like(adv_B, bool)) if rcfg.whiten_advantages else adv_B


class RLOOBatch(NamedTuple):
  tokens_BT: jax.Array
  mask_BT: jax.Array
  advantages_B: jax.Array


def rloo_loss(params: dict, batch: RLOOBatch, cfg: llama.LlamaConfig):
  """(-mean_i A_i log pi(y_i), metrics): REINFORCE with the leave-one-out baseline."""
  logits_BTV, _ = llama.forward(params, batch.tokens_BT, cfg)
  logp_B = jnp.sum(logprobs.token_logprobs(logits_BTV, batch.tokens_BT) * batch.mask_BT, axis=1)
  return -jnp.mean(jax.lax.stop_gradient(batch.advantages_B) * logp_B), {"logp": logp_B.mean()}


def make_rloo_step(cfg: llama.LlamaConfig, tcfg: train.TrainConfig) -> Callable:
  """(state, RLOOBatch) -> (state, metrics): one AdamW step on `rloo_loss` (ids checked on the host)."""

  def check(batch: RLOOBatch) -> None:
    if not isinstance(batch, RLOOBatch):
      raise TypeError(f"batch: expected an online.RLOOBatch, got {type(batch).__name__}")
    checks.check_tokens(batch.tokens_BT, cfg.vocab_size, name="batch.tokens_BT")
    checks.check_finite("batch.advantages_B", batch.advantages_B)

  return train.make_step(lambda p, b: rloo_loss(p, b, cfg), tcfg, check_args=check)


# --- iterative DPO -----------------------------------------------------------------------------


def best_worst_pairs(ro: Rollout, samples_per_prompt: int) -> tuple[PreferenceBatch, int]:
  """Per prompt, (chosen, rejected) = (highest, lowest reward) of its Y samples (the first of
  equals); prompts whose samples all tie are dropped. Returns the PreferenceBatch of the kept
  prompts and how many prompts were dropped."""
  y = samples_per_prompt
  if y < 2 or ro.rewards_B.shape[0] % y:
    raise ValueError(f"samples_per_prompt: expected Y >= 2 dividing {ro.rewards_B.shape[0]} rows, got {y}")
  r_BY = np.asarray(ro.rewards_B).reshape(-1, y)
  best, worst = r_BY.argmax(axis=1), r_BY.argmin(axis=1)
  keep = r_BY.max(axis=1) > r_BY.min(axis=1)
  base = np.arange(r_BY.shape[0]) * y
  win, lose = (base + best)[keep], (base + worst)[keep]
  tokens, mask, lengths = (np.asarray(x) for x in (ro.tokens_BT, ro.mask_BT, ro.lengths_B))
  batch = PreferenceBatch(
    chosen_BT=tokens[win],
    chosen_mask_BT=mask[win],
    chosen_lengths_B=lengths[win],
    rejected_BT=tokens[lose],
    rejected_mask_BT=mask[lose],
    rejected_lengths_B=lengths[lose],
    prompt_lengths_B=np.asarray(ro.prompt_lengths_B)[win],
    margin_B=np.zeros(int(keep.sum()), np.float32),
  )
  return batch, int((~keep).sum())


# --- loops -------------------------------------------------------------------------------------


@struct.dataclass
class OnlineState:
  """A loop's checkpointed state: iterations done (`step`) and the trained state."""

  step: jax.Array
  train: train.TrainState


def _check_on_policy(rcfg: RolloutConfig) -> None:
  """PPO's ratio and RLOO's score function need the sampling policy's log-probs; a rollout's are
  at temperature 1 (TRL divides the logits by the temperature everywhere instead)."""
  if not isinstance(rcfg, RolloutConfig):
    raise TypeError(f"rcfg: expected an online.RolloutConfig, got {type(rcfg).__name__}")
  if rcfg.temperature != 1.0:
    raise ValueError(
      f"rcfg.temperature: expected 1.0 (the log-probs PPO and RLOO read as pi_old's are the policy's at "
      f"temperature 1, so other samples would be off-policy), got {rcfg.temperature}"
    )


def _run(
  state: OnlineState,
  iterations: int,
  body: Callable[[OnlineState, int], tuple[OnlineState, dict]],
  checkpoint_dir: str | os.PathLike | None,
) -> tuple[OnlineState, list[dict]]:
  """Runs body for iterations state.step .. iterations - 1, saving after each one when given a
  directory, resuming from its latest checkpoint; returns the state and each iteration's metrics."""
  checks.check_int("iterations", iterations, low=1)
  manager = None if checkpoint_dir is None else checkpoints.checkpoint_manager(checkpoint_dir)
  history = []
  try:
    if manager is not None and manager.latest_step() is not None:
      state = checkpoints.restore(manager, state)
      if int(state.step) > iterations:
        raise ValueError(
          f"iterations: expected at least the {int(state.step)} iterations already saved in {checkpoint_dir}, got "
          f"{iterations} (its state would be returned as if trained for {iterations})"
        )
    while int(state.step) < iterations:
      state, metrics = body(state, int(state.step))
      state = OnlineState(state.step + 1, state.train)
      history.append({k: float(v) for k, v in metrics.items()})
      if manager is not None:
        checkpoints.save(manager, state)
  finally:
    if manager is not None:
      manager.close()
  return state, history


def _rollout_metrics(ro: Rollout) -> dict:
  return {"reward": float(ro.rewards_B.mean()), "kl": float(ro.kl_B().mean())}


def train_ppo(
  key: jax.Array,
  policy_params: dict,
  value_params: dict,
  cfg: llama.LlamaConfig,
  prompt_fn: PromptFn,
  reward_fn: RewardFn,
  *,
  rcfg: RolloutConfig,
  pcfg: PPOConfig,
  tcfg: train.TrainConfig,
  iterations: int,
  checkpoint_dir: str | os.PathLike | None = None,
) -> tuple[OnlineState, list[dict]]:
  """PPO from `policy_params` (also the frozen reference) with a value model `value_params`
  ({"model", "head"}, e.g. the reward model's): per iteration i, a rollout of prompt_fn(i) with
  key fold_in(key, i), then `ppo_update`. Returns the state ({"policy", "value"}) and per-
  iteration metrics (reward, kl, and the last minibatch's losses)."""
  _check_on_policy(rcfg)
  step = make_ppo_step(cfg, tcfg, pcfg)
  state = OnlineState(jnp.int32(0), train.start_state({"policy": policy_params, "value": value_params}, tcfg))

  def body(s: OnlineState, i: int):
    ro_key, update_key = jax.random.split(jax.random.fold_in(key, i))
    prompts, lengths = prompt_fn(i)
    ro = rollout(ro_key, s.train.params["policy"], policy_params, cfg, prompts, lengths, reward_fn, rcfg)
    batch = ppo_batch(ro, s.train.params["value"], cfg, pcfg)
    trained, metrics = ppo_update(step, s.train, batch, update_key, pcfg)
    return OnlineState(s.step, trained), {**_rollout_metrics(ro), **metrics}

  return _run(state, iterations, body, checkpoint_dir)


def train_rloo(
  key: jax.Array,
  policy_params: dict,
  cfg: llama.LlamaConfig,
  prompt_fn: PromptFn,
  reward_fn: RewardFn,
  *,
  rcfg: RolloutConfig,
  lcfg: RLOOConfig,
  tcfg: train.TrainConfig,
  iterations: int,
  checkpoint_dir: str | os.PathLike | None = None,
) -> tuple[OnlineState, list[dict]]:
  """RLOO from `policy_params` (also the frozen reference): per iteration, a rollout of Y =
  rcfg.samples_per_prompt samples per prompt and one `rloo_loss` step."""
  _check_on_policy(rcfg)
  if rcfg.samples_per_prompt < 2:
    raise ValueError(f"rcfg.samples_per_prompt: RLOO needs Y >= 2 samples per prompt, got {rcfg.samples_per_prompt}")
  step = make_rloo_step(cfg, tcfg)
  state = OnlineState(jnp.int32(0), train.start_state(policy_params, tcfg))

  def body(s: OnlineState, i: int):
    prompts, lengths = prompt_fn(i)
    ro = rollout(jax.random.fold_in(key, i), s.train.params, policy_params, cfg, prompts, lengths, reward_fn, rcfg)
    adv_B = rloo_advantages(ro, rcfg.samples_per_prompt, lcfg)
    trained, metrics = step(s.train, RLOOBatch(ro.tokens_BT, ro.mask_BT, adv_B))
    return OnlineState(s.step, trained), {**_rollout_metrics(ro), **metrics}

  return _run(state, iterations, body, checkpoint_dir)


def train_iterative_dpo(
  key: jax.Array,
  policy_params: dict,
  cfg: llama.LlamaConfig,
  prompt_fn: PromptFn,
  reward_fn: RewardFn,
  *,
  rcfg: RolloutConfig,
  icfg: IterativeDPOConfig,
  tcfg: train.TrainConfig,
  rounds: int,
  checkpoint_dir: str | os.PathLike | None = None,
) -> tuple[OnlineState, list[dict]]:
  """Iterative DPO: per round r, Y samples per prompt of prompt_fn(r) from the current policy,
  best-vs-worst pairs by reward, then icfg.steps DPO steps (minibatches of tcfg.batch_size pairs,
  drawn with a key split from the rollout's) from a fresh optimizer state; with
  icfg.loss.sync_ref_model, TR-DPO's updates (`align.train.sync_reference`) move the reference
  within a round. Rounds whose prompts all tie train nothing."""
  if not icfg.loss.reference:
    raise ValueError(f"icfg.loss: iterative DPO expects a loss with a reference, got {icfg.loss.loss!r}")
  step = align_train.make_preference_step(cfg, tcfg, icfg.loss)
  state = OnlineState(jnp.int32(0), train.start_state(policy_params, tcfg))

  def body(s: OnlineState, r: int):
    policy = s.train.params
    rollout_key, pick_key = jax.random.split(jax.random.fold_in(key, r))  # sampling and minibatches apart
    prompts, lengths = prompt_fn(r)
    ro = rollout(rollout_key, policy, policy_params, cfg, prompts, lengths, reward_fn, rcfg)
    pairs, dropped = best_worst_pairs(ro, rcfg.samples_per_prompt)
    reference = policy if icfg.reference == "round" else policy_params
    trained, metrics = train.start_state(policy, tcfg), {}
    n = pairs.chosen_BT.shape[0]
    for i in range(icfg.steps if n else 0):
      rows = np.asarray(jax.random.randint(jax.random.fold_in(pick_key, i), (tcfg.batch_size,), 0, n))
      batch = PreferenceBatch(*(x[rows] for x in pairs))
      ref_logps = align_train.reference_logprobs(reference, cfg, batch, per_token=icfg.loss.per_token)
      trained, metrics = step(trained, batch, ref_logps)
      reference = align_train.sync_reference(reference, trained, icfg.loss)  # TR-DPO, when configured
    metrics = {k: v for k, v in metrics.items() if k in ("loss", "reward_accuracy")}
    return OnlineState(s.step, trained), {**_rollout_metrics(ro), "pairs": n, "dropped": dropped, **metrics}

  return _run(state, rounds, body, checkpoint_dir)
