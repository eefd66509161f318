"""jax's persistent compilation cache for the benchmarks and the test suite.

Most of a CPU test run, and of a `--scale=ci` benchmark run, is XLA compiling. With the
cache on, an executable compiled once is read back from disk by every later process on
the same machine: a clean clone, a second `make test`, a benchmark's child process.

The cache lives in the user's cache directory, never in the repository:
`$XDG_CACHE_HOME/paperjax/xla`, or `~/.cache/paperjax/xla` without XDG_CACHE_HOME. A
JAX_COMPILATION_CACHE_DIR already set in the environment wins. The entries are compiled
code that jax loads and runs as it is: only share the folder with people whose code you
would run (jax's own warning). `make clean-cache` removes it.
"""

from __future__ import annotations

import os
from pathlib import Path

import jax

ENV_DIR = "JAX_COMPILATION_CACHE_DIR"
ENV_MIN_SECONDS = "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"


def default_dir() -> Path:
  """`$XDG_CACHE_HOME/paperjax/xla`, or `~/.cache/paperjax/xla`."""
  base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
  return Path(base) / "paperjax" / "xla"


def enable() -> Path:
  """Turns the persistent cache on for this process and the processes it starts; returns its folder.

  Every compile is cached, however short (jax's default keeps only those over 1 s): a test
  suite is thousands of compiles of a fraction of a second each. The settings go into the
  environment too, so child processes (the smoke test's benchmark runs, multihost workers)
  read the same cache.
  """
  path = Path(os.environ.get(ENV_DIR) or default_dir())
  path.mkdir(parents=True, exist_ok=True)
  os.environ[ENV_DIR] = str(path)
  os.environ.setdefault(ENV_MIN_SECONDS, "0")
  jax.config.update("jax_compilation_cache_dir", str(path))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", float(os.environ[ENV_MIN_SECONDS]))
  return path
