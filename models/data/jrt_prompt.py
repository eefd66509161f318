"""JRT-Prompt: read the context twice before answering, for any causal model.

A recurrent model that sees the question only after the context must have stored
everything; repeating the context (after the question has been seen once) lets it store
what matters. The paper's template is A(C, Q, C, Q): context and question, twice.

Shapes: B batch, T padded length. For the synthetic recall tasks, `repeat_recall` reads a
`RecallBatch` prompt (or its first `context_len` tokens) `repeats` times and scores only the
last reading.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from paperjax.models.data.synthetic import RecallBatch
from paperjax.ops import checks


def build(context: str, question: str, *, repeats: int = 2, separator: str = "\n\n") -> str:
  """Text prompt: (context, question) `repeats` times, joined by `separator`."""
  _check_repeats(repeats)
  for name, text in (("context", context), ("question", question), ("separator", separator)):
    if not isinstance(text, str):
      raise TypeError(f"{name}: expected a str, got {type(text).__name__}")
  return separator.join([context + separator + question] * repeats)


def repeat_rows(tokens_BT: np.ndarray, lengths_B: np.ndarray, repeats: int = 2) -> tuple[np.ndarray, np.ndarray]:
  """Token-level: each row's real tokens (the first lengths[b]) repeated, right-padded with 0.

  Returns ([B, repeats * T] ids, new lengths). Vectorised: one gather, no Python loop.
  """
  tokens_BT, lengths_B = np.asarray(tokens_BT), np.asarray(lengths_B)
  _check_repeats(repeats)
  if tokens_BT.ndim != 2:
    raise ValueError(f"tokens_BT: expected ids [B, T], got shape {tokens_BT.shape}")
  if not np.issubdtype(tokens_BT.dtype, np.integer):  # float ids would come back as floats, not tokens
    raise TypeError(f"tokens_BT: expected int ids [B, T], got dtype {tokens_BT.dtype}")
  if not np.issubdtype(lengths_B.dtype, np.integer):
    raise TypeError(f"lengths_B: expected int lengths, got dtype {lengths_B.dtype}")
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
  if not isinstance(batch, RecallBatch):
    raise TypeError(f"batch: expected a RecallBatch, got {type(batch).__name__}")
  time = batch.tokens_BT.shape[1]
  context_len = time if context_len is None else context_len
  _check_repeats(repeats)
  if not checks.is_int(context_len) or not 1 <= context_len <= time:
    raise ValueError(f"context_len: expected 1 <= C <= T={time}, got {context_len}")
  earlier_BT = np.tile(batch.tokens_BT[:, :context_len], (1, repeats - 1))
  tokens_BT = np.concatenate([earlier_BT, batch.tokens_BT], axis=1)
  targets_BT = np.concatenate([tokens_BT[:, 1 : earlier_BT.shape[1] + 1], batch.targets_BT], axis=1)
  return RecallBatch(
    tokens_BT, targets_BT, np.concatenate([np.zeros_like(earlier_BT, bool), batch.target_mask_BT], axis=1)
  )


def _check_repeats(repeats: Any) -> None:
  if not checks.is_int(repeats) or repeats < 1:
    raise ValueError(f"repeats: expected an int >= 1, got {repeats!r}")
