"""Shared absl flags and the main function of every benchmark binary and of the suite.

python -m paperjax.bench.<name> --scale=small --out=results   # one benchmark
python -m paperjax.bench --scale=ci --only=bigram.fit          # the suite, filtered
"""

from __future__ import annotations

import dataclasses
import sys
import time
import traceback
from collections.abc import Callable, Mapping, Sequence
from typing import cast

from absl import app, flags, logging

from paperjax.bench import compile_cache, report
from paperjax.bench.harness import SCALES, Benchmark, Context, Environment, Result, Scale, selects_benchmark

SCALE = flags.DEFINE_enum(
  "scale",
  "small",
  list(SCALES),
  "ci: seconds (smoke test); small: the default, the suite in 15 CPU minutes; full: longer CPU experiments; "
  "paper: the papers' shapes (GPU).",
)
OUT = flags.DEFINE_string("out", "results", "Folder for report.md, results.json and plots.")
SEED = flags.DEFINE_integer("seed", 0, "Seed of every PRNG key and data split.")
ONLY = flags.DEFINE_list("only", [], "Benchmarks or benchmark.part names to run (default: all).")
REPEATS = flags.DEFINE_integer("repeats", None, "Timed repeats (median reported); default by scale.")

DEFAULT_REPEATS = {"ci": 2, "small": 3, "full": 5, "paper": 10}  # small: the suite stays under 15 minutes


def run_benchmarks(runs: Mapping[str, Benchmark]) -> int:
  """Runs the selected benchmarks, prints the table, writes the report; returns an exit code.

  An unknown benchmark or part in `--only` is a usage error listing the valid names. A
  benchmark that raises, or a selected part that records nothing, is reported and the
  others still run; the exit code is then 1.
  """
  logging.set_verbosity(logging.WARNING)  # keep jax's backend probing out of the table
  compile_cache.enable()
  scale = cast(Scale, SCALE.value)  # DEFINE_enum admits only SCALES
  env = Environment.current(scale)
  repeats = REPEATS.value or DEFAULT_REPEATS[scale]
  if repeats < 1:
    raise app.UsageError(f"--repeats: expected >= 1, got {repeats}")
  unknown = [o for o in ONLY.value if o.split(".", 1)[0] not in runs]
  if unknown:
    raise app.UsageError(f"--only: unknown benchmarks {unknown}; known: {sorted(runs)}")
  valid = {*runs, *(f"{name}.{part}" for name, bench in runs.items() for part in bench.parts)}
  unknown = [o for o in ONLY.value if o not in valid]
  if unknown:
    raise app.UsageError(f"--only: unknown parts {unknown}; valid names: {sorted(valid)}")
  selected = [name for name in runs if selects_benchmark(ONLY.value, name)]
  results: list[Result] = []
  failed: list[str] = []
  for i, name in enumerate(selected, start=1):
    print(f"[{i}/{len(selected)}] {name} (scale={scale})", file=sys.stderr, flush=True)
    ctx = Context(name, scale, SEED.value, repeats, tuple(ONLY.value), env, parts=runs[name].parts)
    start = time.perf_counter()
    try:
      result = runs[name].run(ctx)
    except Exception:  # keep the rest of the suite; the exit code says it failed
      traceback.print_exc()
      failed.append(name)
    else:
      results.append(dataclasses.replace(result, wall_s=time.perf_counter() - start))
      empty = [p for p in ctx.selected_parts() if not ctx.recorded.get(p)]
      if empty or not sum(ctx.recorded.values()):
        print(f"{name}: parts {empty or ['(all)']} recorded nothing", file=sys.stderr)
        failed.append(name)
    print(f"[{i}/{len(selected)}] {name} done in {time.perf_counter() - start:.1f}s", file=sys.stderr)
  paths = report.write(results, env, OUT.value)
  print(report.markdown_table([r for result in results for r in result.records]))
  print(f"\nwrote {paths['markdown']} and {paths['json']}", file=sys.stderr)
  if failed:
    print(f"FAILED: {', '.join(failed)}", file=sys.stderr)
    return 1
  return 0


def main_for(runs: Mapping[str, Benchmark]) -> Callable[[Sequence[str]], int]:
  """An absl `main` running `runs`; extra positional arguments are an error."""

  def main(argv: Sequence[str]) -> int:
    if len(argv) > 1:
      raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    return run_benchmarks(runs)

  return main
