"""ops.checks itself: field checks by annotation, tree shapes, value checks eagerly, inside
`checked` and (not) inside a plain jit."""

from typing import Annotated, Literal

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import checkify

from paperjax.ops import checks


@checks.config
class Example:
  count: checks.PositiveInt
  rate: checks.Fraction = 0.5
  mode: Literal["a", "b"] = "a"
  names: tuple[Literal["x", "y"], ...] = ()
  scale: Annotated[float, checks.Range(low=0, high=2, high_open=True)] | None = None
  flag: bool = False


@pytest.mark.parametrize(
  "changes, error, match",
  [
    ({"count": 0}, ValueError, r"Example.count: expected int >= 1, got int 0"),
    ({"count": 1.0}, TypeError, r"Example.count: expected int >= 1, got float 1.0"),
    ({"count": True}, TypeError, r"count: expected int >= 1, got bool True"),
    ({"rate": float("nan")}, ValueError, r"rate: expected float in \[0, 1\], got float nan"),
    ({"rate": float("inf")}, ValueError, r"rate: expected float in \[0, 1\], got float inf"),
    ({"rate": "0.5"}, TypeError, r"rate: expected float in \[0, 1\], got str '0.5'"),
    ({"mode": "c"}, ValueError, r"mode: expected one of 'a', 'b', got str 'c'"),
    ({"mode": 1}, TypeError, r"mode: expected one of 'a', 'b', got int 1"),
    ({"names": ("x", "z")}, ValueError, r"names: expected a tuple of \(one of 'x', 'y'\)"),
    ({"names": ["x"]}, TypeError, r"names: expected a tuple of"),
    ({"scale": 2.0}, ValueError, r"scale: expected float in \[0, 2\) or None, got float 2.0"),
    ({"flag": 1}, TypeError, r"flag: expected bool, got int 1"),
  ],
)
def test_config_checks_every_field_by_its_annotation(changes, error, match):
  with pytest.raises(error, match=match):
    Example(**{"count": 1, **changes})


def test_config_accepts_what_the_annotations_allow():
  cfg = Example(count=np.int64(3), rate=1, names=("y", "x"), scale=1.5, flag=np.bool_(True))
  assert cfg.count == 3 and cfg.rate == 1 and cfg.names == ("y", "x")
  with pytest.raises(TypeError, match="positional argument"):
    Example(1)  # keyword-only
  with pytest.raises(AttributeError):
    cfg.count = 2  # frozen


def test_check_tree_names_the_leaf_and_both_shapes():
  want = {"a": jax.ShapeDtypeStruct((2, 3), jnp.float32), "b": {"c": jax.ShapeDtypeStruct((4,), jnp.float32)}}
  checks.check_tree("p", {"a": np.zeros((2, 3)), "b": {"c": np.zeros(4)}}, want)
  with pytest.raises(ValueError, match=r"p\['b'\]\['c'\]: expected shape \(4,\) for this config, got \(5,\)"):
    checks.check_tree("p", {"a": np.zeros((2, 3)), "b": {"c": np.zeros(5)}}, want)
  with pytest.raises(ValueError, match=r"missing: p\['b'\]\['c'\]; unexpected: p\['b'\]\['d'\]"):
    checks.check_tree("p", {"a": np.zeros((2, 3)), "b": {"d": np.zeros(4)}}, want)


def _gather(x_N, index_M, *, scale):
  checks.check_in("index_M", index_M, 0, x_N.shape[0] - 1)
  return x_N[index_M] * scale


def test_value_checks_eagerly_inside_checked_and_not_in_plain_jit():
  x_N, bad = jnp.arange(4.0), jnp.array([1, 7, 2])
  with pytest.raises(ValueError, match=r"index_M: expected values in \[0, 3\], got \[7\] at index \[1\]"):
    _gather(x_N, bad, scale=2.0)
  clamped = jax.jit(_gather, static_argnames="scale")(x_N, bad, scale=2.0)  # the documented gap
  np.testing.assert_array_equal(clamped, [2.0, 6.0, 4.0])
  fn = checks.checked(_gather, static_argnames="scale")
  with pytest.raises(checkify.JaxRuntimeError, match=r"index_M: expected values in \[0, 3\], got 7 at flat index 1"):
    fn(x_N, bad, scale=2.0)
  np.testing.assert_array_equal(fn(x_N, jnp.array([3, 0]), scale=2.0), [6.0, 0.0])


def test_checked_takes_static_arguments_by_position_or_name():
  def f(x, n, y):
    checks.check_finite("x", x)
    return x * n + y

  fn = checks.checked(f, static_argnames="n")
  assert float(fn(jnp.float32(1), 3, jnp.float32(1))) == 4.0
  assert float(fn(jnp.float32(1), n=3, y=jnp.float32(2))) == 5.0
  with pytest.raises(checkify.JaxRuntimeError, match=r"x: expected finite values, got nan"):
    fn(jnp.float32(jnp.nan), 3, jnp.float32(1))
  with pytest.raises(checkify.JaxRuntimeError, match="nan generated"):  # more of checkify's sets on request
    checks.checked(lambda x: jnp.log(x), errors=checks.ERRORS | checkify.nan_checks)(jnp.float32(-1))


@jax.jit
def _inner(x_N, index_M):
  checks.check_in("index_M", index_M, 0, x_N.shape[0] - 1)
  return x_N[index_M]


def test_checked_and_plain_calls_of_an_inner_jit_do_not_share_a_trace():
  """The package jits inside its public functions; a `checked` call and a plain one must
  each get their own trace of that inner jit, in either order (the flag is part of jit's
  cache key): the plain one has no check to trip over, the checked one keeps its check."""
  x_N, bad = jnp.arange(4.0), jnp.array([1, 7])
  outer = lambda x, i: _inner(x, i) * 2
  np.testing.assert_array_equal(outer(x_N, bad), [2.0, 6.0])  # plain first: clamped, the documented gap
  with pytest.raises(checkify.JaxRuntimeError, match=r"index_M: expected values in \[0, 3\], got 7"):
    checks.checked(outer)(x_N, bad)
  np.testing.assert_array_equal(outer(x_N, bad), [2.0, 6.0])  # and plain again after


def test_check_scalar_eagerly_and_inside_checked():
  positive = checks.Range(low=0, low_open=True)
  checks.check_scalar("eps", 1e-5, positive)
  checks.check_scalar("eps", jnp.float32(1e-5), positive)
  with pytest.raises(ValueError, match=r"eps: expected a finite number > 0, got 0.0"):
    checks.check_scalar("eps", 0.0, positive)
  with pytest.raises(TypeError, match=r"eps: expected a real number, got bool True"):
    checks.check_scalar("eps", True, positive)
  scaled = checks.checked(lambda x, eps: (checks.check_scalar("eps", eps, positive), x * eps)[1])
  with pytest.raises(checkify.JaxRuntimeError, match=r"eps: expected a finite number > 0, got nan"):
    scaled(jnp.ones(2), jnp.float32(jnp.nan))
