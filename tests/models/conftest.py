"""Fixtures shared by the model tests: jitted entry points, and the equality of a training
step on a mesh with one device's (tests/models/test_sharding.py, parallel/)."""

import functools
from collections.abc import Callable

import chex
import jax
import jax.numpy as jnp
import optax
import pytest

from paperjax.models.training.train import TrainState


@functools.cache
def _jitted(fn: Callable, cfg, **static) -> Callable:
  return jax.jit(functools.partial(fn, cfg=cfg, **static))


@pytest.fixture(scope="session")
def jitted() -> Callable:
  """`jitted(model.forward, cfg, **static)(params, tokens, ...)`: a model function with its
  config (and any other static keyword, such as a prefill's capacity) bound, jitted once per
  session. An eager forward compiles each op and the layer scan apart, about twice the
  compile time of one jitted program (WORKSPACE.md, "Time")."""
  return _jitted


def _assert_step_equals(state: TrainState, ref_state: TrainState, start: TrainState) -> None:
  """`state` (one step taken on a mesh) equals `ref_state` (the same step on one device from
  `start`): first, the reference step moved every parameter leaf by far more than the
  tolerance, so the comparison can tell a step from no step; then the parameters agree to
  1e-5, and Adam's moments to 1e-5 of each leaf's largest entry (nu is ~1e-10 after one step,
  so an absolute tolerance would pass any nu)."""
  assert int(state.step) == int(ref_state.step) == int(start.step) + 1
  moved = jax.tree.map(lambda a, b: float(jnp.abs(a - b).max()), ref_state.params, start.params)
  still = {jax.tree_util.keystr(path): m for path, m in jax.tree_util.tree_leaves_with_path(moved) if m < 1e-4}
  assert not still, f"the reference step left these parameters (nearly) unchanged: {still}"
  chex.assert_trees_all_close(state.params, ref_state.params, atol=1e-5, rtol=1e-5)
  for name in ("mu", "nu"):
    moment, ref = (optax.tree_utils.tree_get(s.opt_state, name) for s in (state, ref_state))
    to_scale = lambda tree, ref=ref: jax.tree.map(lambda x, r: x / jnp.abs(r).max(), tree, ref)
    chex.assert_trees_all_close(to_scale(moment), to_scale(ref), atol=1e-5, rtol=1e-5)


@pytest.fixture
def assert_step_equals() -> Callable[[TrainState, TrainState, TrainState], None]:
  return _assert_step_equals
