"""RSO's statistical rejection sampling: acceptance frequencies against exp((r - max r) / beta),
the distribution of accepted sets against a python transcription of the paper's Algorithm 1,
the limits beta -> inf (uniform) and beta -> 0 (the best), the pairs and their validity, and
bad inputs. Frequencies are compared at 5 binomial standard errors, with fixed seeds."""

import math
import random
from collections import Counter

import jax
import numpy as np
import pytest

from paperjax.align import rejection_sampling as rs

DRAWS = 20000


def _tolerance(p, n):
  return 5 * np.sqrt(p * (1 - p) / n)


def test_first_pass_accepts_with_probability_exp_r_minus_max_over_beta():
  """With num_samples = Y no pass stops early, so the first pass accepts sample y exactly when
  its own draw passes: P = exp((r_y - max r) / beta)."""
  rewards = np.tile(np.float32([[0.3, -0.2, 0.8, -1.5]]), (DRAWS, 1))
  beta = 0.5
  out = rs.rso_accept(jax.random.key(0), rewards, num_samples=4, beta=beta)
  frequency = (np.asarray(out.round_BY) == 0).mean(axis=0)
  expected = np.exp((rewards[0] - rewards[0].max()) / beta)
  assert frequency[2] == 1.0  # the best is always accepted
  np.testing.assert_array_less(np.abs(frequency - expected), _tolerance(expected, DRAWS) + 1e-12)
  assert np.all(np.asarray(out.accepted_BY))  # every sample is accepted eventually


def algorithm_1(rewards, num_samples, beta, rng):
  """RSO's Algorithm 1 as the paper writes it, over a random visiting order (python floats)."""
  candidates = dict.fromkeys(rng.sample(range(len(rewards)), len(rewards)))
  accepted = []
  while len(accepted) < num_samples:
    top = max(rewards[c] for c in candidates)
    taken = []
    for c in candidates:
      if rng.random() >= math.exp((rewards[c] - top) / beta):
        continue
      accepted.append(c)
      taken.append(c)
      if len(accepted) == num_samples:
        break
    for c in taken:
      del candidates[c]
  return frozenset(accepted)


def test_accepted_sets_follow_algorithm_1():
  rewards = [0.5, 0.0, -0.4, 0.9]
  beta, draws = 0.6, 20000
  rng = random.Random(0)
  slow = Counter(algorithm_1(rewards, 2, beta, rng) for _ in range(draws))
  out = rs.rso_accept(jax.random.key(1), np.tile(np.float32([rewards]), (draws, 1)), num_samples=2, beta=beta)
  accepted = np.asarray(out.accepted_BY)
  assert np.all(accepted.sum(axis=1) == 2)
  ours = Counter(frozenset(np.flatnonzero(row).tolist()) for row in accepted)
  assert len(slow) == 6  # every pair occurs, so the comparison covers them all
  for subset in slow:
    p = (slow[subset] + ours[subset]) / (2 * draws)
    gap = abs(slow[subset] - ours[subset]) / draws
    assert gap < 5 * np.sqrt(p * (1 - p) * 2 / draws), (sorted(subset), slow[subset], ours[subset])


def test_large_beta_accepts_uniformly():
  rewards = np.tile(np.float32([[5.0, -3.0, 0.0, 1.0, 2.0]]), (DRAWS, 1))
  out = rs.rso_pairs(jax.random.key(2), rewards, beta=1e30, num_samples=2)
  frequency = np.asarray(out.accepted_BY).mean(axis=0)
  np.testing.assert_array_less(np.abs(frequency - 0.4), _tolerance(0.4, DRAWS))
  assert np.all(np.asarray(out.round_BY)[np.asarray(out.accepted_BY)] == 0)  # all in the first pass
  assert np.all(np.asarray(out.valid_B))


