"""Shared test setup: 8 host CPU devices, fast compiles, jax's persistent compilation cache,
deterministic seeds.

XLA reads XLA_FLAGS once, when the backend starts, so the flags are set here, before any
test module imports jax; a flag the caller set wins, and child processes inherit them.
Two flags make compiles cheap, and both can change float results in the last bits (the
multihost test compares two launched jobs, which agree bit for bit under any of them):
- `--xla_backend_optimization_level=0` compiles LLVM at -O0: the same HLO passes, about half
  the compile time;
- `--xla_cpu_use_fusion_emitters=false` emits fusions through XLA:CPU's older LLVM emitters
  instead of the MLIR fusion emitters, which cost most of a small program's compile: a tiny
  Llama's training step compiles in 1.1 s instead of 2.7 s, an eager op in 18 ms instead of 30.
WORKSPACE.md, "Time", has the measurements and the commands behind them.

The compilation cache (`paperjax.bench.compile_cache`: the user's cache directory, never the
repository) lets a second run, or a clean clone on the same machine, load what an earlier
run compiled.
"""

import os

for _flag in (
  "--xla_force_host_platform_device_count=8",
  "--xla_backend_optimization_level=0",
  "--xla_cpu_use_fusion_emitters=false",
):
  if _flag.split("=")[0] not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {_flag}".strip()

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
