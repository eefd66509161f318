"""The claims ledger: Test and Rule decide on crafted values, claims are well formed, every
benchmark's registered claims are declared properly, and runs merge into one ledger."""

import importlib
import json

import numpy as np
import pytest
from absl import flags

from paperjax.bench import cli, ledger, registry
from paperjax.bench.harness import Benchmark, ClaimSpec, Context, Environment, Result, Rule, Test

ENV = Environment(backend="cpu", device_kind="cpu", device_count=1, jax_version="0", python="3", scale="small")
GAIN = Test(statistic="gain", op=">", bound=0.0, over="mean ± k sd")


@pytest.mark.parametrize(
  "test, values, outcome",
  [
    (Test(statistic="x", op=">", bound=1.0), [2.0, 3.0], "pass"),
    (Test(statistic="x", op=">", bound=1.0), [0.5, 0.9], "fail"),
    (Test(statistic="x", op=">", bound=1.0), [0.5, 3.0], "unresolved"),
    (Test(statistic="x", op=">", bound=1.0), [1.0], "fail"),  # strict
    (Test(statistic="x", op="<", bound=1.0), [0.5], "pass"),
    (Test(statistic="x", op="|x| <=", bound=0.1), [-0.1, 0.05], "pass"),
    (Test(statistic="x", op="|x| <=", bound=0.1), [-0.2, 0.3], "fail"),
    (Test(statistic="x", op=">", bound=1.0, over="mean"), [0.0, 2.5], "pass"),  # mean 1.25
    (Test(statistic="x", op=">", bound=1.0, over="mean"), [0.0, 1.5], "fail"),
    (GAIN, [1.0, 1.1, 0.9], "pass"),  # mean 1, sd 0.1: [0.8, 1.2]
    (GAIN, [-1.0, -1.1, -0.9], "fail"),
    (GAIN, [1.0, -0.5, 0.4], "unresolved"),
    (GAIN, [1.0], "unresolved"),  # one seed has no spread
    (Test(statistic="x", op="|x| <=", bound=0.1, over="mean ± k sd"), [0.0, 0.01, -0.01], "pass"),
    (Test(statistic="x", op="|x| <=", bound=0.1, over="mean ± k sd"), [0.5, 0.51, 0.49], "fail"),
    (Test(statistic="x", op="|x| <=", bound=0.1, over="mean ± k sd"), [0.3, -0.3, 0.35], "unresolved"),  # wide
    (Test(statistic="x", op=">", bound=0.0), [1.0, float("nan")], "fail"),  # a diverged seed fails
    (Test(statistic="x", op=">", bound=0.0), [], "unresolved"),
  ],
)
def test_outcomes(test, values, outcome):
  assert test.outcome(values) == outcome


RULE = Rule(
  tests=(GAIN, Test(statistic="gain", op=">", bound=0.05, over="mean")),
  requires=(Test(statistic="reference accuracy", op=">", bound=0.5, over="mean"),),
)
LEARNED = {"reference accuracy": [0.9]}


@pytest.mark.parametrize(
  "gain, extra, scale, gpu, expected",
  [
    ([0.2, 0.25, 0.22], {}, "small", False, ("holds", None)),
    ([-0.2, -0.25, -0.22], {}, "small", False, ("fails", None)),
    ([0.02, 0.03, 0.025], {}, "small", False, ("fails", None)),  # significant but below the practical size
    ([0.3, -0.2, 0.4], {}, "small", False, ("undecided", "margin")),  # mean 0.17 > 0.05, spread too wide
    ([0.2, 0.25, 0.22], {"reference accuracy": [0.3]}, "small", False, ("undecided", "reference did not learn")),
    ([0.2, 0.25, 0.22], {}, "ci", False, ("undecided", "budget")),
    ([], {}, "small", False, ("undecided", "nothing to compare")),  # a measurement that could not be made
  ],
)
def test_rule_decides(gain, extra, scale, gpu, expected):
  assert RULE.decide({"gain": gain, **LEARNED, **extra}, scale=scale, gpu=gpu) == expected


