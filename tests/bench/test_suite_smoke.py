"""The suite and a single benchmark binary, run as a user would, at --scale=ci.

The suite runs in GROUPS, one `python -m paperjax.bench --only=...` process each, so that
pytest's two workers share it instead of one worker running every benchmark in a row (the
whole ci suite took 8 minutes of one worker under make test's load with a cold compilation
cache, longer than the rest of the suite on the other worker).
"""

import importlib
import json
import re
import subprocess
import sys

import pytest

from paperjax.bench import registry
from paperjax.bench.harness import SCALES

RECORD_KEYS = {"benchmark", "metric", "value", "unit", "paper_value", "paper_source", "ratio", "environment"}


# Each group about 2 minutes with a cold cache. llama, quant and sae share one group: the suite
# trains the stdlib Llama they study once per process (bench.llama.train_stdlib_lm).
GROUPS = (
  ("jrt", "bigram", "serving", "excp"),
  ("parallel", "interactions", "maxsim"),
  ("align", "tora"),
  ("llama", "quant", "sae"),
)


def _run(*args, cwd):
  """`python -m *args` with this process's environment (tests/conftest.py's XLA_FLAGS: -O0)."""
  return subprocess.run(
    [sys.executable, "-m", *args], cwd=cwd, capture_output=True, text=True, timeout=1200
  )  # a hang guard: a group takes ~2 minutes with a cold cache


def test_the_groups_hold_every_benchmark_once():
  grouped = [name for group in GROUPS for name in group]
  assert sorted(grouped) == sorted(registry.BENCHMARKS), "add a new benchmark to one of GROUPS"


@pytest.mark.parametrize("group", GROUPS, ids=lambda group: group[0])
def test_suite_writes_a_well_formed_report(tmp_path, group):
  proc = _run("paperjax.bench", "--scale=ci", f"--only={','.join(group)}", f"--out={tmp_path}", cwd=tmp_path)
  assert proc.returncode == 0, proc.stderr[-3000:]
  payload = json.loads((tmp_path / "results.json").read_text())
  assert {r["benchmark"] for r in payload["records"]} == set(group)
  for record in payload["records"]:
    assert set(record) == RECORD_KEYS
    assert record["environment"]["scale"] == "ci"
    assert isinstance(record["value"], float)
  md = (tmp_path / "report.md").read_text()
  assert md.startswith("# paperjax benchmark report")
  rows = [line for line in md.splitlines() if line.startswith(tuple(f"| {b} |" for b in group))]
  cells = lambda row: len(re.split(r"(?<!\\)\|", row)) - 2  # "\|" inside a cell is escaped
  records, walls = [r for r in rows if cells(r) == 7], [r for r in rows if cells(r) == 2]
  assert len(records) == len(payload["records"]) and len(walls) == len(group)
  assert set(payload["wall_s"]) == set(group) and all(s > 0 for s in payload["wall_s"].values())
  assert f"| total | {sum(payload['wall_s'].values()):.1f} |" in md
  for plot in payload["plots"]:
    assert (tmp_path / plot["file"]).read_bytes()[:4] == b"\x89PNG"
  assert f"| {group[0]} |" in proc.stdout  # the table is printed too
  registered = {f"{name}/{c.name}" for name in group for c in registry.load(name).claims}
  assert {c["key"] for c in payload["claims"]} == registered  # every registered claim, at ci too
  assert all(c["scale"] == "ci" and c["command"].endswith("--seed=0") for c in payload["claims"])
  if registered:
    assert md.index("## Claims") < md.index("## Measurements")


def test_every_benchmark_configures_every_scale():
  for name in registry.BENCHMARKS:
    module = importlib.import_module(f"paperjax.bench.{name}")
    assert set(module.CONFIGS) == set(SCALES), name


def test_single_binary_runs_only_the_asked_part(tmp_path):
  proc = _run("paperjax.bench.bigram", "--scale=ci", "--only=bigram.fit", f"--out={tmp_path}", cwd=tmp_path)
  assert proc.returncode == 0, proc.stderr[-3000:]
  metrics = [r["metric"] for r in json.loads((tmp_path / "results.json").read_text())["records"]]
  assert metrics and all("count" in m for m in metrics)


def test_unknown_benchmark_is_a_usage_error(tmp_path):
  proc = _run("paperjax.bench", "--scale=ci", "--only=nope", f"--out={tmp_path}", cwd=tmp_path)
  assert proc.returncode != 0
  assert "--only: unknown benchmarks ['nope']" in proc.stderr


def test_unknown_part_is_a_usage_error_listing_valid_names(tmp_path):
  proc = _run("paperjax.bench.bigram", "--scale=ci", "--only=bigram.nosuchpart", f"--out={tmp_path}", cwd=tmp_path)
  assert proc.returncode != 0
  assert "--only: unknown parts ['bigram.nosuchpart']; valid names: ['bigram', 'bigram.fit'," in proc.stderr
