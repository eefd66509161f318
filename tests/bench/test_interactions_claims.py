"""bench/interactions' claims: each rule on crafted per-run values, and the claims' declaration."""

import pytest

from paperjax.bench import interactions as bench

PHASES = {bench.INIT_OFFSET: [0.4], bench.PHASE1_FALL: [4.0], bench.PHASE2_RISE: [0.5]}


def decide(kind, scale="small", **values):
  return bench.RULES[kind].decide({k: [v] for k, v in values.items()}, scale=scale, gpu=False)


def test_two_phases():
  assert bench.RULES["phases"].decide(PHASES, scale="small", gpu=False) == ("holds", None)
  for name, value in (
    (bench.INIT_OFFSET, 2.5),  # init dominated by high orders: no spindle
    (bench.INIT_OFFSET, -2.0),  # nor by low ones
    (bench.PHASE1_FALL, 0.5),  # phase 1 removes little
    (bench.PHASE2_RISE, 0.1),  # phase 2 barely rises
    (bench.PHASE2_RISE, 0.0),  # the lowest mean order is at the end: no phase 2
  ):
    assert bench.RULES["phases"].decide({**PHASES, name: [value]}, scale="small", gpu=False) == ("fails", None)
  assert bench.RULES["phases"].decide(PHASES, scale="ci", gpu=False) == ("undecided", "budget")


@pytest.mark.parametrize(
  "lag, verdict",
  [(0, "holds"), (1, "holds"), (-1, "holds"), (2, "fails"), (-3, "fails"), (float("nan"), "fails")],  # nan: no growth
)
def test_phase_two_starts_with_overfitting(lag, verdict):
  assert decide("overfitting", **{bench.LAG: lag})[0] == verdict


def test_sigma2_falls_at_every_phase_two_step():
  assert decide("sigma2", **{bench.SIGMA2_FALLS: 1.0, bench.STEPS: 5}) == ("holds", None)
  assert decide("sigma2", **{bench.SIGMA2_FALLS: 0.8, bench.STEPS: 5}) == ("fails", None)
  assert decide("sigma2", **{bench.SIGMA2_FALLS: float("nan"), bench.STEPS: 0}) == (
    "undecided",
    "nothing to compare",
  )


def test_theory_beats_a_flat_distribution():
  assert decide("theory", **{bench.VS_FLAT: 0.05, bench.CHECKPOINTS: 6}) == ("holds", None)
  assert decide("theory", **{bench.VS_FLAT: 0.7, bench.CHECKPOINTS: 6}) == ("fails", None)  # not half the error
  assert decide("theory", **{bench.VS_FLAT: float("nan"), bench.CHECKPOINTS: 0})[0] == "undecided"


def test_claims_are_declared_per_run():
  names = [c.name for c in bench.CLAIMS]
  assert len(names) == len(set(names)) == 4 * len(bench.RUNS)
  assert all(c.part in bench.PARTS and "arXiv" in c.source for c in bench.CLAIMS)
  assert set(bench.RUNS) == {"clean labels", f"{0.3:.0%} label noise", "Transformer, stdlib lines"}  # run()'s tags
  for tag, specs in bench.CLAIMS_OF.items():
    assert {s.part for s in specs} == {bench.RUNS[tag][0]}
