"""bench/tora's claims: each rule decided on crafted per-seed errors (holds, fails, undecided),
and the guidance statistics computed from crafted errors."""

import numpy as np
import pytest

from paperjax.bench import tora as bench_tora

SPEC = {c.name: c for c in bench_tora.CLAIMS}


def _decide(name, values, scale="full"):
  return SPEC[name].rule.decide(values, scale=scale, gpu=False)


def _verdicts(e: dict[str, list[float]], scale="full") -> dict[str, tuple]:
  values = bench_tora.guidance_values({f: np.array(x) for f, x in e.items()})
  return {name: _decide(name, v, scale) for name, v in values.items()}


def test_guidance_rules_on_crafted_errors():
  e = {
    "none": [9.0, 8.0],
    "concat": [3.0, 8.5],  # gains 6 px with one seed, -0.5 with the other
    "cross_attention": [8.5, 7.5],  # gains under a pixel with both seeds
    "adanorm": [1.0, 1.0],
  }
  assert _verdicts(e) == {
    "guidance lowers the error (concat)": ("undecided", "margin"),
    "guidance lowers the error (cross_attention)": ("fails", None),
    "guidance lowers the error (adanorm)": ("holds", None),
    "adaptive norm is the best fuser": ("holds", None),  # below both by > 0.1 px with every seed
  }
  assert set(_verdicts(e, "small").values()) == {("undecided", "budget")}


@pytest.mark.parametrize(
  "concat, expected",
  [
    ([1.3, 1.4], ("holds", None)),
    ([0.5, 0.9], ("fails", None)),  # beaten by concatenation with every seed
    ([1.05, 1.0], ("fails", None)),  # tied within 0.1 px with every seed (the old rule: undecided)
    ([1.3, 1.05], ("undecided", "margin")),  # clearly best with one seed only
  ],
)
def test_adaptive_norm_best(concat, expected):
  e = {"none": [9.0, 9.0], "concat": concat, "cross_attention": [9.0, 9.0], "adanorm": [1.0, 1.0]}
  values = bench_tora.guidance_values({f: np.array(x) for f, x in e.items()})
  np.testing.assert_allclose(values["adaptive norm is the best fuser"][bench_tora.BEST], np.array(concat) - 1.0)
  assert _decide("adaptive norm is the best fuser", values["adaptive norm is the best fuser"]) == expected


def test_fusers_not_trained_give_no_values_and_stay_undecided():
  values = bench_tora.guidance_values({"none": np.array([8.0]), "adanorm": np.array([8.1])})  # the small config
  assert values["guidance lowers the error (concat)"] == {bench_tora._gain("concat"): []}
  assert values["adaptive norm is the best fuser"] == {bench_tora.BEST: []}
  assert _decide("guidance lowers the error (concat)", values["guidance lowers the error (concat)"], "small") == (
    "undecided",
    "budget",
  )
  assert _decide("adaptive norm is the best fuser", values["adaptive norm is the best fuser"]) == (
    "undecided",
    "nothing to compare",
  )
  assert _decide("guidance lowers the error (adanorm)", values["guidance lowers the error (adanorm)"]) == (
    "fails",
    None,
  )


@pytest.mark.parametrize(
  "growth, scale, expected",
  [
    ([1.5, 1.2, 0.9], "full", ("holds", None)),
    ([3.0, 2.0, 2.5], "full", ("fails", None)),  # 2x is not slow
    ([1.5, 3.0, 1.0], "full", ("undecided", "margin")),
    ([], "full", ("undecided", "nothing to compare")),  # scored only at the training length
    ([1.5, 1.2, 0.9], "small", ("undecided", "budget")),
  ],
)
def test_error_growth(growth, scale, expected):
  assert _decide("error grows slowly with duration", {bench_tora.GROWTH: growth}, scale) == expected
