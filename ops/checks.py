"""Input checks the whole package shares: config fields, parameter shapes, ids and lengths,
and value checks that survive `jax.jit` through `checked`.

Shapes: B batch, T time.

Shapes are static, so their checks hold under `jax.jit`. Value checks (ids in range,
lengths in 1 .. T, finite floats) need the values:
- eagerly (and on the host before a jitted core, which every entry point the package
  jits itself does) they raise `ValueError` naming the argument, the expectation and
  the offending values;
- inside a function the user jits, the values are tracers and the checks cannot run,
  unless the function is wrapped in `checked`: it runs it under
  `jax.experimental.checkify`, where the same checks become `checkify.check`s compiled
  into the program, and raises after the call.

  forward = checks.checked(llama.forward, static_argnames="cfg")   # instead of jax.jit
  logits_BTV, _ = forward(params, tokens_BT, cfg=cfg)              # raises on an id >= V

Configs declare their fields' types and ranges once, in their annotations
(`vocab_size: checks.PositiveInt`), and `@checks.config` (a keyword-only frozen dataclass)
checks every field at construction: a new field gets the check by being annotated.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import math
import numbers
import operator
import sys
import types
import typing
from collections.abc import Callable, Sequence
from typing import Annotated, Any, Literal, TypeVar, dataclass_transform

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import checkify

# True while `checked` traces its function: the value checks then emit checkify.check. A
# jax user context, not a global flag: it is scoped to the trace of one call and is part of
# jit's cache key, so a function the package jits inside (generate's `_generate`, ...) is
# traced once with the checks and once without, never reusing the other's program.
_UNDER_CHECKIFY = jax.make_user_context(default_value=False)

# What `checked` catches by default: the package's own checks. checkify.index_checks would
# add every gather's and scatter's bounds, but it ignores their mode, so it also flags the
# deliberate out-of-range writes a KV cache drops (mode="drop"): opt in where none occur.
ERRORS = checkify.user_checks


def concrete(x: Any) -> np.ndarray | None:
  """x as numpy when it has a value now (not inside a trace), else None. A global array
  spread over other processes' devices counts as unknown: each process checks its own
  data before it becomes global."""
  if x is None or isinstance(x, jax.core.Tracer):
    return None
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    return None
  return np.asarray(x)


def on_host(*xs: Any) -> tuple[Any, tuple]:
  """(np, numpy copies of xs) when every x is concrete, else (jnp, xs): a check that first
  derives what it compares (a masked table, a row max) runs the same code eagerly, with no
  device dispatch, and in a trace, where the derived check compiles into `checked`."""
  values = tuple(concrete(x) for x in xs)
  return (np, values) if all(v is not None for v in values) else (jnp, xs)


def _show(values: np.ndarray, limit: int = 6) -> str:
  shown = ", ".join(str(v) for v in values.ravel()[:limit].tolist())
  return f"[{shown}{', ...' if values.size > limit else ''}]"


def check_values(name: str, x: Any, bad: Callable[[Any], Any], expected: str) -> None:
  """Raises where bad(x) (elementwise, numpy or jnp) holds anywhere: a ValueError naming
  `name`, `expected` and the offending values and indices on concrete x; a checkify check
  on traced x under `checked`; nothing on traced x elsewhere."""
  values = concrete(x)
  if values is not None:
    mask = np.asarray(bad(values))
    if values.ndim == 0 and mask:
      raise ValueError(f"{name}: expected {expected}, got {values.item()}")
    if mask.any():
      where = [tuple(i) if len(i) != 1 else i[0] for i in np.argwhere(mask)[:6].tolist()]
      raise ValueError(f"{name}: expected {expected}, got {_show(values[mask])} at index {where}")
  elif _UNDER_CHECKIFY.value:
    mask = bad(x)
    first = jnp.argmax(mask.ravel())
    checkify.check(~mask.any(), f"{name}: expected {expected}, got {{}} at flat index {{}}", x.ravel()[first], first)


def check_in(name: str, x: Any, low: float, high: float, *, what: str = "values") -> None:
  """Every element of x lies in [low, high] (see the module docstring for when it runs)."""
  check_values(name, x, lambda v: (v < low) | (v > high), f"{what} in [{low}, {high}]")


def check_finite(name: str, x: Any) -> None:
  """Every element of the float array x is finite."""
  check_values(name, x, lambda v: ~(jnp.isfinite(v) if isinstance(v, jax.Array) else np.isfinite(v)), "finite values")


def check_array(name: str, x: Any, ndim: int, *, integer: bool = False, shape: str = "") -> None:
  """x is an array (not a list) of rank `ndim`, of integers when `integer`; `shape` names the
  expected shape in the message, e.g. "[B, T]". TypeError for a non-array or a wrong dtype,
  ValueError for a wrong rank."""
  if not hasattr(x, "ndim") or not hasattr(x, "dtype"):
    raise TypeError(f"{name}: expected an array {shape} (jnp.asarray(...)), got {type(x).__name__}")
  if integer and not jnp.issubdtype(x.dtype, jnp.integer):
    raise TypeError(f"{name}: expected integers {shape}, got {x.dtype} of shape {tuple(x.shape)}")
  if x.ndim != ndim:
    raise ValueError(f"{name}: expected {shape or f'rank {ndim}'}, got {x.dtype} of shape {tuple(x.shape)}")


def is_int(x: Any) -> bool:
  """A Python or numpy integer, not a bool."""
  return isinstance(x, (int, np.integer)) and not isinstance(x, (bool, np.bool_))


def check_scalar(name: str, x: Any, valid: Range | None = None) -> None:
  """x is one real number (Python, numpy or a 0-d jax array; not a bool or a str), finite and
  in `valid`; the value check runs eagerly and inside `checked` like the others."""
  real_array = hasattr(x, "dtype") and jnp.ndim(x) == 0 and jnp.issubdtype(x.dtype, jnp.number)
  if isinstance(x, (bool, np.bool_, str)) or not (isinstance(x, numbers.Real) or real_array):
    raise TypeError(f"{name}: expected a real number, got {type(x).__name__} {x!r}")
  valid = valid or Range()

  def bad(v):
    out = ~(jnp.isfinite(v) if isinstance(v, jax.Array) else np.isfinite(v))
    if valid.low is not None:
      out |= (v <= valid.low) if valid.low_open else (v < valid.low)
    if valid.high is not None:
      out |= (v >= valid.high) if valid.high_open else (v > valid.high)
    return out

  check_values(
    name, x, bad, f"a finite number {valid}" if valid.low is not None or valid.high is not None else "a finite number"
  )


def check_int(name: str, x: Any, low: int | None = None, high: int | None = None) -> int:
  """x as an int: a Python, numpy or concrete 0-d jax integer (not a bool) in [low, high]
  (None: open)."""
  if isinstance(x, jax.Array) and not isinstance(x, jax.core.Tracer) and x.ndim == 0:
    x = np.asarray(x)[()]  # e.g. a TrainState's step
  if not is_int(x):
    raise TypeError(f"{name}: expected an int, got {type(x).__name__} {x!r}")
  if (low is not None and x < low) or (high is not None and x > high):
    raise ValueError(f"{name}: expected an int in [{low}, {'inf' if high is None else high}], got {x}")
  return int(x)


def check_tokens(tokens_BT: jax.Array | np.ndarray, vocab_size: int, *, name: str = "tokens_BT") -> tuple[int, int]:
  """(B, T) of integer ids [B, T], each in [0, vocab_size)."""
  check_array(name, tokens_BT, 2, integer=True, shape="[B, T]")
  check_values(name, tokens_BT, lambda v: (v < 0) | (v >= vocab_size), f"ids in [0, {vocab_size})")
  return tokens_BT.shape[0], tokens_BT.shape[1]


def check_lengths(lengths_B: Any, batch: int, width: int, *, name: str = "lengths_B", low: int = 1) -> jax.Array:
  """Row lengths as int32 [B], each in low .. width."""
  if isinstance(lengths_B, (list, tuple)):
    lengths_B = np.asarray(lengths_B)
  check_array(name, lengths_B, 1, integer=True, shape=f"[{batch}]")
  if lengths_B.shape != (batch,):
    raise ValueError(f"{name}: expected shape ({batch},), got {tuple(lengths_B.shape)}")
  check_in(name, lengths_B, low, width, what="lengths")
  return jnp.asarray(lengths_B, jnp.int32)


F = TypeVar("F", bound=Callable[..., Any])


def checked(fn: F, *, static_argnames: str | Sequence[str] = (), errors: frozenset = ERRORS) -> F:
  """`jax.jit(fn, static_argnames=...)` with the package's value checks compiled in: a
  failing check raises `checkify.JaxRuntimeError` (its message names the argument, the
  expectation and the first offending value) when the call returns. `errors`: the checkify
  error sets caught (default `ERRORS`; e.g. `ERRORS | checkify.nan_checks`). Use it as the
  outermost transformation, in place of jax.jit; static arguments may be given by position
  or by name.
  """
  static = {static_argnames} if isinstance(static_argnames, str) else set(static_argnames)
  signature = inspect.signature(fn)

  jitted = jax.jit(checkify.checkify(fn, errors=errors), static_argnames=tuple(static))

  def split(args: tuple, kwargs: dict) -> tuple[list, dict]:
    """checkify's wrapper hides fn's signature from jit, which then finds static arguments
    by name only: a static argument, and every positional one after it, goes by name."""
    positional: list = []
    named: dict = {}
    for name, value in signature.bind(*args, **kwargs).arguments.items():
      kind = signature.parameters[name].kind
      by_name = bool(named) or name in static
      if kind is inspect.Parameter.VAR_KEYWORD:
        named.update(value)
      elif kind is inspect.Parameter.KEYWORD_ONLY or (by_name and kind is inspect.Parameter.POSITIONAL_OR_KEYWORD):
        named[name] = value
      elif by_name:
        raise TypeError(f"{name}: {fn.__name__} takes it by position after a static argument; pass that one by name")
      else:
        positional.extend(value if kind is inspect.Parameter.VAR_POSITIONAL else (value,))
    return positional, named

  @functools.wraps(fn)
  def call(*args, **kwargs):
    positional, named = split(args, kwargs)
    with _UNDER_CHECKIFY(True):
      error, out = jitted(*positional, **named)
    error.throw()
    return out

  return typing.cast(F, call)


# ---- config fields ----


@dataclasses.dataclass(frozen=True)
class Range:
  """low <= x <= high (either bound None: open-ended; `*_open`: strict)."""

  low: float | None = None
  high: float | None = None
  low_open: bool = False
  high_open: bool = False

  def holds(self, x: float) -> bool:
    above = self.low is None or (x > self.low if self.low_open else x >= self.low)
    below = self.high is None or (x < self.high if self.high_open else x <= self.high)
    return above and below

  def __str__(self) -> str:
    if self.high is None:
      return f"{'>' if self.low_open else '>='} {self.low}"
    if self.low is None:
      return f"{'<' if self.high_open else '<='} {self.high}"
    return f"in {'(' if self.low_open else '['}{self.low}, {self.high}{')' if self.high_open else ']'}"


PositiveInt = Annotated[int, Range(low=1)]
NonNegativeInt = Annotated[int, Range(low=0)]
PositiveFloat = Annotated[float, Range(low=0, low_open=True)]
NonNegativeFloat = Annotated[float, Range(low=0)]
Fraction = Annotated[float, Range(low=0, high=1)]  # a probability, a ratio in [0, 1]


def _describe(tp: Any) -> str:
  origin, args = typing.get_origin(tp), typing.get_args(tp)
  if origin is Annotated:
    return f"{_describe(args[0])} {args[1]}"
  if origin is Literal:
    return "one of " + ", ".join(repr(a) for a in args)
  if origin in (typing.Union, types.UnionType):
    return " or ".join(_describe(a) for a in args)
  if tp is type(None):
    return "None"
  if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
    return f"a tuple of ({_describe(args[0])})"
  if origin is not None:
    return getattr(origin, "__name__", str(tp))
  return getattr(tp, "__name__", str(tp))


def _conforms(value: Any, tp: Any) -> bool:
  """Whether value has type tp (ranges in Annotated included; floats must be finite)."""
  origin, args = typing.get_origin(tp), typing.get_args(tp)
  if tp is Any or isinstance(tp, TypeVar):
    return True
  if origin is Annotated:
    return _conforms(value, args[0]) and all(m.holds(value) for m in args[1:] if isinstance(m, Range))
  if origin in (typing.Union, types.UnionType):
    return any(_conforms(value, a) for a in args)
  if origin is Literal:
    return any(type(value) is type(a) and value == a for a in args)
  if tp is type(None):
    return value is None
  if tp is bool:
    return isinstance(value, (bool, np.bool_))
  if tp is int:
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))
  if tp is float:
    real = isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, (bool, np.bool_))
    return real and math.isfinite(value)
  if origin is tuple:
    if not isinstance(value, tuple):
      return False
    if len(args) == 2 and args[1] is Ellipsis:
      return all(_conforms(v, args[0]) for v in value)
    return not args or (len(args) == len(value) and all(_conforms(v, a) for v, a in zip(value, args)))
  if origin is not None:
    return isinstance(value, origin) if isinstance(origin, type) else True
  return isinstance(value, tp) if isinstance(tp, type) else True


def _kind(tp: Any) -> Any:
  """tp without its ranges and with each Literal widened to its values' types: a value
  that fails tp but has its kind is out of range (ValueError), else of the wrong type."""
  origin, args = typing.get_origin(tp), typing.get_args(tp)
  if origin is Annotated:
    return _kind(args[0])
  if origin is Literal:
    return functools.reduce(operator.or_, {type(a) for a in args})
  if origin in (typing.Union, types.UnionType):
    return functools.reduce(operator.or_, [_kind(a) for a in args])
  if origin is tuple:
    return tuple[tuple(a if a is Ellipsis else _kind(a) for a in args)]  # type: ignore[misc]
  return tp


@functools.cache
def _hints(cls: Any) -> dict[str, Any]:
  # The globals of the module that defined cls (captured by `config`): a module run as
  # __main__ through runpy is not the sys.modules["__main__"] that get_type_hints would read.
  return typing.get_type_hints(cls, globalns=getattr(cls, "_defining_globals", None), include_extras=True)


def check_fields(cfg: Any) -> None:
  """Every field of the dataclass cfg has its annotated type and lies in its annotated
  Range; raises TypeError (wrong type) or ValueError (out of range, NaN, inf) naming the field."""
  hints = _hints(cfg.__class__)
  for field in dataclasses.fields(cfg):
    tp, value = hints[field.name], getattr(cfg, field.name)
    if _conforms(value, tp):
      continue
    non_finite = isinstance(value, (float, np.floating)) and not math.isfinite(value)
    wrong_type = not _conforms(value, _kind(tp)) and not non_finite
    message = f"{type(cfg).__name__}.{field.name}: expected {_describe(tp)}, got {type(value).__name__} {value!r}"
    if isinstance(value, dict):
      options = typing.get_args(tp) or (tp,)
      classes = [a.__name__ for a in options if isinstance(a, type) and dataclasses.is_dataclass(a)]
      if classes:
        message += f"; a dict is not read here, build a {classes[0]}(...)"
      if "dict" in field.metadata:
        message += f" ({field.metadata['dict']})"
    raise (TypeError if wrong_type else ValueError)(message)


C = TypeVar("C")


@dataclass_transform(kw_only_default=True, frozen_default=True)
def config(cls: type[C]) -> type[C]:
  """A keyword-only frozen dataclass whose fields are checked (`check_fields`) before its own
  `__post_init__` runs."""
  own = cls.__dict__.get("__post_init__")
  setattr(cls, "_defining_globals", sys._getframe(1).f_globals)  # noqa: B010

  def __post_init__(self):
    check_fields(self)
    if own is not None:
      own(self)

  setattr(cls, "__post_init__", __post_init__)  # noqa: B010 (mypy does not know the attribute)
  return dataclasses.dataclass(frozen=True, kw_only=True)(cls)


# ---- parameter trees ----


@functools.cache  # a pure function of the (hashable, immutable) init and config
def init_shapes(init: Callable[..., Any], cfg: Any) -> Any:
  """The tree of init(key, cfg) as jax.ShapeDtypeStructs, computed without running init."""
  return jax.eval_shape(functools.partial(init, cfg=cfg), jax.random.key(0))


def check_tree(name: str, tree: Any, expected: Any, *, is_leaf: Callable[[Any], bool] | None = None) -> None:
  """`tree` has expected's structure and every leaf its shape (expected: a tree of arrays or
  jax.ShapeDtypeStruct, e.g. jax.eval_shape of an init). Names the leaf and both shapes."""
  got = dict(jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_leaf)[0])
  want = dict(jax.tree_util.tree_flatten_with_path(expected)[0])
  key = jax.tree_util.keystr
  missing, extra = [key(p) for p in want if p not in got], [key(p) for p in got if p not in want]
  if missing or extra:
    listed = lambda paths: ", ".join(f"{name}{p}" for p in paths) or "none"
    raise ValueError(
      f"{name}: expected the leaves of the config's init; missing: {listed(missing)}; unexpected: {listed(extra)}"
    )
  for path, leaf in want.items():
    shape = tuple(getattr(got[path], "shape", ()))
    if shape != tuple(leaf.shape):
      raise ValueError(f"{name}{key(path)}: expected shape {tuple(leaf.shape)} for this config, got {shape}")
