"""Training steps of the post-training pipeline: SFT, reward model, preference optimisation.

All three reuse `models.train` (make_step, TrainState). SFT is plain next-token
training with the completion mask; the reward model minimises the Bradley-Terry loss; the
policy minimises a `dpo.PreferenceConfig` loss against a frozen reference whose log-probs
are computed outside the gradient.

Shapes: B batch, T time.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from paperjax.align import dpo, logprobs, reward
from paperjax.align.data import PreferenceBatch
from paperjax.models.training import lm, train
from paperjax.models.transformer import llama
from paperjax.ops import checks


def sft_batch(tokens_BT: np.ndarray, completion_mask_BT: np.ndarray) -> lm.Batch:
  """A next-token `lm.Batch` whose loss counts completion tokens only."""
  checks.check_array("tokens_BT", tokens_BT, 2, integer=True, shape="[B, T]")
  checks.check_array("completion_mask_BT", completion_mask_BT, 2, shape="[B, T]")
  _check_mask("completion_mask_BT", completion_mask_BT, tokens_BT.shape)
  if tokens_BT.shape[1] < 2:
    raise ValueError(f"tokens_BT: expected T >= 2 (inputs and next-token targets), got shape {tokens_BT.shape}")
  checks.check_values(
    "completion_mask_BT",
    completion_mask_BT[:, 0],
    lambda v: v,
    "False at position 0 (it is no token's target: the prompt must come first)",
  )
  batch, time = tokens_BT.shape
  positions = np.broadcast_to(np.arange(time - 1, dtype=np.int32), (batch, time - 1))
  return lm.Batch(
    tokens_BT[:, :-1], tokens_BT[:, 1:], completion_mask_BT[:, 1:], np.zeros((batch, time - 1), np.int32), positions
  )


def check_batch(batch: PreferenceBatch, vocab_size: int) -> None:
  """Raises unless `batch` is a PreferenceBatch of one batch size whose ids are in [0, vocab_size),
  lengths in 1 .. T, masks bool, False at position 0 and past each row's length, and margins
  finite. Shapes always; values when concrete (the steps check on the host before the jitted
  step, so a bad batch raises instead of being clamped or gathered out of range)."""
  if not isinstance(batch, PreferenceBatch):
    raise TypeError(f"batch: expected an align.data.PreferenceBatch, got {type(batch).__name__}")
  size = np.shape(batch.chosen_BT)[0] if np.ndim(batch.chosen_BT) == 2 else None
  for side in ("chosen", "rejected"):
    tokens = getattr(batch, f"{side}_BT")
    checks.check_tokens(tokens, vocab_size, name=f"batch.{side}_BT")
    rows, time = tokens.shape
    if rows != size:
      raise ValueError(f"batch.{side}_BT: expected {size} rows like batch.chosen_BT, got shape {tokens.shape}")
    lengths = checks.check_lengths(getattr(batch, f"{side}_lengths_B"), rows, time, name=f"batch.{side}_lengths_B")
    mask = getattr(batch, f"{side}_mask_BT")
    _check_mask(f"batch.{side}_mask_BT", mask, tokens.shape)
    # True at position 0 (no prediction) or past the row's length (padding) would score a token
    # that is not part of the completion.
    concrete_mask, concrete_lengths = checks.concrete(mask), checks.concrete(lengths)
    if concrete_mask is not None and concrete_lengths is not None:  # numpy: no device dispatch for an eager check
      slots_T = np.arange(time)
      scored = concrete_mask & ((slots_T[None, :] >= concrete_lengths[:, None]) | (slots_T[None, :] == 0))
    else:
      slots = jnp.arange(time)
      scored = mask & ((slots[None, :] >= lengths[:, None]) | (slots[None, :] == 0))
    checks.check_values(f"batch.{side}_mask_BT", scored, lambda v: v, "False at position 0 and past each row's length")
  checks.check_lengths(batch.prompt_lengths_B, size or 0, np.shape(batch.chosen_BT)[1], name="batch.prompt_lengths_B")
  margin = batch.margin_B
  checks.check_array("batch.margin_B", margin, 1, shape=f"[{size}]")
  if not np.issubdtype(margin.dtype, np.floating):
    raise TypeError(f"batch.margin_B: expected float margins, got {margin.dtype}")
  if margin.shape != (size,):
    raise ValueError(f"batch.margin_B: expected shape ({size},), got {tuple(margin.shape)}")
  checks.check_finite("batch.margin_B", margin)


def _check_mask(name: str, mask, shape) -> None:
  checks.check_array(name, mask, 2, shape="[B, T]")
  if mask.dtype != np.bool_:
    raise TypeError(f"{name}: expected a bool mask (True at completion tokens), got {mask.dtype}")
  if tuple(mask.shape) != tuple(shape):
    raise ValueError(f"{name}: expected shape {tuple(shape)} like the tokens, got {tuple(mask.shape)}")


def make_reward_step(cfg: llama.LlamaConfig, tcfg: train.TrainConfig, *, centering: float = 0.0) -> Callable:
  """(state, PreferenceBatch) -> (state, metrics) minimising the Bradley-Terry loss (with margins).

  The batch is checked on the host (`check_batch`) before the jitted step runs."""

  def loss_fn(params, batch: PreferenceBatch):
    r_c = reward.rewards(params, jnp.asarray(batch.chosen_BT), jnp.asarray(batch.chosen_lengths_B), cfg)
    r_r = reward.rewards(params, jnp.asarray(batch.rejected_BT), jnp.asarray(batch.rejected_lengths_B), cfg)
    return reward.bradley_terry_loss(r_c, r_r, margin_B=jnp.asarray(batch.margin_B), centering=centering)

  reward.check_centering(centering)  # now, not at the first step
  return _checked_step(train.make_step(loss_fn, tcfg), cfg)


def pair_logprobs(
  params: dict, cfg: llama.LlamaConfig, batch: PreferenceBatch
) -> tuple[logprobs.SequenceLogProbs, ...]:
  """(chosen, rejected) completion log-probs under `params`; the batch is checked as in
  `check_batch` (values when concrete)."""
  check_batch(batch, cfg.vocab_size)
  return (
    logprobs.model_logprobs(params, cfg, jnp.asarray(batch.chosen_BT), jnp.asarray(batch.chosen_mask_BT)),
    logprobs.model_logprobs(params, cfg, jnp.asarray(batch.rejected_BT), jnp.asarray(batch.rejected_mask_BT)),
  )


def make_preference_step(cfg: llama.LlamaConfig, tcfg: train.TrainConfig, pcfg: dpo.PreferenceConfig) -> Callable:
  """(state, PreferenceBatch, reference (chosen, rejected) log-probs) -> (state, metrics).

  The batch is checked on the host (`check_batch`) before the jitted step runs."""
  if not isinstance(pcfg, dpo.PreferenceConfig):
    raise TypeError(f"pcfg: expected a dpo.PreferenceConfig, got {type(pcfg).__name__}")

  def loss_fn(params, batch: PreferenceBatch, reference):
    chosen, rejected = pair_logprobs(params, cfg, batch)
    return dpo.preference_loss(dpo.PairLogProbs(chosen, rejected, *reference), pcfg)

  return _checked_step(train.make_step(loss_fn, tcfg), cfg)


def _checked_step(jitted: Callable, cfg: llama.LlamaConfig) -> Callable:
  """`jitted(state, batch, *rest)` after `check_batch` on the host."""

  def step(state: train.TrainState, batch: PreferenceBatch, *rest):
    check_batch(batch, cfg.vocab_size)
    return jitted(state, batch, *rest)

  step.jitted = jitted  # type: ignore[attr-defined]  # for .lower(), as train.make_step's mesh steps
  return step


def reference_logprobs(ref_params: dict, cfg: llama.LlamaConfig, batch: PreferenceBatch):
  """Frozen reference log-probs: computed once per batch, never differentiated. The batch is
  checked on the host (`check_batch`) before the jitted call."""
  check_batch(batch, cfg.vocab_size)
  return jax.lax.stop_gradient(_pair_logprobs_jit(ref_params, cfg, batch))


_pair_logprobs_jit = jax.jit(pair_logprobs, static_argnums=1)
