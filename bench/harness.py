"""The benchmark harness: records, plots, the run context, timing and progress.

A benchmark is a function `run(ctx: Context) -> Result`. It measures, and returns its
numbers as `Record`s (each beside the paper's value when the paper has one) and its
curves as `Plot` specs; `report.write` renders them. Nothing here draws or prints the
table itself, so a benchmark stays a pure measurement.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import platform
import statistics
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence, Sized
from typing import Any, ClassVar, Literal, NamedTuple, TypeVar

import jax
import numpy as np

from paperjax.ops import checks

# ci: seconds (the smoke test); small: the default, the whole suite within 15 minutes on 2 CPU
# cores; full: the longer CPU experiments (tens of minutes each); paper: the papers' shapes (a GPU).
Scale = Literal["ci", "small", "full", "paper"]
SCALES: tuple[Scale, ...] = ("ci", "small", "full", "paper")
T = TypeVar("T")


@dataclasses.dataclass(frozen=True)
class Environment:
  """Where a number was measured: absolute times mean nothing without it."""

  backend: str
  device_kind: str
  device_count: int
  jax_version: str
  python: str
  scale: Scale

  @classmethod
  def current(cls, scale: Scale) -> Environment:
    device = jax.devices()[0]
    return cls(
      backend=jax.default_backend(),
      device_kind=device.device_kind,
      device_count=jax.device_count(),
      jax_version=jax.__version__,
      python=platform.python_version(),
      scale=scale,
    )


@dataclasses.dataclass(frozen=True)
class Record:
  """One measured number, beside the paper's when there is one.

  `paper_value` is a number, or a qualitative claim ("< 1", "insensitive to order") when
  the paper states no number; `ratio` = value / paper_value when both are numbers.
  """

  benchmark: str
  metric: str
  value: float
  unit: str
  paper_value: float | str | None
  paper_source: str
  environment: Environment

  def __post_init__(self):
    for name in ("benchmark", "metric", "unit"):
      if not isinstance(getattr(self, name), str) or not getattr(self, name).strip():
        raise ValueError(f"record {self.metric!r}: {name} must be a non-empty string, got {getattr(self, name)!r}")
    # A measured value may come out non-finite (a diverged loss): it is reported as 'nan' / 'inf'.
    if isinstance(self.value, bool) or not isinstance(self.value, numbers.Real):
      raise TypeError(f"record {self.metric!r}: value must be a number, got {self.value!r}")
    paper = self.paper_value
    if isinstance(paper, bool) or not (paper is None or isinstance(paper, (numbers.Real, str))):
      raise TypeError(f"record {self.metric!r}: paper_value must be a number, a claim or None, got {paper!r}")
    if isinstance(paper, numbers.Real) and not math.isfinite(paper):
      raise ValueError(f"record {self.metric!r}: paper_value must be finite, got {paper!r}")
    if isinstance(paper, str) and not paper.strip():
      raise ValueError(f"record {self.metric!r}: paper_value must be a non-empty claim or None, got {paper!r}")

  @property
  def ratio(self) -> float | None:
    if isinstance(self.paper_value, (int, float)) and self.paper_value != 0:
      return self.value / self.paper_value
    return None

  def to_json(self) -> dict[str, Any]:
    """A JSON-safe dict: non-finite numbers become the strings 'nan' / 'inf'."""
    row = {**dataclasses.asdict(self), "ratio": self.ratio}
    return {k: str(v) if isinstance(v, float) and not math.isfinite(v) else v for k, v in row.items()}


@dataclasses.dataclass(frozen=True)
class Series:
  label: str
  x: tuple[float, ...]
  y: tuple[float, ...]

  def __post_init__(self):
    if len(self.x) != len(self.y):
      raise ValueError(f"series {self.label!r}: {len(self.x)} x values but {len(self.y)} y values")


@dataclasses.dataclass(frozen=True)
class Plot:
  """A plot as data; `name` becomes the PNG file name `<benchmark>_<name>.png`.

  kind "line" draws each series as a line; "bar" draws every series as bars at the same x
  positions, so a positive and a negative series read as one up/down histogram.
  """

  name: str
  title: str
  xlabel: str
  ylabel: str
  series: tuple[Series, ...]
  xscale: Literal["linear", "log"] = "linear"
  yscale: Literal["linear", "log"] = "linear"
  kind: Literal["line", "bar"] = "line"

  def __post_init__(self):
    if self.kind not in ("line", "bar"):
      raise ValueError(f"plot {self.name!r}: kind must be 'line' or 'bar', got {self.kind!r}")


@dataclasses.dataclass(frozen=True, eq=False)
class Image:
  """A picture as data; `name` becomes the PNG file name `<benchmark>_<name>.png`.

  `pixels` is [height, width, 3] in [0, 1]; each of `lines` is a polyline (xs, ys) in pixel
  coordinates (x = column, y = row) drawn over it.
  """

  name: str
  title: str
  pixels: np.ndarray
  lines: tuple[tuple[tuple[float, ...], tuple[float, ...]], ...] = ()

  def __post_init__(self):
    if self.pixels.ndim != 3 or self.pixels.shape[-1] != 3:
      raise ValueError(f"image {self.name!r}: pixels must be [height, width, 3], got shape {self.pixels.shape}")
    if not (np.isfinite(self.pixels).all() and self.pixels.min() >= 0 and self.pixels.max() <= 1):
      raise ValueError(f"image {self.name!r}: pixels must lie in [0, 1]")
    for xs, ys in self.lines:
      if len(xs) != len(ys):
        raise ValueError(f"image {self.name!r}: a line has {len(xs)} x values but {len(ys)} y values")


Verdict = Literal["holds", "fails", "undecided"]
# Why a claim is undecided, each with the words the ledger prints.
REASONS = {
  "budget": "the budget at this scale",
  "needs a GPU": "needs a GPU",
  "margin": "the measurement cannot resolve the margin",
  "reference did not learn": "the reference model did not learn the task",
  "nothing to compare": "the run produced nothing to compare",
}
Reason = Literal["budget", "needs a GPU", "margin", "reference did not learn", "nothing to compare"]
Op = Literal[">", "<", "|x| <="]


def verdict_text(verdict: str, reason: str | None) -> str:
  """ "holds", "fails" or "undecided: <the reason in words>", as the ledger prints it."""
  return verdict if reason is None else f"undecided: {REASONS[reason]}"


Over = Literal["each seed", "mean", "mean ± k sd"]
_Outcome = Literal["pass", "fail", "unresolved"]


@checks.config
class Test:
  """One condition on one statistic's per-seed values x_1..x_n, as data.

  `op` compares a value with `bound`: x > bound, x < bound, or |x| <= bound. `over` says
  which values must satisfy it:
    "each seed"    pass if every x_s does, fail if none does, otherwise unresolved;
    "mean"         pass if the mean does, fail otherwise (a deterministic measurement, or a
                   practical-size condition beside a spread condition);
    "mean ± k sd"  pass if every point of [mean - k sd, mean + k sd] does, fail if none
                   does, otherwise unresolved (sd over the seeds, ddof 1; n >= 2).
  """

  __test__: ClassVar[bool] = False  # a statistical test, not one for pytest to collect

  statistic: str
  op: Op
  bound: float
  over: Over = "each seed"
  k: checks.PositiveFloat = 2.0

  def __post_init__(self):  # after checks.config's type, range and Literal checks
    if not self.statistic.strip():
      raise ValueError(f"Test.statistic: expected a non-empty name, got {self.statistic!r}")

  @property
  def text(self) -> str:
    x = {"each seed": "for every seed", "mean": "for the mean", "mean ± k sd": f"over mean ± {self.k:g} sd"}
    cond = (
      f"|{self.statistic}| <= {self.bound:g}" if self.op == "|x| <=" else f"{self.statistic} {self.op} {self.bound:g}"
    )
    return f"{cond} {x[self.over]}"

  def outcome(self, values: Sequence[float]) -> _Outcome:
    x = np.asarray(values, np.float64)
    if x.ndim != 1 or not x.size or not np.isfinite(x).all():
      return "fail" if x.size and np.isnan(x).any() else "unresolved"  # a diverged run fails its test
    if self.over == "mean":
      return "pass" if self._passes(np.array([x.mean()]))[0] else "fail"
    if self.over == "mean ± k sd":
      if x.size < 2:
        return "unresolved"
      m, sd = x.mean(), x.std(ddof=1)
      x = np.array([m - self.k * sd, m, m + self.k * sd])
      if self.op == "|x| <=" and x[0] < -self.bound < self.bound < x[2]:  # an interval around the band
        return "unresolved"
    passes = self._passes(x)
    return "pass" if passes.all() else "fail" if not passes.any() else "unresolved"

  def _passes(self, x: np.ndarray) -> np.ndarray:
    if self.op == ">":
      return x > self.bound
    if self.op == "<":
      return x < self.bound
    return np.abs(x) <= self.bound


@checks.config
class Rule:
  """How a claim is decided, fixed before the run: `decide` is the one interpreter.

  holds if every test passes; fails if any test fails; otherwise undecided (the margin). It
  is undecided instead, whatever the tests say, when a `requires` test does not pass (for the
  reason `unmet`: the reference model did not learn the task, so a comparison means nothing,
  or the run produced nothing to compare),
  below the scale `decided_at` (the budget), off a GPU when `gpu`, and when a test's
  statistic has no values (nothing to compare: the measurement could not be made).
  """

  tests: tuple[Test, ...]
  requires: tuple[Test, ...] = ()
  unmet: Reason = "reference did not learn"  # the reason given when a `requires` test does not pass
  decided_at: Scale = "small"
  gpu: bool = False

  def __post_init__(self):  # after checks.config's checks of each field
    if not self.tests:
      raise ValueError("Rule.tests: expected at least one Test, got ()")

  @property
  def statistics(self) -> tuple[str, ...]:
    return tuple(dict.fromkeys(t.statistic for t in (*self.tests, *self.requires)))

  @property
  def text(self) -> str:
    false = {"each seed": "for every seed", "mean": "for the mean", "mean ± k sd": "over the whole mean ± k sd"}
    kinds = dict.fromkeys(t.over for t in self.tests)
    text = "holds if " + " and ".join(t.text for t in self.tests)
    text += "; fails if one of these is false " + " or ".join(false[k] for k in kinds) + "; otherwise undecided"
    if self.requires:
      text += "; undecided unless " + " and ".join(t.text for t in self.requires)
    if self.gpu:
      text += "; decided on a GPU"
    if self.decided_at != "small":
      text += f"; decided at --scale={self.decided_at} or larger"
    return text

  def decide(self, values: Mapping[str, Sequence[float]], *, scale: Scale, gpu: bool) -> tuple[Verdict, Reason | None]:
    """(verdict, reason if undecided) from the per-seed values of each statistic."""
    missing = sorted(set(self.statistics) - set(values))
    if missing:
      raise ValueError(f"values: the rule needs the statistics {missing}, got {sorted(values)}")
    if self.gpu and not gpu:
      return "undecided", "needs a GPU"
    if SCALES.index(scale) < SCALES.index(self.decided_at):
      return "undecided", "budget"
    if any(t.outcome(values[t.statistic]) != "pass" for t in self.requires):
      return "undecided", self.unmet
    if any(not len(values[t.statistic]) for t in self.tests):  # a measurement that could not be made
      return "undecided", "nothing to compare"
    outcomes = [t.outcome(values[t.statistic]) for t in self.tests]
    if all(o == "pass" for o in outcomes):
      return "holds", None
    if "fail" in outcomes:
      return "fails", None
    return "undecided", "margin"


@checks.config
class ClaimSpec:
  """A paper's claim and its rule, declared in a benchmark module's CLAIMS before any run.

  `name` is unique within the benchmark; `part` is the part that measures it; `source` the
  paper and where in it (table, figure, section); `claim` the paper's words.
  """

  name: str
  part: str
  source: str
  claim: str
  rule: Rule

  def __post_init__(self):  # after checks.config's checks of each field
    for field in ("name", "part", "source", "claim"):
      if not getattr(self, field).strip():
        raise ValueError(f"ClaimSpec.{field}: expected a non-empty string, got {getattr(self, field)!r}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class Claim:
  """A claim decided in one run: the spec, the per-seed values of each statistic, the
  verdict (and the reason when undecided), the scale and the command that reproduces it."""

  benchmark: str
  spec: ClaimSpec
  seeds: tuple[int, ...]
  values: dict[str, tuple[float, ...]]
  verdict: Verdict
  reason: Reason | None
  scale: Scale
  command: str
  note: str = ""  # what the numbers mean beyond the rule (a diagnosis, a different baseline)

  def __post_init__(self):
    if self.verdict not in ("holds", "fails", "undecided"):
      raise ValueError(f"claim {self.spec.name!r}: verdict must be holds, fails or undecided, got {self.verdict!r}")
    if (self.verdict == "undecided") != (self.reason in REASONS):
      raise ValueError(f"claim {self.spec.name!r}: an undecided verdict needs a reason from {list(REASONS)}")
    if not self.command.strip():
      raise ValueError(f"claim {self.spec.name!r}: command must say how to reproduce it")

  @property
  def key(self) -> str:
    return f"{self.benchmark}/{self.spec.name}"

  def measured(self) -> str:
    """Each statistic as mean ± sd (n), or its single value."""

    def one(x: tuple[float, ...]) -> str:
      if len(x) < 2:
        return f"{x[0]:.4g}" if x else "—"
      return f"{statistics.fmean(x):.4g} ± {statistics.stdev(x):.2g} (n={len(x)})"

    return "; ".join(f"{name} {one(x)}" for name, x in self.values.items())

  def verdict_text(self) -> str:
    return verdict_text(self.verdict, self.reason)

  def to_json(self) -> dict[str, Any]:
    finite = lambda v: v if math.isfinite(v) else str(v)
    return {
      "key": self.key,
      "benchmark": self.benchmark,
      "name": self.spec.name,
      "part": self.spec.part,
      "source": self.spec.source,
      "claim": self.spec.claim,
      "rule": self.spec.rule.text,
      "seeds": list(self.seeds),
      "values": {k: [finite(float(v)) for v in x] for k, x in self.values.items()},
      "measured": self.measured(),
      "verdict": self.verdict,
      "reason": self.reason,
      "scale": self.scale,
      "command": self.command,
      "note": self.note,
    }


@dataclasses.dataclass(frozen=True)
class Result:
  benchmark: str
  records: tuple[Record, ...]
  plots: tuple[Plot, ...] = ()
  notes: tuple[str, ...] = ()
  wall_s: float | None = None  # the whole run's wall time, set by the runner
  images: tuple[Image, ...] = ()
  claims: tuple[Claim, ...] = ()  # set by the runner from the Context's `claim` calls

  def __post_init__(self):
    if not isinstance(self.benchmark, str) or not self.benchmark.strip():
      raise ValueError(f"result: benchmark must be a non-empty string, got {self.benchmark!r}")
    others = sorted({r.benchmark for r in self.records} - {self.benchmark})
    if others:
      raise ValueError(f"result {self.benchmark!r}: records must be its own, got records of {others}")
    if self.wall_s is not None and not (math.isfinite(self.wall_s) and self.wall_s >= 0):
      raise ValueError(f"result {self.benchmark!r}: wall_s must be finite and >= 0, got {self.wall_s!r}")
    names = [plot.name for plot in self.plots] + [image.name for image in self.images]
    repeated = sorted(name for name in set(names) if names.count(name) > 1)
    if repeated:  # each becomes the file <benchmark>_<name>.png: one would overwrite the other
      raise ValueError(f"result {self.benchmark!r}: plot and image names must be unique, got {repeated} repeated")
    unsafe = [name for name in names if not name or "/" in name or "\\" in name or name.startswith(".")]
    if unsafe:
      raise ValueError(f"result {self.benchmark!r}: plot and image names must be file names, got {unsafe}")

  @classmethod
  def from_parts(cls, benchmark: str, parts: Sequence[tuple[Sequence[Record], Plot, str]]) -> Result:
    """One result from the (records, plot, note) of each part that ran."""
    return cls(
      benchmark,
      tuple(r for records, _, _ in parts for r in records),
      tuple(plot for _, plot, _ in parts),
      tuple(note for _, _, note in parts),
    )


@dataclasses.dataclass(frozen=True)
class Context:
  """What one benchmark run is asked for (from the shared absl flags).

  `parts` are the benchmark's declared parts (None: not checked). Records are counted per
  part (the last part `wants` said yes to), so the runner can tell a part that recorded
  nothing.
  """

  benchmark: str
  scale: Scale
  seed: int
  repeats: int
  only: tuple[str, ...]
  environment: Environment
  parts: tuple[str, ...] | None = None
  recorded: dict[str | None, int] = dataclasses.field(default_factory=dict, compare=False, repr=False)
  claims: list[Claim] = dataclasses.field(default_factory=list, compare=False, repr=False)
  _current: list[str | None] = dataclasses.field(default_factory=lambda: [None], compare=False, repr=False)

  def __post_init__(self):
    if self.scale not in SCALES:
      raise ValueError(f"scale: expected one of {SCALES}, got {self.scale!r}")
    if isinstance(self.repeats, bool) or not isinstance(self.repeats, int) or self.repeats < 1:
      raise ValueError(f"repeats: expected an int >= 1, got {self.repeats!r}")
    if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
      raise ValueError(f"seed: expected an int >= 0, got {self.seed!r}")

  def wants(self, part: str) -> bool:
    """True if `--only` is empty or names this benchmark or `<benchmark>.<part>`."""
    if self.parts is not None and part not in self.parts:
      raise ValueError(f"part: {part!r} is not among {self.benchmark}'s declared PARTS {self.parts}")
    chosen = not self.only or any(o in (self.benchmark, f"{self.benchmark}.{part}") for o in self.only)
    if chosen:
      self._current[0] = part
    return chosen

  def selected_parts(self) -> tuple[str, ...]:
    """The declared parts `--only` selects (all of them when it names the benchmark or nothing)."""
    if not self.parts or not self.only or self.benchmark in self.only:
      return self.parts or ()
    return tuple(p for p in self.parts if f"{self.benchmark}.{p}" in self.only)

  def record(
    self,
    metric: str,
    value: float,
    unit: str,
    paper_value: float | str | None = None,
    paper_source: str = "",
  ) -> Record:
    self.recorded[self._current[0]] = self.recorded.get(self._current[0], 0) + 1
    return Record(self.benchmark, metric, float(value), unit, paper_value, paper_source, self.environment)

  def claim(
    self,
    spec: ClaimSpec,
    values: Mapping[str, Sequence[float] | np.ndarray | float],
    *,
    seeds: Sequence[int] = (),
    note: str = "",
  ) -> Claim:
    """Decides `spec` on the per-seed `values` of its rule's statistics (a number: one
    measurement; given `seeds`, each statistic has one value per seed, one, or none) and keeps
    the claim for the run's Result. The command reruns its part at
    this scale and seed."""
    if self.parts is not None and spec.part not in self.parts:
      raise ValueError(f"claim {spec.name!r}: part {spec.part!r} is not among {self.benchmark}'s PARTS {self.parts}")
    per_seed = {
      k: tuple(float(x) for x in (v if isinstance(v, Sequence | np.ndarray) else [v])) for k, v in values.items()
    }
    if seeds:  # a per-seed statistic with another count of values would pair values with the wrong seeds
      wrong = {k: len(v) for k, v in per_seed.items() if len(v) not in (0, 1, len(seeds))}
      if wrong:
        raise ValueError(f"claim {spec.name!r}: {len(seeds)} seeds, but statistics with other counts {wrong}")
    verdict, reason = spec.rule.decide(per_seed, scale=self.scale, gpu=self.environment.backend == "gpu")
    command = f"python -m paperjax.bench.{self.benchmark} --scale={self.scale} --only={self.benchmark}.{spec.part}"
    command += f" --seed={self.seed}"
    claim = Claim(
      benchmark=self.benchmark,
      spec=spec,
      seeds=tuple(int(s) for s in seeds) or (self.seed,),
      values=per_seed,
      verdict=verdict,
      reason=reason,
      scale=self.scale,
      command=command,
      note=note,
    )
    if any(c.spec.name == spec.name for c in self.claims):
      raise ValueError(f"claim {spec.name!r}: decided twice in one run of {self.benchmark}")
    self.claims.append(claim)
    return claim


class Benchmark(NamedTuple):
  """A benchmark binary's `run` and the parts it splits into (`--only=<name>.<part>`)."""

  run: Callable[[Context], Result]
  parts: tuple[str, ...] = ()  # () = one undivided part
  timed: bool = True  # False: it times nothing, so `--repeats` is a usage error rather than ignored
  claims: tuple[ClaimSpec, ...] = ()  # the claims its parts decide (a module's CLAIMS)