def test_rule_text_comes_from_its_data_and_its_gates_apply():
  assert RULE.text == (
    "holds if gain > 0 over mean ± 2 sd and gain > 0.05 for the mean; fails if one of these is false over the "
    "whole mean ± k sd or for the mean; otherwise undecided; undecided unless reference accuracy > 0.5 for the mean"
  )
  gpu = Rule(tests=(Test(statistic="speed-up", op=">", bound=1.5),), gpu=True, decided_at="full")
  assert gpu.text.endswith("; decided on a GPU; decided at --scale=full or larger")
  assert gpu.decide({"speed-up": [3.0]}, scale="full", gpu=False) == ("undecided", "needs a GPU")
  assert gpu.decide({"speed-up": [3.0]}, scale="small", gpu=True) == ("undecided", "budget")
  assert gpu.decide({"speed-up": [3.0]}, scale="paper", gpu=True) == ("holds", None)
  with pytest.raises(ValueError, match=r"needs the statistics \['reference accuracy'\]"):
    RULE.decide({"gain": [1.0]}, scale="small", gpu=False)


@pytest.mark.parametrize(
  "build, error, message",
  [
    (lambda: Test(statistic="", op=">", bound=0.0), ValueError, "Test.statistic: expected a non-empty name"),
    (lambda: Test(statistic="x", op=">=", bound=0.0), ValueError, "Test.op: expected one of"),
    (lambda: Test(statistic="x", op=">", bound=float("nan")), ValueError, "Test.bound: expected float, got float nan"),
    (lambda: Test(statistic="x", op=">", bound=0.0, over="median"), ValueError, "Test.over: expected one of"),
    (lambda: Test(statistic="x", op=">", bound=0.0, k=0.0), ValueError, "Test.k: expected float > 0"),
    (lambda: Rule(tests=()), ValueError, "Rule.tests: expected at least one Test"),
    (lambda: Rule(tests=(GAIN,), decided_at="huge"), ValueError, "Rule.decided_at: expected one of"),
    (lambda: Rule(tests=(GAIN,), unmet="bad"), ValueError, "Rule.unmet: expected one of"),
    (lambda: ClaimSpec(name="a", part="p", source="", claim="c", rule=RULE), ValueError, "ClaimSpec.source: expected"),
    (lambda: ClaimSpec(name="a", part="p", source="s", claim="c", rule="gain > 0"), TypeError, "ClaimSpec.rule"),
  ],
)
def test_malformed_rules_and_claims_are_errors(build, error, message):
  with pytest.raises(error, match=message):
    build()


SPEC = ClaimSpec(name="demo gain", part="a", source="Demo (arXiv 0000.00000), Table 1", claim="it helps", rule=RULE)


def test_context_decides_a_claim_with_its_command():
  ctx = Context("demo", "small", 3, 1, (), ENV, parts=("a", "b"))
  claim = ctx.claim(SPEC, {"gain": np.array([0.2, 0.25, 0.22]), "reference accuracy": 0.9}, seeds=[3, 4, 5])
  assert (claim.verdict, claim.reason, claim.seeds) == ("holds", None, (3, 4, 5))
  assert claim.command == "python -m paperjax.bench.demo --scale=small --only=demo.a --seed=3"
  assert claim.measured() == "gain 0.2233 ± 0.025 (n=3); reference accuracy 0.9"
  row = claim.to_json()
  assert row["key"] == "demo/demo gain" and row["rule"] == RULE.text and row["values"]["gain"] == [0.2, 0.25, 0.22]
  with pytest.raises(ValueError, match=r"3 seeds, but statistics with other counts \{'gain': 2\}"):
    Context("demo", "small", 3, 1, (), ENV, parts=("a",)).claim(
      SPEC, {"gain": [0.2, 0.25], "reference accuracy": 0.9}, seeds=[3, 4, 5]
    )
  with pytest.raises(ValueError, match="decided twice"):
    ctx.claim(SPEC, {"gain": [1.0], "reference accuracy": 0.9})
  with pytest.raises(ValueError, match="part 'a' is not among demo's PARTS"):
    Context("demo", "small", 0, 1, (), ENV, parts=("b",)).claim(SPEC, {"gain": [1.0], "reference accuracy": 1.0})


def test_a_registered_claim_that_is_not_produced_fails_the_run(tmp_path):
  def run(ctx):
    records = []
    if ctx.wants("a"):
      records.append(ctx.record("from a", 1.0, "x"))
      if ctx.seed == 0:  # seed 1: the part forgets its claim
        ctx.claim(SPEC, {"gain": [0.2, 0.25, 0.22], "reference accuracy": 0.9})
    if ctx.wants("b"):
      records.append(ctx.record("from b", 1.0, "x"))
    return Result(ctx.benchmark, tuple(records))

  demo = {"demo": Benchmark(run, ("a", "b"), claims=(SPEC,))}
  try:
    for args, code in (
      (["--only=demo.b", "--seed=1"], 0),
      (["--only=demo", "--seed=0"], 0),
      (["--only=demo", "--seed=1"], 1),
    ):
      flags.FLAGS(["prog", "--scale=small", f"--out={tmp_path / str(code)}", *args])
      assert cli.run_benchmarks(demo) == code, args
  finally:
    flags.FLAGS.unparse_flags()
  payload = json.loads((tmp_path / "0" / "results.json").read_text())
  assert [c["key"] for c in payload["claims"]] == ["demo/demo gain"]
  report = (tmp_path / "0" / "report.md").read_text()
  assert report.index("## Claims") < report.index("| demo | from a |")  # the ledger comes first
  assert "1 claims from 1 papers: 1 hold, 0 fail, 0 undecided" in report


