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


def sft_batch(tokens_BT: np.ndarray, completion_mask_BT: np.ndarray) -> lm.Batch:
  """A next-token `lm.Batch` whose loss counts completion tokens only."""
  batch, time = tokens_BT.shape
  positions = np.broadcast_to(np.arange(time - 1, dtype=np.int32), (batch, time - 1))
  return lm.Batch(
    tokens_BT[:, :-1], tokens_BT[:, 1:], completion_mask_BT[:, 1:], np.zeros((batch, time - 1), np.int32), positions
  )


def make_reward_step(cfg: llama.LlamaConfig, tcfg: train.TrainConfig, *, centering: float = 0.0) -> Callable:
  """(state, PreferenceBatch) -> (state, metrics) minimising the Bradley-Terry loss (with margins)."""

  def loss_fn(params, batch: PreferenceBatch):
    r_c = reward.rewards(params, jnp.asarray(batch.chosen_BT), jnp.asarray(batch.chosen_lengths_B), cfg)
    r_r = reward.rewards(params, jnp.asarray(batch.rejected_BT), jnp.asarray(batch.rejected_lengths_B), cfg)
    return reward.bradley_terry_loss(r_c, r_r, margin_B=jnp.asarray(batch.margin_B), centering=centering)

  return train.make_step(loss_fn, tcfg)


def pair_logprobs(
  params: dict, cfg: llama.LlamaConfig, batch: PreferenceBatch
) -> tuple[logprobs.SequenceLogProbs, ...]:
  """(chosen, rejected) completion log-probs under `params`."""
  return (
    logprobs.model_logprobs(params, cfg, jnp.asarray(batch.chosen_BT), jnp.asarray(batch.chosen_mask_BT)),
    logprobs.model_logprobs(params, cfg, jnp.asarray(batch.rejected_BT), jnp.asarray(batch.rejected_mask_BT)),
  )


def make_preference_step(cfg: llama.LlamaConfig, tcfg: train.TrainConfig, pcfg: dpo.PreferenceConfig) -> Callable:
  """(state, PreferenceBatch, reference (chosen, rejected) log-probs) -> (state, metrics)."""

  def loss_fn(params, batch: PreferenceBatch, reference):
    chosen, rejected = pair_logprobs(params, cfg, batch)
    return dpo.preference_loss(dpo.PairLogProbs(chosen, rejected, *reference), pcfg)

  return train.make_step(loss_fn, tcfg)


def reference_logprobs(ref_params: dict, cfg: llama.LlamaConfig, batch: PreferenceBatch):
  """Frozen reference log-probs: computed once per batch, never differentiated."""
  return jax.lax.stop_gradient(_pair_logprobs_jit(ref_params, cfg, batch))


_pair_logprobs_jit = jax.jit(pair_logprobs, static_argnums=1)
