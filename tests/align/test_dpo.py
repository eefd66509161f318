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


def one(x):  # a batch of one, float32
  return np.array([x], np.float32)


def _avg(total, n):
  return total / n


def slow(name, w, l, rw, rl, nw, nl, b, eps, c):
  """One pair's loss, written from the spec with python floats (w, l: policy sums; r*: reference sums)."""
  rho_w, rho_l = w - rw, l - rl
  d = rho_w - rho_l
  aw, al = _avg(w, nw), _avg(l, nl)
  d_avg = (aw - _avg(rw, nw)) - (al - _avg(rl, nl))
  if name == "sigmoid":  # TRL 1.16's: no label smoothing (the config refuses eps > 0)
    return -ls(b * d)
  if name == "cdpo":  # conservative DPO
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
  if name == "sigmoid_norm":  # TRL: plain sigmoid on per-token log-ratios, no smoothing
    return -ls(b * d_avg)
  if name == "dpop":  # Smaug Eq. 3: penalty lambda max(0, log pi_ref(y_w) / pi(y_w)) inside the sigmoid
    penalty = c.dpop_lambda * max(0.0, rw - w)
    return -ls(b * (d - penalty))
  if name == "npo":  # NPO: only the forget (rejected) side
    return -(2 / b) * ls(-b * rho_l)
  if name == "slic":  # SLiC-HF: calibration hinge on policy sums + lambda * NLL of the target (chosen)
    return max(0.0, c.slic_delta - w + l) - c.slic_lambda * w
  raise KeyError(name)


# Losses that couple the pairs of a batch have their own tests below.
BATCHWISE = ("aot", "aot_unpaired", "beta_dpo", "cpo", "sft")
NAMES = [n for n in dpo.LOSSES if n not in dpo.ALIASES]
PAIRWISE = [n for n in NAMES if n not in BATCHWISE]


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
  eps = 0.1 if dpo.LOSSES[name].smoothing else 0.0
  return dpo.PreferenceConfig(loss=name, beta=0.7, label_smoothing=eps, length_alpha=0.05, bco_shift=0.2, **kw)


@pytest.mark.parametrize("name", PAIRWISE)
def test_loss_matches_scalar_transcription(name, np_rng):
  arrays = _batch(np_rng)
  cfg = _config(name)
  loss, _ = dpo.preference_loss(_pair(*arrays), cfg)
  expected = np.mean([slow(name, *map(float, row), cfg.beta, cfg.label_smoothing, cfg) for row in zip(*arrays)])
  assert float(loss) == pytest.approx(expected, rel=1e-4, abs=1e-5)


@pytest.mark.parametrize("name", ["aot_unpaired", "aot"])
def test_aot_sorts_over_the_batch(name, np_rng):
  w, l, rw, rl, nw, nl = _batch(np_rng)
  cfg = _config(name)
  if name == "aot_unpaired":
    deltas = np.sort(w - rw) - np.sort(l - rl)
  else:
    deltas = np.sort(w - l) - np.sort(rw - rl)
  eps, b = cfg.label_smoothing, cfg.beta
  assert eps > 0  # TRL smooths both
  expected = np.mean([-(1 - eps) * ls(b * float(x)) - eps * ls(-b * float(x)) for x in deltas])
  loss, _ = dpo.preference_loss(_pair(w, l, rw, rl, nw, nl), cfg)
  assert float(loss) == pytest.approx(expected, rel=1e-5)


def test_cpo_matches_transcription(np_rng):
  """TRL's CPOTrainer: cDPO-style sigmoid on summed policy log-probs, plus cpo_alpha times one
  token-level NLL mean over the batch's chosen tokens (not a mean of per-row means)."""
  w, l, rw, rl, nw, nl = _batch(np_rng)
  cfg = _config("cpo", cpo_alpha=0.7)
  loss, _ = dpo.preference_loss(_pair(w, l, rw, rl, nw, nl), cfg)
  nll = -sum(float(x) for x in w) / sum(float(n) for n in nw)
  eps, b = cfg.label_smoothing, cfg.beta
  per = [-(1 - eps) * ls(b * (float(x) - float(y))) - eps * ls(-b * (float(x) - float(y))) for x, y in zip(w, l)]
  assert float(loss) == pytest.approx(sum(per) / len(per) + 0.7 * nll, rel=1e-5)


