"""AND-OR (Harsanyi) interactions of a model's output over masked inputs.

Shapes: n input variables, M = 2^n subsets, B batch, C classes, F input features. A subset T of the n
variables is the integer with bit i set iff variable i is in T; arrays over subsets are
indexed by that integer (index 0 = {}, M - 1 = N).

  v(x_T)     = log p(y | x_T) - log(1 - p(y | x_T))      (x_T: variables outside T at baseline)
  I_and(S)   = sum_{T subset S} (-1)^{|S|-|T|} v_and(x_T)                     (Moebius transform)
  I_or(S)    = -sum_{T subset S} (-1)^{|S|-|T|} v_or(x_{N \\ T})
  v_and      = 0.5 (v - delta) + gamma,  v_or = 0.5 (v - delta) - gamma,  |delta_T| <= zeta

gamma and delta minimise sum_{S != {}} |I_and(S)| + |I_or(S)| (the sparsest AND-OR split),
and for every T the interactions reproduce the output (universal matching):
  v(x_T) - delta_T = v(x_{}) - delta_{} + sum_{{} != S subset T} I_and(S) + sum_{S cap T != {}} I_or(S).

The transforms are the fast subset (zeta / Moebius) transforms, O(n 2^n).
"""

from __future__ import annotations

import functools
import numbers
from collections.abc import Callable
from typing import Annotated, Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from paperjax.ops import checks

MAX_VARIABLES = 20  # 2^20 masked forward passes is already a large job


def subset_masks(n: int) -> np.ndarray:
  """bool [M, n]: row T says which variables T keeps."""
  _check_n(n)
  return ((np.arange(2**n)[:, None] >> np.arange(n)) & 1).astype(bool)


def subset_orders(n: int) -> np.ndarray:
  """int [M]: |T| for every subset index."""
  return subset_masks(n).sum(axis=1)


def log_odds(logits_BC: jax.Array, label: int | jax.Array) -> jax.Array:
  """v = log p_y - log(1 - p_y) = logit_y - logsumexp_{c != y} logit_c, float32 [B].

  label: an int class in [0, C) (or one per row, [B]). Value checks (label in range) run on
  concrete inputs, or inside `ops.checks.checked`: a label >= C would make p_y 0 silently."""
  if not hasattr(logits_BC, "ndim") or logits_BC.ndim != 2:
    raise ValueError(f"logits_BC: expected logits [B, C], got shape {jnp.shape(logits_BC)}")
  if isinstance(label, (bool, np.bool_)) or not jnp.issubdtype(jnp.result_type(label), jnp.integer):
    raise TypeError(f"label: expected an int class id, got {jnp.result_type(label)} {label!r:.40}")
  if jnp.ndim(label) not in (0, 1) or (jnp.ndim(label) == 1 and jnp.shape(label) != logits_BC.shape[:1]):
    raise ValueError(f"label: expected one class or one per row {logits_BC.shape[:1]}, got shape {jnp.shape(label)}")
  if logits_BC.shape[-1] < 2:  # no other class: logsumexp over nothing is -inf, v = inf
    raise ValueError(f"logits_BC: expected at least 2 classes [B, C >= 2], got shape {logits_BC.shape}")
  checks.check_in("label", label, 0, logits_BC.shape[-1] - 1, what="class ids")
  if jnp.ndim(label) == 1:
    label = jnp.asarray(label)[:, None]
  logits_BC = logits_BC.astype(jnp.float32)
  is_label = jnp.arange(logits_BC.shape[-1]) == label
  others = jax.nn.logsumexp(jnp.where(is_label, -jnp.inf, logits_BC), axis=-1)
  return jnp.sum(jnp.where(is_label, logits_BC, 0.0), axis=-1) - others


