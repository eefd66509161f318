"""Bad input never passes silently (issue 31): each bad flag of the suite binary and of every
benchmark binary is a usage error naming the flag, the expectation and the value, raised
before any work starts; the harness's records, results and report refuse bad values too.

The binaries' own `main`s run in-process: `_binary` executes `python -m <module>`'s
`__main__` block with `absl.app.run` captured, so each case parses its argv into the shared
flags and calls that `main`, as `app.run` would, without a ~4 s jax import per case.
`test_end_to_end_exit_code_and_stderr` runs two binaries as processes.
"""

from __future__ import annotations

import functools
import json
import math
import runpy
import subprocess
import sys
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import pytest
from absl import app, flags, logging

from paperjax.bench import cli, registry, report
from paperjax.bench.harness import (
  SCALES,
  Benchmark,
  Context,
  Environment,
  Image,
  Plot,
  Record,
  Result,
  Series,
)

SUITE = "paperjax.bench"
GPU_CHECK = "paperjax.bench.gpu_check"
BINARIES = (SUITE, *(f"paperjax.bench.{name}" for name in registry.BENCHMARKS), GPU_CHECK)
ENV = Environment("cpu", "cpu", 8, "0.0", "3.11", "ci")
FILE = "{file}"  # an existing file (a placeholder, filled per test); {tmp} is the test's folder


class WorkStarted(BaseException):  # not an Exception: the runner's `except Exception` must not swallow it
  pass


@functools.cache
def _binary(module: str) -> tuple[Callable[[Sequence[str]], Any], dict[str, Any]]:
  """The `main` that `python -m module` hands to `app.run`, and the flag defaults its
  `__main__` block sets (gpu_check's); those defaults are undone here and set per call."""
  captured: list[Callable] = []
  saved = {name: flags.FLAGS[name].default for name in ("scale", "out", "only", "seed", "repeats")}
  run, app.run = app.run, captured.append  # type: ignore[assignment]
  try:
    with warnings.catch_warnings():
      warnings.simplefilter("ignore", RuntimeWarning)  # runpy: the module is already imported
      runpy.run_module(module, run_name="__main__", alter_sys=False)
  finally:
    app.run = run
    defaults = {name: flags.FLAGS[name].default for name in saved if flags.FLAGS[name].default != saved[name]}
    for name, value in saved.items():
      flags.FLAGS.set_default(name, value)
  (main,) = captured
  return main, defaults


def _call(module: str, args: Sequence[str]) -> Any:
  """`python -m module *args`, in-process: absl parses the flags, then the binary's main runs."""
  main, defaults = _binary(module)
  saved = {name: flags.FLAGS[name].default for name in defaults}
  try:
    for name, value in defaults.items():
      flags.FLAGS.set_default(name, value)
    return main(flags.FLAGS([module, *args]))
  finally:
    flags.FLAGS.unparse_flags()
    for name, value in saved.items():
      flags.FLAGS.set_default(name, value)


@pytest.fixture
def no_work(monkeypatch):
  """Every step of a run after the flag check fails the test: the cases must stop before it."""

  def started(*args, **kwargs):
    raise WorkStarted("work started before the bad input was refused")

  monkeypatch.setattr(cli.compile_cache, "enable", started)
  monkeypatch.setattr(cli.Environment, "current", started)
  monkeypatch.setattr(cli, "Context", started)
  monkeypatch.setattr(cli.report, "write", started)


def _other(name: str) -> str:
  return registry.BENCHMARKS[(registry.BENCHMARKS.index(name) + 1) % len(registry.BENCHMARKS)]


