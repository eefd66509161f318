"""bench/sae's decision rule on crafted frontiers."""

from paperjax.bench import sae as bench_sae

STANDARD = [(10.0, 0.5, 0.6), (100.0, 0.8, 0.9)]  # (L0, explained variance, loss recovered)


def test_points_above_below_and_beyond_the_standard_frontier():
  rule = lambda points: bench_sae._versus_standard(points, STANDARD, 2)
  # at L0 = sqrt(10 * 100) the frontier is midway in log L0: 0.75
  assert rule([(31.6227766, 0.0, 0.76)]) == ("beats", 1, 1)
  assert rule([(31.6227766, 0.0, 0.74)]) == ("loses", 0, 1)
  assert rule([(5.0, 0.0, 0.61), (31.6227766, 0.0, 0.70)]) == ("mixed", 1, 2)  # sparser: vs the sparsest point
  assert rule([(500.0, 0.0, 0.99)]) == ("not comparable", 0, 0)  # denser than every standard point