def evaluate_subsets(
  model_fn: Callable[[Any, jax.Array], jax.Array],
  params,
  x_BF: jax.Array,
  baseline_F: jax.Array,
  variable_of_F: jax.Array,
  labels_B: jax.Array,
  n: int,
  *,
  chunk: int = 256,
) -> jax.Array:
  """v(x_T) of every sample for all 2^n subsets, in one jitted, chunked pass: float32 [B, M].

  Args:
    model_fn: model_fn(params, inputs [K, *F]) -> logits [K, C]; keep it one function
      object across calls (it is a static jit argument) and pass weights as `params`.
    params: the model's parameters (traced).
    x_BF: samples [B, *F]; baseline_F: the value masked features take, [*F].
    variable_of_F: int [*F], the variable (0 .. n-1) of each feature; -1 keeps a feature
      always (not a variable).
    labels_B: each sample's true class y.
    n: number of variables.
    chunk: masked inputs per model call (bounds memory).
  """
  _check_n(n)
  if not isinstance(chunk, (int, np.integer)) or isinstance(chunk, bool) or chunk < 1:
    raise ValueError(f"chunk: expected an int >= 1, got {chunk!r}")
  x_BF, baseline_F, variable_of_F = jnp.asarray(x_BF), jnp.asarray(baseline_F), jnp.asarray(variable_of_F)
  if x_BF.ndim < 2 or x_BF.shape[0] < 1:
    raise ValueError(f"x_BF: expected samples [B, *F] with B >= 1, got shape {x_BF.shape}")
  checks.check_finite("x_BF", x_BF)
  checks.check_finite("baseline_F", baseline_F)
  feature_shape = x_BF.shape[1:]
  if baseline_F.shape != feature_shape or variable_of_F.shape != feature_shape:
    raise ValueError(
      f"baseline_F, variable_of_F: expected a sample's shape {feature_shape}, "
      f"got {baseline_F.shape}, {variable_of_F.shape}"
    )
  labels_B = jnp.asarray(labels_B)
  if not jnp.issubdtype(labels_B.dtype, jnp.integer):
    raise TypeError(f"labels_B: expected int class ids, got dtype {labels_B.dtype}")
  if labels_B.shape != x_BF.shape[:1]:
    raise ValueError(f"labels_B: expected shape {x_BF.shape[:1]}, got {labels_B.shape}")
  if not jnp.issubdtype(variable_of_F.dtype, jnp.integer):
    raise TypeError(f"variable_of_F: expected int variable ids (-1: fixed), got dtype {variable_of_F.dtype}")
  ids = np.asarray(variable_of_F)
  if ids.min() < -1 or ids.max() >= n or len(set(ids[ids >= 0].ravel().tolist())) != n:
    raise ValueError(
      f"variable_of_F: expected every id 0 .. {n - 1} used (-1: fixed features), got {np.unique(ids).tolist()}"
    )
  out = jax.eval_shape(model_fn, params, x_BF[:1])  # the logits' shape, without running the model
  if getattr(out, "ndim", None) != 2 or out.shape[0] != 1:
    raise ValueError(f"model_fn: expected logits [K, C] for K inputs, got {getattr(out, 'shape', type(out))} for K = 1")
  checks.check_in("labels_B", labels_B, 0, out.shape[1] - 1, what=f"class ids of the model's {out.shape[1]} classes")
  return _evaluate(model_fn, params, x_BF, baseline_F, variable_of_F, labels_B, n, min(chunk, 2**n))


@functools.partial(jax.jit, static_argnums=(0, 6, 7))
def _evaluate(model_fn, params, x_BF, baseline_F, variable_of_F, labels_B, n, chunk):
  masks = jnp.asarray(subset_masks(n))
  masks = jnp.pad(masks, ((0, -masks.shape[0] % chunk), (0, 0))).reshape(-1, chunk, n)
  keep_always = variable_of_F < 0
  var = jnp.maximum(variable_of_F, 0)

  def one_sample(args):
    x_F, label = args

    def one_chunk(masks_Kn):
      keep = keep_always | masks_Kn[:, var]  # [K, *F]
      return log_odds(model_fn(params, jnp.where(keep, x_F, baseline_F)), label)

    return jax.lax.map(one_chunk, masks).reshape(-1)[: 2**n]

  return jax.lax.map(one_sample, (x_BF, labels_B))


