"""Token selection from next-token logits: greedy, temperature, top-k, top-p.

Shapes: B batch, V vocabulary, N kept ids (top-k).

`select` is the "select" step of every generation loop in paperjax. Order of operations
(as in common samplers): subtract each row's max logit and divide by the temperature (so a tiny
T cannot overflow), keep the top k, keep the nucleus of mass p, then draw. Temperature 0 is
greedy and ignores the filters.
"""

from __future__ import annotations

import numbers

import jax
import jax.numpy as jnp
import numpy as np

from paperjax.ops import checks

_NEG_INF = -jnp.inf


def top_k_logits(logits_BV: jax.Array, k: int) -> jax.Array:
  """Keeps exactly the k largest logits per row (ties: lower id first); the rest -> -inf.

  Value checks (no NaN or +inf logit, a logit above -inf in every row) run on concrete inputs,
  or inside `ops.checks.checked`."""
  _check_logits(logits_BV)
  check_args(logits_BV.shape[-1], 1.0, k, None)
  return _top_k(logits_BV, k)


def _top_k(logits_BV: jax.Array, k: int) -> jax.Array:
  _, top_ids_BN = jax.lax.top_k(logits_BV, k)
  keep_BV = jnp.zeros(logits_BV.shape, bool).at[jnp.arange(logits_BV.shape[0])[:, None], top_ids_BN].set(True)
  return jnp.where(keep_BV, logits_BV, _NEG_INF)


def top_p_logits(logits_BV: jax.Array, p: float) -> jax.Array:
  """Keeps the nucleus: the smallest most-probable prefix whose mass is >= p.

  With tokens sorted by probability (ties: lower id first), token i is kept iff the mass
  strictly before it is < p; so the top token is always kept. The rest -> -inf. Value checks
  as in `top_k_logits`.
  """
  _check_logits(logits_BV)
  check_args(logits_BV.shape[-1], 1.0, None, p)
  return _top_p(logits_BV, p)


def _top_p(logits_BV: jax.Array, p: float) -> jax.Array:
  order_BV = jnp.argsort(-logits_BV, axis=-1, stable=True)
  probs_BV = jax.nn.softmax(jnp.take_along_axis(logits_BV, order_BV, axis=-1).astype(jnp.float32), axis=-1)
  mass_before_BV = jnp.cumsum(probs_BV, axis=-1) - probs_BV
  keep_sorted_BV = mass_before_BV < p
  rows = jnp.arange(logits_BV.shape[0])[:, None]
  keep_BV = jnp.zeros(logits_BV.shape, bool).at[rows, order_BV].set(keep_sorted_BV)
  return jnp.where(keep_BV, logits_BV, _NEG_INF)


def select(
  key: jax.Array,
  logits_BV: jax.Array,
  temperature: float = 1.0,
  *,
  top_k: int | None = None,
  top_p: float | None = None,
) -> jax.Array:
  """Picks one token per row.

  T == 0: argmax_v logits[b, v] (greedy; ties go to the lowest id).
  T > 0:  a sample from p[b] = softmax(filter((logits[b] - max logits[b]) / T)) in float32, drawn by inverse
          CDF: the first v with cumsum(p[b])[v] > u[b] * sum(p[b]), u ~ U[0, 1). One
          uniform per row instead of V Gumbel draws (3-4x faster on CPU at V = 4096).
  Tokens with probability 0 (logit -inf, or filtered out) are never drawn.

  Args:
    key: PRNG key (unused when greedy).
    logits_BV: float logits, shape [B, V].
    temperature: a finite real >= 0, python or a concrete numpy/jax scalar (static: greedy and
      sampled are separate traces).
    top_k: keep the k most likely tokens (None: all).
    top_p: keep the nucleus of mass p (None: all).

  Returns:
    int32 token ids, shape [B].

  Value checks (no NaN or +inf logit, a logit above -inf in every row: either would pick a token
  no distribution gave) run on concrete inputs, or inside `ops.checks.checked`.
  """
  _check_logits(logits_BV)
  check_args(logits_BV.shape[1], temperature, top_k, top_p)
  logits_BV = logits_BV.astype(jnp.float32)
  if float(temperature) == 0.0:
    return jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
  logits_BV = _scale(logits_BV, float(temperature))
  if top_k is not None:
    logits_BV = _top_k(logits_BV, top_k)
  if top_p is not None:
    logits_BV = _top_p(logits_BV, top_p)
  probs_BV = jax.nn.softmax(logits_BV, axis=-1)
  cdf_BV = jnp.cumsum(probs_BV, axis=-1)
  u_B1 = jax.random.uniform(key, (logits_BV.shape[0], 1)) * cdf_BV[:, -1:]
  token_B = jnp.sum(cdf_BV <= u_B1, axis=-1)
  # u * total can round up to total; never step past the last token with mass.
  last_B = logits_BV.shape[1] - 1 - jnp.argmax(probs_BV[:, ::-1] > 0, axis=-1)
  return jnp.minimum(token_B, last_B).astype(jnp.int32)


