"""Count-table language models: the bigram (Markov chain) of the LLM explainer, and order k.

An order-k model predicts token t from the k tokens before it with a table of
next-token distributions, one row per context:

  C[c, v] = #{t : tokens[t-k:t] = c, tokens[t] = v}          (counts, Eq. "count table")
  P[c, v] = C[c, v] / sum_v' C[c, v']                          (rows with data)
  P[c, v] = [v != last(c)] / (V - 1)                           (rows with no data)

A row with no data is uniform over the *other* tokens: the context's last token gets 0
(the explainer's rule). Optional additive smoothing adds `alpha` to every count of rows
with data. Order 1 is the bigram; order 0 is the unigram (a single row).

The table has V^k rows of V entries, so it grows as V^(k+1): a 100k vocabulary makes even
the bigram table 40 GB in float32. `count` refuses tables larger than `max_table_bytes`
with an error; `corpus.compact_vocab` maps a corpus onto a small vocabulary first.

Shapes: B batch, T time, V vocabulary, C = V^k contexts, O context length (= order),
N generated tokens.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from paperjax.ops import checks, sampling

DEFAULT_MAX_TABLE_BYTES = 4 * 2**30


@struct.dataclass
class NgramTable:
  """Next-token distributions per context: probs_CV[c] = P(next | context c)."""

  probs_CV: jax.Array  # float32 [V^order, V]
  order: int = struct.field(pytree_node=False)

  @property
  def vocab_size(self) -> int:
    return self.probs_CV.shape[1]


def table_bytes(vocab_size: int, order: int, itemsize: int = 4) -> int:
  """Bytes of an order-k table: V^k rows x V columns x itemsize."""
  return vocab_size ** (order + 1) * itemsize


def count(
  tokens_BT: jax.Array | np.ndarray,
  *,
  vocab_size: int,
  order: int = 1,
  mask_BT: jax.Array | np.ndarray | None = None,
  max_table_bytes: int = DEFAULT_MAX_TABLE_BYTES,
) -> jax.Array:
  """Counts (context, next) occurrences: C[c, v], int32 of shape [V^order, V].

  A window of order + 1 consecutive tokens of one row counts when every token in it is
  masked in; windows never cross rows. Vectorised: one scatter-add over all windows.

  Args:
    tokens_BT: int ids in [0, vocab_size), shape [B, T] (or [T] for one sequence).
    vocab_size: V.
    order: k >= 0, the context length.
    mask_BT: bool, True at real tokens; default all True.
    max_table_bytes: refuse a float32 table larger than this.
  """
  _check_table(vocab_size, order, max_table_bytes)
  tokens_BT, mask_BT = _check_tokens(tokens_BT, mask_BT, vocab_size)
  return _count(jnp.asarray(tokens_BT), jnp.asarray(mask_BT), vocab_size, order)


@functools.partial(jax.jit, static_argnums=(2, 3))
def _count(tokens_BT: jax.Array, mask_BT: jax.Array, vocab_size: int, order: int) -> jax.Array:
  num_windows = tokens_BT.shape[1] - order
  if num_windows <= 0:
    return jnp.zeros((vocab_size**order, vocab_size), jnp.int32)
  # Window t covers tokens t .. t+order; its flat cell is sum_i tokens[t+i] * V^(order-i).
  cell_BN = jnp.zeros((tokens_BT.shape[0], num_windows), jnp.int32)
  valid_BN = jnp.ones_like(cell_BN, dtype=bool)
  for i in range(order + 1):
    cell_BN = cell_BN * vocab_size + tokens_BT[:, i : i + num_windows]
    valid_BN &= mask_BT[:, i : i + num_windows]
  flat = jnp.zeros(vocab_size ** (order + 1), jnp.int32).at[cell_BN.ravel()].add(valid_BN.ravel().astype(jnp.int32))
  return flat.reshape(vocab_size**order, vocab_size)


def probabilities(counts_CV: jax.Array, *, alpha: float = 0.0) -> NgramTable:
  """Normalises counts into an `NgramTable` (rows with no data follow the module rule).

  P[c, v] = (C[c, v] + alpha) / (sum_v' C[c, v'] + alpha V) where the row has data;
  [v != last(c)] / (V - 1) where it has none (uniform over all V for order 0).
  `alpha` is traced: sweeping it compiles once.
  """
  checks.check_array("counts_CV", counts_CV, 2, shape="[V^k, V]")
  num_contexts, vocab_size = counts_CV.shape
  order = round(np.log(num_contexts) / np.log(vocab_size)) if num_contexts > 1 and vocab_size > 1 else 0
  if vocab_size < 2 or vocab_size**order != num_contexts:
    raise ValueError(f"counts_CV: expected shape [V^k, V] with V >= 2, got {counts_CV.shape}")
  checks.check_finite("counts_CV", counts_CV)
  checks.check_in("counts_CV", counts_CV, 0, math.inf, what="counts")
  _check_scalar("alpha", alpha)
  return NgramTable(_probabilities(counts_CV, jnp.float32(alpha), order), order)


@functools.partial(jax.jit, static_argnums=(2,))
def _probabilities(counts_CV: jax.Array, alpha: jax.Array, order: int) -> jax.Array:
  num_contexts, vocab_size = counts_CV.shape
  counts_CV = counts_CV.astype(jnp.float32)
  totals_C1 = counts_CV.sum(axis=1, keepdims=True)
  smoothed_CV = (counts_CV + alpha) / (totals_C1 + alpha * vocab_size)
  if order == 0:
    empty_CV = jnp.full_like(counts_CV, 1.0 / vocab_size)
  else:
    last_C = jnp.arange(num_contexts) % vocab_size  # a context's most recent token
    others_CV = jnp.arange(vocab_size)[None, :] != last_C[:, None]
    empty_CV = others_CV.astype(jnp.float32) / (vocab_size - 1)
  return jnp.where(totals_C1 > 0, smoothed_CV, empty_CV)


def fit(
  tokens_BT: jax.Array | np.ndarray,
  *,
  vocab_size: int,
  order: int = 1,
  mask_BT: jax.Array | np.ndarray | None = None,
  alpha: float = 0.0,
  max_table_bytes: int = DEFAULT_MAX_TABLE_BYTES,
) -> NgramTable:
  """`probabilities(count(...))`: the fitted table in one call."""
  counts = count(tokens_BT, vocab_size=vocab_size, order=order, mask_BT=mask_BT, max_table_bytes=max_table_bytes)
  return probabilities(counts, alpha=alpha)


def next_token_probs(table: NgramTable, context_BO: jax.Array) -> jax.Array:
  """P(next | the last `order` tokens of each row): float32 [B, V].

  `context_BO` may hold more than `order` tokens; only the last `order` are read (all are
  checked). Value checks (ids in [0, V)) run on concrete inputs, or inside `ops.checks.checked`.
  """
  _check_table_type(table)
  context_BO = _check_context("context_BO", context_BO, table)
  return table.probs_CV[_context_index(context_BO, table.order, table.vocab_size)]


def log_probs(table: NgramTable, tokens_BT: jax.Array | np.ndarray, mask_BT=None) -> tuple[jax.Array, jax.Array]:
  """log P(tokens[t] | tokens[t-k:t]) and where it is defined, both [B, T].

  Position t is defined when t >= order and tokens t-k .. t are all masked in.
  """
  _check_table_type(table)
  tokens_BT, mask_BT = _check_tokens(tokens_BT, mask_BT, table.vocab_size)
  return _log_probs(table, jnp.asarray(tokens_BT), jnp.asarray(mask_BT))


@jax.jit
def _log_probs(table: NgramTable, tokens_BT: jax.Array, mask_BT: jax.Array):
  k, num_tokens = table.order, tokens_BT.shape[1]
  padded_BT = jnp.pad(tokens_BT, ((0, 0), (k, 0)))
  valid_BT = jnp.pad(mask_BT, ((0, 0), (k, 0)))
  rows = jnp.zeros_like(tokens_BT)
  defined_BT = mask_BT & (jnp.arange(num_tokens) >= k)[None, :]
  for i in range(k):  # row index of the context tokens t-k .. t-1, and their validity
    rows = rows * table.vocab_size + padded_BT[:, i : i + num_tokens]
    defined_BT &= valid_BT[:, i : i + num_tokens]
  lp_BT = jnp.log(table.probs_CV[rows, tokens_BT])
  return jnp.where(defined_BT, lp_BT, 0.0), defined_BT


def perplexity(table: NgramTable, tokens_BT, mask_BT=None, *, start: int | None = None) -> float:
  """exp(-mean log P) over defined positions t >= start (default: the model's order).

  Pass one `start` to compare models of different orders on the same positions.
  """
  _check_table_type(table)
  start = table.order if start is None else start
  if not checks.is_int(start) or start < table.order:
    raise ValueError(f"start: expected an int >= order={table.order}, got {start!r}")
  lp_BT, defined_BT = log_probs(table, tokens_BT, mask_BT)
  defined_BT = defined_BT.at[:, :start].set(False)
  n = defined_BT.sum()
  if int(n) == 0:
    raise ValueError("tokens_BT: no position has a full context to score")
  return float(jnp.exp(-lp_BT.sum() / n))


def generate(
  key: jax.Array,
  table: NgramTable,
  prompt_BO: jax.Array,
  *,
  max_new_tokens: int,
  eos_id: int | None = None,
  temperature: float = 1.0,
) -> tuple[jax.Array, jax.Array]:
  """predict -> select -> append, until EOS or `max_new_tokens`.

  Selection is greedy at temperature 0, else sampling from P^(1/T) (ops.sampling.select).
  A row stops after emitting `eos_id` (the EOS is kept); later slots repeat `eos_id`.

  Args:
    key: PRNG key.
    table: fitted `NgramTable`.
    prompt_BO: integer ids in [0, V), [B, O] with O >= order (their last `order` tokens are
      read; every one is checked).
    max_new_tokens: N >= 1.
    eos_id: stop token, or None to always generate N tokens.
    temperature: a finite float >= 0.

  Returns:
    (tokens_BN int32, lengths_B int32): row b's generation is tokens_BN[b, :lengths_B[b]].
  """
  _check_table_type(table)
  prompt_BO = _check_context("prompt_BO", prompt_BO, table)
  if not checks.is_int(max_new_tokens) or max_new_tokens < 1:
    raise ValueError(f"max_new_tokens: expected an int >= 1, got {max_new_tokens!r}")
  if eos_id is not None and (not checks.is_int(eos_id) or not 0 <= eos_id < table.vocab_size):
    raise ValueError(f"eos_id: expected an int id in [0, {table.vocab_size}) or None, got {eos_id!r}")
  _check_scalar("temperature", temperature)
  context_BO = prompt_BO[:, prompt_BO.shape[1] - table.order :].astype(jnp.int32)
  eos = None if eos_id is None else int(eos_id)
  return _generate(key, table, context_BO, int(max_new_tokens), eos, float(temperature))


@functools.partial(jax.jit, static_argnums=(3, 4, 5))
def _generate(key, table, context_BO, max_new_tokens, eos_id, temperature):
  def step(carry, step_key):
    context_BO, done_B = carry
    logits_BV = jnp.log(next_token_probs(table, context_BO))
    token_B = sampling.select(step_key, logits_BV, temperature)
    if eos_id is not None:
      token_B = jnp.where(done_B, eos_id, token_B)
      done_B = done_B | (token_B == eos_id)
    context_BO = jnp.concatenate([context_BO[:, 1:], token_B[:, None]], axis=1)
    return (context_BO, done_B), (token_B, done_B)

  done_B = jnp.zeros(context_BO.shape[0], bool)
  keys = jax.random.split(key, max_new_tokens)
  _, (tokens_NB, done_NB) = jax.lax.scan(step, (context_BO, done_B), keys)
  # Length = steps until (and including) the first EOS: N minus the steps done before.
  done_before_NB = jnp.concatenate([jnp.zeros_like(done_NB[:1]), done_NB[:-1]], axis=0)
  lengths_B = max_new_tokens - done_before_NB.sum(axis=0, dtype=jnp.int32)
  return tokens_NB.T, lengths_B


def _context_index(context_BO: jax.Array, order: int, vocab_size: int) -> jax.Array:
  """Row of the table for the last `order` tokens: sum_i c_i V^(order-1-i)."""
  index = jnp.zeros(context_BO.shape[:-1], jnp.int32)
  for i in range(context_BO.shape[-1] - order, context_BO.shape[-1]):
    index = index * vocab_size + context_BO[..., i]
  return index


def _check_scalar(name: str, x: Any) -> None:
  checks.check_scalar(name, x, checks.Range(low=0))


def _check_table_type(table: Any) -> None:
  """table is an NgramTable whose rows are distributions: probs_CV float [V^order, V], finite,
  >= 0, each row summing to 1 within 1e-4 (values when concrete, or under `checks.checked`).
  A hand-built table with a negative or unnormalised row would give NaN or a wrong perplexity."""
  if not isinstance(table, NgramTable):
    raise TypeError(f"table: expected an NgramTable (bigram.fit(...)), got {type(table).__name__}")
  if not checks.is_int(table.order) or table.order < 0:
    raise ValueError(f"table.order: expected an int >= 0, got {table.order!r}")
  checks.check_array("table.probs_CV", table.probs_CV, 2, shape="[V^order, V]")
  probs_CV = table.probs_CV
  if not jnp.issubdtype(probs_CV.dtype, jnp.floating):
    raise TypeError(f"table.probs_CV: expected float probabilities, got {probs_CV.dtype}")
  if probs_CV.shape[0] != probs_CV.shape[1] ** table.order:
    raise ValueError(
      f"table.probs_CV: expected [V^order, V] = [{probs_CV.shape[1] ** table.order}, {probs_CV.shape[1]}] for "
      f"order={table.order}, got {tuple(probs_CV.shape)}"
    )
  xp, (x,) = checks.on_host(probs_CV)
  x = x.astype(xp.float64 if xp is np else jnp.float32)
  checks.check_finite("table.probs_CV", x)
  checks.check_values("table.probs_CV", x, lambda v: v < 0, "probabilities >= 0")
  checks.check_values("table.probs_CV", x.sum(axis=1), lambda v: abs(v - 1) > 1e-4, "rows summing to 1 (within 1e-4)")


def _check_context(name: str, context_BO: Any, table: NgramTable) -> jax.Array:
  """context_BO as an integer array [B, O >= order] of ids in [0, V) (values when concrete,
  or under `checks.checked`)."""
  if isinstance(context_BO, (list, tuple)):
    context_BO = np.asarray(context_BO)
  checks.check_tokens(context_BO, table.vocab_size, name=name)
  if context_BO.shape[1] < table.order:
    raise ValueError(f"{name}: expected shape [B, O] with O >= order={table.order}, got {tuple(context_BO.shape)}")
  return jnp.asarray(context_BO)


def _check_table(vocab_size: int, order: int, max_table_bytes: int) -> None:
  if not checks.is_int(order) or order < 0:
    raise ValueError(f"order: expected an int >= 0, got {order!r}")
  if not checks.is_int(vocab_size) or vocab_size < 2:
    raise ValueError(f"vocab_size: expected an int >= 2, got {vocab_size!r}")
  if isinstance(max_table_bytes, bool) or not isinstance(max_table_bytes, (int, float, np.integer, np.floating)):
    raise TypeError(f"max_table_bytes: expected a number of bytes, got {type(max_table_bytes).__name__}")
  need = table_bytes(vocab_size, order)
  if need > max_table_bytes or vocab_size ** (order + 1) >= 2**31:
    raise MemoryError(
      f"vocab_size={vocab_size}, order={order}: the table has V^{order} x V = "
      f"{vocab_size ** (order + 1):.3g} cells, {need / 2**30:.3g} GiB in float32, over "
      f"max_table_bytes={max_table_bytes / 2**30:.3g} GiB (and int32 indexing); "
      "shrink the vocabulary (corpus.compact_vocab) or the order"
    )


def _check_tokens(tokens_BT, mask_BT, vocab_size: int) -> tuple[np.ndarray, np.ndarray]:
  tokens_BT = np.asarray(tokens_BT)
  if tokens_BT.ndim == 1:
    tokens_BT = tokens_BT[None, :]
    mask_BT = None if mask_BT is None else np.asarray(mask_BT)[None, :]
  if tokens_BT.ndim != 2:
    raise ValueError(f"tokens_BT: expected shape [B, T] or [T], got {tokens_BT.shape}")
  if not np.issubdtype(tokens_BT.dtype, np.integer):
    raise TypeError(f"tokens_BT: expected integer ids, got dtype {tokens_BT.dtype}")
  mask_BT = np.ones(tokens_BT.shape, bool) if mask_BT is None else np.asarray(mask_BT)
  if mask_BT.shape != tokens_BT.shape or mask_BT.dtype != bool:
    raise ValueError(f"mask_BT: expected bool of shape {tokens_BT.shape}, got {mask_BT.dtype} {mask_BT.shape}")
  real = tokens_BT[mask_BT]
  if real.size and (real.min() < 0 or real.max() >= vocab_size):
    bad = real[(real < 0) | (real >= vocab_size)][0]
    raise ValueError(f"tokens_BT: id {bad} outside the vocabulary [0, {vocab_size})")
  return tokens_BT.astype(np.int32), mask_BT
