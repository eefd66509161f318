"""Two processes of 4 CPU devices (gloo over loopback) train exactly as one process of 8."""

from paperjax.models.parallel import multihost


def test_two_processes_equal_one():
  steps = 3
  job = multihost.launch(steps, num_processes=2, local_devices=4, timeout_s=300)
  one = multihost.train_losses(steps)  # this process: 8 host devices (tests/conftest.py)
  assert len(job) == steps
  assert job == one, (job, one)  # same program, same reductions: bit-identical
  assert job[-1] != job[0]  # the steps trained
