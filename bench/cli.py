"""Shared absl flags and the main function of every benchmark binary and of the suite.

python -m paperjax.bench.<name> --scale=small --out=results   # one benchmark
python -m paperjax.bench --scale=ci --only=bigram.fit          # the suite, filtered

Every flag is checked before any work starts (`check_flags`): a bad value is an
`app.UsageError` naming the flag, the expectation and the value, and no flag is ignored
silently (`--repeats` for benchmarks that time nothing is an error too).
"""

from __future__ import annotations

import dataclasses
import sys
import time
import traceback
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from typing import cast

from absl import app, flags, logging

from paperjax.bench import compile_cache, report
from paperjax.bench.harness import SCALES, Benchmark, Context, Environment, Result, Scale, selects_benchmark

# small: the suite stays under 15 minutes
DEFAULT_REPEATS: dict[Scale, int] = {"ci": 2, "small": 3, "full": 5, "paper": 10}
SEED_MAX = 2**32 - 1  # numpy's and jax's seeds; keeps the benchmarks' seed arithmetic (10**6 * seed) in int64

SCALE = flags.DEFINE_enum(
  "scale",
  "small",
  list(SCALES),
  "ci: seconds (smoke test); small: the default, the suite in 15 CPU minutes; full: longer CPU experiments; "
  "paper: the papers' shapes (GPU).",
)
OUT = flags.DEFINE_string(
  "out", "results", "Folder for report.md, results.json and plots: an existing folder or one that can be made."
)
SEED = flags.DEFINE_integer("seed", 0, f"Seed of every PRNG key and data split, 0 to {SEED_MAX}.")
ONLY = flags.DEFINE_list(
  "only", [], "Benchmarks or benchmark.part names to run, comma-separated, each once (default: all)."
)
REPEATS = flags.DEFINE_integer(
  "repeats",
  None,
  "Timed repeats per median, >= 1; default by scale: "
  + ", ".join(f"{scale} {n}" for scale, n in DEFAULT_REPEATS.items())
  + ". An error for benchmarks that time nothing.",
)


@dataclasses.dataclass(frozen=True)
class Settings:
  """The checked flag values of one run."""

  scale: Scale
  seed: int
  repeats: int
  only: tuple[str, ...]
  out: str
  selected: tuple[str, ...]  # the benchmarks to run, in order


def refuse_unused(names: Sequence[str], script: str) -> None:
  """A usage error naming those of the benchmarks' flags `names` given on the command line: a
  script that imports `bench` has them defined but does not read them."""
  given = [f"--{name}" for name in names if flags.FLAGS[name].present]
  if given:
    raise app.UsageError(f"{given}: the benchmarks' flags {script} has no use for")


def check_flags(runs: Mapping[str, Benchmark]) -> Settings:
  """Checks every shared flag against `runs` (the benchmarks this binary can run); raises
  `app.UsageError` naming the flag, the expectation and the value. Starts no work: it
  touches no device and leaves --out as it found it."""
  scale = cast(Scale, SCALE.value)  # DEFINE_enum admits only SCALES
  if not 0 <= SEED.value <= SEED_MAX:
    raise app.UsageError(f"--seed: expected 0 <= seed <= {SEED_MAX}, got {SEED.value}")
  only = _check_only(runs)
  selected = tuple(name for name in runs if selects_benchmark(only, name))
  if REPEATS.value is None:
    repeats = DEFAULT_REPEATS[scale]
  elif REPEATS.value < 1:
    raise app.UsageError(
      f"--repeats: expected >= 1 (unset: {DEFAULT_REPEATS[scale]} at --scale={scale}), got {REPEATS.value}"
    )
  else:
    repeats = REPEATS.value
    if not any(runs[name].timed for name in selected):
      raise app.UsageError(
        f"--repeats: expected unset when no selected benchmark times anything, got {REPEATS.value} "
        f"for {list(selected)}, which time nothing"
      )
  try:
    report.check_out(OUT.value)
  except ValueError as e:
    raise app.UsageError(f"--{e}") from None
  return Settings(scale, SEED.value, repeats, only, OUT.value, selected)


