"""bench/sae's claims: the frontier comparison on crafted points and the rule on crafted values."""

import dataclasses
import math

import pytest

from paperjax.bench import sae as bench_sae
from paperjax.interp import sae

STANDARD = [(10.0, 0.5, 0.6), (100.0, 0.8, 0.9)]  # (L0, explained variance, loss recovered)
MIDDLE = math.sqrt(10.0 * 100.0)  # midway in log L0: the frontier is 0.65 (EV) and 0.75 (loss recovered)
LOSS, EV = (bench_sae.above(metric) for metric, _ in bench_sae.FRONTIERS)


def test_points_above_below_and_beyond_the_standard_frontier():
  count = lambda points: bench_sae.points_above_standard(points, STANDARD, 2)
  assert count([(MIDDLE, 0.0, 0.76)]) == (1, 1)
  assert count([(MIDDLE, 0.0, 0.74)]) == (0, 1)
  assert count([(5.0, 0.0, 0.61), (MIDDLE, 0.0, 0.70)]) == (1, 2)  # sparser: against the sparsest point
  assert count([(500.0, 0.0, 0.99)]) == (0, 0)  # denser than every standard point
  assert bench_sae.points_above_standard([(MIDDLE, 0.66, 0.0)], STANDARD, 1) == (1, 1)  # explained variance


def values(loss, ev, comparable):
  return {LOSS: [loss], EV: [ev], bench_sae.COMPARABLE: [comparable]}


@pytest.mark.parametrize(
  "crafted, scale, expected",
  [
    (values(1.0, 1.0, 2), "small", ("holds", None)),  # every comparable point above on both frontiers
    (values(1.0, 0.5, 2), "small", ("fails", None)),  # one point under the explained-variance frontier
    (values(0.5, 1.0, 2), "full", ("fails", None)),  # mixed on loss recovered (the old rule's "mixed")
    (values(0.0, 0.0, 4), "small", ("fails", None)),  # below everywhere
    (values(float("nan"), float("nan"), 0), "small", ("undecided", "nothing to compare")),
    (values(1.0, 1.0, 2), "ci", ("undecided", "budget")),
  ],
)
def test_beats_standard_rule(crafted, scale, expected):
  for spec in bench_sae.CLAIMS:
    assert spec.rule.decide(crafted, scale=scale, gpu=False) == expected


def test_claims_cover_every_architecture_against_the_standard():
  names = [c.name for c in bench_sae.CLAIMS]
  assert len(names) == len(set(names))
  assert {c.part for c in bench_sae.CLAIMS} <= set(bench_sae.PARTS)
  assert set(bench_sae.CLAIM_OF) == set(sae.ARCHITECTURES) - {"standard"}
  assert all("arXiv" in c.source for c in bench_sae.CLAIMS)
  for arch, spec in bench_sae.CLAIM_OF.items():
    assert spec.name.lower().startswith(arch)
  for cfg in bench_sae.CONFIGS.values():  # every scale trains every architecture, so every claim is produced
    assert {arch for arch, _ in cfg.grid} == set(sae.ARCHITECTURES)


def test_a_grid_without_an_architecture_is_refused():
  with pytest.raises(ValueError, match="grid: expected each of"):
    dataclasses.replace(bench_sae.SMALL, grid=(("standard", (2.0,)), ("topk", (8.0,))))