def test_sft_is_one_token_mean_over_the_batch(np_rng):
  w, l, rw, rl, nw, nl = _batch(np_rng)
  loss, _ = dpo.preference_loss(_pair(w, l, rw, rl, nw, nl), dpo.PreferenceConfig(loss="sft"))
  total, tokens = 0.0, 0.0
  for x, n in zip(w, nw):
    total, tokens = total - float(x), tokens + float(n)
  assert float(loss) == pytest.approx(total / tokens, rel=1e-6)
  assert abs(float(loss) - float(np.mean(-w / nw))) > 1e-3  # not the mean of per-row means


def test_beta_dpo_scales_beta_by_the_batch_margin(np_rng):
  w, l, rw, rl, nw, nl = _batch(np_rng)
  cfg = dpo.PreferenceConfig(loss="beta_dpo", beta=0.3, beta_dpo_alpha=0.8, beta_dpo_m0=-0.2)
  deltas = [float(a - ra - (b - rb)) for a, b, ra, rb in zip(w, l, rw, rl)]
  margin = sum(deltas) / len(deltas)
  beta_batch = max(0.3 * (1 + 0.8 * (margin + 0.2)), 1e-3)
  loss, _ = dpo.preference_loss(_pair(w, l, rw, rl, nw, nl), cfg)
  assert float(loss) == pytest.approx(sum(-ls(beta_batch * d) for d in deltas) / len(deltas), rel=1e-5)
  # beta_batch is held constant: the gradient is sigmoid DPO's at beta = beta_batch.
  as_dpo = dpo.PreferenceConfig(beta=beta_batch)
  grad = lambda c: jax.grad(lambda x: dpo.preference_loss(_pair(x, l, rw, rl, nw, nl), c)[0])(jnp.asarray(w))
  np.testing.assert_allclose(grad(cfg), grad(as_dpo), rtol=1e-4, atol=1e-7)
  # alpha = 0 is DPO.
  plain, _ = dpo.preference_loss(_pair(w, l, rw, rl, nw, nl), dpo.PreferenceConfig(beta=0.3))
  still, _ = dpo.preference_loss(
    _pair(w, l, rw, rl, nw, nl), dpo.PreferenceConfig(loss="beta_dpo", beta=0.3, beta_dpo_alpha=0.0)
  )
  assert float(still) == pytest.approx(float(plain), rel=1e-6)


@pytest.mark.parametrize(
  "name, expected",
  [("dpop", math.log(2)), ("beta_dpo", math.log(2)), ("sigmoid_norm", math.log(2)), ("npo", 2 / 0.4 * math.log(2))],
)
def test_policy_equal_to_reference_gives_the_loss_at_zero(name, expected, np_rng):
  w, l, _, _, nw, nl = _batch(np_rng)
  loss, _ = dpo.preference_loss(_pair(w, l, w, l, nw, nl), dpo.PreferenceConfig(loss=name, beta=0.4))
  assert float(loss) == pytest.approx(expected, rel=1e-6)


def test_reference_free_losses_on_an_equal_pair():
  """lp_w == lp_l: CPO's preference term is ln 2, SLiC's hinge is its margin."""
  w = np.array([-3.0, -5.0], np.float32)
  pair = _pair(w, w, w, w, np.array([2, 4], np.float32), np.array([3, 3], np.float32))
  cpo, _ = dpo.preference_loss(pair, dpo.PreferenceConfig(loss="cpo", cpo_alpha=0.5))
  assert float(cpo) == pytest.approx(math.log(2) + 0.5 * 8.0 / 6.0, rel=1e-6)
  slic, _ = dpo.preference_loss(pair, dpo.PreferenceConfig(loss="slic", slic_delta=1.0, slic_lambda=0.5))
  assert float(slic) == pytest.approx(1.0 + 0.5 * 4.0, rel=1e-6)