def moebius(f_M: jax.Array) -> jax.Array:
  """g(S) = sum_{T subset S} (-1)^{|S|-|T|} f(T), by one pass per variable (O(n 2^n))."""
  n = _n_of(f_M, "f_M")
  g = f_M
  for i in range(n):
    g = g.reshape(-1, 2, 2**i)
    g = jnp.stack([g[:, 0], g[:, 1] - g[:, 0]], axis=1)
  return g.reshape(f_M.shape)


def zeta(g_M: jax.Array) -> jax.Array:
  """f(S) = sum_{T subset S} g(T): the inverse of `moebius`."""
  n = _n_of(g_M, "g_M")
  f = g_M
  for i in range(n):
    f = f.reshape(-1, 2, 2**i)
    f = jnp.stack([f[:, 0], f[:, 1] + f[:, 0]], axis=1)
  return f.reshape(g_M.shape)


def and_interactions(v_and_M: jax.Array) -> jax.Array:
  """I_and = Moebius(v_and) (the Harsanyi dividends); I_and({}) = v_and(x_{})."""
  _n_of(v_and_M, "v_and_M")
  return moebius(v_and_M)


def or_interactions(v_or_M: jax.Array) -> jax.Array:
  """I_or(S) = -Moebius(T -> v_or(x_{N \\ T}))(S); the complement of index T is M - 1 - T."""
  _n_of(v_or_M, "v_or_M")
  return -moebius(v_or_M[::-1])


@checks.config
class DecompositionConfig:
  """The reference optimiser: SGD with momentum, learning rate decayed 10x over the run.

  The L1 objective's gradient grows as 2^n, so the step is learning_rate / 2^n: one
  setting works for every n (0.015 roughly halves the L1 of a digit MLP's n = 9 games).
  Every field is checked at construction (`ops.checks.config`).
  """

  steps: checks.PositiveInt = 10_000
  learning_rate: checks.PositiveFloat = 0.015
  momentum: Annotated[float, checks.Range(low=0, high=1, high_open=True)] = 0.9
  decay: Annotated[float, checks.Range(low=0, high=1, low_open=True)] = 0.1  # total learning-rate decay over `steps`
  noise_fraction: checks.NonNegativeFloat = 0.02  # zeta = noise_fraction * |v(x_N) - v(x_{})|; 0 disables delta


class Decomposition(NamedTuple):
  i_and_M: jax.Array
  i_or_M: jax.Array
  gamma_M: jax.Array
  delta_M: jax.Array
  matching_error: jax.Array  # max_T |v(x_T) - delta_T - reconstruction(T)|
  l1_before: jax.Array  # objective with gamma = delta = 0
  l1_after: jax.Array


DEFAULT_DECOMPOSITION = DecompositionConfig()


def decompose(v_M: jax.Array, cfg: DecompositionConfig = DEFAULT_DECOMPOSITION) -> Decomposition:
  """Learns gamma (and bounded delta) for the sparsest AND-OR interactions of v.

  v_M may be [M] or a batch [X, M] of samples (decomposed independently, in one vmap).
  """
  if not isinstance(cfg, DecompositionConfig):
    raise TypeError(f"cfg: expected a DecompositionConfig, got {type(cfg).__name__}")
  v_M = jnp.asarray(v_M, jnp.float32)
  if v_M.ndim not in (1, 2) or (v_M.ndim == 2 and v_M.shape[0] < 1):
    raise ValueError(f"v_M: expected v over 2^n subsets [M] or a batch [X, M], got shape {v_M.shape}")
  _n_of(v_M[0] if v_M.ndim == 2 else v_M, "v_M")
  checks.check_finite("v_M", v_M)
  if v_M.ndim == 2:
    return jax.vmap(_decompose, in_axes=(0, None))(v_M, cfg)
  return _decompose(v_M, cfg)


def _split(v_M, gamma_M, delta_M):
  base = 0.5 * (v_M - delta_M)
  return and_interactions(base + gamma_M), or_interactions(base - gamma_M)


