"""Two processes of 4 CPU devices (gloo over loopback) train exactly as one process of 8."""

import jax
import numpy as np

from paperjax.models.parallel import multihost
from paperjax.models.training import lm
from paperjax.models.transformer import llama


def test_two_processes_equal_one():
  # Both runs are launched jobs (1 process of 8 devices against 2 of 4), which agree bit for
  # bit at XLA's default level and at the suite's -O0 (tests/conftest.py). This process's own
  # run at -O0 differs from them in the last bit (4.620264530 against 4.620265007 at step 1).
  steps = 3
  jobs = [multihost.start(steps, num_processes=n, local_devices=8 // n) for n in (2, 1)]  # side by side
  job, one = (j.losses(timeout_s=300) for j in jobs)
  assert len(job) == steps
  assert job == one, (job, one)  # bit-identical
  # The steps trained: step 0's loss is the initial parameters' and every later one is not.
  params = llama.init(jax.random.key(0), multihost.CFG)
  untrained = [float(lm.loss_fn(params, multihost.batch(k), multihost.CFG)) for k in range(steps)]
  np.testing.assert_allclose(job[0], untrained[0], rtol=1e-5)
  assert all(abs(j - u) > 1e-3 for j, u in zip(job[1:], untrained[1:])), (job, untrained)


def test_a_child_keeps_the_callers_xla_flags_but_its_own_device_count(monkeypatch):
  monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0")
  env = multihost.cpu_devices_env(4)
  assert env["XLA_FLAGS"] == "--xla_backend_optimization_level=0 --xla_force_host_platform_device_count=4"
  assert env["JAX_PLATFORMS"] == "cpu"