def select_rows(
  keys_B: jax.Array,
  logits_BV: jax.Array,
  temperature_B: jax.Array,
  top_k_B: jax.Array,
  top_p_B: jax.Array,
) -> jax.Array:
  """`select` with each row's own key and settings, in one traced call: row b's token is
  select(keys_B[b], logits_BV[b:b+1], temperature_B[b], top_k=top_k_B[b], top_p=top_p_B[b])[0]
  (a serving step samples rows of different requests together, on the device).

  Settings are arrays (traced, not static): temperature 0 is greedy; top_k = V keeps every
  token (select's None); top_p > 1 keeps every token (select's None). keys_B are typed keys
  [B]. Shapes are checked (every setting one per row); no value checks: the serving engine
  checks each request's settings on the host.
  Returns int32 [B].
  """
  checks.check_array("logits_BV", logits_BV, 2, shape="[B, V]")
  rows = logits_BV.shape[0]
  for name, x in (("keys_B", keys_B), ("temperature_B", temperature_B), ("top_k_B", top_k_B), ("top_p_B", top_p_B)):
    if getattr(x, "shape", None) != (rows,):
      raise ValueError(f"{name}: expected shape ({rows},), one per row of logits_BV, got {getattr(x, 'shape', x)}")
  logits_BV = logits_BV.astype(jnp.float32)
  vocab = logits_BV.shape[1]
  greedy_B = jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
  safe_B1 = jnp.where(temperature_B > 0, temperature_B, 1.0).astype(jnp.float32)[:, None]
  shifted_BV = logits_BV - jnp.max(logits_BV, axis=-1, keepdims=True)
  scaled_BV = jnp.where(shifted_BV == 0, 0.0, shifted_BV / safe_B1)
  # top-k as a rank threshold: the same tokens as lax.top_k's (ties: the lower id first).
  order_BV = jnp.argsort(-scaled_BV, axis=-1, stable=True)
  rank_BV = jnp.zeros_like(order_BV).at[jnp.arange(logits_BV.shape[0])[:, None], order_BV].set(jnp.arange(vocab))
  scaled_BV = jnp.where(rank_BV < top_k_B[:, None], scaled_BV, _NEG_INF)
  kept_BV = jax.vmap(lambda x_V, p: _top_p(x_V[None], p)[0])(scaled_BV, top_p_B.astype(jnp.float32))
  scaled_BV = jnp.where((top_p_B <= 1.0)[:, None], kept_BV, scaled_BV)

  def draw(key, x_V):
    probs_V = jax.nn.softmax(x_V)
    cdf_V = jnp.cumsum(probs_V)
    u = jax.random.uniform(key, (1, 1))[0, 0] * cdf_V[-1]
    last = vocab - 1 - jnp.argmax(probs_V[::-1] > 0)
    return jnp.minimum(jnp.sum(cdf_V <= u), last).astype(jnp.int32)

  sampled_B = jax.vmap(draw)(keys_B, scaled_BV)
  return jnp.where(temperature_B > 0, sampled_B, greedy_B)


def _scale(logits_BV: jax.Array, temperature: float) -> jax.Array:
  """(logits - max_v logits) / T per row: every entry <= 0 (-inf at worst), the max exactly 0.
  Dividing raw logits by a tiny T overflows to inf (and under jit XLA:CPU gives NaN near
  |logits / T| ~ 1e10), which made the softmax NaN and the draw token 0. The max is pinned to 0
  by a where, not by 0 / T: a subnormal T flushes to 0 and 0 / 0 would be NaN."""
  shifted_BV = logits_BV - jnp.max(logits_BV, axis=-1, keepdims=True)
  return jnp.where(shifted_BV == 0, 0.0, shifted_BV / jnp.float32(temperature))


def _is_real(value: object) -> bool:
  """A python, numpy or jax real scalar (a 0-d array of a float or int dtype), not a bool."""
  if isinstance(value, (bool, np.bool_)):
    return False
  if isinstance(value, numbers.Real):
    return True
  dtype, ndim = getattr(value, "dtype", None), getattr(value, "ndim", None)
  return dtype is not None and ndim == 0 and (jnp.issubdtype(dtype, jnp.floating) or jnp.issubdtype(dtype, jnp.integer))


def check_args(vocab_size: int, temperature: float, top_k: int | None, top_p: float | None) -> None:
  """Raises ValueError (TypeError for a non-number) for selection arguments that `select` would refuse."""
  for name, value in (("temperature", temperature), ("top_p", top_p)):
    if value is not None and not _is_real(value):
      raise TypeError(
        f"{name}: expected a real number (python, numpy or jax scalar), got {type(value).__name__} {value!r}"
      )
  if not 0.0 <= float(temperature) < np.inf:  # NaN fails too
    raise ValueError(f"temperature: expected >= 0 and finite, got {temperature}")
  is_int = isinstance(top_k, (int, np.integer)) and not isinstance(top_k, (bool, np.bool_))
  if top_k is not None and (not is_int or not 1 <= top_k <= vocab_size):
    raise ValueError(f"top_k: expected an int in [1, {vocab_size}], got {top_k!r}")
  if top_p is not None and not 0.0 < float(top_p) <= 1.0:
    raise ValueError(f"top_p: expected 0 < p <= 1, got {top_p}")


def _check_logits(logits_BV: jax.Array) -> None:
  checks.check_array("logits_BV", logits_BV, 2, shape="[B, V]")
  if not jnp.issubdtype(logits_BV.dtype, jnp.floating):
    raise TypeError(f"logits_BV: expected a floating dtype, got {logits_BV.dtype}")
  if logits_BV.shape[1] == 0:
    raise ValueError(f"logits_BV: expected at least one vocabulary entry, got shape {logits_BV.shape}")
  xp, (x,) = checks.on_host(logits_BV)
  # NaN or +inf makes the softmax NaN, and a row without a finite logit has no distribution:
  # both would come out as token 0.
  checks.check_values("logits_BV", x, lambda v: xp.isnan(v) | (v == np.inf), "logits that are finite or -inf")
  checks.check_values("logits_BV", x.max(axis=1), lambda v: v == -np.inf, "a logit above -inf in every row")
