"""The benchmarks `python -m paperjax.bench` runs, in order.

Each name is a module `paperjax.bench.<name>` exposing `run(ctx: Context) -> Result` and
`PARTS` (the names its `ctx.wants` asks about), `CLAIMS` (the `harness.ClaimSpec`s its parts
decide through `ctx.claim`, declared before any run), and `TIMED = False` if it times nothing
(then `--repeats` is a usage error rather than ignored), runnable on its own as
`python -m paperjax.bench.<name>`. Add a benchmark by writing that
module and appending its name here.
"""

from __future__ import annotations

import importlib

from paperjax.bench.harness import Benchmark

BENCHMARKS: tuple[str, ...] = (
  "bigram",
  "llama",
  "maxsim",
  "align",
  "interactions",
  "jrt",
  "quant",
  "serving",
  "excp",
  "sae",
  "parallel",
  "tora",
)


def load(name: str) -> Benchmark:
  if name not in BENCHMARKS:
    raise ValueError(f"benchmark: unknown name {name!r}; registered: {list(BENCHMARKS)}")
  module = importlib.import_module(f"paperjax.bench.{name}")
  return Benchmark(module.run, module.PARTS, getattr(module, "TIMED", True), getattr(module, "CLAIMS", ()))
