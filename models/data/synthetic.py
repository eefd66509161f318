"""Seeded, vectorised synthetic recall tasks (Zoology / JRT): MQAR and set disjointness.

Shapes: B batch, T sequence length, V vocabulary. Token 0 is padding; 1, 2, 3 are separators; the rest
of the vocabulary is split into two halves: keys / values for MQAR (fixed halves, as Zoology's), set A /
set B for set disjointness (a random split per example by default, as the JRT authors' data: with fixed
halves the shared token is the only token of A's half inside B, a local shortcut around the set
comparison).

A `RecallBatch` is next-token data: targets_BT[t] is the token expected after position t,
and target_mask_BT marks the positions that are scored (the recall answers only);
`recall_loss` is the cross-entropy and accuracy over those positions.
"""

from __future__ import annotations

from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from paperjax.ops import checks

PAD, SEP1, SEP2, SEP3 = 0, 1, 2, 3
FIRST = 4


class RecallBatch(NamedTuple):
  tokens_BT: np.ndarray  # int32
  targets_BT: np.ndarray  # int32
  target_mask_BT: np.ndarray  # bool


def _check_common(rng: Any, batch: Any, vocab_size: Any, **counts: Any) -> None:
  """rng is a numpy Generator; batch, vocab_size and each count are ints >= 1."""
  if not isinstance(rng, np.random.Generator):
    raise TypeError(f"rng: expected a numpy Generator (np.random.default_rng(seed)), got {type(rng).__name__}")
  for name, value in {"batch": batch, "vocab_size": vocab_size, **counts}.items():
    if not isinstance(value, (int, np.integer)) or isinstance(value, (bool, np.bool_)) or value < 1:
      raise ValueError(f"{name}: expected an int >= 1, got {value!r}")


def _halves(vocab_size: int, need: int) -> tuple[np.ndarray, np.ndarray]:
  usable = vocab_size - FIRST
  if usable < 2 * need:
    raise ValueError(f"vocab_size: {vocab_size} leaves {usable} tokens, fewer than 2 x {need} needed")
  half = usable // 2
  return np.arange(FIRST, FIRST + half), np.arange(FIRST + half, FIRST + 2 * half)


def _distinct(rng: np.random.Generator, pool: np.ndarray, batch: int, count: int) -> np.ndarray:
  """[batch, count] tokens drawn from pool without replacement within each row."""
  return pool[np.argsort(rng.random((batch, pool.size)), axis=1)[:, :count]]


def mqar(rng: np.random.Generator, batch: int, num_pairs: int, num_queries: int, vocab_size: int) -> RecallBatch:
  """Multi-query associative recall: k1 v1 .. kP vP, then query keys each followed by its value.

  Keys are distinct per row (first half of the vocabulary), values from the second half;
  the scored positions are the query keys (their target is the paired value).
  """
  _check_common(rng, batch, vocab_size, num_pairs=num_pairs, num_queries=num_queries)
  if not 1 <= num_queries <= num_pairs:
    raise ValueError(f"num_queries: expected 1 <= queries <= num_pairs={num_pairs}, got {num_queries}")
  key_pool, value_pool = _halves(vocab_size, num_pairs)
  keys = _distinct(rng, key_pool, batch, num_pairs)
  values = rng.choice(value_pool, (batch, num_pairs))
  asked = np.argsort(rng.random((batch, num_pairs)), axis=1)[:, :num_queries]
  rows = np.arange(batch)[:, None]
  context = np.stack([keys, values], axis=2).reshape(batch, -1)
  queries = np.stack([keys[rows, asked], values[rows, asked]], axis=2).reshape(batch, -1)
  tokens = np.concatenate([context, queries], axis=1).astype(np.int32)
  targets = np.concatenate([tokens[:, 1:], np.full((batch, 1), PAD, np.int32)], axis=1)
  mask = np.zeros(tokens.shape, bool)
  mask[:, context.shape[1] :: 2] = True  # each query key predicts its value
  return RecallBatch(tokens, targets, mask)