def test_dpop_on_a_reversed_pair_above_the_reference():
  """With both sides above the reference the penalty is 0: DPOP is DPO, and
  loss(Delta) - loss(-Delta) = -b Delta."""
  cfg = dpo.PreferenceConfig(loss="dpop", beta=0.5)
  n = one(3.0)
  forward, _ = dpo.preference_loss(_pair(one(-2.0), one(-4.0), one(-3.0), one(-4.5), n, n), cfg)
  reverse, _ = dpo.preference_loss(_pair(one(-4.0), one(-2.0), one(-4.5), one(-3.0), n, n), cfg)
  # Forward: rho_w = 1, rho_l = 0.5, Delta = 0.5. Reversed: rho_w = 0.5 (still >= 0), Delta = -0.5.
  assert float(forward) == pytest.approx(-ls(0.25), rel=1e-6)
  assert float(forward) - float(reverse) == pytest.approx(-0.25, rel=1e-5)


def test_dpop_penalty_pushes_the_chosen_side_up():
  """Below the reference (rho_w < 0) DPOP's gradient on log pi(y_w) is larger than DPO's."""
  n, rw, rl = one(3.0), one(-3.0), one(-6.0)

  def grad_w(cfg):
    fn = lambda x: dpo.preference_loss(_pair(x, one(-8.0), rw, rl, n, n), cfg)[0]
    return float(jax.grad(fn)(one(-3.5))[0])

  assert grad_w(dpo.PreferenceConfig(loss="dpop", beta=0.5)) < 5 * grad_w(dpo.PreferenceConfig(beta=0.5)) < 0
  # lambda = 0 is DPO.
  assert grad_w(dpo.PreferenceConfig(loss="dpop", beta=0.5, dpop_lambda=0.0)) == pytest.approx(
    grad_w(dpo.PreferenceConfig(beta=0.5)), rel=1e-6
  )


@pytest.mark.parametrize(
  "name, w, l, rw, rl",
  [
    ("dpop", 0.0, -60.0, -30.0, -30.0),  # rho_w = 30, rho_l = -30
    ("npo", -1.0, -90.0, -1.0, -30.0),  # rho_l = -60
    ("sigmoid_norm", -1.0, -200.0, -10.0, -50.0),
    ("slic", -1.0, -20.0, -1.0, -20.0),  # margin 19 > delta: only the NLL is left
    ("cpo", -1.0, -200.0, -1.0, -20.0),
  ],
)
def test_saturated_margin_has_no_preference_gradient(name, w, l, rw, rl):
  n = one(1.0)
  cfg = dpo.PreferenceConfig(loss=name, beta=1.0, cpo_alpha=0.0, slic_lambda=0.0)
  fn = lambda x, y: dpo.preference_loss(_pair(x, y, one(rw), one(rl), n, n), cfg)[0]
  loss = fn(one(w), one(l))
  g_w, g_l = jax.grad(fn, argnums=(0, 1))(one(w), one(l))
  assert float(loss) < 1e-6 and abs(float(g_w[0])) < 1e-6 and abs(float(g_l[0])) < 1e-6
  if name == "slic":  # the regulariser alone: d/d lp_w of -lambda lp_w
    cfg = dpo.PreferenceConfig(loss="slic", slic_lambda=0.5)
    assert float(jax.grad(fn)(one(w), one(l))[0]) == -0.5


def test_npo_ignores_the_chosen_side(np_rng):
  w, l, rw, rl, nw, nl = _batch(np_rng)
  cfg = dpo.PreferenceConfig(loss="npo", beta=0.3)

  def fn(chosen, ref_chosen):
    return dpo.preference_loss(_pair(chosen, l, ref_chosen, rl, nw, nl), cfg)[0]

  g_w, g_rw = jax.grad(fn, argnums=(0, 1))(jnp.asarray(w), jnp.asarray(rw))
  assert not np.any(np.asarray(g_w)) and not np.any(np.asarray(g_rw))
  assert float(fn(w, rw)) == pytest.approx(float(fn(w - 1.0, np.minimum(rw + 2.0, 0))), rel=1e-7)


def test_sigmoid_dpo_is_ln2_when_policy_equals_reference(np_rng):
  w, l, _, _, nw, nl = _batch(np_rng)
  loss, metrics = dpo.preference_loss(_pair(w, l, w, l, nw, nl), dpo.PreferenceConfig())
  assert float(loss) == pytest.approx(math.log(2), abs=1e-7)
  assert float(metrics["reward_margin"]) == 0.0


