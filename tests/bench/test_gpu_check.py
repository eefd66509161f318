"""The GPU-check command: its no-GPU mode, and its kernel grid run in interpret mode on CPU."""

import subprocess
import sys

import jax
import pytest

from paperjax.bench import gpu_check


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


# The case builders draw their inputs eagerly; rbg keys compile those draws much faster than threefry.
FAST_KEY = jax.random.key(0, impl="unsafe_rbg")


def test_kernel_grid_passes_in_interpret_mode_and_a_wrong_kernel_fails():
  small = [c for c in gpu_check.maxsim_cases(FAST_KEY) if "N=19" in c.name]  # the test grid; ColBERT shapes on GPU
  assert len(small) == 4  # float32, bfloat16, float16, binary
  # float32 and binary through the check; tests/ops/test_maxsim.py runs every dtype in interpret mode.
  errors = gpu_check.check([small[0], small[-1]], interpret=True)
  assert errors[small[0].name] < 1e-4 and errors[small[-1].name] == 0.0  # binary codes are exact
  off_by_one = gpu_check.Case(
    "shifted", lambda impl, interpret: small[0].scores(impl, interpret) + (impl == "pallas"), 0.5
  )
  with pytest.raises(AssertionError, match="shifted: 1 > 0.5"):
    gpu_check.check([off_by_one], interpret=True)


def test_paged_grid_passes_in_interpret_mode():
  grid = [c for c in gpu_check.paged_cases(FAST_KEY) if "K=16" in c.name]  # Llama shapes on GPU
  assert len(grid) == 18  # GQA 1/4/8 x pages 8/16/32 x float32/bfloat16
  # One case through the check; tests/ops/test_paged_attention.py runs the whole grid in interpret mode.
  small = [c for c in grid if "G=2" in c.name and "page=8" in c.name and "float32" in c.name]
  assert len(small) == 1
  errors = gpu_check.check(small, interpret=True)
  assert errors[small[0].name] < 1e-5  # exact float32 on CPU


@pytest.mark.parametrize("name", list(gpu_check.RUNS))
def test_each_check_refuses_a_cpu_backend(name):
  with pytest.raises(RuntimeError, match="needs a GPU backend, got 'cpu'"):
    gpu_check.RUNS[name].run(None)  # type: ignore[arg-type]