U, BAD_VALUE, UNKNOWN = app.UsageError, flags.IllegalFlagValueError, flags.UnrecognizedFlagError
CASES = [
  # The suite binary.
  pytest.param(
    [SUITE, "--repeats=0"], U, r"--repeats: expected >= 1 \(unset: 3 at --scale=small\), got 0", id="repeats-0"
  ),
  pytest.param([SUITE, "--repeats=-2", "--scale=ci"], U, r"--repeats: expected >= 1 .*, got -2", id="repeats-neg"),
  pytest.param([SUITE, "--repeats=two"], BAD_VALUE, "--repeats=two", id="repeats-not-int"),
  pytest.param([SUITE, "--repeat=3"], UNKNOWN, "'repeat'", id="repeats-typo"),
  pytest.param([SUITE, "--seed=-1"], U, r"--seed: expected 0 <= seed <= 4294967295, got -1", id="seed-neg"),
  pytest.param([SUITE, f"--seed={2**32}"], U, r"--seed: .* got 4294967296", id="seed-over-uint32"),
  pytest.param([SUITE, "--seed=1.5"], BAD_VALUE, "--seed=1.5", id="seed-float"),
  pytest.param([SUITE, "--scale=huge"], BAD_VALUE, "--scale=huge", id="scale-unknown"),
  pytest.param(
    [SUITE, "--only="], U, "--only: expected benchmark or benchmark.part names, got an empty", id="only-empty"
  ),
  pytest.param(
    [SUITE, "--only=bigram,,llama"],
    U,
    r"--only: expected names without empty entries, got 'bigram,,llama'",
    id="only-empty-entry",
  ),
  pytest.param([SUITE, "--only=bigram,"], U, "--only: expected names without empty entries", id="only-trailing-comma"),
  pytest.param(
    [SUITE, "--only=bigram,llama,bigram"], U, r"--only: expected each name once, got \['bigram'\]", id="only-duplicate"
  ),
  pytest.param(
    [SUITE, "--only=bigram,bigram.fit"],
    U,
    r"--only: expected a part or its whole benchmark, got \['bigram.fit'\]",
    id="only-part-and-benchmark",
  ),
  pytest.param([SUITE, "--only=nope"], U, r"--only: unknown benchmarks \['nope'\]", id="only-unknown"),
  pytest.param(
    [SUITE, "--only=bigram.nope"], U, r"--only: unknown parts \['bigram.nope'\]; valid names: ", id="only-unknown-part"
  ),
  pytest.param([SUITE, "--only=bigram.fit.x"], U, r"--only: unknown parts \['bigram.fit.x'\]", id="only-nested-part"),
  pytest.param(
    [SUITE, "--only=align,interactions", "--repeats=3"],
    U,
    r"--repeats: expected unset .* got 3 for \['align', 'interactions'\]",
    id="repeats-untimed",
  ),
  pytest.param([SUITE, "extra"], U, r"unexpected arguments: \['extra'\]", id="positional"),
  pytest.param([SUITE, "--scale=ci", "results"], U, r"unexpected arguments: \['results'\]", id="positional-out"),
  pytest.param([SUITE, f"--out={FILE}"], U, r"--out: expected a folder .*, got '.*report.txt'", id="out-file"),
  pytest.param(
    [SUITE, f"--out={FILE}/sub"], U, r"--out: .* \(its parent '.*report.txt' is a file\)", id="out-under-file"
  ),
  pytest.param([SUITE, "--out="], U, r"--out: expected a folder path, got ''", id="out-empty"),
  pytest.param(
    [SUITE, "--out=/proc/paperjax-results"],
    U,
    r"--out: expected a folder this process can write in",
    id="out-unwritable",
    marks=pytest.mark.skipif(sys.platform != "linux", reason="/proc"),
  ),
  # Each benchmark binary runs its own benchmark only: another's name, or its part, is an error.
  *(
    pytest.param(
      [f"paperjax.bench.{name}", f"--only={_other(name)}"],
      U,
      rf"--only: unknown benchmarks \['{_other(name)}'\] for this binary, which runs \['{name}'\] "
      r"\(python -m paperjax.bench runs every benchmark\)",
      id=f"{name}-only-other",
    )
    for name in registry.BENCHMARKS
  ),
  pytest.param(
    ["paperjax.bench.bigram", "--only=llama.cache"],
    U,
    r"--only: unknown benchmarks \['llama.cache'\] for this binary",
    id="bigram-only-other-part",
  ),
  pytest.param(
    ["paperjax.bench.bigram", "--only=bigram.nosuchpart"],
    U,
    r"valid names: \['bigram', 'bigram.fit',",
    id="bigram-only-unknown-part",
  ),
  pytest.param(["paperjax.bench.llama", "--repeats=0"], U, "--repeats: expected >= 1", id="llama-repeats-0"),
  pytest.param(["paperjax.bench.maxsim", "--seed=-5"], U, "--seed: expected 0 <= seed", id="maxsim-seed-neg"),
  pytest.param(
    ["paperjax.bench.align", "--repeats=3"],
    U,
    r"--repeats: expected unset .* for \['align'\], which time nothing",
    id="align-repeats",
  ),
  pytest.param(
    ["paperjax.bench.interactions", "--scale=ci", "--repeats=1"],
    U,
    r"--repeats: .* \['interactions'\]",
    id="interactions-repeats",
  ),
  pytest.param(
    ["paperjax.bench.jrt", "--only=jrt.recall,jrt.recall"],
    U,
    r"--only: expected each name once, got \['jrt.recall'\]",
    id="jrt-only-duplicate",
  ),
  pytest.param(
    ["paperjax.bench.quant", "--only=quant.bound,quant"],
    U,
    r"--only: expected a part or its whole .* \['quant.bound'\]",
    id="quant-only-part-and-benchmark",
  ),
  pytest.param(
    ["paperjax.bench.serving", "--scale=ci", "memory"],
    U,
    r"unexpected arguments: \['memory'\]",
    id="serving-positional",
  ),
  pytest.param(["paperjax.bench.excp", f"--out={FILE}"], U, "--out: expected a folder", id="excp-out-file"),
  pytest.param(
    ["paperjax.bench.sae", "--only="], U, "--only: expected benchmark or benchmark.part names", id="sae-only-empty"
  ),
  pytest.param(
    ["paperjax.bench.parallel", "--only=parallel.pipeline,"],
    U,
    "--only: expected names without empty entries",
    id="parallel-only-trailing-comma",
  ),
  pytest.param(
    ["paperjax.bench.tora", f"--seed={2**40}"],
    U,
    "--seed: expected 0 <= seed <= 4294967295, got 1099511627776",
    id="tora-seed-big",
  ),
  # gpu_check checks its flags before it looks for a GPU, so a bad flag fails on CPU too.
  pytest.param(
    [GPU_CHECK, "--repeats=0"], U, "--repeats: expected >= 1 \\(unset: 10 at --scale=paper\\)", id="gpu_check-repeats-0"
  ),
  pytest.param(
    [GPU_CHECK, "--only=gpu_matmul,gpu_matmul"],
    U,
    r"--only: expected each name once, got \['gpu_matmul'\]",
    id="gpu_check-only-duplicate",
  ),
  pytest.param(
    [GPU_CHECK, "--only=bigram"],
    U,
    r"--only: unknown benchmarks \['bigram'\] for this binary, which runs \['gpu_matmul',",
    id="gpu_check-only-not-its-own",
  ),
  pytest.param([GPU_CHECK, f"--out={FILE}"], U, "--out: expected a folder", id="gpu_check-out-file"),
]


