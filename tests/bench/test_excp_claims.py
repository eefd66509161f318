"""bench/excp's claim: declared once, its statistic and rule on crafted sweeps."""

from paperjax.bench import excp as bench_excp

CLAIM = bench_excp.EXCP_70X
RATIO = "highest alpha-sweep ratio within 1% held-out loss"
DROP = "held-out loss drop, first to last checkpoint"


def test_full_sweeps_alpha_past_the_cap_over_seeds():
  full = bench_excp.CONFIGS["full"]
  assert full.seeds >= 3 and min(full.alphas) == 5e-5 and max(full.alphas) >= 5e-2
  assert bench_excp.CONFIGS["ci"].seeds >= 2  # the smoke test runs the other-seed path


def test_best_ratio_keeps_points_within_one_percent():
  points = [(18.9, -0.0005, 0.9), (25.9, 0.0099, 0.5), (92.0, 0.0101, 0.1)]  # (ratio, loss increase, kept)
  assert bench_excp.best_ratio(points) == 25.9  # 92x costs 1.01%
  assert bench_excp.best_ratio([(92.0, -0.007, 0.1), (18.9, 0.0, 0.9)]) == 92.0  # a loss decrease is within
  assert bench_excp.best_ratio([(30.0, 0.02, 0.5)]) == 1.0  # nothing within: the dense state
  assert bench_excp.best_ratio([(75.0, 0.01, 0.1)]) == 75.0  # the tolerance is inclusive


def test_rule_holds_fails_and_undecided():
  decide = lambda ratio, drop=(0.5, 0.5, 0.5), scale="full": CLAIM.rule.decide(
    {RATIO: ratio, DROP: drop}, scale=scale, gpu=False
  )
  assert decide([75.0, 80.0, 71.0]) == ("holds", None)
  assert decide([25.9, 30.0, 20.0]) == ("fails", None)
  assert decide([92.0, 30.0, 40.0]) == ("undecided", "margin")  # the seeds disagree
  assert decide([70.0, 70.0, 70.0]) == ("fails", None)  # Test has only '>': exactly 70x does not pass
  assert decide([500.0, 500.0, 500.0], drop=(0.5, -0.01, 0.5)) == ("undecided", "reference did not learn")
  assert decide([92.0], drop=(0.5,), scale="small") == ("undecided", "budget")  # small: one model, 3 alphas
