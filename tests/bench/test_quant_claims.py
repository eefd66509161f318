"""bench/quant's claims: the distribution check and the FP8 prefill speed-up, on crafted values."""

import pytest

from paperjax.bench import quant

SAME, SPEED = quant.CLAIMS
KS, DIFF = quant.KS_P, quant.DIFFERENCE


@pytest.mark.parametrize(
  "ks, diff, scale, expected",
  [
    ([0.5, 0.8, 0.3, 0.9], [0.01, -0.01, 0.0, 0.005], "full", ("holds", None)),  # within ±0.05 at ± 2 sd
    ([0.5, 0.8, 0.3, 0.9], [0.20, 0.21, 0.19, 0.20], "full", ("fails", None)),  # a clear shift
    ([0.01, 0.001, 0.02, 0.04], [0.0, 0.01, -0.01, 0.0], "full", ("fails", None)),  # KS rejects for every seed
    ([0.5, 0.8, 0.3, 0.9], [0.04, -0.03, 0.06, 0.0], "full", ("undecided", "margin")),  # ± 2 sd crosses the margin
    ([0.5, 0.01, 0.3, 0.9], [0.01, -0.01, 0.0, 0.005], "full", ("undecided", "margin")),  # one seed rejects
    ([0.63], [0.025], "full", ("undecided", "margin")),  # one sample has no spread: the old form said "same"
    ([0.5, 0.8, 0.3, 0.9], [0.01, -0.01, 0.0, 0.005], "small", ("undecided", "budget")),
  ],
)
def test_distribution_rule(ks, diff, scale, expected):
  assert SAME.rule.decide({KS: ks, DIFF: diff}, scale=scale, gpu=False) == expected


@pytest.mark.parametrize(
  "speed_up, scale, gpu, expected",
  [
    (1.4, "paper", True, ("holds", None)),
    (1.07, "paper", True, ("fails", None)),  # the H200 measurement in README's GPU rows
    (1.4, "paper", False, ("undecided", "needs a GPU")),  # a CPU emulates FP8 dots
    (0.7, "small", False, ("undecided", "needs a GPU")),
    (1.4, "small", True, ("undecided", "budget")),  # small shapes say nothing about prefill at scale
  ],
)
def test_prefill_rule_is_decided_on_a_gpu_at_the_paper_shapes(speed_up, scale, gpu, expected):
  assert SPEED.rule.decide({quant.SPEED_UP: [speed_up]}, scale=scale, gpu=gpu) == expected


def test_claims_are_declared_for_their_parts():
  assert len({c.name for c in quant.CLAIMS}) == len(quant.CLAIMS)
  assert [c.part for c in quant.CLAIMS] == ["distribution", "throughput"]
  assert all(c.part in quant.PARTS and "arXiv" in c.source for c in quant.CLAIMS)
  assert SAME.rule.decided_at == "full" and SPEED.rule.gpu
  full = quant.CONFIGS["full"]
  assert full.replicates >= 2 and full.replicates * full.generations >= 4096  # the n the margin is decided on