def set_disjointness(
  rng: np.random.Generator,
  batch: int,
  size_a: int,
  size_b: int,
  vocab_size: int,
  order: Literal["a_first", "b_first"] = "a_first",
  halves: Literal["random", "fixed"] = "random",
) -> RecallBatch:
  """`[1] X [2] Y [3]` with sets A, B from disjoint halves; one token of B is replaced by a
  token t of A, and the answer after [3] is t. `order` puts A (or B) first.

  `halves="random"` splits the vocabulary anew for each row (A and B are then disjoint
  random subsets of all of it); `"fixed"` draws A from the first half and B from the second,
  which leaves the shortcut "answer B's one token from the first half"."""
  _check_common(rng, batch, vocab_size, size_a=size_a, size_b=size_b)
  if order not in ("a_first", "b_first"):
    raise ValueError(f"order: expected 'a_first' or 'b_first', got {order!r}")
  if halves not in ("random", "fixed"):
    raise ValueError(f"halves: expected 'random' or 'fixed', got {halves!r}")
  pool_a, pool_b = _halves(vocab_size, max(size_a, size_b))
  if halves == "fixed":
    a = _distinct(rng, pool_a, batch, size_a)
    b = _distinct(rng, pool_b, batch, size_b)
  else:  # a random order of the whole pool per row; its first half holds A, its second B
    every = _distinct(rng, np.concatenate([pool_a, pool_b]), batch, 2 * pool_a.size)
    a, b = every[:, :size_a], every[:, pool_a.size : pool_a.size + size_b]
  rows = np.arange(batch)
  shared = a[rows, rng.integers(0, size_a, batch)]
  b[rows, rng.integers(0, size_b, batch)] = shared
  first, second = (a, b) if order == "a_first" else (b, a)
  col = lambda token: np.full((batch, 1), token)
  tokens = np.concatenate([col(SEP1), first, col(SEP2), second, col(SEP3)], axis=1).astype(np.int32)
  targets = np.concatenate([tokens[:, 1:], shared[:, None]], axis=1).astype(np.int32)
  mask = np.zeros(tokens.shape, bool)
  mask[:, -1] = True
  return RecallBatch(tokens, targets, mask)


def recall_loss(logits_BTV: jax.Array, batch: RecallBatch) -> tuple[jax.Array, dict]:
  """(mean cross-entropy over the scored positions, {"accuracy": argmax == target there}).

  Value checks (targets in [0, V)) run on concrete inputs, or inside `ops.checks.checked`."""
  if not isinstance(batch, RecallBatch):
    raise TypeError(f"batch: expected a RecallBatch, got {type(batch).__name__}")
  checks.check_array("logits_BTV", logits_BTV, 3, shape="[B, T, V]")
  if logits_BTV.shape[:2] != tuple(np.shape(batch.tokens_BT)):
    raise ValueError(f"logits_BTV: expected leading shape {np.shape(batch.tokens_BT)}, got {logits_BTV.shape}")
  if not jnp.issubdtype(logits_BTV.dtype, jnp.floating):
    raise TypeError(f"logits_BTV: expected float logits, got dtype {logits_BTV.dtype}")
  # Both must be [B, T] exactly: a [B, 1] mask would broadcast over every position, and an
  # int mask would weight the positions by its values.
  checks.check_array("batch.targets_BT", batch.targets_BT, 2, integer=True, shape="[B, T]")
  checks.check_array("batch.target_mask_BT", batch.target_mask_BT, 2, shape="[B, T]")
  for name, x in (("batch.targets_BT", batch.targets_BT), ("batch.target_mask_BT", batch.target_mask_BT)):
    if tuple(x.shape) != logits_BTV.shape[:2]:
      raise ValueError(f"{name}: expected shape {logits_BTV.shape[:2]} (the logits' [B, T]), got {tuple(x.shape)}")
  if batch.target_mask_BT.dtype != np.bool_:
    raise TypeError(f"batch.target_mask_BT: expected a bool mask [B, T], got {batch.target_mask_BT.dtype}")
  vocab = logits_BTV.shape[-1]
  # an id >= V would gather a clamped logit silently
  checks.check_in("batch.targets_BT", batch.targets_BT, 0, vocab - 1, what="ids of the logits' vocabulary")
  mask_BT = jnp.asarray(batch.target_mask_BT, jnp.float32)
  count = jnp.maximum(mask_BT.sum(), 1.0)
  nll_BT = optax.softmax_cross_entropy_with_integer_labels(logits_BTV.astype(jnp.float32), batch.targets_BT)
  hits_BT = (jnp.argmax(logits_BTV, -1) == batch.targets_BT) * mask_BT
  return jnp.sum(nll_BT * mask_BT) / count, {"accuracy": hits_BT.sum() / count}
