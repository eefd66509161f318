"""paperjax's Llama training step against transformers + torch.optim.AdamW, side by side.

  .venv/bin/python scripts/train_speed_vs_torch.py --torch_python=/tmp/tv/bin/python [--rounds=3]

`--torch_python` is a Python with torch and transformers (a scratch venv: `python -m venv
/tmp/tv && /tmp/tv/bin/pip install torch==2.13.0 transformers`; neither is a paperjax
dependency). For each model of `bench.llama`'s train_speed part at `--scale` (the
benchmarks' flag, default small; `--seed` too), the rounds
alternate: paperjax times its forward (the loss), gradient and training step in this
process (compiled once, `--unroll` chooses the layout), then `scripts/torch_train_speed.py`
times the same shapes in a fresh process. Each side's figure is the median over rounds of
each round's median; the ratio's range is over the rounds. Both sides use the machine's
cores as their libraries do by default, one side at a time.

"GEMMs alone" is the gradient's matmuls (`bench.llama.training_gemms`: every dot_general of
paperjax's gradient, traced) timed on their own in each round: by XLA, each as its own jitted
dot_general, and by torch (`torch_train_speed.py --gemms`), each as `torch.matmul` of
transposed views; "rest" is the step's time less its GEMMs'.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import statistics
import subprocess
import sys
import tempfile

from absl import app, flags

from paperjax.bench import cli
from paperjax.bench import llama as bench_llama
from paperjax.bench.harness import time_fn

TORCH_PYTHON = flags.DEFINE_string("torch_python", None, "A Python with torch and transformers.", required=True)
ROUNDS = flags.DEFINE_integer("rounds", 3, "Alternating rounds per model.", lower_bound=1)
STEPS = flags.DEFINE_integer("steps", 5, "Timed calls per round and side (median).", lower_bound=1)
UNROLL = flags.DEFINE_bool("unroll", True, "paperjax side: LlamaConfig.unroll (the layers written out).")

TORCH_SCRIPT = pathlib.Path(__file__).with_name("torch_train_speed.py")


def _check_torch_can_build(model) -> None:
  """The torch side builds float32, untied, head_dim = dim / n_heads, RoPE theta 500000 without
  scaling and eps 1e-5: anything else would time a different model."""
  expected = dict(
    head_dim=(None, model.dim // model.n_heads),
    tie_embeddings=(False,),
    rope_theta=(500_000.0,),
    rope_scaling=(None,),
    norm_eps=(1e-5,),
    dtype=("float32",),
    param_dtype=("float32",),
  )
  wrong = {name: getattr(model, name) for name, ok in expected.items() if getattr(model, name) not in ok}
  if wrong:
    raise ValueError(f"model: the torch side cannot build {wrong}; it builds {expected}")


def _torch_round(model, batch: int, seq_len: int, gemms_file: str) -> dict[str, float]:
  shape = dict(
    vocab=model.vocab_size,
    dim=model.dim,
    layers=model.n_layers,
    heads=model.n_heads,
    kv_heads=model.n_kv_heads,
    ffn=model.ffn_dim,
    batch=batch,
    seq=seq_len,
    steps=STEPS.value,
    seed=cli.SEED.value,
  )
  args = [TORCH_PYTHON.value, str(TORCH_SCRIPT), *(f"--{k}={v}" for k, v in shape.items()), f"--gemms={gemms_file}"]
  proc = subprocess.run(args, capture_output=True, text=True, check=False)
  if proc.returncode:
    raise RuntimeError(f"{TORCH_SCRIPT.name} failed:\n{proc.stderr[-2000:]}")
  return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}")
  cli.refuse_unused(("out", "only", "repeats"), "this script (it takes --scale and --seed)")
  speed = bench_llama.CONFIGS[cli.SCALE.value].speed
  print(
    "| model | side | forward ms | grad ms | step ms | GEMMs alone ms | rest ms | tokens/s "
    "| paperjax / torch tokens/s (range over rounds) | torch / paperjax GEMM time (range) |"
  )
  print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
  for base in speed.models:
    _check_torch_can_build(base)
  for base in speed.models:
    model = dataclasses.replace(base, unroll=UNROLL.value)
    programs = bench_llama.training_programs(model, speed.batch, speed.seq_len, cli.SEED.value)
    gemms, dot = bench_llama.training_gemms(model, speed.batch, speed.seq_len), bench_llama.jitted_dot()
    rounds: dict[str, list[dict[str, float]]] = {"paperjax": [], "torch": []}
    with tempfile.NamedTemporaryFile("w", suffix=".json") as gemms_file:
      json.dump([[lhs, rhs, dims, count] for (lhs, rhs, dims), count in gemms.items()], gemms_file)
      gemms_file.flush()
      for _ in range(ROUNDS.value):
        ours = {f"{name}_s": time_fn(fn, repeats=STEPS.value, warmup=2).median_s for name, fn in programs.items()}
        ours["gemms_s"] = bench_llama.time_gemms(gemms, STEPS.value, dot)
        rounds["paperjax"].append(ours)
        rounds["torch"].append(_torch_round(model, speed.batch, speed.seq_len, gemms_file.name))
    tokens = speed.batch * speed.seq_len
    spread = lambda xs: f"{statistics.median(xs):.2f} ({min(xs):.2f} .. {max(xs):.2f})"
    pairs = list(zip(rounds["paperjax"], rounds["torch"]))
    label = f"{model.num_params() / 1e6:.1f}M, B={speed.batch}, T={speed.seq_len}"
    for side, runs in rounds.items():
      med = {key: statistics.median(r[key] for r in runs) for key in ("forward_s", "grad_s", "step_s", "gemms_s")}
      ratios = " | "
      if side == "paperjax":
        steps, gemm_times = ([t[key] / p[key] for p, t in pairs] for key in ("step_s", "gemms_s"))
        ratios = f"{spread(steps)} | {spread(gemm_times)}"
      print(
        f"| {label} | {side}{' (unrolled)' if side == 'paperjax' and model.unroll else ''} | "
        f"{med['forward_s'] * 1e3:.0f} | {med['grad_s'] * 1e3:.0f} | {med['step_s'] * 1e3:.0f} | "
        f"{med['gemms_s'] * 1e3:.0f} | {(med['step_s'] - med['gemms_s']) * 1e3:.0f} | "
        f"{tokens / med['step_s']:.0f} | {ratios} |",
        flush=True,
      )


if __name__ == "__main__":
  sys.exit(app.run(main))