def selects_benchmark(only: Sequence[str], benchmark: str) -> bool:
  """Whether `--only` (benchmark or benchmark.part names) selects any of `benchmark`."""
  return not only or any(o.split(".", 1)[0] == benchmark for o in only)


class Timing(NamedTuple):
  median_s: float
  times_s: tuple[float, ...]


def time_fn(fn: Callable[..., Any], *args, repeats: int = 5, warmup: int = 1, **kwargs) -> Timing:
  """Median wall time of fn(*args, **kwargs) over `repeats` calls after `warmup` calls.

  Warm-up calls absorb compilation; every call blocks until its outputs are ready, so
  asynchronous dispatch never hides work. Works for numpy baselines too.
  """
  if repeats < 1 or warmup < 0:
    raise ValueError(f"repeats, warmup: expected >= 1 and >= 0, got {repeats}, {warmup}")
  for _ in range(warmup):
    jax.block_until_ready(fn(*args, **kwargs))
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args, **kwargs))
    times.append(time.perf_counter() - start)
  return Timing(statistics.median(times), tuple(times))


def progress(
  items: Iterable[T],
  desc: str,
  *,
  total: int | None = None,
  stream=None,
  min_interval_s: float = 10.0,
) -> Iterator[T]:
  """Yields `items`, showing `desc [i/total] elapsed, eta` on stderr.

  On a terminal the line redraws in place; elsewhere (CI logs) a line is printed at most
  every `min_interval_s` seconds, plus the last.
  """
  stream = sys.stderr if stream is None else stream
  total = total if total is not None else (len(items) if isinstance(items, Sized) else None)
  tty = hasattr(stream, "isatty") and stream.isatty()
  start = last = time.perf_counter()

  def show(done: int, final: bool) -> None:
    elapsed = time.perf_counter() - start
    count = f"{done}/{total}" if total else str(done)
    eta = f", eta {elapsed / done * (total - done):.0f}s" if total and done and not final else ""
    line = f"{desc} [{count}] {elapsed:.1f}s{eta}"
    stream.write(("\r" + line + ("\n" if final else "")) if tty else line + "\n")
    stream.flush()

  done = 0
  for item in items:
    yield item
    done += 1
    now = time.perf_counter()
    if tty or now - last >= min_interval_s:
      if not (total and done == total):
        show(done, final=False)
      last = now
  show(done, final=True)
