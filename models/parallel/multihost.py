"""Multi-process (multi-host) training: one sharded step across processes, on CPU here.

JAX's multi-controller runtime runs one Python process per host; each sees every device
of the job (`jax.devices()`) but holds only its own (`jax.local_devices()`). The same
program runs in every process: the mesh spans all devices, each process fills only the
shards of the batch it holds (`sharding.put`), and XLA's collectives cross processes. On
CPU they go over loopback through gloo, so

  python -m paperjax.models.parallel.multihost --num_processes=2 --local_devices=4

launches 2 processes of 4 CPU devices each, trains a tiny Llama on a (data 2, fsdp 2,
tensor 2) mesh over their 8 devices (`train_losses`) and prints the losses as JSON; one
process with 8 devices gives the same numbers (tests/models/parallel, bench/parallel).

Shapes: N tokens of the synthetic stream.
"""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
from typing import NamedTuple

import jax
import numpy as np
from absl import app, flags

from paperjax.models import sharding
from paperjax.models.training import lm
from paperjax.models.training.train import TrainConfig
from paperjax.models.transformer import llama

CFG = llama.LlamaConfig(vocab_size=64, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=64, max_seq_len=64)
TCFG = TrainConfig(batch_size=8, seq_len=16, warmup_steps=0, total_steps=10)  # no warm-up: every step moves
MESH = {"data": 2, "fsdp": 2, "tensor": 2}  # the fsdp_tp rules use every axis


def batch(step: int, seed: int = 0) -> lm.Batch:
  """Step `step`'s batch of a seeded synthetic token stream (the same in every process)."""
  ids_N = np.random.default_rng(seed).integers(0, CFG.vocab_size, 4096)
  return lm.batch_at(ids_N, np.arange(ids_N.size) // 50, step, TCFG)


def train_losses(steps: int, seed: int = 0) -> list[float]:
  """Losses of `steps` sharded training steps of CFG from `llama.init(key(seed))`, on a mesh
  over all of the job's devices, on `batch(step, seed)`: the loss of step k is that of the
  parameters after k updates."""
  mesh = sharding.make_mesh(data=MESH["data"], fsdp=MESH["fsdp"], tensor=MESH["tensor"])
  run = lm.sharded_training(jax.random.key(seed), CFG, TCFG, mesh, "fsdp_tp")
  state, losses = run.state, []
  for step in range(steps):
    state, metrics = run.step(state, sharding.put(batch(step, seed), run.shardings.batch))
    losses.append(float(np.asarray(metrics["loss"].addressable_data(0))))  # replicated: every process has it
  return losses


def initialize(coordinator: str, num_processes: int, process_id: int) -> None:
  """Joins the job: gloo CPU collectives, then `jax.distributed.initialize`."""
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes, process_id=process_id)


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


class Job(NamedTuple):
  """Worker processes running `train_losses` together (`start`)."""

  workers: list[subprocess.Popen]

  def losses(self, timeout_s: float = 300) -> list[float]:
    """Waits for every worker; process 0's losses (raises, with the workers' output, if any fails)."""
    outputs = []
    try:
      for worker in self.workers:
        outputs.append(worker.communicate(timeout=timeout_s)[0])
    finally:
      for worker in self.workers:
        worker.kill()
    if any(worker.returncode for worker in self.workers):
      raise RuntimeError("multihost: a worker failed:\n" + "\n".join(o[-3000:] for o in outputs))
    return json.loads(outputs[0].strip().splitlines()[-1])["losses"]


def cpu_devices_env(devices: int) -> dict[str, str]:
  """This process's environment for a child on `devices` host CPU devices: XLA_FLAGS keeps
  the caller's other flags (a compile option the caller set still applies) and replaces any
  device count."""
  kept = [
    f for f in os.environ.get("XLA_FLAGS", "").split() if not f.startswith("--xla_force_host_platform_device_count")
  ]
  flags = " ".join([*kept, f"--xla_force_host_platform_device_count={devices}"])
  return {**os.environ, "XLA_FLAGS": flags, "JAX_PLATFORMS": "cpu"}


def start(steps: int, *, num_processes: int = 2, local_devices: int = 4) -> Job:
  """Starts `train_losses(steps)` across `num_processes` processes of `local_devices` CPU
  devices each, and returns without waiting."""
  if num_processes * local_devices != math.prod(MESH.values()):
    raise ValueError(
      f"num_processes, local_devices: {num_processes} x {local_devices} devices do not make the mesh {MESH}"
    )
  # No persistent compilation cache in a job of several processes. jax writes cache entries
  # from process 0 only, so with a warm cache (jax 0.10.2) process 0 loaded the step while
  # process 1 compiled it, and under make test's load process 0 waited at the first collective
  # past the 30 s barrier timeout and the job hung. Without it all compile, in step.
  env = cpu_devices_env(local_devices)
  if num_processes > 1:
    env["JAX_ENABLE_COMPILATION_CACHE"] = "false"
  command = [sys.executable, "-m", "paperjax.models.parallel.multihost", f"--coordinator=127.0.0.1:{_free_port()}"]
  command += [f"--num_processes={num_processes}", f"--steps={steps}"]
  return Job(
    [
      subprocess.Popen(
        [*command, f"--process_id={i}"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
      )
      for i in range(num_processes)
    ]
  )


def launch(steps: int, *, num_processes: int = 2, local_devices: int = 4, timeout_s: float = 300) -> list[float]:
  """`start`, then wait: process 0's losses of `train_losses(steps)` run across the processes."""
  return start(steps, num_processes=num_processes, local_devices=local_devices).losses(timeout_s)


_COORDINATOR = flags.DEFINE_string("coordinator", None, "host:port of process 0 (worker mode).")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This worker's index (worker mode).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", 2, "Processes in the job.")
_LOCAL_DEVICES = flags.DEFINE_integer("local_devices", 4, "CPU devices per process (launcher mode).")
_STEPS = flags.DEFINE_integer("steps", 3, "Training steps.")


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}")
  if _PROCESS_ID.value is None:  # launcher
    if _COORDINATOR.present:
      raise app.UsageError("--coordinator: only for a worker (with --process_id); the launcher picks a free port")
    losses = launch(_STEPS.value, num_processes=_NUM_PROCESSES.value, local_devices=_LOCAL_DEVICES.value)
    print(json.dumps({"processes": _NUM_PROCESSES.value, "losses": losses}))
    return
  if _COORDINATOR.value is None:
    raise app.UsageError("--coordinator: required with --process_id")
  if _LOCAL_DEVICES.present:
    raise app.UsageError("--local_devices: only for the launcher; a worker's devices come from XLA_FLAGS")
  initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
  losses = train_losses(_STEPS.value)
  print(json.dumps({"process": jax.process_index(), "losses": losses}))


if __name__ == "__main__":
  app.run(main)
