"""Training steps of the post-training pipeline: SFT, reward model, preference optimisation, KTO.

All reuse `models.train` (make_step, TrainState). SFT is plain next-token training with the
completion mask; the reward model minimises the Bradley-Terry loss; the policy minimises a
`dpo.PreferenceConfig` loss (or, on unpaired completions with binary feedback, `dpo.kto_loss`)
against a frozen reference whose log-probs are computed outside the gradient.

Shapes: B batch, T time.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from paperjax.align import dpo, logprobs, reward
from paperjax.align.data import PreferenceBatch, UnpairedBatch
from paperjax.models.training import lm, train
from paperjax.models.transformer import llama
from paperjax.ops import checks


def sft_batch(tokens_BT: np.ndarray, completion_mask_BT: np.ndarray) -> lm.Batch:
  """A next-token `lm.Batch` whose loss counts completion tokens only."""
  checks.check_array("tokens_BT", tokens_BT, 2, integer=True, shape="[B, T]")
  checks.check_array("completion_mask_BT", completion_mask_BT, 2, shape="[B, T]")
  logprobs.check_mask("completion_mask_BT", completion_mask_BT, tokens_BT.shape)
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
  lengths and prompt lengths in 1 .. T, masks bool, False in the prompt (so at position 0) and
  past each row's length, and margins finite. Shapes always; values when concrete (the steps
  check on the host before the jitted step, so a bad batch raises instead of being clamped or
  gathered out of range)."""
  if not isinstance(batch, PreferenceBatch):
    raise TypeError(f"batch: expected an align.data.PreferenceBatch, got {type(batch).__name__}")
  size = np.shape(batch.chosen_BT)[0] if np.ndim(batch.chosen_BT) == 2 else None
  for side in ("chosen", "rejected"):
    tokens = getattr(batch, f"{side}_BT")
    checks.check_tokens(tokens, vocab_size, name=f"batch.{side}_BT")
    rows, time = tokens.shape
    if rows != size:
      raise ValueError(f"batch.{side}_BT: expected {size} rows like batch.chosen_BT, got shape {tokens.shape}")
    if side == "chosen":
      prompts = checks.check_lengths(batch.prompt_lengths_B, rows, time, name="batch.prompt_lengths_B")
    lengths = checks.check_lengths(getattr(batch, f"{side}_lengths_B"), rows, time, name=f"batch.{side}_lengths_B")
    mask = getattr(batch, f"{side}_mask_BT")
    logprobs.check_mask(f"batch.{side}_mask_BT", mask, tokens.shape)
    # True in the prompt (position 0, which has no prediction, included) or past the row's length
    # (padding) would score a token that is not part of the completion.
    xp, (mask_BT, lengths_B, prompts_B) = checks.on_host(mask, lengths, prompts)
    slots_T = xp.arange(time)
    scored = mask_BT & ((slots_T[None, :] >= lengths_B[:, None]) | (slots_T[None, :] < prompts_B[:, None]))
    checks.check_values(
      f"batch.{side}_mask_BT", scored, lambda v: v, "False in the prompt, at position 0 and past each row's length"
    )
  margin = batch.margin_B
  checks.check_array("batch.margin_B", margin, 1, shape=f"[{size}]")
  if not jnp.issubdtype(margin.dtype, jnp.floating):  # jnp: numpy does not count ml_dtypes' bfloat16
    raise TypeError(f"batch.margin_B: expected float margins, got {margin.dtype}")
  if margin.shape != (size,):
    raise ValueError(f"batch.margin_B: expected shape ({size},), got {tuple(margin.shape)}")
  checks.check_finite("batch.margin_B", margin)


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
  params: dict, cfg: llama.LlamaConfig, batch: PreferenceBatch, *, per_token: bool = False
) -> tuple[logprobs.SequenceLogProbs, ...]:
  """(chosen, rejected) completion log-probs under `params`; the batch is checked as in
  `check_batch` (values when concrete). per_token: with the per-token fields
  (`logprobs.sequence_logprobs`) that ld_alpha and use_weighting read (`pcfg.per_token`)."""
  check_batch(batch, cfg.vocab_size)
  return tuple(
    logprobs.model_logprobs(
      params,
      cfg,
      jnp.asarray(getattr(batch, f"{side}_BT")),
      jnp.asarray(getattr(batch, f"{side}_mask_BT")),
      per_token=per_token,
    )
    for side in ("chosen", "rejected")
  )


