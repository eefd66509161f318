"""Harness pieces: timing, records, selection, progress and the report files."""

import io
import json
import math

import numpy as np
import pytest

from paperjax.bench import report
from paperjax.bench.harness import (
  Context,
  Environment,
  Image,
  Plot,
  Result,
  Series,
  progress,
  selects_benchmark,
  time_fn,
)

ENV = Environment("cpu", "cpu", 8, "0.0", "3.11", "ci")


def _ctx(only=()):
  return Context("demo", "ci", 0, 2, tuple(only), ENV)


def test_time_fn_warms_up_and_takes_the_median():
  calls = []
  timing = time_fn(lambda x: calls.append(x) or x, 7, repeats=3, warmup=2)
  assert calls == [7] * 5
  assert len(timing.times_s) == 3
  assert timing.median_s == sorted(timing.times_s)[1]
  with pytest.raises(ValueError, match="repeats"):
    time_fn(lambda: None, repeats=0)


def test_record_ratio_and_json():
  ctx = _ctx()
  assert ctx.record("speed-up", 6.0, "x", 12.0, "paper").ratio == 0.5
  assert ctx.record("ppl ratio", 0.4, "ratio", "< 1", "explainer").ratio is None
  assert ctx.record("none", 1.0, "x").ratio is None
  row = ctx.record("bad", math.nan, "x", 2.0).to_json()
  assert row["value"] == "nan" and row["ratio"] == "nan"
  json.dumps(row, allow_nan=False)


def test_only_selects_benchmarks_and_parts():
  assert _ctx().wants("fit")
  assert _ctx(["demo"]).wants("fit")
  assert _ctx(["demo.fit"]).wants("fit") and not _ctx(["demo.fit"]).wants("generate")
  assert not _ctx(["other"]).wants("fit")
  assert selects_benchmark(["demo.fit"], "demo") and not selects_benchmark(["demox"], "demo")
  assert selects_benchmark([], "demo")


def test_progress_prints_lines_off_a_terminal():
  stream = io.StringIO()
  assert list(progress(range(3), "work", stream=stream, min_interval_s=0.0)) == [0, 1, 2]
  lines = stream.getvalue().splitlines()
  assert lines[0].startswith("work [1/3]") and "eta" in lines[0]
  assert lines[-1].startswith("work [3/3]") and "eta" not in lines[-1]


def test_series_lengths_must_match_and_plot_kinds_are_checked():
  with pytest.raises(ValueError, match="3 x values but 2 y values"):
    Series("s", (1, 2, 3), (1, 2))
  with pytest.raises(ValueError, match="kind must be 'line' or 'bar', got 'bars'"):
    Plot("p", "t", "x", "y", (), kind="bars")  # type: ignore[arg-type]


def test_images_are_checked():
  with pytest.raises(ValueError, match=r"pixels must be \[height, width, 3\]"):
    Image("i", "t", np.zeros((4, 4)))
  with pytest.raises(ValueError, match=r"pixels must lie in \[0, 1\]"):
    Image("i", "t", np.full((2, 2, 3), 1.5))
  with pytest.raises(ValueError, match="2 x values but 1 y values"):
    Image("i", "t", np.zeros((2, 2, 3)), (((0.0, 1.0), (0.0,)),))


def test_report_files(tmp_path):
  ctx = _ctx()
  result = Result(
    "demo",
    (ctx.record("a|b", 1234.5, "tokens/s", 1000.0, "Paper (2024), Table 1"),),
    (
      Plot("curve", "A curve", "x", "y", (Series("s", (1.0, 2.0), (3.0, 4.0)),)),
      Plot("bars", "Up and down", "k", "A", (Series("+", (1, 2), (3, 1)), Series("-", (1, 2), (-1, -2))), kind="bar"),
    ),
    ("a note",),
    wall_s=12.345,
    images=(Image("strip", "Frames", np.full((4, 6, 3), 0.5), (((0.0, 2.0, 5.0), (0.0, 3.0, 1.0)),)),),
  )
  paths = report.write([result], ENV, tmp_path / "out")
  md = paths["markdown"].read_text()
  assert "| demo | 12.3 |" in md and "| total | 12.3 |" in md
  assert "| demo | a\\|b | 1234 | tokens/s | 1000 | Paper (2024), Table 1 | 1.234 |" in md
  assert "- a note" in md and "(demo_curve.png)" in md and "![Frames](demo_strip.png)" in md
  payload = json.loads(paths["json"].read_text())
  assert payload["environment"]["backend"] == "cpu"
  assert payload["records"][0]["ratio"] == pytest.approx(1.2345)
  assert payload["plots"][0]["series"][0]["y"] == [3.0, 4.0]
  assert payload["wall_s"] == {"demo": 12.345}
  assert payload["images"] == [{"benchmark": "demo", "file": "demo_strip.png", "title": "Frames"}]
  assert paths["demo_strip"].read_bytes()[:4] == b"\x89PNG"
  assert paths["demo_curve"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  assert payload["plots"][1]["kind"] == "bar" and paths["demo_bars"].read_bytes()[:4] == b"\x89PNG"
  assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
    "demo_bars.png",
    "demo_curve.png",
    "demo_strip.png",
    "report.md",
    "results.json",
  ]


def test_a_selected_part_that_records_nothing_fails_the_run(tmp_path):
  """The runner counts records per part: `demo.b` below records nothing, so the exit code is 1."""
  from absl import flags

  from paperjax.bench import cli
  from paperjax.bench.harness import Benchmark

  def run(ctx):
    records = []
    if ctx.wants("a"):
      records.append(ctx.record("from a", 1.0, "x"))
    if ctx.wants("b"):
      pass  # forgot to record
    return Result(ctx.benchmark, tuple(records))

  demo = {"demo": Benchmark(run, ("a", "b"))}
  try:
    for only, code in (("demo.a", 0), ("demo.b", 1), ("demo", 1)):
      flags.FLAGS(["prog", "--scale=ci", f"--only={only}", f"--out={tmp_path}"])
      assert cli.run_benchmarks(demo) == code, only
  finally:
    flags.FLAGS.unparse_flags()
  with pytest.raises(ValueError, match="part: 'c' is not among demo's declared PARTS"):
    Context("demo", "ci", 0, 2, (), ENV, parts=("a", "b")).wants("c")
