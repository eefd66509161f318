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
    xp, (mask_BT, lengths_B) = checks.on_host(mask, lengths)
    slots_T = xp.arange(time)
    scored = mask_BT & ((slots_T[None, :] >= lengths_B[:, None]) | (slots_T[None, :] == 0))
    checks.check_values(f"batch.{side}_mask_BT", scored, lambda v: v, "False at position 0 and past each row's length")
  checks.check_lengths(batch.prompt_lengths_B, size or 0, np.shape(batch.chosen_BT)[1], name="batch.prompt_lengths_B")
  margin = batch.margin_B
  checks.check_array("batch.margin_B", margin, 1, shape=f"[{size}]")
  if not jnp.issubdtype(margin.dtype, jnp.floating):  # jnp: numpy does not count ml_dtypes' bfloat16
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
  return train.make_step(loss_fn, tcfg, check_args=lambda batch: check_batch(batch, cfg.vocab_size))


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

  The batch (`check_batch`) and the reference log-probs (`check_reference`) are checked on
  the host before the jitted step (`step.jitted`) runs. A reference-free loss takes
  reference=None (or (None, None))."""
  if not isinstance(pcfg, dpo.PreferenceConfig):
    raise TypeError(f"pcfg: expected a dpo.PreferenceConfig, got {type(pcfg).__name__}")
  needs_reference = dpo.LOSSES[pcfg.loss].reference

  def loss_fn(params, batch: PreferenceBatch, reference):
    chosen, rejected = pair_logprobs(params, cfg, batch)
    return dpo.preference_loss(dpo.PairLogProbs(chosen, rejected, *(reference or (None, None))), pcfg)

  def check_args(batch: PreferenceBatch, reference) -> None:
    check_batch(batch, cfg.vocab_size)
    absent = reference is None or (isinstance(reference, tuple) and all(r is None for r in reference))
    if needs_reference or not absent:
      check_reference(reference, np.shape(batch.chosen_BT)[0], loss=pcfg.loss)

  return train.make_step(loss_fn, tcfg, check_args=check_args)


def check_reference(reference, batch: int, *, loss: str = "") -> None:
  """Raises unless `reference` is a (chosen, rejected) pair of `logprobs.SequenceLogProbs`
  (what `reference_logprobs` returns) of shape [batch], log-probs finite and <= 0, counts >= 0.
  Shapes always; values when concrete."""
  if not isinstance(reference, (tuple, list)) or len(reference) != 2:
    length = f" of length {len(reference)}" if isinstance(reference, (tuple, list)) else ""
    for_loss = f" (loss {loss!r} compares against a frozen reference)" if loss else ""
    raise TypeError(
      f"reference: expected a (chosen, rejected) pair of logprobs.SequenceLogProbs from "
      f"align.train.reference_logprobs{for_loss}, got a {type(reference).__name__}{length}"
    )
  for side, s in zip(("chosen", "rejected"), reference):
    name = f"reference.{side}"
    if not isinstance(s, logprobs.SequenceLogProbs):
      raise TypeError(f"{name}: expected logprobs.SequenceLogProbs, got {type(s).__name__}")
    for field in ("sum_B", "count_B"):
      x = getattr(s, field)
      checks.check_array(f"{name}.{field}", x, 1, shape=f"[{batch}]")
      if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(f"{name}.{field}: expected floats, got {x.dtype}")
      if tuple(x.shape) != (batch,):
        raise ValueError(f"{name}.{field}: expected shape ({batch},) like the batch, got {tuple(x.shape)}")
      checks.check_finite(f"{name}.{field}", x)
    # A positive log-prob is a logit or a probability passed by mistake.
    checks.check_in(f"{name}.sum_B", s.sum_B, -np.inf, 0, what="log-probs")
    checks.check_in(f"{name}.count_B", s.count_B, 0, np.inf, what="token counts")


def reference_logprobs(ref_params: dict, cfg: llama.LlamaConfig, batch: PreferenceBatch):
  """Frozen reference log-probs: computed once per batch, never differentiated. The batch is
  checked on the host (`check_batch`) before the jitted call."""
  check_batch(batch, cfg.vocab_size)
  return jax.lax.stop_gradient(_pair_logprobs_jit(ref_params, cfg, batch))


_pair_logprobs_jit = jax.jit(pair_logprobs, static_argnums=1)