def test_small_beta_keeps_the_best():
  rewards = np.float32([[0.1, 0.7, -0.3, 0.4], [2.0, 1.0, 3.0, 0.0]])
  out = rs.rso_pairs(jax.random.key(3), rewards, beta=1e-30, num_samples=2)
  assert np.asarray(out.pairs).tolist() == [[1, 3], [2, 0]]  # the best two, ranked
  assert np.asarray(out.round_BY).tolist() == [[-1, 0, -1, 1], [1, -1, 0, -1]]  # the best remaining, pass by pass
  # A beta that is 0 (or subnormal, flushed to 0) in float32 is the same limit, not 0 / 0 for the best.
  tiny = rs.rso_pairs(jax.random.key(3), rewards, beta=1e-46, num_samples=2)
  assert np.asarray(tiny.pairs).tolist() == [[1, 3], [2, 0]] and np.all(np.asarray(tiny.valid_B))


def test_pairs_rank_the_accepted_samples_and_mark_what_cannot_pair(np_rng):
  rewards = np_rng.normal(0, 1, (64, 6)).astype(np.float32)
  out = rs.rso_pairs(jax.random.key(4), rewards, beta=1.0, num_samples=3)
  accepted, pairs = np.asarray(out.accepted_BY), np.asarray(out.pairs)
  assert pairs.shape == (64, 2) and np.all(np.asarray(out.valid_B))
  for row, (chosen, rejected), r in zip(accepted, pairs, rewards):
    assert row.sum() == 3 and row[chosen] and row[rejected]
    assert r[chosen] == r[row].max() and r[rejected] == r[row].min()
  # One valid sample (a NaN elsewhere is never read), and two accepted with equal rewards.
  rewards = np.float32([[0.5, math.nan, math.nan], [1.0, 1.0, 1.0]])
  valid = np.array([[True, False, False], [True, True, True]])
  out = rs.rso_pairs(jax.random.key(5), rewards, beta=1.0, valid_BY=valid)
  assert np.asarray(out.valid_B).tolist() == [False, False]
  assert np.asarray(out.pairs).tolist() == [[-1, -1], [-1, -1]]
  assert np.asarray(out.accepted_BY).tolist()[0] == [True, False, False]


R = np.float32([[0.0, 1.0, 2.0]])

BAD = [
  pytest.param(
    lambda: rs.rso_accept(jax.random.key(0), R, num_samples=4, beta=1.0),
    ValueError,
    r"num_samples: expected an int in \[1, 3\], got 4",
    id="more-than-Y",
  ),
  pytest.param(
    lambda: rs.rso_pairs(jax.random.key(0), R, num_samples=1, beta=1.0),
    ValueError,
    r"num_samples: expected an int >= 2",
    id="pair-of-one",
  ),
  pytest.param(
    lambda: rs.rso_accept(jax.random.key(0), R, num_samples=2, beta=0.0),
    ValueError,
    r"beta: expected a finite number > 0",
    id="beta-0",
  ),
  pytest.param(
    lambda: rs.rso_accept(jax.random.key(0), R, num_samples=2, beta="1"),
    TypeError,
    r"beta: expected a real number",
    id="beta-str",
  ),
  pytest.param(
    lambda: rs.rso_accept(jax.random.key(0), np.array([[0, 1, 2]]), num_samples=2, beta=1.0),
    TypeError,
    r"rewards_BY: expected float rewards",
    id="int-rewards",
  ),
  pytest.param(
    lambda: rs.rso_accept(jax.random.key(0), np.float32([0.0, 1.0]), num_samples=1, beta=1.0),
    ValueError,
    r"rewards_BY: expected \[B, Y\]",
    id="rank-1",
  ),
  pytest.param(
    lambda: rs.rso_accept(jax.random.key(0), np.float32([[0.0, math.nan]]), num_samples=1, beta=1.0),
    ValueError,
    r"rewards_BY: expected finite values",
    id="nan-where-valid",
  ),
  pytest.param(
    lambda: rs.rso_accept(jax.random.key(0), R, num_samples=1, beta=1.0, valid_BY=np.ones((1, 3), int)),
    TypeError,
    r"valid_BY: expected a bool mask",
    id="int-valid",
  ),
  pytest.param(
    lambda: rs.rso_accept(jax.random.key(0), R, num_samples=1, beta=1.0, valid_BY=np.ones((1, 2), bool)),
    ValueError,
    r"valid_BY: expected shape \(1, 3\)",
    id="valid-shape",
  ),
]


@pytest.mark.parametrize(("call", "error", "message"), BAD)
def test_bad_inputs(call, error, message):
  with pytest.raises(error, match=message):
    call()
