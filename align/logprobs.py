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

from paperjax.models import protocol


class SequenceLogProbs(NamedTuple):
  sum_B: jax.Array  # float32
  count_B: jax.Array  # float32, kept tokens

  @property
  def mean_B(self) -> jax.Array:
    return self.sum_B / jnp.maximum(self.count_B, 1.0)


def token_logprobs(logits_BTV: jax.Array, tokens_BT: jax.Array) -> jax.Array:
  """lp[b, t] = log softmax(logits[b, t - 1])[tokens[b, t]] for t >= 1, lp[b, 0] = 0 (float32)."""
  if logits_BTV.shape[:2] != tokens_BT.shape:
    raise ValueError(f"tokens_BT: expected shape {logits_BTV.shape[:2]}, got {tokens_BT.shape}")
  logp_BTV = jax.nn.log_softmax(logits_BTV[:, :-1].astype(jnp.float32), axis=-1)
  picked = jnp.take_along_axis(logp_BTV, tokens_BT[:, 1:, None], axis=-1)[..., 0]
  return jnp.pad(picked, ((0, 0), (1, 0)))


def completion_mask(
  tokens_BT: jax.Array,
  prompt_lengths_B: jax.Array,
  lengths_B: jax.Array,
  exclude_ids: Sequence[int] = (),
) -> jax.Array:
  """True at completion tokens: prompt_length <= t < length, and tokens not in exclude_ids."""
  t = jnp.arange(tokens_BT.shape[1])[None, :]
  mask_BT = (t >= prompt_lengths_B[:, None]) & (t < lengths_B[:, None])
  if exclude_ids:
    mask_BT &= ~jnp.isin(tokens_BT, jnp.asarray(exclude_ids, tokens_BT.dtype))
  return mask_BT


def sequence_logprobs(logits_BTV: jax.Array, tokens_BT: jax.Array, mask_BT: jax.Array) -> SequenceLogProbs:
  """Masked sum (and count, for the averaged form) of token log-probs per row."""
  if mask_BT.shape != tokens_BT.shape:
    raise ValueError(f"mask_BT: expected shape {tokens_BT.shape}, got {mask_BT.shape}")
  if not isinstance(mask_BT, jax.core.Tracer) and bool(jnp.any(mask_BT[:, 0])):
    raise ValueError("mask_BT: position 0 has no prediction (logits t - 1); the prompt must come first")
  mask = mask_BT.astype(jnp.float32)
  return SequenceLogProbs(jnp.sum(token_logprobs(logits_BTV, tokens_BT) * mask, axis=1), mask.sum(axis=1))


def model_logprobs(params: Any, cfg: Any, tokens_BT: jax.Array, mask_BT: jax.Array) -> SequenceLogProbs:
  """`sequence_logprobs` of any protocol model's logits on tokens_BT (`models.protocol`)."""
  logits_BTV, _ = protocol.model_for(cfg).forward(params, tokens_BT, cfg)
  return sequence_logprobs(logits_BTV, tokens_BT, mask_BT)