def _l1(v_M, gamma_M, delta_M):
  i_and, i_or = _split(v_M, gamma_M, delta_M)
  return jnp.sum(jnp.abs(i_and[1:])) + jnp.sum(jnp.abs(i_or[1:]))


@jax.jit
def reconstruct(i_and_M: jax.Array, i_or_M: jax.Array, v_empty: jax.Array) -> jax.Array:
  """v(x_{}) + sum_{{} != S subset T} I_and(S) + sum_{S cap T != {}} I_or(S), for every T."""
  _check_pair(i_and_M, i_or_M)
  if jnp.ndim(v_empty) != 0:
    raise ValueError(f"v_empty: expected a scalar v(x_{{}}), got shape {jnp.shape(v_empty)}")
  and_part = zeta(i_and_M.at[0].set(0.0))
  or_total = jnp.sum(i_or_M[1:])
  or_disjoint = zeta(i_or_M.at[0].set(0.0))[::-1]  # sum over {} != S subset N \ T
  return v_empty + and_part + (or_total - or_disjoint)


@functools.partial(jax.jit, static_argnums=1)
def _decompose(v_M, cfg: DecompositionConfig):
  bound = cfg.noise_fraction * jnp.abs(v_M[-1] - v_M[0])
  schedule = optax.exponential_decay(cfg.learning_rate / v_M.shape[0], cfg.steps, cfg.decay)
  tx = optax.sgd(schedule, momentum=cfg.momentum)
  params = (jnp.zeros_like(v_M), jnp.zeros_like(v_M))
  loss_grad = jax.grad(lambda p: _l1(v_M, *p))

  def step(carry, _):
    params, opt_state = carry
    updates, opt_state = tx.update(loss_grad(params), opt_state, params)
    gamma, delta = optax.apply_updates(params, updates)
    return ((gamma, jnp.clip(delta, -bound, bound)), opt_state), None

  ((gamma, delta), _), _ = jax.lax.scan(step, (params, tx.init(params)), None, length=cfg.steps)
  i_and, i_or = _split(v_M, gamma, delta)
  recon = reconstruct(i_and, i_or, v_M[0] - delta[0])
  error = jnp.max(jnp.abs(v_M - delta - recon))
  return Decomposition(
    i_and, i_or, gamma, delta, error, _l1(v_M, jnp.zeros_like(v_M), jnp.zeros_like(v_M)), _l1(v_M, gamma, delta)
  )


def salience_threshold(v_full: jax.Array, v_empty: jax.Array, fraction: float = 0.03) -> jax.Array:
  """tau = fraction * mean over samples of |v(x) - v(x_{})|."""
  real = isinstance(fraction, numbers.Real) or (
    hasattr(fraction, "dtype")
    and jnp.ndim(fraction) == 0
    and (jnp.issubdtype(fraction.dtype, jnp.floating) or jnp.issubdtype(fraction.dtype, jnp.integer))
  )  # any real scalar, bfloat16 too (no np.floating)
  if isinstance(fraction, (bool, np.bool_)) or not real:
    raise TypeError(f"fraction: expected a float in [0, 1], got {type(fraction).__name__} {fraction!r}")
  if not 0 <= fraction <= 1:  # NaN fails too
    raise ValueError(f"fraction: expected a float in [0, 1], got {fraction}")
  if jnp.shape(v_full) != jnp.shape(v_empty):
    raise ValueError(f"v_empty: expected the shape of v_full {jnp.shape(v_full)}, got {jnp.shape(v_empty)}")
  return fraction * jnp.mean(jnp.abs(jnp.asarray(v_full) - jnp.asarray(v_empty)))


def order_strength(i_and_M: jax.Array, i_or_M: jax.Array, tau: float) -> tuple[jax.Array, jax.Array]:
  """(A_k^+, A_k^-) for k = 0 .. n: summed salient positive / |negative| interactions, AND and OR together."""
  n = _check_pair(i_and_M, i_or_M)
  _check_tau(tau)
  orders = jnp.asarray(subset_orders(n))
  both = jnp.stack([i_and_M, i_or_M]).at[:, 0].set(0.0)  # the empty set is not an interaction
  salient = jnp.abs(both) >= tau
  plus = jnp.where(salient & (both > 0), both, 0.0).sum(axis=0)
  minus = jnp.where(salient & (both < 0), -both, 0.0).sum(axis=0)
  return (jax.ops.segment_sum(plus, orders, num_segments=n + 1), jax.ops.segment_sum(minus, orders, num_segments=n + 1))