def make_preference_step(cfg: llama.LlamaConfig, tcfg: train.TrainConfig, pcfg: dpo.PreferenceConfig) -> Callable:
  """(state, PreferenceBatch, reference (chosen, rejected) log-probs) -> (state, metrics).

  The batch (`check_batch`) and the reference log-probs (`check_reference`) are checked on
  the host before the jitted step (`step.jitted`) runs. A reference-free loss takes
  reference=None (or (None, None)). With pcfg.ld_alpha the reference must carry per-token
  log-probs (`reference_logprobs(..., per_token=True)`); the policy's are computed with them
  whenever `pcfg.per_token`. With pcfg.sync_ref_model the loop updates the reference
  (`sync_reference`) after each step and computes its log-probs from the updated params."""
  if not isinstance(pcfg, dpo.PreferenceConfig):
    raise TypeError(f"pcfg: expected a dpo.PreferenceConfig, got {type(pcfg).__name__}")
  needs_reference = pcfg.reference

  def loss_fn(params, batch: PreferenceBatch, reference):
    chosen, rejected = pair_logprobs(params, cfg, batch, per_token=pcfg.per_token)
    return dpo.preference_loss(dpo.PairLogProbs(chosen, rejected, *(reference or (None, None))), pcfg)

  def check_args(batch: PreferenceBatch, reference) -> None:
    check_batch(batch, cfg.vocab_size)
    absent = reference is None or (isinstance(reference, tuple) and all(r is None for r in reference))
    if not needs_reference and not absent:
      raise ValueError(f"reference: loss {pcfg.loss!r} reads no reference log-probs (they would be ignored); pass None")
    if needs_reference:
      per_token = pcfg.ld_alpha is not None
      check_reference(reference, np.shape(batch.chosen_BT)[0], loss=str(pcfg.loss), per_token=per_token)

  return train.make_step(loss_fn, tcfg, check_args=check_args)


