"""DRO's squared loss against a float transcription, its gradients against the paper's
formulas (with and without the policy's 1/tau rescaling), the known cases (the optimum, the
gradient's direction), and bad inputs."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from paperjax.align import dro
from paperjax.align.dro import DROConfig
from paperjax.align.logprobs import SequenceLogProbs


def _rows(np_rng, batch=5):
  policy = -np_rng.uniform(2, 20, batch)
  reference = np.minimum(policy + np_rng.normal(0, 1, batch), 0)
  rewards = np_rng.normal(0, 1, batch)
  values = np_rng.normal(0, 1, batch)
  return [np.asarray(x, np.float32) for x in (policy, reference, rewards, values)]


def _call(policy, reference, rewards, values, cfg):
  seq = lambda s: SequenceLogProbs(jnp.asarray(s), jnp.ones_like(jnp.asarray(s)))
  return dro.dro_loss(seq(policy), seq(reference), jnp.asarray(rewards), jnp.asarray(values), cfg)


def test_loss_is_the_squared_objective(np_rng):
  arrays = _rows(np_rng)
  cfg = DROConfig(tau=0.3)
  loss, metrics = _call(*arrays, cfg)
  rows = list(zip(*(a.tolist() for a in arrays)))
  expected = sum(0.5 * (r - v - 0.3 * (p - q)) ** 2 for p, q, r, v in rows) / len(rows)
  assert float(loss) == pytest.approx(expected, rel=1e-5)
  assert float(metrics["value_error"]) == pytest.approx(sum(r - v - 0.3 * (p - q) for p, q, r, v in rows) / 5, rel=1e-5)


@pytest.mark.parametrize("rescale", [False, True])
def test_gradients_are_the_papers(rescale, np_rng):
  """d/d log pi = -tau (r - V - tau rho) / B, divided by tau when rescaled (DRO-V's Algorithm 1);
  d/dV = -(r - V - tau rho) / B; the reference gets none."""
  policy, reference, rewards, values = _rows(np_rng)
  tau = 0.3
  cfg = DROConfig(tau=tau, rescale_policy=rescale)
  grads = jax.grad(lambda p, q, v: _call(p, q, rewards, v, cfg)[0], argnums=(0, 1, 2))(policy, reference, values)
  g_policy, g_reference, g_values = (np.asarray(g) for g in grads)
  for b, (p, q, r, v) in enumerate(zip(*(a.tolist() for a in (policy, reference, rewards, values)))):
    residual = r - v - tau * (p - q)
    expected_policy = -tau * residual / 5 / (tau if rescale else 1.0)
    assert g_policy[b] == pytest.approx(expected_policy, rel=1e-4, abs=1e-7)
    assert g_values[b] == pytest.approx(-residual / 5, rel=1e-4, abs=1e-7)
  assert np.all(g_reference == 0)


def test_unrescaled_gradient_is_the_plain_squared_loss_gradient(np_rng):
  policy, reference, rewards, values = _rows(np_rng)
  cfg = DROConfig(tau=0.7, rescale_policy=False)
  plain = lambda p, v: 0.5 * jnp.mean((rewards - v - 0.7 * (p - reference)) ** 2)
  got = jax.grad(lambda p, v: _call(p, reference, rewards, v, cfg)[0], argnums=(0, 1))(policy, values)
  want = jax.grad(plain, argnums=(0, 1))(policy, values)
  for g, w in zip(got, want):
    np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-8)


def test_optimum_has_zero_loss_and_zero_gradient():
  """V = r - tau rho solves every row: L = 0 and neither side moves."""
  policy, reference, rewards = np.float32([-3.0, -7.0]), np.float32([-4.0, -6.0]), np.float32([1.0, -0.5])
  values = rewards - 0.5 * (policy - reference)
  cfg = DROConfig(tau=0.5)
  loss, _ = _call(policy, reference, rewards, values, cfg)
  grads = jax.grad(lambda p, v: _call(p, reference, rewards, v, cfg)[0], argnums=(0, 1))(policy, values)
  assert float(loss) == pytest.approx(0.0, abs=1e-12)
  for g in grads:
    np.testing.assert_allclose(g, 0.0, atol=1e-6)


def test_reward_above_the_value_raises_the_log_prob_and_the_value():
  """At pi = pi_ref, a reward above V: descent raises log pi(y) and raises V."""
  cfg = DROConfig(tau=1.0)
  g_p, g_v = jax.grad(lambda p, v: _call(p, np.float32([-5.0]), np.float32([1.0]), v, cfg)[0], argnums=(0, 1))(
    np.float32([-5.0]), np.float32([0.0])
  )
  assert float(g_p[0]) < 0 and float(g_v[0]) < 0
  g_p, _ = jax.grad(lambda p, v: _call(p, np.float32([-5.0]), np.float32([-1.0]), v, cfg)[0], argnums=(0, 1))(
    np.float32([-5.0]), np.float32([0.0])
  )
  assert float(g_p[0]) > 0  # a reward below the value lowers it


SEQ = SequenceLogProbs(np.float32([-1.0, -2.0]), np.float32([1.0, 1.0]))
F2 = np.float32([0.0, 0.0])

BAD = [
  pytest.param(lambda: DROConfig(tau=0.0), ValueError, r"DROConfig.tau: expected float > 0", id="tau"),
  pytest.param(lambda: DROConfig(tau=math.inf), ValueError, r"DROConfig.tau", id="tau-inf"),
  pytest.param(
    lambda: dro.dro_loss(SEQ, SEQ, F2, F2, {"tau": 1.0}), TypeError, r"cfg: expected a dro.DROConfig", id="cfg"
  ),
  pytest.param(
    lambda: dro.dro_loss((np.float32([-1.0]),), SEQ, F2, F2, DROConfig()),
    TypeError,
    r"policy: expected logprobs.SequenceLogProbs",
    id="policy-type",
  ),
  pytest.param(
    lambda: dro.dro_loss(SEQ, SEQ, np.array([1, 0]), F2, DROConfig()),
    TypeError,
    r"rewards_B: expected a float array",
    id="int-rewards",
  ),
  pytest.param(
    lambda: dro.dro_loss(SEQ, SEQ, F2, np.float32([0.0]), DROConfig()),
    ValueError,
    r"policy, reference, rewards_B, values_B: expected one shape \[B\]",
    id="value-shape",
  ),
  pytest.param(
    lambda: dro.dro_loss(SEQ, SEQ, F2, np.float32([0.0, math.nan]), DROConfig()),
    ValueError,
    r"values_B: expected finite values",
    id="nan-value",
  ),
  pytest.param(
    lambda: dro.dro_loss(SEQ, SequenceLogProbs(np.float32([-1.0, 0.5]), F2), F2, F2, DROConfig()),
    ValueError,
    r"reference.sum_B: expected log-probs in",
    id="positive-log-prob",
  ),
  pytest.param(
    lambda: dro.dro_loss(SequenceLogProbs(np.float32([-1.0, -2.0]), np.float32([1.0, -1.0])), SEQ, F2, F2, DROConfig()),
    ValueError,
    r"policy.count_B: expected token counts in \[0, inf\], got \[-1.0\]",
    id="negative-count",
  ),
]


@pytest.mark.parametrize(("call", "error", "message"), BAD)
def test_bad_inputs(call, error, message):
  with pytest.raises(error, match=message):
    call()
