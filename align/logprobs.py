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


def check_logits(logits_BTV: Any, name: str = "logits_BTV") -> None:
  """Raises unless logits_BTV is a floating array [B, T, V] (`name` in the message)."""
  checks.check_array(name, logits_BTV, 3, shape="[B, T, V]")
  if not jnp.issubdtype(logits_BTV.dtype, jnp.floating):
    raise TypeError(f"{name}: expected a floating dtype, got {logits_BTV.dtype}")


def check_mask(name: str, mask_BT: Any, shape: Sequence[int], *, position_0: bool = False) -> None:
  """Raises unless mask_BT is a bool array [B, T] of the tokens' `shape`; with position_0, also
  unless it is False at position 0 (no logits predict token 0). Values when concrete."""
  checks.check_array(name, mask_BT, 2, shape="[B, T]")
  if mask_BT.dtype != np.bool_:
    raise TypeError(f"{name}: expected a bool mask (True at completion tokens), got {mask_BT.dtype}")
  if tuple(mask_BT.shape) != tuple(shape):
    raise ValueError(f"{name}: expected shape {tuple(shape)} like the tokens, got {tuple(mask_BT.shape)}")
  if position_0:
    checks.check_values(
      name, mask_BT[:, 0], lambda v: v, "False at position 0 (it has no prediction: the prompt must come first)"
    )


def check_sequence(name: str, s: Any, *, fields: tuple[str, str] = ("sum_B", "count_B")) -> None:
  """Raises unless the summed log-probs of `s` (a SequenceLogProbs; `fields` names the sum and
  count fields of another such tuple, e.g. listwise.ListLogProbs's ("sum_BY", "count_BY")) are
  finite and <= 0 (a positive one is a logit or a probability passed by mistake) and its token
  counts finite and >= 0. Messages name `name`.field. Values when concrete, or inside
  `ops.checks.checked`."""
  total, count = (getattr(s, f) for f in fields)
  checks.check_finite(f"{name}.{fields[0]}", total)
  checks.check_in(f"{name}.{fields[0]}", total, -np.inf, 0, what="log-probs")
  checks.check_finite(f"{name}.{fields[1]}", count)
  checks.check_in(f"{name}.{fields[1]}", count, 0, np.inf, what="token counts")


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
  return _pick(_checked_log_softmax(logits_BTV, tokens_BT), tokens_BT)


def _checked_log_softmax(logits_BTV: jax.Array, tokens_BT: jax.Array) -> jax.Array:
  """log softmax of logits 0 .. T - 2 (float32 [B, T - 1, V]), the ones that score tokens 1 .. T - 1,
  after checking logits_BTV and tokens_BT (ids in [0, V) when concrete)."""
  check_logits(logits_BTV)
  checks.check_array("tokens_BT", tokens_BT, 2, integer=True, shape="[B, T]")
  if logits_BTV.shape[:2] != tokens_BT.shape:
    raise ValueError(f"tokens_BT: expected shape {logits_BTV.shape[:2]}, got {tokens_BT.shape}")
  checks.check_tokens(tokens_BT, logits_BTV.shape[2])
  return jax.nn.log_softmax(logits_BTV[:, :-1].astype(jnp.float32), axis=-1)


def _pick(logp_BTV: jax.Array, tokens_BT: jax.Array) -> jax.Array:
  """lp[b, t] = logp[b, t - 1, tokens[b, t]] for t >= 1, lp[b, 0] = 0."""
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
  checks.check_array("tokens_BT", tokens_BT, 2, integer=True, shape="[B, T]")
  check_mask("mask_BT", mask_BT, tokens_BT.shape, position_0=True)
  mask = mask_BT.astype(jnp.float32)
  if not per_token:
    token_BT = token_logprobs(logits_BTV, tokens_BT) * mask
    return SequenceLogProbs(jnp.sum(token_BT, axis=1), mask.sum(axis=1))
  logp_BTV = _checked_log_softmax(logits_BTV, tokens_BT)
  token_BT = _pick(logp_BTV, tokens_BT) * mask
  # log sum_v p_v^2 = logsumexp(2 log p): logits t - 1 score token t, as in token_logprobs.
  log_sum_sq_BT = jnp.pad(jax.nn.logsumexp(2 * logp_BTV, axis=-1), ((0, 0), (1, 0))) * mask
  return SequenceLogProbs(jnp.sum(token_BT, axis=1), mask.sum(axis=1), token_BT, mask, log_sum_sq_BT)


def model_logprobs(
  params: Any, cfg: Any, tokens_BT: jax.Array, mask_BT: jax.Array, *, per_token: bool = False
) -> SequenceLogProbs:
  """`sequence_logprobs` of any protocol model's logits on tokens_BT (`models.protocol`)."""
  logits_BTV, _ = protocol.model_for(cfg).forward(params, tokens_BT, cfg)
  return sequence_logprobs(logits_BTV, tokens_BT, mask_BT, per_token=per_token)
