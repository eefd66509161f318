"""Shared test setup: 8 host CPU devices, jax's persistent compilation cache, deterministic seeds.

XLA reads XLA_FLAGS once, when the backend starts, so the device count is set here,
before any test module imports jax. The compilation cache (`paperjax.bench.compile_cache`:
the user's cache directory, never the repository) lets a second run, or a clean clone on
the same machine, load what an earlier run compiled.
"""

import os

_DEVICES_FLAG = "--xla_force_host_platform_device_count=8"
if _DEVICES_FLAG not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _DEVICES_FLAG).strip()

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from paperjax.bench import compile_cache  # noqa: E402

compile_cache.enable()

SEED = 0


@pytest.fixture
def key() -> jax.Array:
  """A fresh, fixed PRNG key per test: results never depend on test order."""
  return jax.random.key(SEED)


@pytest.fixture
def np_rng() -> np.random.Generator:
  return np.random.default_rng(SEED)
