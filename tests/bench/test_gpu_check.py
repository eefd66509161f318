"""The GPU-check command: its no-GPU mode, and its kernel grid run in interpret mode on CPU."""

import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from paperjax.bench import gpu_check
from paperjax.ops import quant


def test_without_a_gpu_it_says_so_and_exits_0(tmp_path):
  proc = subprocess.run(
    [sys.executable, "-m", "paperjax.bench.gpu_check", f"--out={tmp_path}"],
    cwd=tmp_path,
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "no GPU backend here" in proc.stdout and "nothing was timed" in proc.stdout
  assert list(tmp_path.iterdir()) == []  # no report: nothing was measured


def test_kernel_grid_passes_in_interpret_mode_and_a_wrong_kernel_fails():
  small = [c for c in gpu_check.cases(jax.random.key(0)) if "N=19" in c.name]  # the test grid; ColBERT shapes on GPU
  assert len(small) == 4  # float32, bfloat16, float16, binary
  errors = gpu_check.check(small, interpret=True)
  assert errors[small[-1].name] == 0.0  # binary codes are exact
  off_by_one = gpu_check.Case(
    "shifted", lambda impl, interpret: small[0].scores(impl, interpret) + (impl == "pallas"), 0.5
  )
  with pytest.raises(AssertionError, match="shifted: 1 > 0.5"):
    gpu_check.check([off_by_one], interpret=True)


def test_run_refuses_a_cpu_backend():
  with pytest.raises(RuntimeError, match="needs a GPU backend, got 'cpu'"):
    gpu_check.run(None)  # type: ignore[arg-type]


def test_the_low_precision_dots_it_times_accumulate_exactly(np_rng):
  a = np_rng.integers(-127, 128, (16, 32))
  b = np_rng.integers(-127, 128, (32, 8))
  out = quant.dot(jnp.asarray(a, jnp.int8), jnp.asarray(b, jnp.int8))
  assert out.dtype == jnp.int32 and (np.asarray(out) == a @ b).all()
  a8, b8 = (jnp.asarray(x / 8, jnp.float8_e4m3fn) for x in (a, b))
  expected = np.asarray(a8, np.float64) @ np.asarray(b8, np.float64)
  np.testing.assert_allclose(quant.dot(a8, b8), expected, rtol=1e-6)