@pytest.mark.parametrize(("argv", "error", "match"), CASES)
def test_bad_flags_are_usage_errors_before_any_work(argv, error, match, tmp_path, monkeypatch, no_work):
  monkeypatch.chdir(tmp_path)  # the default --out=results is made here, if anywhere
  (tmp_path / "report.txt").write_text("keep me")
  argv = [a.replace(FILE, str(tmp_path / "report.txt")) for a in argv]
  with pytest.raises(error, match=match):
    _call(argv[0], argv[1:])
  assert sorted(p.name for p in tmp_path.iterdir()) == ["report.txt"]  # nothing made, nothing left behind
  assert (tmp_path / "report.txt").read_text() == "keep me"


def test_the_cases_cover_every_binary():
  assert {argv[0] for argv, *_ in (case.values for case in CASES)} == set(BINARIES)
  assert len(CASES) >= 25


@pytest.mark.parametrize("module", BINARIES)
def test_good_flags_pass_the_check(module, tmp_path, monkeypatch, no_work):
  """The guard is live: with good flags every binary gets past the check to its first step of
  work (gpu_check, on CPU, to saying there is no GPU), so the cases above fail for their flag."""
  monkeypatch.chdir(tmp_path)
  args = ["--scale=ci", "--seed=4294967295", f"--out={tmp_path / 'new' / 'out'}"]
  if module not in (SUITE, GPU_CHECK) and registry.load(module.rsplit(".", 1)[1]).timed:
    args.append("--repeats=1")
  if module == GPU_CHECK:
    assert _call(module, args) == 0
  else:
    with pytest.raises(WorkStarted):
      _call(module, args)
  assert not (tmp_path / "new").exists()  # checked, not made: a refused run leaves no folder


def test_out_is_checked_before_any_benchmark_runs(tmp_path, monkeypatch):
  ran = []
  demo = {"demo": Benchmark(lambda ctx: ran.append(ctx) or pytest.fail("the benchmark ran"), ("a",))}
  monkeypatch.setattr(report, "write", lambda *a: pytest.fail("the report was written"))
  (tmp_path / "taken").write_text("x")
  try:
    flags.FLAGS(["prog", "--scale=ci", f"--out={tmp_path / 'taken'}"])
    with pytest.raises(
      app.UsageError, match=r"--out: expected a folder or a path where one can be made, got '.*taken'"
    ):
      cli.run_benchmarks(demo)
    assert ran == []
  finally:
    flags.FLAGS.unparse_flags()