def check_reference(reference, batch: int, *, loss: str = "", per_token: bool = False) -> None:
  """Raises unless `reference` is a (chosen, rejected) pair of `logprobs.SequenceLogProbs`
  (what `reference_logprobs` returns) of shape [batch], log-probs finite and <= 0, counts finite and >= 0,
  and, with per_token (ld_alpha), per-token fields token_BT and mask_BT of B = batch rows.
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
    logprobs.check_sequence(name, s)
    for field in ("token_BT", "mask_BT") if per_token else ():
      x = getattr(s, field)
      if x is None:
        raise ValueError(
          f"{name}.{field}: ld_alpha needs per-token reference log-probs: "
          f"align.train.reference_logprobs(..., per_token=True), got None"
        )
      checks.check_array(f"{name}.{field}", x, 2, shape=f"[{batch}, T]")
      if x.shape[0] != batch:
        raise ValueError(f"{name}.{field}: expected {batch} rows like the batch, got shape {tuple(x.shape)}")


def reference_logprobs(ref_params: dict, cfg: llama.LlamaConfig, batch: PreferenceBatch, *, per_token: bool = False):
  """Frozen reference log-probs: computed once per batch, never differentiated. The batch is
  checked on the host (`check_batch`) before the jitted call. per_token: as in `pair_logprobs`
  (needed by ld_alpha)."""
  check_batch(batch, cfg.vocab_size)
  return jax.lax.stop_gradient(_pair_logprobs_jit(ref_params, cfg, batch, per_token=per_token))


_pair_logprobs_jit = jax.jit(pair_logprobs, static_argnums=1, static_argnames="per_token")


def mix_reference(ref_params, policy_params, alpha: float):
  """TR-DPO's (arXiv 2404.09656) soft reference update, leaf by leaf:

    ref <- alpha * policy + (1 - alpha) * ref     (alpha = 1: the "hard" update, a copy)

  Both trees must have one structure and shapes; each leaf keeps the reference's dtype.
  alpha is checked when concrete (a finite number in [0, 1])."""
  checks.check_scalar("alpha", alpha, checks.Range(low=0, high=1))
  checks.check_tree("policy_params", policy_params, ref_params)

  def mix(ref, policy):
    out = (1 - alpha) * jnp.asarray(ref, jnp.float32) + alpha * jnp.asarray(policy, jnp.float32)
    return out.astype(jnp.asarray(ref).dtype)

  return jax.tree.map(mix, ref_params, policy_params)


def sync_reference(ref_params, state: train.TrainState, pcfg: dpo.PreferenceConfig):
  """The reference for the next step, as TRL's SyncRefModelCallback does after each optimizer step:
  `mix_reference(ref, state.params, pcfg.ref_model_mixup_alpha)` when pcfg.sync_ref_model and
  state.step (steps taken) is a multiple of pcfg.ref_model_sync_steps; else ref_params itself.

    for batch in batches:
      reference = reference_logprobs(ref_params, cfg, batch)   # from the current reference
      state, metrics = step(state, batch, reference)
      ref_params = sync_reference(ref_params, state, pcfg)
  """
  if not isinstance(pcfg, dpo.PreferenceConfig):
    raise TypeError(f"pcfg: expected a dpo.PreferenceConfig, got {type(pcfg).__name__}")
  step = checks.check_int("state.step", state.step, low=0)
  if not pcfg.sync_ref_model or step == 0 or step % pcfg.ref_model_sync_steps:
    return ref_params
  return mix_reference(ref_params, state.params, pcfg.ref_model_mixup_alpha)


def kto_mismatched(batch: UnpairedBatch) -> UnpairedBatch:
  """KTO's KL rows: prompt i with the completion of row (i - 1) mod B, as TRL 1.16's KTOTrainer
  rotates them ((x_1, y_B), (x_2, y_1), ..., (x_B, y_{B-1})) for the reference point z,
  right-padded; masks follow the completion. B must be >= 2 (TRL refuses 1 too: each prompt
  would keep its own completion and z would be the implied reward)."""
  if not isinstance(batch, UnpairedBatch):
    raise TypeError(f"batch: expected an align.data.UnpairedBatch, got {type(batch).__name__}")
  tokens, mask = np.asarray(batch.tokens_BT), np.asarray(batch.mask_BT)
  lengths, prompt_lengths = np.asarray(batch.lengths_B), np.asarray(batch.prompt_lengths_B)
  if tokens.ndim != 2 or len(tokens) < 2:
    raise ValueError(
      f"batch.tokens_BT: expected [B, T] with B >= 2 (KTO's KL rows pair each prompt with another row's "
      f"completion), got shape {tokens.shape}"
    )
  rows, masks = [], []
  for i in range(len(tokens)):
    j = (i - 1) % len(tokens)
    completion = slice(int(prompt_lengths[j]), int(lengths[j]))
    rows.append(np.concatenate([tokens[i, : prompt_lengths[i]], tokens[j, completion]]))
    masks.append(np.concatenate([np.zeros(prompt_lengths[i], bool), mask[j, completion]]))
  width = max(len(r) for r in rows)
  pad = lambda r, fill: np.pad(r, (0, width - len(r)), constant_values=fill)
  return UnpairedBatch(
    np.stack([pad(r, 0) for r in rows]).astype(tokens.dtype),
    np.stack([pad(m, False) for m in masks]),
    np.asarray([len(r) for r in rows], np.int32),
    prompt_lengths.astype(np.int32),
    np.asarray(batch.label_B),
  )


def check_unpaired(batch: UnpairedBatch, vocab_size: int) -> None:
  """Raises unless `batch` is an UnpairedBatch of one batch size: ids in [0, vocab_size), lengths
  in 1 .. T, prompt lengths in 1 .. length, a bool mask False in the prompt and past each length,
  bool labels. Shapes always; values when concrete."""
  if not isinstance(batch, UnpairedBatch):
    raise TypeError(f"batch: expected an align.data.UnpairedBatch, got {type(batch).__name__}")
  rows, time = checks.check_tokens(batch.tokens_BT, vocab_size, name="batch.tokens_BT")
  lengths = checks.check_lengths(batch.lengths_B, rows, time, name="batch.lengths_B")
  prompts = checks.check_lengths(batch.prompt_lengths_B, rows, time, name="batch.prompt_lengths_B")
  checks.check_in("batch.lengths_B", lengths - prompts, 0, time, what="lengths - prompt_lengths_B")
  logprobs.check_mask("batch.mask_BT", batch.mask_BT, (rows, time))
  xp, (mask_BT, lengths_B, prompts_B) = checks.on_host(batch.mask_BT, lengths, prompts)
  slots_T = xp.arange(time)
  outside = mask_BT & ((slots_T[None, :] >= lengths_B[:, None]) | (slots_T[None, :] < prompts_B[:, None]))
  checks.check_values("batch.mask_BT", outside, lambda v: v, "False in the prompt and past each row's length")
  label = batch.label_B
  if getattr(label, "dtype", None) != np.bool_ or tuple(np.shape(label)) != (rows,):
    raise TypeError(
      f"batch.label_B: expected bool labels [{rows}] (True: desirable), got "
      f"{getattr(label, 'dtype', type(label).__name__)} {tuple(np.shape(label))}"
    )


def kto_reference_logprobs(ref_params: dict, cfg: llama.LlamaConfig, batch: UnpairedBatch):
  """The frozen reference's (completion, mismatched KL row) log-probs for `make_kto_step`."""
  check_unpaired(batch, cfg.vocab_size)
  return jax.lax.stop_gradient(_unpaired_logprobs_jit(ref_params, cfg, batch, kto_mismatched(batch)))


