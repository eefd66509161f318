"""bench/jrt's claim rules on crafted per-seed differences."""

import numpy as np
import pytest

from paperjax.bench import jrt

verdict = jrt.claim_verdict


def test_based_order_gap_needs_a_clear_positive_gap_and_a_learned_easy_order():
  assert verdict("Based order gap", np.array([0.30, 0.35, 0.40]), reference=0.9) == "holds"
  assert verdict("Based order gap", np.array([0.02, 0.03, 0.04]), reference=0.9) == "fails"  # below 0.05
  assert verdict("Based order gap", np.array([-0.2, 0.3, 0.6]), reference=0.9) == "fails"  # sd 0.4: m < 2 sd
  assert verdict("Based order gap", np.array([0.30, 0.35, 0.40]), reference=0.3) == "undecided"


def test_jrt_rnn_order_gap_needs_no_gap_at_based_accuracy():
  flat = np.array([0.01, -0.02, 0.02])
  assert verdict("JRT-RNN order gap", flat, reference=0.9, easy=0.88) == "holds"
  assert verdict("JRT-RNN order gap", flat, reference=0.9, easy=0.80) == "fails"  # insensitive only by failing
  assert verdict("JRT-RNN order gap", np.array([0.2, 0.25, 0.3]), reference=0.9, easy=0.9) == "fails"
  assert verdict("JRT-RNN order gap", np.array([-0.1, 0.1, 0.3]), reference=0.9, easy=0.9) == "holds"  # |0.1| <= 2 sd
  assert verdict("JRT-RNN order gap", flat, reference=0.4, easy=0.4) == "undecided"
  with pytest.raises(ValueError, match="easy"):
    verdict("JRT-RNN order gap", flat, reference=0.9)


def test_jrt_prompt_gain_must_exceed_twice_the_seed_spread():
  assert verdict("JRT-Prompt gain", np.array([0.10, 0.12, 0.14]), reference=0.95) == "holds"
  assert verdict("JRT-Prompt gain", np.array([-0.05, 0.05, 0.15]), reference=0.95) == "fails"
  assert verdict("JRT-Prompt gain", np.array([0.10, 0.12, 0.14]), reference=0.2) == "undecided"  # untrainable here
  with pytest.raises(ValueError, match="rule"):
    verdict("order gap", np.zeros(3), reference=0.9)
