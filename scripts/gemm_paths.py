"""XLA:CPU's float32 GEMMs against torch's (MKL) and against XLA's other CPU GEMM paths.

  .venv/bin/python scripts/gemm_paths.py [--torch_python=/tmp/tv/bin/python] [--rounds=2]
  taskset -c 0 .venv/bin/python scripts/gemm_paths.py --only_single   # one core

Prints, per round (the paths alternate within a round, so drift hits them alike):
- the seconds of the `small` Llama's training GEMM list (`bench.llama.training_gemms`, the
  111 dot_generals of its unrolled gradient at B=8, T=128) under each XLA option set of
  PATHS, each GEMM jitted alone (`bench.llama.time_gemms`), and under torch when
  `--torch_python` names a Python with torch and transformers (`torch_train_speed._gemm`);
- GFLOP/s of two single GEMMs, [1024, 256] @ [256, 768] and 2048^3, in XLA and torch, with
  the cores this process may use (run it under `taskset -c 0` for one).
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import subprocess
import sys
import tempfile

import jax
import jax.numpy as jnp
from absl import app, flags

from paperjax.bench import cli
from paperjax.bench import llama as bench_llama
from paperjax.bench.harness import time_fn
from paperjax.models.transformer import llama

TORCH_PYTHON = flags.DEFINE_string("torch_python", None, "A Python with torch and transformers (optional).")
ROUNDS = flags.DEFINE_integer("rounds", 2, "Alternating rounds.", lower_bound=1)
ONLY_SINGLE = flags.DEFINE_bool("only_single", False, "Only the two single GEMMs.")

PATHS = {  # XLA debug options, passed per program as jax.jit(compiler_options=...)
  "default (YNNPACK)": {},
  "no YNNPACK": {"xla_cpu_experimental_ynn_fusion_type": ""},
  "oneDNN custom call": {"xla_cpu_experimental_onednn_custom_call": True},
  "oneDNN rewrite": {"xla_cpu_experimental_ynn_fusion_type": "", "xla_cpu_use_onednn": True},
  "XNNPACK": {"xla_cpu_experimental_ynn_fusion_type": "", "xla_cpu_use_xnnpack": True},
}
SINGLE = ((1024, 256, 768), (2048, 2048, 2048))  # m, k, n

TORCH_SIDE = """
import json, statistics, sys, time
sys.path.insert(0, {scripts!r})
import torch
from torch_train_speed import _gemm

def median_s(fn, repeats=7):
  fn(); fn()
  times = []
  for _ in range(repeats):
    start = time.perf_counter(); fn(); times.append(time.perf_counter() - start)
  return statistics.median(times)

flops = lambda m, k, n: 2 * m * k * n / median_s(lambda a=torch.ones(m, k), b=torch.ones(k, n): a @ b) / 1e9
out = {{"single": [flops(m, k, n) for m, k, n in {single!r}]}}
if {gemms!r}:
  out["list_s"] = sum(c * median_s(_gemm(l, r, d)) for l, r, d, c in json.load(open({gemms!r})))
print(json.dumps(out))
"""


def _torch(gemms_file: str) -> dict:
  assert TORCH_PYTHON.value is not None
  code = TORCH_SIDE.format(scripts=str(pathlib.Path(__file__).parent), single=SINGLE, gemms=gemms_file)
  proc = subprocess.run([TORCH_PYTHON.value, "-c", code], capture_output=True, text=True, check=False)
  if proc.returncode:
    raise RuntimeError(f"the torch side failed:\n{proc.stderr[-2000:]}")
  return json.loads(proc.stdout.strip().splitlines()[-1])


def _single_xla() -> list[float]:
  dot = jax.jit(jnp.matmul)
  return [
    2 * m * k * n / time_fn(dot, jnp.ones((m, k)), jnp.ones((k, n)), repeats=7).median_s / 1e9 for m, k, n in SINGLE
  ]


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}")
  cli.refuse_unused(("scale", "seed", "out", "only", "repeats"), "this script")
  model = dataclasses.replace(llama.PRESETS["small"], unroll=True)
  gemms = {} if ONLY_SINGLE.value else bench_llama.training_gemms(model, 8, 128)
  shapes = " and ".join(f"[{m}, {k}] @ [{k}, {n}]" for m, k, n in SINGLE)
  with tempfile.NamedTemporaryFile("w", suffix=".json") as gemms_file:
    json.dump([[lhs, rhs, dims, count] for (lhs, rhs, dims), count in gemms.items()], gemms_file)
    gemms_file.flush()
    dots = {name: bench_llama.jitted_dot(compiler_options=options or None) for name, options in PATHS.items()}
    for dot in dots.values() if gemms else ():
      bench_llama.time_gemms(gemms, 1, dot)  # compiles every program before the first round
    for r in range(ROUNDS.value):
      for name, dot in dots.items() if gemms else ():
        seconds = bench_llama.time_gemms(gemms, 7, dot)
        print(f"round {r + 1}: GEMM list ({sum(gemms.values())} GEMMs), XLA {name}: {seconds * 1e3:.0f} ms", flush=True)
      print(f"round {r + 1}: XLA GFLOP/s of {shapes}: {', '.join(f'{g:.0f}' for g in _single_xla())}", flush=True)
      if TORCH_PYTHON.value:
        side = _torch(gemms_file.name if gemms else "")
        if gemms:
          print(f"round {r + 1}: GEMM list, torch: {side['list_s'] * 1e3:.0f} ms", flush=True)
        print(f"round {r + 1}: torch GFLOP/s of {shapes}: {', '.join(f'{g:.0f}' for g in side['single'])}", flush=True)


if __name__ == "__main__":
  sys.exit(app.run(main))