@pytest.mark.parametrize("name", PAIRWISE)
def test_gradient_pushes_chosen_up_and_rejected_down(name, np_rng):
  """From a pair the policy ranks the wrong way (rho_w = -0.5, rho_l = +0.5)."""
  *_, nw, nl = _batch(np_rng, batch=1)
  rw, rl = one(-8.0), one(-7.0)
  cfg = _config(name)

  def loss(policy_w, policy_l):
    return dpo.preference_loss(_pair(policy_w, policy_l, rw, rl, nw, nl), cfg)[0]

  g_w, g_l = jax.grad(loss, argnums=(0, 1))(jnp.asarray(rw - 0.5), jnp.asarray(rl + 0.5))
  if name != "sft":  # SFT reads the chosen side only
    assert float(g_l[0]) > 0, "descent must lower the rejected log-prob"
  if name == "npo":  # NPO reads the rejected (forget) side only
    assert float(g_w[0]) == 0.0
  elif name != "apo_down":  # APO-down lowers both, the rejected one faster, by design
    assert float(g_w[0]) < 0, "descent must raise the chosen log-prob"


@pytest.mark.parametrize("name", NAMES)
def test_averaged_losses_read_averages_and_the_rest_sums(name, np_rng):
  """Same sums, other lengths: only losses declared averaged (and those that read lengths:
  R-DPO's penalty, the token-mean NLL of sft and CPO) change."""
  w, l, rw, rl, nw, nl = _batch(np_rng)
  cfg = _config(name)
  a, _ = dpo.preference_loss(_pair(w, l, rw, rl, nw, nl), cfg)
  b, _ = dpo.preference_loss(_pair(w, l, rw, rl, nw * 2, nl + 3), cfg)
  expected_change = dpo.LOSSES[name].averaged or name in ("rdpo", "sft", "cpo")
  assert (abs(float(a) - float(b)) > 1e-6) == expected_change
  assert dpo.LOSSES[name].averaged == (name in ("ipo", "simpo", "orpo", "sigmoid_norm"))


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


def test_smoothing_flags_name_the_losses_that_read_eps():
  readers = {n for n in NAMES if dpo.LOSSES[n].smoothing}
  assert readers == {"cdpo", "robust", "exo_pair", "aot", "aot_unpaired", "rdpo", "simpo", "cpo"}


def test_sigmoid_is_trls_and_cdpo_smooths(np_rng):
  """TRL 1.16's sigmoid ignores label_smoothing: ours refuses it there (pointing to cdpo) rather
  than apply cDPO or ignore it; cdpo at eps 0 is sigmoid, and at eps > 0 differs from it."""
  with pytest.raises(ValueError, match=r"label_smoothing: TRL 1.16's sigmoid ignores label_smoothing .*loss='cdpo'"):
    dpo.PreferenceConfig(loss="sigmoid", label_smoothing=0.1)
  with pytest.raises(ValueError, match=r"label_smoothing: TRL 1.16's sigmoid ignores"):
    dpo.PreferenceConfig(loss=("sigmoid", "robust"), label_smoothing=0.1)
  lp = _pair(*_batch(np_rng))
  plain, _ = dpo.preference_loss(lp, dpo.PreferenceConfig(beta=0.7))
  zero, _ = dpo.preference_loss(lp, dpo.PreferenceConfig(loss="cdpo", beta=0.7))
  smoothed, _ = dpo.preference_loss(lp, dpo.PreferenceConfig(loss="cdpo", beta=0.7, label_smoothing=0.1))
  assert float(zero) == pytest.approx(float(plain), rel=1e-6)
  assert abs(float(smoothed) - float(plain)) > 1e-3


@pytest.mark.parametrize("loss", ["hinge", "ipo", "sigmoid_norm", "orpo", "slic", ("hinge", "sft")])
def test_label_smoothing_no_loss_reads_is_refused(loss):
  with pytest.raises(ValueError, match=r"label_smoothing: none of loss .* reads it .*'cdpo'"):
    dpo.PreferenceConfig(loss=loss, label_smoothing=0.1)
  dpo.PreferenceConfig(loss=("hinge", "robust"), label_smoothing=0.1)  # robust reads it (hinge ignores it, as TRL)


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
