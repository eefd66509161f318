"""The persistent compilation cache: where it lives, who wins, and that child processes write to it."""

import os
import subprocess
import sys

import jax
import pytest

from paperjax.bench import compile_cache


@pytest.fixture
def restore_jax_cache_config():
  """enable() updates process-wide jax settings: put back what the suite runs with."""
  saved = jax.config.jax_compilation_cache_dir, jax.config.jax_persistent_cache_min_compile_time_secs
  yield
  jax.config.update("jax_compilation_cache_dir", saved[0])
  jax.config.update("jax_persistent_cache_min_compile_time_secs", saved[1])


def test_the_cache_lives_in_the_users_cache_directory(tmp_path, monkeypatch, restore_jax_cache_config):
  monkeypatch.delenv(compile_cache.ENV_DIR, raising=False)
  monkeypatch.delenv(compile_cache.ENV_MIN_SECONDS, raising=False)
  monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
  path = compile_cache.enable()
  assert path == tmp_path / "xdg" / "paperjax" / "xla" and path.is_dir()
  assert jax.config.jax_compilation_cache_dir == str(path)
  assert jax.config.jax_persistent_cache_min_compile_time_secs == 0  # every compile, however short
  assert os.environ[compile_cache.ENV_DIR] == str(path)  # for child processes

  monkeypatch.delenv("XDG_CACHE_HOME")
  monkeypatch.setenv("HOME", str(tmp_path / "home"))
  assert compile_cache.default_dir() == tmp_path / "home" / ".cache" / "paperjax" / "xla"

  monkeypatch.setenv(compile_cache.ENV_DIR, str(tmp_path / "mine"))  # the user's own setting wins
  assert compile_cache.enable() == tmp_path / "mine"
  assert jax.config.jax_compilation_cache_dir == str(tmp_path / "mine")


def test_a_child_process_writes_its_compiles_to_the_cache(tmp_path, monkeypatch, restore_jax_cache_config):
  monkeypatch.delenv(compile_cache.ENV_DIR, raising=False)
  monkeypatch.delenv(compile_cache.ENV_MIN_SECONDS, raising=False)
  monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
  path = compile_cache.enable()  # the child learns the folder and the 0 s threshold from the environment
  assert list(path.iterdir()) == []
  program = "import jax, jax.numpy as jnp; jax.jit(lambda x: jnp.sin(x) * 3)(jnp.ones(7)).block_until_ready()"
  proc = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, timeout=120)
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert any(p.name.startswith("jit__lambda-") for p in path.iterdir())  # a sub-second compile, kept