def test_repeats_help_lists_the_default_of_every_scale():
  assert set(cli.DEFAULT_REPEATS) == set(SCALES)
  help_text = flags.FLAGS["repeats"].help
  assert "default by scale: ci 2, small 3, full 5, paper 10" in help_text
  assert all(f"{scale} {n}" in help_text for scale, n in cli.DEFAULT_REPEATS.items())


def test_verbosity_is_honoured_and_repeats_unset_takes_the_scale_default(tmp_path):
  """--verbosity was overwritten by the runner's WARNING level: a flag silently ignored."""
  seen = []

  def run(ctx):
    seen.append((logging.get_verbosity(), ctx.repeats))
    return Result(ctx.benchmark, (ctx.record("x", 1.0, "x"),))

  before = logging.get_verbosity()
  try:
    for extra, expected in (([], (logging.WARNING, 2)), (["--verbosity=1", "--repeats=7"], (1, 7))):
      flags.FLAGS(["prog", "--scale=ci", f"--out={tmp_path}", *extra])
      assert cli.run_benchmarks({"demo": Benchmark(run)}) == 0
      assert seen[-1] == expected
      flags.FLAGS.unparse_flags()
  finally:
    flags.FLAGS.unparse_flags()
    logging.set_verbosity(before)


def test_end_to_end_exit_code_and_stderr(tmp_path):
  """Two binaries as a user runs them, side by side: a non-zero exit, the message, no output."""
  (tmp_path / "file").write_text("keep me")
  runs = {
    "--repeats: expected >= 1 (unset: 2 at --scale=ci), got 0": [SUITE, "--scale=ci", "--repeats=0", "--out=out"],
    f"--out: expected a folder or a path where one can be made, got '{tmp_path / 'file'}'": [
      "paperjax.bench.bigram",
      f"--out={tmp_path / 'file'}",
    ],
  }
  procs = {
    message: subprocess.Popen(
      [sys.executable, "-m", *argv], cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    for message, argv in runs.items()
  }
  for message, proc in procs.items():
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 1, stderr[-2000:]
    assert message in stderr and stdout == ""
  assert sorted(p.name for p in tmp_path.iterdir()) == ["file"] and (tmp_path / "file").read_text() == "keep me"


# The harness: a bad record, result, context or report path is refused where it is made.
REC = dict(benchmark="demo", metric="m", value=1.0, unit="x", paper_value=None, paper_source="", environment=ENV)
HARNESS_CASES = [
  pytest.param(
    lambda: Record(**{**REC, "metric": ""}), ValueError, "metric must be a non-empty string", id="record-empty-metric"
  ),
  pytest.param(
    lambda: Record(**{**REC, "unit": " "}), ValueError, "unit must be a non-empty string", id="record-blank-unit"
  ),
  pytest.param(
    lambda: Record(**{**REC, "benchmark": ""}),
    ValueError,
    "benchmark must be a non-empty string",
    id="record-empty-benchmark",
  ),
  pytest.param(
    lambda: Record(**{**REC, "value": "3"}), TypeError, "value must be a number, got '3'", id="record-str-value"
  ),
  pytest.param(
    lambda: Record(**{**REC, "value": True}), TypeError, "value must be a number, got True", id="record-bool-value"
  ),
  pytest.param(
    lambda: Record(**{**REC, "paper_value": math.nan}),
    ValueError,
    "paper_value must be finite, got nan",
    id="record-nan-paper",
  ),
  pytest.param(
    lambda: Record(**{**REC, "paper_value": -math.inf}), ValueError, "paper_value must be finite", id="record-inf-paper"
  ),
  pytest.param(
    lambda: Record(**{**REC, "paper_value": ""}),
    ValueError,
    "paper_value must be a non-empty claim",
    id="record-empty-claim",
  ),
  pytest.param(
    lambda: Record(**{**REC, "paper_value": [1.0]}),
    TypeError,
    "paper_value must be a number, a claim or None",
    id="record-list-paper",
  ),
  pytest.param(
    lambda: Result("", ()), ValueError, "result: benchmark must be a non-empty string", id="result-empty-name"
  ),
  pytest.param(
    lambda: Result("other", (Record(**REC),)),
    ValueError,
    r"records must be its own, got records of \['demo'\]",
    id="result-foreign-records",
  ),
  pytest.param(
    lambda: Result("demo", (), wall_s=math.nan),
    ValueError,
    "wall_s must be finite and >= 0, got nan",
    id="result-nan-wall",
  ),
  pytest.param(
    lambda: Result("demo", (), wall_s=-1.0), ValueError, "wall_s must be finite and >= 0", id="result-negative-wall"
  ),
  pytest.param(
    lambda: Result("demo", (), (Plot("p", "t", "x", "y", ()),) * 2),
    ValueError,
    r"names must be unique, got \['p'\]",
    id="result-duplicate-plots",
  ),
  pytest.param(
    lambda: Result("demo", (), (Plot("p", "t", "x", "y", ()),), images=(Image("p", "t", np.zeros((1, 1, 3))),)),
    ValueError,
    "must be unique",
    id="result-plot-image-clash",
  ),
  pytest.param(
    lambda: Result("demo", (), (Plot("../p", "t", "x", "y", ()),)),
    ValueError,
    r"must be file names, got \['../p'\]",
    id="result-path-plot-name",
  ),
  pytest.param(
    lambda: Context("demo", "ci", 0, 0, (), ENV),
    ValueError,
    "repeats: expected an int >= 1, got 0",
    id="context-repeats-0",
  ),
  pytest.param(
    lambda: Context("demo", "ci", -1, 2, (), ENV),
    ValueError,
    "seed: expected an int >= 0, got -1",
    id="context-seed-neg",
  ),
  pytest.param(
    lambda: Context("demo", "huge", 0, 2, (), ENV), ValueError, "scale: expected one of", id="context-scale"
  ),  # type: ignore[arg-type]
  pytest.param(
    lambda: report.write([Result("demo", ())] * 2, ENV, "unused"),
    ValueError,
    r"results: expected one result per benchmark, got \['demo'\]",
    id="report-duplicate-results",
  ),
  pytest.param(lambda: report.check_out(""), ValueError, "out: expected a folder path, got ''", id="report-empty-out"),
]


@pytest.mark.parametrize(("make", "error", "match"), HARNESS_CASES)
def test_harness_refuses_bad_values(make, error, match, tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  with pytest.raises(error, match=match):
    make()
  assert list(tmp_path.iterdir()) == []


def test_a_measured_nan_is_reported_and_a_report_over_a_file_is_refused(tmp_path):
  """A non-finite measurement is data (shown as 'nan'), in a record as in a plot's series: the
  report is written (the plots' JSON used to fail at the end of the run). A file as `out` is a
  ValueError naming it, before anything is written."""
  ctx = Context("demo", "ci", 0, 2, (), ENV)
  result = Result(
    "demo",
    (ctx.record("loss", math.nan, "nats"),),
    (Plot("p", "t", "x", "y", (Series("s", (1.0, 2.0), (1.0, math.inf)),)),),
  )
  paths = report.write([result], ENV, tmp_path / "out")
  payload = json.loads(paths["json"].read_text())
  assert payload["records"][0]["value"] == "nan" and payload["plots"][0]["series"][0]["y"] == [1.0, "inf"]
  (tmp_path / "file").write_text("keep me")
  with pytest.raises(ValueError, match=r"out: expected a folder or a path where one can be made, got '.*file'"):
    report.write([result], ENV, tmp_path / "file")
  assert (tmp_path / "file").read_text() == "keep me"


def test_check_out_takes_folders_and_leaves_no_trace(tmp_path):
  (tmp_path / "existing").mkdir()
  assert report.check_out(tmp_path / "existing") == tmp_path / "existing"
  assert report.check_out(tmp_path / "a" / "b") == tmp_path / "a" / "b"
  assert sorted(p.name for p in tmp_path.rglob("*")) == ["existing"]


def test_scripts_refuse_the_benchmark_flags_they_do_not_read():
  """`cli.refuse_unused` names the given flags among those a script does not read, and no others."""
  try:
    flags.FLAGS(["script", "--out=/tmp/unused", "--seed=1"])
    with pytest.raises(app.UsageError, match=r"\['--seed', '--out'\]: the benchmarks' flags my script has no use for"):
      cli.refuse_unused(("scale", "seed", "out"), "my script")
    cli.refuse_unused(("scale", "only", "repeats"), "my script")  # none of these given
  finally:
    flags.FLAGS.unparse_flags()