def _unpaired_logprobs(params, cfg, batch: UnpairedBatch, mismatched: UnpairedBatch):
  return (
    logprobs.model_logprobs(params, cfg, jnp.asarray(batch.tokens_BT), jnp.asarray(batch.mask_BT)),
    logprobs.model_logprobs(params, cfg, jnp.asarray(mismatched.tokens_BT), jnp.asarray(mismatched.mask_BT)),
  )


_unpaired_logprobs_jit = jax.jit(_unpaired_logprobs, static_argnums=1)


def make_kto_step(
  cfg: llama.LlamaConfig,
  tcfg: train.TrainConfig,
  *,
  beta: float = 0.1,
  desirable_weight: float = 1.0,
  undesirable_weight: float = 1.0,
) -> Callable:
  """(state, UnpairedBatch, reference from `kto_reference_logprobs`) -> (state, metrics)
  minimising `dpo.kto_loss`, with z from the mismatched rows (`kto_mismatched`). The batch
  (`check_unpaired`, before its mismatched rows are built) and the reference are checked on
  the host before the jitted step; the loss's arguments are checked now."""
  probe = logprobs.SequenceLogProbs(jnp.zeros(1), jnp.ones(1))
  weights = dict(beta=beta, desirable_weight=desirable_weight, undesirable_weight=undesirable_weight)
  dpo.kto_loss(probe, probe, jnp.ones(1, bool), probe, probe, **weights)  # refuses bad weights now

  def loss_fn(params, batch: UnpairedBatch, mismatched: UnpairedBatch, reference):
    policy, kl_policy = _unpaired_logprobs(params, cfg, batch, mismatched)
    return dpo.kto_loss(policy, reference[0], jnp.asarray(batch.label_B), kl_policy, reference[1], **weights)

  def check_args(batch: UnpairedBatch, mismatched: UnpairedBatch, reference) -> None:
    # kto_step has checked the batch (check_unpaired) before building the mismatched rows.
    rows = np.shape(batch.tokens_BT)[0]
    if not isinstance(reference, tuple) or len(reference) != 2:
      raise TypeError(f"reference: expected the pair kto_reference_logprobs returns, got {type(reference).__name__}")
    for name, s in zip(("reference[0]", "reference[1]"), reference):
      if not isinstance(s, logprobs.SequenceLogProbs) or tuple(s.sum_B.shape) != (rows,):
        raise ValueError(f"{name}: expected logprobs.SequenceLogProbs of shape ({rows},) like the batch, got {s!r:.80}")
      logprobs.check_sequence(name, s)

  step = train.make_step(loss_fn, tcfg, check_args=check_args)

  def kto_step(state: train.TrainState, batch: UnpairedBatch, reference):
    check_unpaired(batch, cfg.vocab_size)  # first: kto_mismatched indexes by the batch's lengths
    return step(state, batch, kto_mismatched(batch), reference)

  kto_step.jitted = step.jitted  # type: ignore[attr-defined]
  return kto_step
