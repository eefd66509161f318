"""Every preference loss against a scalar transcription of its formula, plus the
properties the spec names: ln 2 at init, gradient directions, sums vs averages."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from paperjax.align import dpo
from paperjax.align.logprobs import SequenceLogProbs


def ls(x):  # log sigmoid, scalar
  return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


def s(x):
  return 1 / (1 + math.exp(-x))


def _avg(total, n):
  return total / n


def slow(name, w, l, rw, rl, nw, nl, b, eps, c):
  """One pair's loss, written from the spec with python floats (w, l: policy sums; r*: reference sums)."""
  rho_w, rho_l = w - rw, l - rl
  d = rho_w - rho_l
  aw, al = _avg(w, nw), _avg(l, nl)
  d_avg = (aw - _avg(rw, nw)) - (al - _avg(rl, nl))
  if name == "sigmoid":
    return -(1 - eps) * ls(b * d) - eps * ls(-b * d)
  if name == "robust":
    return (-(1 - eps) * ls(b * d) + eps * ls(-b * d)) / (1 - 2 * eps)
  if name == "hinge":
    return max(0.0, 1 - b * d)
  if name == "ipo":
    return (d_avg - 1 / (2 * b)) ** 2
  if name == "exo_pair":
    return s(b * d) * (ls(b * d) - math.log(1 - eps)) + s(-b * d) * (ls(-b * d) - math.log(eps))
  if name == "nca_pair":
    return -ls(b * rho_w) - 0.5 * ls(-b * rho_w) - 0.5 * ls(-b * rho_l)
  if name == "bco_pair":
    return -ls(b * rho_w - c.bco_shift) - ls(-(b * rho_l - c.bco_shift))
  if name == "sppo_hard":
    return (rho_w - 1 / (2 * b)) ** 2 + (rho_l + 1 / (2 * b)) ** 2
  if name == "apo_zero":
    return 1 - s(b * rho_w) + s(b * rho_l)
  if name == "apo_down":
    return s(b * rho_w) + 1 - s(b * d)
  if name == "discopop":
    z = b * d
    m = s(z / c.discopop_tau)
    return (1 - m) * -ls(z) + m * math.exp(-z)
  if name == "rdpo":
    z = b * d - c.length_alpha * (nw - nl)
    return -(1 - eps) * ls(z) - eps * ls(-z)
  if name == "simpo":
    u = b * (aw - al) - c.gamma
    return -(1 - eps) * ls(u) - eps * ls(-u)
  if name == "orpo":
    log_odds = (aw - al) - (math.log(1 - math.exp(aw)) - math.log(1 - math.exp(al)))
    return -aw - c.orpo_lambda * ls(log_odds)
  raise KeyError(name)


PAIRWISE = [n for n in dpo.LOSSES if not n.startswith("aot")]


def _batch(np_rng, batch=6):
  counts_w = np_rng.integers(1, 20, batch).astype(np.float32)
  counts_l = np_rng.integers(1, 20, batch).astype(np.float32)
  # Summed log-probs: negative, about -1 per token.
  w, l = -counts_w * np_rng.uniform(0.3, 2, batch), -counts_l * np_rng.uniform(0.3, 2, batch)
  # Reference log-probs near the policy's, and log-probs all the same (<= 0: preference_loss refuses others).
  rw, rl = np.minimum(w + np_rng.normal(0, 1, batch), 0), np.minimum(l + np_rng.normal(0, 1, batch), 0)
  return [np.asarray(x, np.float32) for x in (w, l, rw, rl, counts_w, counts_l)]


def _pair(w, l, rw, rl, nw, nl):
  seq = lambda total, n: SequenceLogProbs(jnp.asarray(total), jnp.asarray(n))
  return dpo.PairLogProbs(seq(w, nw), seq(l, nl), seq(rw, nw), seq(rl, nl))


def _config(name, **kw):
  eps = 0.1 if name in ("sigmoid", "robust", "exo_pair", "rdpo", "simpo") else 0.0
  return dpo.PreferenceConfig(loss=name, beta=0.7, label_smoothing=eps, length_alpha=0.05, bco_shift=0.2, **kw)


@pytest.mark.parametrize("name", PAIRWISE)
def test_loss_matches_scalar_transcription(name, np_rng):
  arrays = _batch(np_rng)
  cfg = _config(name)
  loss, _ = dpo.preference_loss(_pair(*arrays), cfg)
  expected = np.mean([slow(name, *map(float, row), cfg.beta, cfg.label_smoothing, cfg) for row in zip(*arrays)])
  assert float(loss) == pytest.approx(expected, rel=1e-4, abs=1e-5)


@pytest.mark.parametrize("name", ["aot_pair", "aot"])
def test_aot_sorts_over_the_batch(name, np_rng):
  w, l, rw, rl, nw, nl = _batch(np_rng)
  cfg = _config(name)
  if name == "aot_pair":
    deltas = np.sort(w - rw) - np.sort(l - rl)
  else:
    deltas = np.sort(w - l) - np.sort(rw - rl)
  expected = np.mean([-ls(cfg.beta * float(x)) for x in deltas])
  loss, _ = dpo.preference_loss(_pair(w, l, rw, rl, nw, nl), cfg)
  assert float(loss) == pytest.approx(expected, rel=1e-5)


def test_sigmoid_dpo_is_ln2_when_policy_equals_reference(np_rng):
  w, l, _, _, nw, nl = _batch(np_rng)
  loss, metrics = dpo.preference_loss(_pair(w, l, w, l, nw, nl), dpo.PreferenceConfig())
  assert float(loss) == pytest.approx(math.log(2), abs=1e-7)
  assert float(metrics["reward_margin"]) == 0.0