def _modules():
  return [importlib.import_module(f"paperjax.bench.{name}") for name in registry.BENCHMARKS]


def test_every_registered_claim_is_declared_properly():
  sources: list[str] = []
  for module in _modules():
    claims = getattr(module, "CLAIMS", ())
    own = [c.name for c in claims]
    assert len(own) == len(set(own)), f"{module.__name__}: claim names repeat"
    for c in claims:
      assert isinstance(c, ClaimSpec) and c.part in module.PARTS, (module.__name__, c.name)
      assert ", " in c.source, f"{c.name}: the source names the paper, then where in it ('Paper (arXiv id), Table 2')"
    sources += [c.source for c in claims]
  papers = {ledger.paper(source) for source in sources}
  assert len(sources) >= 25 and len(papers) >= 9, (len(sources), sorted(papers))  # the coverage


def test_the_paper_of_a_source_is_its_arxiv_id():
  assert ledger.paper("Llama 3 report (arXiv 2407.21783), Sec. 6.2") == "2407.21783"
  assert ledger.paper("Llama 3 (arXiv:2407.21783), Table 3") == "2407.21783"
  assert ledger.paper("LLM explainer article, Sec. 2") == "LLM explainer article"


def _row(key, scale, verdict, reason=None, source="P (arXiv 1), Table 1"):
  bench, name = key.split("/")
  return {
    "key": key,
    "benchmark": bench,
    "name": name,
    "source": source,
    "claim": f"claim {name}",
    "rule": "holds if x > 0 for every seed; fails if one of these is false for every seed; otherwise undecided",
    "measured": "x 1",
    "verdict": verdict,
    "reason": reason,
    "scale": scale,
    "command": f"python -m paperjax.bench.{bench} --scale={scale}",
    "note": "",
  }


def test_ledger_merges_runs_strongest_first(tmp_path):
  small = [_row("b/one", "small", "fails"), _row("b/two", "small", "undecided", "needs a GPU")]
  full = [_row("b/one", "full", "holds"), _row("b/two", "full", "undecided", "needs a GPU")]
  gpu = [_row("b/two", "ci", "holds")]  # a GPU verdict beats "needs a GPU" at any scale
  merged = ledger.merge([small, full, gpu])
  assert [(c["key"], c["scale"], c["verdict"]) for c in merged] == [
    ("b/one", "full", "holds"),
    ("b/two", "ci", "holds"),
  ]
  assert merged[0]["others"] == ["small: fails"]
  assert merged[1]["others"] == ["small: undecided: needs a GPU", "full: undecided: needs a GPU"]
  for i, rows in enumerate((small, full, gpu)):
    (tmp_path / str(i)).mkdir()
    (tmp_path / str(i) / "results.json").write_text(json.dumps({"claims": rows}))
  assert ledger.main([str(tmp_path / "0"), str(tmp_path / "1"), str(tmp_path / "2"), f"--out={tmp_path / 'l'}"]) == 0
  text = (tmp_path / "l" / "ledger.md").read_text()
  assert text.startswith("2 claims from 1 papers: 2 hold, 0 fail, 0 undecided")
  assert "**holds** (also small: fails)" in text
  assert json.loads((tmp_path / "l" / "ledger.json").read_text()) == merged


@pytest.mark.parametrize(
  "payload, message",
  [
    ({"records": []}, "expected a 'claims' list"),
    ({"claims": [{"key": "a/b"}]}, r"claims\[0\] lacks"),
    ({"claims": [_row("a/b", "huge", "holds")]}, "scale 'huge'"),
    ({"claims": [_row("a/b", "small", "undecided")]}, "reason None with undecided"),
  ],
)
def test_ledger_refuses_malformed_results(tmp_path, payload, message):
  (tmp_path / "results.json").write_text(json.dumps(payload))
  with pytest.raises(ValueError, match=message):
    ledger.read(tmp_path)
  with pytest.raises(FileNotFoundError, match="no results.json"):
    ledger.read(tmp_path / "missing")
