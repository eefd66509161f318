"""AND-OR interactions against brute-force subset loops; universal matching; closed-form theory."""

import itertools

import jax.numpy as jnp
import numpy as np
import pytest

from paperjax.interp import dynamics
from paperjax.interp import interactions as ia


def _subsets(mask):
  """All subsets of a bitmask (brute force)."""
  bits = [i for i in range(mask.bit_length()) if mask >> i & 1]
  for r in range(len(bits) + 1):
    for combo in itertools.combinations(bits, r):
      yield sum(1 << i for i in combo)


def _brute_and(f):
  m = len(f)
  return np.array([sum((-1) ** (bin(s).count("1") - bin(t).count("1")) * f[t] for t in _subsets(s)) for s in range(m)])


def _brute_or(f):
  m = len(f)
  full = m - 1
  return np.array(
    [-sum((-1) ** (bin(s).count("1") - bin(t).count("1")) * f[full ^ t] for t in _subsets(s)) for s in range(m)]
  )


@pytest.mark.parametrize("n", [1, 3, 5])
def test_fast_transforms_match_the_3n_loop(n, np_rng):
  f = np_rng.normal(size=2**n)
  np.testing.assert_allclose(ia.and_interactions(jnp.asarray(f)), _brute_and(f), rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(ia.or_interactions(jnp.asarray(f)), _brute_or(f), rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(ia.zeta(ia.moebius(jnp.asarray(f))), f, rtol=1e-5, atol=1e-5)


def _universal_matching_error(v, dec):
  """Recompute the reconstruction by brute force for every T."""
  n = len(v).bit_length() - 1
  i_and, i_or, delta = map(np.asarray, (dec.i_and_M, dec.i_or_M, dec.delta_M))
  errs = []
  for t in range(2**n):
    total = v[0] - delta[0]
    total += sum(i_and[s] for s in _subsets(t) if s)
    total += sum(i_or[s] for s in range(1, 2**n) if s & t)
    errs.append(abs(v[t] - delta[t] - total))
  return max(errs)


def test_universal_matching_without_and_with_noise(np_rng):
  v = np_rng.normal(size=2**5).astype(np.float32) * 3
  exact = ia.decompose(jnp.asarray(v), ia.DecompositionConfig(steps=500, learning_rate=0.3, noise_fraction=0.0))
  assert float(jnp.abs(exact.delta_M).max()) == 0.0
  assert _universal_matching_error(v, exact) < 1e-4 and float(exact.matching_error) < 1e-4
  assert float(exact.l1_after) < float(exact.l1_before)  # the split got sparser
  noisy = ia.decompose(jnp.asarray(v), ia.DecompositionConfig(steps=500, learning_rate=0.3, noise_fraction=0.04))
  bound = 0.04 * abs(v[-1] - v[0])
  assert float(jnp.abs(noisy.delta_M).max()) <= bound * (1 + 1e-6)
  assert _universal_matching_error(v, noisy) < 1e-4  # exact once delta is accounted for
  np.testing.assert_allclose(  # and within delta's bound of v itself
    ia.reconstruct(noisy.i_and_M, noisy.i_or_M, v[0] - noisy.delta_M[0]), v, atol=2 * bound + 1e-4
  )


def _product_model(params, x_KF):
  return jnp.stack([jnp.zeros(x_KF.shape[0]), jnp.prod(x_KF, axis=1)], axis=1)  # log-odds of class 1 = prod


def test_product_game_has_a_single_and_interaction(np_rng):
  x = np_rng.uniform(0.5, 2.0, (1, 4)).astype(np.float32)
  v = ia.evaluate_subsets(_product_model, None, x, np.zeros(4, np.float32), np.arange(4), np.array([1]), 4, chunk=4)
  i_and = np.asarray(ia.and_interactions(v[0]))
  assert i_and[-1] == pytest.approx(float(np.prod(x)), rel=1e-5)
  np.testing.assert_allclose(i_and[:-1], 0.0, atol=1e-6)


def _mlp(params, x_KF):
  return jnp.tanh(x_KF @ params["w1"]) @ params["w2"]


def test_evaluate_subsets_matches_a_masking_loop(np_rng):
  params = {
    "w1": jnp.asarray(np_rng.normal(size=(6, 8)), jnp.float32),
    "w2": jnp.asarray(np_rng.normal(size=(8, 3)), jnp.float32),
  }
  x = np_rng.normal(size=(2, 6)).astype(np.float32)
  baseline = np.full(6, 0.5, np.float32)
  variable_of = np.array([0, 0, 1, -1, 2, 1])  # feature 3 is always kept
  labels = np.array([2, 0])
  v = np.asarray(ia.evaluate_subsets(_mlp, params, x, baseline, variable_of, labels, 3, chunk=3))
  for b in range(2):
    for t in range(8):
      keep = np.array([vid < 0 or bool(t >> vid & 1) for vid in variable_of])
      logits = np.asarray(_mlp(params, jnp.asarray(np.where(keep, x[b], baseline))[None]))[0].astype(np.float64)
      p = np.exp(logits - logits.max())
      p /= p.sum()
      assert v[b, t] == pytest.approx(np.log(p[labels[b]] / (1 - p[labels[b]])), rel=1e-4, abs=1e-4)


def test_order_strength_and_jaccard(np_rng):
  i_and = jnp.asarray(np_rng.normal(size=8), jnp.float32)
  i_or = jnp.asarray(np_rng.normal(size=8), jnp.float32)
  plus, minus = ia.order_strength(i_and, i_or, 0.5)
  orders = ia.subset_orders(3)
  for k in range(4):
    vals = [
      float(x) for arr in (i_and, i_or) for s, x in enumerate(np.asarray(arr)) if s and orders[s] == k and abs(x) >= 0.5
    ]
    assert float(plus[k]) == pytest.approx(sum(x for x in vals if x > 0), abs=1e-6)
    assert float(minus[k]) == pytest.approx(-sum(x for x in vals if x < 0), abs=1e-6)
  strength = ia.normalized_order_strength(jnp.stack([i_and, i_and]), jnp.stack([i_or, i_or]), 0.5)
  assert float(strength[1:].mean()) == pytest.approx(1.0)
  a = jnp.array([1.0, -2.0, 0.0])
  assert float(ia.jaccard(a, a)) == 1.0
  assert float(ia.jaccard(a, jnp.array([0.0, 0.0, 3.0]))) == 0.0
  assert float(ia.jaccard(a, -a)) == 0.0  # opposite signs share nothing
  assert float(ia.jaccard(jnp.array([1.0, 1.0]), jnp.array([1.0, 3.0]))) == pytest.approx(2 / 4)
  assert ia.order_vector(i_and, i_or, 2).shape == (6,)


@pytest.mark.parametrize(
  "n, sigma2, expected",
  [
    (4, 1.0, [2.728, 2.835, 2.905]),
    (4, 0.1, [2.090, 2.392, 2.567]),
    (4, 0.01, [1.326, 1.848, 2.154]),
    (6, 0.01, [1.301, 1.786, 2.098, 2.306, 2.453]),
  ],
)
def test_closed_form_order_ratios_match_the_paper(n, sigma2, expected):
  np.testing.assert_allclose(dynamics.order_ratios(n, sigma2), expected, atol=1e-3)


def test_rows_of_one_order_have_equal_norms_and_ratios_fall_with_sigma():
  norms = np.linalg.norm(dynamics.m_hat(5, 0.3), axis=1)
  orders = ia.subset_orders(5)
  for k in range(6):
    np.testing.assert_allclose(norms[orders == k], norms[orders == k][0], rtol=1e-9)
  assert (dynamics.order_ratios(5, 1.0) > dynamics.order_ratios(5, 0.01)).all()
  np.testing.assert_allclose(dynamics.order_ratios(5, 0.0), 1.0, rtol=1e-9)  # sigma = 0: no order bias


def test_fit_sigma2_recovers_the_generating_noise(np_rng):
  w_star = np_rng.normal(size=2**5)
  measured = dynamics.order_distribution(dynamics.closed_form_weights(w_star, 5, 0.1), 5)
  sigma2, predicted = dynamics.fit_sigma2(measured, w_star, 5)
  assert sigma2 == pytest.approx(0.1, rel=0.1)
  np.testing.assert_allclose(predicted, measured, atol=1e-2)


def test_fit_on_the_grid_edge_is_a_bound_and_the_end_point_fit_is_circular(np_rng):
  """Measured = the distribution of w* itself (what the final checkpoint is): the best fit
  runs to the smallest sigma^2 on the grid, so that value only bounds the fit."""
  w_star = np_rng.normal(size=2**4)
  sigma2, predicted = dynamics.fit_sigma2(dynamics.order_distribution(w_star, 4), w_star, 4)
  assert sigma2 == dynamics.SIGMA2_GRID[0]
  measured = dynamics.order_distribution(w_star, 4)
  at = lambda s2: dynamics.relative_residual(
    measured, dynamics.order_distribution(dynamics.closed_form_weights(w_star, 4, s2), 4)
  )
  assert at(0.0) < 1e-9 < at(1e-6) < at(1e-4) < at(1e-2)  # the optimum, sigma^2 = 0, lies past the edge
  assert dynamics.relative_residual(measured, predicted) == pytest.approx(at(dynamics.SIGMA2_GRID[0]))


def test_relative_residual_skips_order_0():
  measured, predicted = np.array([[0.0, 1.0, 2.0, 2.0]]), np.array([[7.0, 1.0, 2.0, 5.0]])
  np.testing.assert_allclose(dynamics.relative_residual(measured, predicted), [3.0 / 3.0])
  assert dynamics.relative_residual(measured[0], measured[0]) == 0.0


def test_errors():
  with pytest.raises(ValueError, match="n: expected 1 <= n <= 20"):
    ia.subset_masks(24)
  with pytest.raises(ValueError, match="baseline_F"):
    ia.evaluate_subsets(_mlp, None, np.zeros((1, 6)), np.zeros(5), np.arange(6) % 3, np.array([0]), 3)
  with pytest.raises(ValueError, match="variable_of_F"):
    ia.evaluate_subsets(_mlp, None, np.zeros((1, 6)), np.zeros(6), np.zeros(6, int), np.array([0]), 3)
  with pytest.raises(ValueError, match="2\\^n subsets"):
    ia.moebius(jnp.zeros(6))
  with pytest.raises(ValueError, match="n: expected 1 <= n <= 12"):
    dynamics.triggering_matrix(13)
  with pytest.raises(ValueError, match="sigma2"):
    dynamics.m_hat(3, -1.0)
  with pytest.raises(ValueError, match="noise_fraction"):
    ia.DecompositionConfig(noise_fraction=-0.1)
