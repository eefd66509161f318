"""Two processes of 4 CPU devices (gloo over loopback) train exactly as one process of 8."""

import jax
import numpy as np

from paperjax.models.parallel import multihost
from paperjax.models.training import lm
from paperjax.models.transformer import llama


def test_two_processes_equal_one():
  steps = 3
  job = multihost.launch(steps, num_processes=2, local_devices=4, timeout_s=300)
  one = multihost.train_losses(steps)  # this process: 8 host devices (tests/conftest.py)
  assert len(job) == steps
  assert job == one, (job, one)  # same program, same reductions: bit-identical
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