@pytest.mark.parametrize("name", PAIRWISE)
def test_gradient_pushes_chosen_up_and_rejected_down(name, np_rng):
  """From a pair the policy ranks the wrong way (rho_w = -0.5, rho_l = +0.5)."""
  *_, nw, nl = _batch(np_rng, batch=1)
  rw, rl = np.float32([-8.0]), np.float32([-7.0])
  cfg = _config(name)

  def loss(policy_w, policy_l):
    return dpo.preference_loss(_pair(policy_w, policy_l, rw, rl, nw, nl), cfg)[0]

  g_w, g_l = jax.grad(loss, argnums=(0, 1))(jnp.asarray(rw - 0.5), jnp.asarray(rl + 0.5))
  assert float(g_l[0]) > 0, "descent must lower the rejected log-prob"
  if name != "apo_down":  # APO-down lowers both, the rejected one faster, by design
    assert float(g_w[0]) < 0, "descent must raise the chosen log-prob"


@pytest.mark.parametrize("name", list(dpo.LOSSES))
def test_averaged_losses_read_averages_and_the_rest_sums(name, np_rng):
  """Same sums, other lengths: only losses declared averaged (and R-DPO, which reads lengths) change."""
  w, l, rw, rl, nw, nl = _batch(np_rng)
  cfg = _config(name)
  a, _ = dpo.preference_loss(_pair(w, l, rw, rl, nw, nl), cfg)
  b, _ = dpo.preference_loss(_pair(w, l, rw, rl, nw * 2, nl + 3), cfg)
  expected_change = dpo.LOSSES[name].averaged or name == "rdpo"
  assert (abs(float(a) - float(b)) > 1e-6) == expected_change
  assert dpo.LOSSES[name].averaged == (name in ("ipo", "simpo", "orpo"))


def test_rpo_adds_the_chosen_nll(np_rng):
  arrays = _batch(np_rng)
  base, metrics = dpo.preference_loss(_pair(*arrays), dpo.PreferenceConfig())
  with_nll, _ = dpo.preference_loss(_pair(*arrays), dpo.PreferenceConfig(rpo_alpha=0.5))
  assert float(with_nll - base) == pytest.approx(0.5 * float(metrics["nll_chosen"]), rel=1e-5)
  assert float(metrics["nll_chosen"]) == pytest.approx(float(np.mean(-arrays[0] / arrays[4])), rel=1e-5)


def test_metrics(np_rng):
  w, l, rw, rl, nw, nl = _batch(np_rng)
  _, m = dpo.preference_loss(_pair(w, l, rw, rl, nw, nl), dpo.PreferenceConfig(beta=0.5))
  assert float(m["rewards_chosen"]) == pytest.approx(float(np.mean(0.5 * (w - rw))), rel=1e-5)
  assert float(m["reward_accuracy"]) == pytest.approx(float(np.mean((w - rw) > (l - rl))))


def test_kto_matches_transcription(np_rng):
  pol = np_rng.normal(-10, 2, 6).astype(np.float32)
  ref = pol + np_rng.normal(0, 1, 6).astype(np.float32)
  desirable = np.array([1, 0, 1, 1, 0, 0], bool)
  kl_pol, kl_ref = np_rng.normal(-10, 1, 6).astype(np.float32), np_rng.normal(-11, 1, 6).astype(np.float32)
  seq = lambda x: SequenceLogProbs(jnp.asarray(x), jnp.ones(6))
  loss, metrics = dpo.kto_loss(
    seq(pol), seq(ref), jnp.asarray(desirable), seq(kl_pol), seq(kl_ref), beta=0.3, undesirable_weight=1.5
  )
  z = max(0.0, float(np.mean(kl_pol - kl_ref)))
  per = [
    (1 - s(0.3 * (p - r - z))) if d else 1.5 * (1 - s(0.3 * (z - (p - r)))) for p, r, d in zip(pol, ref, desirable)
  ]
  assert float(loss) == pytest.approx(np.mean(per), rel=1e-5)
  assert float(metrics["kl"]) == pytest.approx(z, rel=1e-5)


def test_errors(np_rng):
  with pytest.raises(ValueError, match=r"PreferenceConfig.beta: expected float > 0, got float 0.0"):
    dpo.PreferenceConfig(beta=0.0)
  with pytest.raises(ValueError, match="label_smoothing"):
    dpo.PreferenceConfig(label_smoothing=0.5)
  with pytest.raises(ValueError, match="exo_pair needs"):
    dpo.PreferenceConfig(loss="exo_pair")
  with pytest.raises(ValueError, match="unknown 'ppo'"):
    dpo.PreferenceConfig(loss="ppo")
  w, l, rw, rl, nw, nl = _batch(np_rng)
  with pytest.raises(ValueError, match="needs ref_chosen"):
    dpo.preference_loss(dpo.PairLogProbs(*_pair(w, l, rw, rl, nw, nl)[:2]), dpo.PreferenceConfig())
  with pytest.raises(ValueError, match="one batch shape"):
    dpo.preference_loss(_pair(w, l[:4], rw, rl, nw, nl[:4]), dpo.PreferenceConfig())
  seq = SequenceLogProbs(jnp.zeros(3), jnp.ones(3))
  with pytest.raises(ValueError, match="beta"):
    dpo.kto_loss(seq, seq, jnp.ones(3, bool), seq, seq, beta=-1.0)