def normalized_order_strength(i_and_BM: jax.Array, i_or_BM: jax.Array, tau: float) -> jax.Array:
  """I^(k) = E_x[sum_{type, |S| = k, salient} |I(S)|] / Z, Z = mean over k = 1 .. n; shape [n + 1] (k = 0 is 0)."""
  if jnp.ndim(i_and_BM) != 2 or jnp.shape(i_or_BM) != jnp.shape(i_and_BM):
    raise ValueError(f"i_and_BM, i_or_BM: expected one shape [B, M], got {jnp.shape(i_and_BM)}, {jnp.shape(i_or_BM)}")
  _n_of(i_and_BM[0], "i_and_BM")
  _check_tau(tau)
  plus, minus = jax.vmap(order_strength, in_axes=(0, 0, None))(i_and_BM, i_or_BM, tau)
  per_order = (plus + minus).mean(axis=0)
  return per_order / jnp.maximum(per_order[1:].mean(), 1e-12)


def order_vector(i_and_M: jax.Array, i_or_M: jax.Array, k: int) -> jax.Array:
  """The order-k interactions, AND then OR entries: [2 * C(n, k)]."""
  n = _check_pair(i_and_M, i_or_M)
  if not isinstance(k, (int, np.integer)) or isinstance(k, bool) or not 0 <= k <= n:
    raise ValueError(f"k: expected an order in 0 .. n={n}, got {k!r}")
  select = subset_orders(n) == k
  return jnp.concatenate([i_and_M[select], i_or_M[select]])


def jaccard(a: jax.Array, b: jax.Array) -> jax.Array:
  """sum min / sum max of the nonnegative maps [max(I, 0); max(-I, 0)] of two vectors."""
  if a.shape != b.shape:
    raise ValueError(f"a, b: expected one shape, got {a.shape}, {b.shape}")
  lift = lambda x: jnp.concatenate([jnp.maximum(x, 0), jnp.maximum(-x, 0)])
  a, b = lift(a), lift(b)
  return jnp.sum(jnp.minimum(a, b)) / jnp.maximum(jnp.sum(jnp.maximum(a, b)), 1e-30)


def _check_n(n: int) -> None:
  if not isinstance(n, (int, np.integer)) or not 1 <= n <= MAX_VARIABLES:
    raise ValueError(f"n: expected 1 <= n <= {MAX_VARIABLES} input variables (2^n masked inputs), got {n}")


def _n_of(f_M: jax.Array, name: str = "f_M") -> int:
  if not hasattr(f_M, "shape") or not hasattr(f_M, "dtype"):
    raise TypeError(f"{name}: expected an array over 2^n subsets (jnp.asarray(...)), got {type(f_M).__name__}")
  shape = jnp.shape(f_M)
  size = shape[-1] if shape else 0
  n = size.bit_length() - 1
  if len(shape) != 1 or size < 2 or 2**n != size:
    raise ValueError(f"{name}: expected a vector over 2^n subsets (M = 2, 4, 8, ...), got shape {shape}")
  return n


def _check_pair(i_and_M: jax.Array, i_or_M: jax.Array) -> int:
  """n of two interaction vectors over the same 2^n subsets."""
  n = _n_of(i_and_M, "i_and_M")
  if jnp.shape(i_or_M) != jnp.shape(i_and_M):
    raise ValueError(f"i_or_M: expected the shape of i_and_M {jnp.shape(i_and_M)}, got {jnp.shape(i_or_M)}")
  return n


def _check_tau(tau: Any) -> None:
  checks.check_scalar("tau", tau, checks.Range(low=0))  # a salience threshold
