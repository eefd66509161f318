"""JRT-Prompt: read the context twice before answering, for any causal model.

A recurrent model that sees the question only after the context must have stored
everything; repeating the context (after the question has been seen once) lets it store
what matters. The paper's template is A(C, Q, C, Q): context and question, twice.

Shapes: B batch, T padded length. For the synthetic recall tasks, `repeat_recall` reads a
`RecallBatch` prompt (or its first `context_len` tokens) `repeats` times and scores only the
last reading.
"""

from __future__ import annotations

import numpy as np

from paperjax.models.data.synthetic import RecallBatch


def build(context: str, question: str, *, repeats: int = 2, separator: str = "\n\n") -> str:
  """Text prompt: (context, question) `repeats` times, joined by `separator`."""
  if repeats < 1:
    raise ValueError(f"repeats: expected >= 1, got {repeats}")
  return separator.join([context + separator + question] * repeats)


def repeat_rows(tokens_BT: np.ndarray, lengths_B: np.ndarray, repeats: int = 2) -> tuple[np.ndarray, np.ndarray]:
  """Token-level: each row's real tokens (the first lengths[b]) repeated, right-padded with 0.

  Returns ([B, repeats * T] ids, new lengths). Vectorised: one gather, no Python loop.
  """
  tokens_BT, lengths_B = np.asarray(tokens_BT), np.asarray(lengths_B)
  if repeats < 1:
    raise ValueError(f"repeats: expected >= 1, got {repeats}")
  if lengths_B.shape != tokens_BT.shape[:1] or (lengths_B < 0).any() or (lengths_B > tokens_BT.shape[1]).any():
    raise ValueError(f"lengths_B: expected [B] lengths within 0 .. T={tokens_BT.shape[1]}, got {lengths_B.tolist()}")
  width = repeats * tokens_BT.shape[1]
  t = np.arange(width)[None, :]
  new_lengths = repeats * lengths_B
  source = t % np.maximum(lengths_B, 1)[:, None]
  out = np.take_along_axis(tokens_BT, source, axis=1)
  return np.where(t < new_lengths[:, None], out, 0).astype(tokens_BT.dtype), new_lengths


def repeat_recall(batch: RecallBatch, repeats: int = 2, *, context_len: int | None = None) -> RecallBatch:
  """The first `context_len` tokens (default: the whole prompt) read `repeats` times, then the
  rest of the row: [B, (repeats - 1) context_len + T], scored on the last reading only.

  The whole prompt suits tasks whose question is the prompt itself (set disjointness: which
  token do the two sets share?), so no earlier reading shows an answer; MQAR repeats only its
  key-value context, since its queries carry their answers. Targets stay next tokens.
  """
  time = batch.tokens_BT.shape[1]
  context_len = time if context_len is None else context_len
  if repeats < 1:
    raise ValueError(f"repeats: expected >= 1, got {repeats}")
  if not 1 <= context_len <= time:
    raise ValueError(f"context_len: expected 1 <= C <= T={time}, got {context_len}")
  earlier_BT = np.tile(batch.tokens_BT[:, :context_len], (1, repeats - 1))
  tokens_BT = np.concatenate([earlier_BT, batch.tokens_BT], axis=1)
  targets_BT = np.concatenate([tokens_BT[:, 1 : earlier_BT.shape[1] + 1], batch.targets_BT], axis=1)
  return RecallBatch(
    tokens_BT, targets_BT, np.concatenate([np.zeros_like(earlier_BT, bool), batch.target_mask_BT], axis=1)
  )