def _check_only(runs: Mapping[str, Benchmark]) -> tuple[str, ...]:
  only = tuple(ONLY.value)
  if ONLY.present and not only:
    raise app.UsageError(
      "--only: expected benchmark or benchmark.part names, got an empty value (omit --only to run all)"
    )
  if "" in only:
    raise app.UsageError(f"--only: expected names without empty entries, got {','.join(only)!r}")
  repeated = sorted(name for name, count in Counter(only).items() if count > 1)
  if repeated:
    raise app.UsageError(f"--only: expected each name once, got {repeated} repeated")
  unknown = [o for o in only if o.split(".", 1)[0] not in runs]
  if unknown:
    raise app.UsageError(
      f"--only: unknown benchmarks {unknown} for this binary, which runs {sorted(runs)}"
      + ("" if len(runs) > 1 else " (python -m paperjax.bench runs every benchmark)")
    )
  valid = {*runs, *(f"{name}.{part}" for name, bench in runs.items() for part in bench.parts)}
  unknown = [o for o in only if o not in valid]
  if unknown:
    raise app.UsageError(f"--only: unknown parts {unknown}; valid names: {sorted(valid)}")
  covered = [o for o in only if "." in o and o.split(".", 1)[0] in only]
  if covered:
    raise app.UsageError(f"--only: expected a part or its whole benchmark, got {covered} beside their benchmark")
  return only


def run_benchmarks(runs: Mapping[str, Benchmark]) -> int:
  """Runs the selected benchmarks, prints the table, writes the report; returns an exit code.

  The flags are checked first (`check_flags`): an unknown benchmark or part in `--only` is a
  usage error listing the valid names. A benchmark that raises, or a selected part that
  records nothing, is reported and the others still run; the exit code is then 1.
  """
  settings = check_flags(runs)
  if not flags.FLAGS["verbosity"].present:  # keep jax's backend probing out of the table, unless asked for
    logging.set_verbosity(logging.WARNING)
  compile_cache.enable()
  env = Environment.current(settings.scale)
  results: list[Result] = []
  failed: list[str] = []
  selected = settings.selected
  for i, name in enumerate(selected, start=1):
    print(f"[{i}/{len(selected)}] {name} (scale={settings.scale})", file=sys.stderr, flush=True)
    ctx = Context(name, settings.scale, settings.seed, settings.repeats, settings.only, env, parts=runs[name].parts)
    start = time.perf_counter()
    try:
      result = runs[name].run(ctx)
    except Exception:  # keep the rest of the suite; the exit code says it failed
      traceback.print_exc()
      failed.append(name)
    else:
      results.append(dataclasses.replace(result, wall_s=time.perf_counter() - start, claims=tuple(ctx.claims)))
      empty = [p for p in ctx.selected_parts() if not ctx.recorded.get(p)]
      if empty or not sum(ctx.recorded.values()):
        print(f"{name}: parts {empty or ['(all)']} recorded nothing", file=sys.stderr)
        failed.append(name)
      parts, produced = ctx.selected_parts(), {c.spec.name for c in ctx.claims}
      missing = [c.name for c in runs[name].claims if (not parts or c.part in parts) and c.name not in produced]
      if missing:  # a registered claim its part did not produce would vanish from the ledger silently
        print(f"{name}: claims {missing} are registered but were not produced", file=sys.stderr)
        failed.append(name)
    print(f"[{i}/{len(selected)}] {name} done in {time.perf_counter() - start:.1f}s", file=sys.stderr)
  paths = report.write(results, env, settings.out)
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
      raise app.UsageError(f"unexpected arguments: {list(argv[1:])} (every setting is a --flag; see --help)")
    return run_benchmarks(runs)

  return main
