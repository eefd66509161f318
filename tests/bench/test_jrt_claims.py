"""bench/jrt's claims: each rule decided on crafted per-seed values (holds, fails, undecided
for each reason), and the recall statistics computed from crafted accuracies."""

import numpy as np
import pytest

from paperjax.bench import jrt

SPEC = {c.name: c for c in jrt.CLAIMS}
LEARNED = [0.90, 0.92, 0.88]  # a reference model that learned its task
NOT_LEARNED = [0.30, 0.35, 0.40]


def _decide(name, values, scale="full", gpu=False):
  return SPEC[name].rule.decide(values, scale=scale, gpu=gpu)


@pytest.mark.parametrize(
  "gap, reference, scale, expected",
  [
    ([0.30, 0.35, 0.40], LEARNED, "full", ("holds", None)),
    ([0.02, 0.03, 0.04], LEARNED, "full", ("fails", None)),  # significant, below the practical 0.05
    ([-0.30, -0.35, -0.40], LEARNED, "full", ("fails", None)),  # the other order is easier
    ([-0.2, 0.3, 0.6], LEARNED, "full", ("undecided", "margin")),  # mean 0.23 < 2 sd (the old rule: fails)
    ([0.30, 0.35, 0.40], NOT_LEARNED, "full", ("undecided", "reference did not learn")),
    ([0.30, 0.35, 0.40], LEARNED, "small", ("undecided", "budget")),
    ([0.30, 0.35, 0.40], LEARNED, "ci", ("undecided", "budget")),
  ],
)
def test_based_order_gap(gap, reference, scale, expected):
  assert _decide("Based order gap", {jrt.BASED_GAP: gap, jrt.BASED_EASY: reference}, scale) == expected


@pytest.mark.parametrize(
  "gap, versus_based, reference, expected",
  [
    ([0.01, -0.02, 0.02], [-0.02, 0.0, 0.01], LEARNED, ("holds", None)),
    ([0.01, -0.02, 0.02], [-0.10, -0.12, -0.08], LEARNED, ("fails", None)),  # insensitive only by failing both
    ([0.20, 0.25, 0.30], [0.0, 0.0, 0.0], LEARNED, ("fails", None)),  # a clear gap
    ([-0.1, 0.1, 0.3], [0.0, 0.0, 0.0], LEARNED, ("undecided", "margin")),  # |0.1| <= 2 sd (the old rule: holds)
    ([0.01, -0.02, 0.02], [0.0, 0.0, 0.0], NOT_LEARNED, ("undecided", "reference did not learn")),
  ],
)
def test_jrt_rnn_order_gap(gap, versus_based, reference, expected):
  values = {jrt.JRT_GAP: gap, jrt.JRT_VS_BASED: versus_based, jrt.BASED_EASY: reference}
  assert _decide("JRT-RNN order gap", values) == expected


@pytest.mark.parametrize("suffix", list(jrt.PROMPT_TASKS))
@pytest.mark.parametrize(
  "gain, transformer, expected",
  [
    ([0.10, 0.12, 0.14], LEARNED, ("holds", None)),
    ([-0.10, -0.12, -0.14], LEARNED, ("fails", None)),
    ([-0.05, 0.0, 0.04], LEARNED, ("undecided", "margin")),  # a mean at 0 inside a wide spread: not a refutation
    ([-0.05, 0.05, 0.15], LEARNED, ("undecided", "margin")),  # mean 0.05 < 2 sd (the old rule: fails)
    ([0.10, 0.12, 0.14], [0.2, 0.2, 0.3], ("undecided", "reference did not learn")),
  ],
)
def test_jrt_prompt_gain(suffix, gain, transformer, expected):
  values = {jrt._gain(suffix): gain, jrt._transformer(suffix): transformer}
  assert _decide(f"JRT-Prompt gain, {suffix}", values) == expected


@pytest.mark.parametrize(
  "model, speedup, scale, gpu, expected",
  [
    ("JRT-Prompt", 12.0, "paper", True, ("holds", None)),
    ("JRT-Prompt", 5.0, "paper", True, ("fails", None)),  # under half the paper's 11.9x
    ("JRT-RNN", 10.0, "paper", True, ("holds", None)),
    ("JRT-RNN", 9.0, "paper", True, ("fails", None)),  # under half the paper's 19.2x
    ("JRT-RNN", 10.0, "full", True, ("undecided", "budget")),  # the paper's N = 32768 is --scale=paper
    ("JRT-Prompt", 12.0, "paper", False, ("undecided", "needs a GPU")),  # a CPU's XLA attention is not FA2
    ("JRT-Prompt", 0.6, "ci", False, ("undecided", "needs a GPU")),
  ],
)
def test_prefill_speedups_are_decided_only_on_a_gpu_at_paper_scale(model, speedup, scale, gpu, expected):
  assert _decide(f"{model} prefill speed-up", {jrt._speedup(model): [speedup]}, scale, gpu) == expected


def test_recall_values_pair_the_seeds_of_each_cell():
  table = {
    ("Based", "small set first"): [0.9, 0.8],
    ("Based", "large set first"): [0.5, 0.6],
    ("Based", "MQAR"): [0.2, 0.4],
    ("JRT-RNN", "small set first"): [0.85, 0.9],
    ("JRT-RNN", "large set first"): [0.8, 0.95],
    ("Based + JRT-Prompt", "large set first"): [0.7, 0.5],
    ("Based + JRT-Prompt", "MQAR"): [0.3, 0.3],
    ("Transformer", "large set first"): [1.0, 0.99],
    ("Transformer", "MQAR"): [0.6, 0.7],
  }
  values = jrt.recall_values(lambda model, task: np.array(table[model, task]))
  assert set(values) == {c.name for c in jrt.CLAIMS if c.part == "recall"}
  for name, stats in values.items():
    assert set(stats) == set(SPEC[name].rule.statistics), name
  close = np.testing.assert_allclose
  close(values["Based order gap"][jrt.BASED_GAP], [0.4, 0.2])  # small first - large first, seed by seed
  close(values["JRT-RNN order gap"][jrt.JRT_GAP], [0.05, -0.05])
  close(values["JRT-RNN order gap"][jrt.JRT_VS_BASED], [-0.05, 0.1])
  sets = "set disjointness (large set first)"
  close(values[f"JRT-Prompt gain, {sets}"][jrt._gain(sets)], [0.2, -0.1])
  close(values["JRT-Prompt gain, MQAR"][jrt._gain("MQAR")], [0.1, -0.1])
  close(values["JRT-Prompt gain, MQAR"][jrt._transformer("MQAR")], [0.6, 0.7])
