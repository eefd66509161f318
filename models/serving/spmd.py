"""The serving engine SPMD across processes: the same engine in every process, one mesh.

JAX's multi-controller runtime runs one Python process per host (`models.parallel.multihost`
does it for training). Here every process builds the same model (`llama.init(key(seed))`),
the same requests and the same `engine.Engine` on a tensor-parallel mesh over all of the
job's devices (`placement.MeshPlacement`: the pools and weights split over kv heads). The
scheduler is deterministic host Python and every model input is the same on every process,
so each process takes the same scheduling decisions, makes the same model calls (whose
collectives cross processes, over gloo on CPU) and streams the same tokens. So

  python -m paperjax.models.serving.spmd --num_processes=2 --local_devices=4

launches 2 processes of 4 CPU devices each, serves `requests()` with `CFG` on a mesh of
tensor size 8 over their 8 devices, checks that both processes' outputs are equal and equal
to this process's one-device engine, and prints them with each process's per-device pool
and weight bytes as JSON (tests/models/serving/test_engine_mesh.py runs it).

Shapes: G kv heads, P pages (L * pages of the pool), S page slots, K head dim.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Hashable
from typing import Any, NamedTuple

import jax
import numpy as np
from absl import app, flags

from paperjax.models import sharding
from paperjax.models.parallel import multihost
from paperjax.models.serving import engine, placement
from paperjax.models.transformer import llama

# 8 kv heads: a tensor axis of 8 (or 4, 2) divides the pools, the heads, the FFN and the vocabulary.
CFG = llama.LlamaConfig(
  vocab_size=64,
  dim=64,
  n_layers=2,
  n_heads=8,
  n_kv_heads=8,
  ffn_dim=64,
  max_seq_len=64,
  axis_rules=sharding.RULES["tp"],
)
ENGINE_CFG = engine.EngineConfig(num_blocks=24, block_size=4, max_batch=4, prefill_rows=2, prefill_chunk=8)
STOP = 25  # ends 3 of the 6 default requests before their max_new_tokens
DEVICES = 8  # the job's devices: num_processes x local_devices


def requests(seed: int = 0, count: int = 6) -> list[engine.Request]:
  """`count` seeded requests: prompts of 1-19 tokens (longer ones prefill in chunks of
  ENGINE_CFG.prefill_chunk = 8), 1-9 new tokens, stop id STOP; every third one, from the
  second, samples (temperature 1, top-p 0.9 or top-k 5, its own seed), the rest are greedy.
  The same in every process."""
  rng = np.random.default_rng(seed)
  out = []
  for i in range(count):
    prompt = tuple(int(x) for x in rng.integers(0, CFG.vocab_size, int(rng.integers(1, 20))))
    sampling: dict[str, Any] = {}
    if i % 3 == 1:
      sampling = {"temperature": 1.0, "seed": seed + i, **({"top_p": 0.9} if i % 2 else {"top_k": 5})}
    out.append(
      engine.Request(id=f"r{i}", prompt=prompt, max_new_tokens=int(rng.integers(1, 10)), stop_ids=(STOP,), **sampling)
    )
  return out


def mesh_placement(devices: Any = None) -> placement.MeshPlacement:
  """Tensor parallelism of CFG over `devices` (default: all of the job's), every other axis 1."""
  devices = jax.devices() if devices is None else list(devices)
  return placement.MeshPlacement(sharding.make_mesh(tensor=len(devices), devices=devices), CFG)


def serve(place: placement.Placement, seed: int = 0, count: int = 6) -> tuple[dict[Hashable, list[int]], engine.Engine]:
  """The generated tokens of `requests(seed, count)` from an engine over `llama.init(key(seed))`
  placed by `place`, and the engine (its pools and weights, for their shardings)."""
  params = llama.init(jax.random.key(seed), CFG)
  eng = engine.Engine(params, CFG, ENGINE_CFG, place=place)
  return eng.generate(requests(seed, count)), eng


def report(eng: engine.Engine) -> dict[str, Any]:
  """What a process holds of the engine: the most bytes of pools and of weights on one of its
  devices, and the shapes of its pool shards."""
  pools = (eng.k_pages_GPSK, eng.v_pages_GPSK)
  return {
    "pool_bytes": max(placement.device_bytes(pools).values()),
    "weight_bytes": max(placement.device_bytes(eng.params).values()),
    "pool_shards": sorted(list(s.data.shape) for s in eng.k_pages_GPSK.addressable_shards),
    "devices": len(jax.local_devices()),
  }


class Job(NamedTuple):
  """Worker processes serving together (`start`)."""

  workers: list[subprocess.Popen]

  def results(self, timeout_s: float = 300) -> list[dict[str, Any]]:
    """Waits for every worker; each one's JSON line (outputs and `report`), in process order.
    Raises RuntimeError, with the workers' output, if one fails or the job runs past
    timeout_s (then every worker is killed)."""
    deadline = time.monotonic() + timeout_s
    outputs = []
    try:
      for worker in self.workers:
        outputs.append(worker.communicate(timeout=max(deadline - time.monotonic(), 0.1))[0])
    except subprocess.TimeoutExpired:
      for worker in self.workers:
        worker.kill()
      outputs += [worker.communicate()[0] for worker in self.workers[len(outputs) :]]
      tails = "\n".join(f"process {i}:\n{o[-3000:]}" for i, o in enumerate(outputs))
      raise RuntimeError(f"spmd: the job ran past timeout_s={timeout_s}; the workers were killed:\n{tails}") from None
    finally:
      for worker in self.workers:
        worker.kill()
    if any(worker.returncode for worker in self.workers):
      raise RuntimeError(
        "spmd: a worker failed:\n" + "\n".join(f"process {i}:\n{o[-3000:]}" for i, o in enumerate(outputs))
      )
    return [json.loads([line for line in o.splitlines() if line.startswith("{")][-1]) for o in outputs]


def start(*, num_processes: int = 2, local_devices: int = 4, seed: int = 0, count: int = 6) -> Job:
  """Starts `serve` on the job's mesh across `num_processes` processes of `local_devices` CPU
  devices each, and returns without waiting."""
  if num_processes * local_devices != DEVICES:
    raise ValueError(
      f"num_processes, local_devices: {num_processes} x {local_devices} devices, expected {DEVICES} in all "
      f"(the mesh's tensor axis, which divides CFG's {CFG.n_kv_heads} kv heads)"
    )
  # No persistent compilation cache across processes (models.parallel.multihost.start: with a
  # warm cache process 0 loads a call that process 1 compiles, and the job can hang).
  env = multihost.cpu_devices_env(local_devices)
  if num_processes > 1:
    env["JAX_ENABLE_COMPILATION_CACHE"] = "false"
  command = [sys.executable, "-m", "paperjax.models.serving.spmd", f"--coordinator=127.0.0.1:{multihost._free_port()}"]
  command += [f"--num_processes={num_processes}", f"--engine_seed={seed}", f"--engine_requests={count}"]
  return Job(
    [
      subprocess.Popen(
        [*command, f"--process_id={i}"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
      )
      for i in range(num_processes)
    ]
  )


def check(results: list[dict[str, Any]], reference: dict[Hashable, list[int]]) -> None:
  """Raises unless every process's outputs equal `reference` (the one-device engine's)."""
  expected = {str(k): v for k, v in reference.items()}  # JSON keys are strings
  for result in results:
    if result["outputs"] != expected:
      raise AssertionError(
        f"spmd: process {result['process']} generated {result['outputs']}, the one-device engine {expected}"
      )


def launch(
  *, num_processes: int = 2, local_devices: int = 4, seed: int = 0, count: int = 6, timeout_s: float = 300
) -> dict[str, Any]:
  """`start`, wait, and check every process against this process's one-device engine
  (`serve(placement.Placement())`): each process's result, and the one-device `report`."""
  job = start(num_processes=num_processes, local_devices=local_devices, seed=seed, count=count)
  reference, one = serve(placement.Placement(), seed, count)  # while the workers run
  results = job.results(timeout_s)
  check(results, reference)
  return {"processes": results, "one_device": report(one), "outputs": {str(k): v for k, v in reference.items()}}


# --coordinator, --process_id, --num_processes and --local_devices are multihost's flags
# (imported above; one process cannot define a flag twice).
_SEED = flags.DEFINE_integer("engine_seed", 0, "Model and request seed (not --seed: bench.cli owns it).")
_REQUESTS = flags.DEFINE_integer("engine_requests", 6, "Requests served.")


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}")
  f = flags.FLAGS
  if f.process_id is None:  # launcher
    if f["coordinator"].present:
      raise app.UsageError("--coordinator: only for a worker (with --process_id); the launcher picks a free port")
    result = launch(
      num_processes=f.num_processes, local_devices=f.local_devices, seed=_SEED.value, count=_REQUESTS.value
    )
    print(json.dumps(result))  # launch raised unless every process equals the one-device engine
    return
  if f.coordinator is None:
    raise app.UsageError("--coordinator: required with --process_id")
  if f["local_devices"].present:
    raise app.UsageError("--local_devices: only for the launcher; a worker's devices come from XLA_FLAGS")
  multihost.initialize(f.coordinator, f.num_processes, f.process_id)
  if jax.device_count() != DEVICES:
    raise RuntimeError(f"spmd: expected {DEVICES} devices in the job, got {jax.device_count()}")
  outputs, eng = serve(mesh_placement(), _SEED.value, _REQUESTS.value)
  print(json.dumps({"process": jax.process_index(), "outputs": outputs, **report(eng)}))


if __name__ == "__main__":
  app.run(main)
