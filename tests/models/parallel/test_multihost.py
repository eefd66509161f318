"""Two processes of 4 CPU devices (gloo over loopback) train exactly as one process of 8."""

from paperjax.models.parallel import multihost


def test_two_processes_equal_one():
  steps = 3
  job = multihost.launch(steps, num_processes=2, local_devices=4, timeout_s=300)
  one = multihost.train_losses(steps)  # this process: 8 host devices (tests/conftest.py)
  assert len(job) == steps
  assert job == one, (job, one)  # same program, same reductions: bit-identical
  assert job[-1] != job[0]  # the steps trained


def test_a_child_keeps_the_callers_xla_flags_but_its_own_device_count(monkeypatch):
  monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0")
  env = multihost.cpu_devices_env(4)
  assert env["XLA_FLAGS"] == "--xla_backend_optimization_level=0 --xla_force_host_platform_device_count=4"
  assert env["JAX_PLATFORMS"] == "cpu"
