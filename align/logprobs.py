"""Per-token and per-sequence log-probabilities of completions.

Shapes: B batch, T time, V vocabulary.

  logp(y | x) = sum_t m_t log pi(tokens_t | tokens_<t)

Logits at position t predict token t + 1, so token t is scored by logits t - 1 and token
0 has no score. The mask m keeps completion tokens only: prompt, padding and (Llama 3)
special formatting tokens are 0. "Averaged" forms divide by the number of kept tokens.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from paperjax.models import protocol
from paperjax.ops import checks


def _check_logits(logits_BTV: jax.Array) -> None:
  checks.check_array("logits_BTV", logits_BTV, 3, shape="[B, T, V]")
  if not jnp.issubdtype(logits_BTV.dtype, jnp.floating):
    raise TypeError(f"logits_BTV: expected a floating dtype, got {logits_BTV.dtype}")


class SequenceLogProbs(NamedTuple):
  """A completion's masked log-prob sum and token count per row; with `per_token=True`
  (`sequence_logprobs`) also the per-token pieces LD-DPO and WPO read (`dpo.PreferenceConfig`'s
  ld_alpha and use_weighting). Built from two arrays, as before, the per-token fields are None."""

  sum_B: jax.Array  # float32
  count_B: jax.Array  # float32, kept tokens
  token_BT: jax.Array | None = None  # m_t log pi(y_t), 0 off the mask (float32)
  mask_BT: jax.Array | None = None  # m_t (float32)
  log_sum_sq_BT: jax.Array | None = None  # m_t log sum_v pi(v)^2 at the same position (WPO), 0 off the mask

  @property
  def mean_B(self) -> jax.Array:
    return self.sum_B / jnp.maximum(self.count_B, 1.0)


def token_logprobs(logits_BTV: jax.Array, tokens_BT: jax.Array) -> jax.Array:
  """lp[b, t] = log softmax(logits[b, t - 1])[tokens[b, t]] for t >= 1, lp[b, 0] = 0 (float32).

  Value checks (ids in [0, V)) run on concrete inputs, or inside `ops.checks.checked`."""
  _check_logits(logits_BTV)
  checks.check_array("tokens_BT", tokens_BT, 2, integer=True, shape="[B, T]")
  if logits_BTV.shape[:2] != tokens_BT.shape:
    raise ValueError(f"tokens_BT: expected shape {logits_BTV.shape[:2]}, got {tokens_BT.shape}")
  checks.check_tokens(tokens_BT, logits_BTV.shape[2])
  logp_BTV = jax.nn.log_softmax(logits_BTV[:, :-1].astype(jnp.float32), axis=-1)
  picked = jnp.take_along_axis(logp_BTV, tokens_BT[:, 1:, None], axis=-1)[..., 0]
  return jnp.pad(picked, ((0, 0), (1, 0)))


def completion_mask(
  tokens_BT: jax.Array,
  prompt_lengths_B: jax.Array,
  lengths_B: jax.Array,
  exclude_ids: Sequence[int] = (),
) -> jax.Array:
  """True at completion tokens: prompt_length <= t < length, and tokens not in exclude_ids.

  Value checks (1 <= prompt length <= length <= T) run on concrete inputs, or inside
  `ops.checks.checked`."""
  checks.check_array("tokens_BT", tokens_BT, 2, integer=True, shape="[B, T]")
  batch, time = tokens_BT.shape
  prompt_lengths_B = checks.check_lengths(prompt_lengths_B, batch, time, name="prompt_lengths_B")
  lengths_B = checks.check_lengths(lengths_B, batch, time, name="lengths_B")
  # A completion ends after its prompt (an empty one is allowed); swapped arguments fail here.
  checks.check_in("lengths_B", lengths_B - prompt_lengths_B, 0, time, what="lengths - prompt_lengths_B")
  if not all(isinstance(i, (int, np.integer)) and not isinstance(i, bool) for i in exclude_ids):
    raise TypeError(f"exclude_ids: expected token ids (ints), got {exclude_ids!r}")
  t = jnp.arange(tokens_BT.shape[1])[None, :]
  mask_BT = (t >= prompt_lengths_B[:, None]) & (t < lengths_B[:, None])
  if exclude_ids:
    mask_BT &= ~jnp.isin(tokens_BT, jnp.asarray(exclude_ids, tokens_BT.dtype))
  return mask_BT


def sequence_logprobs(
  logits_BTV: jax.Array, tokens_BT: jax.Array, mask_BT: jax.Array, *, per_token: bool = False
) -> SequenceLogProbs:
  """Masked sum (and count, for the averaged form) of token log-probs per row.

  per_token: also keep token_BT = m_t log pi(y_t | y_<t), mask_BT = m_t and
  log_sum_sq_BT = m_t log sum_v pi(v | y_<t)^2 (WPO's alignment term), each [B, T] float32 and
  0 at position 0 and off the mask, as `dpo.preference_loss` needs them for ld_alpha and
  use_weighting.

  Value checks (ids in [0, V), mask False at position 0) run on concrete inputs, or inside
  `ops.checks.checked`."""
  checks.check_array("mask_BT", mask_BT, 2, shape="[B, T]")
  if mask_BT.shape != tokens_BT.shape:
    raise ValueError(f"mask_BT: expected shape {tokens_BT.shape}, got {mask_BT.shape}")
  if mask_BT.dtype != jnp.bool_:
    raise TypeError(f"mask_BT: expected a bool mask (True at completion tokens), got {mask_BT.dtype}")
  checks.check_values(
    "mask_BT", mask_BT[:, 0], lambda v: v, "False at position 0 (it has no prediction: the prompt must come first)"
  )
  mask = mask_BT.astype(jnp.float32)
  token_BT = token_logprobs(logits_BTV, tokens_BT) * mask
  if not per_token:
    return SequenceLogProbs(jnp.sum(token_BT, axis=1), mask.sum(axis=1))
  # log sum_v p_v^2 = logsumexp(2 log p): logits t - 1 score token t, as in token_logprobs.
  logp_BTV = jax.nn.log_softmax(logits_BTV[:, :-1].astype(jnp.float32), axis=-1)
  log_sum_sq_BT = jnp.pad(jax.nn.logsumexp(2 * logp_BTV, axis=-1), ((0, 0), (1, 0))) * mask
  return SequenceLogProbs(jnp.sum(token_BT, axis=1), mask.sum(axis=1), token_BT, mask, log_sum_sq_BT)


def model_logprobs(
  params: Any, cfg: Any, tokens_BT: jax.Array, mask_BT: jax.Array, *, per_token: bool = False
) -> SequenceLogProbs:
  """`sequence_logprobs` of any protocol model's logits on tokens_BT (`models.protocol`)."""
  logits_BTV, _ = protocol.model_for(cfg).forward(params, tokens_BT, cfg)
  return sequence_logprobs(logits_BTV, tokens_BT, mask_BT, per_token=per_token)
