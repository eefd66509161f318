"""Shared test setup: 8 host CPU devices and deterministic seeds.

XLA reads XLA_FLAGS once, when the backend starts, so the device count is set here,
before any test module imports jax.
"""

import os

_DEVICES_FLAG = "--xla_force_host_platform_device_count=8"
if _DEVICES_FLAG not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _DEVICES_FLAG).strip()

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

SEED = 0


@pytest.fixture
def key() -> jax.Array:
  """A fresh, fixed PRNG key per test: results never depend on test order."""
  return jax.random.key(SEED)


@pytest.fixture
def np_rng() -> np.random.Generator:
  return np.random.default_rng(SEED)
