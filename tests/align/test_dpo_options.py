"""TRL 1.16's DPOConfig options in dpo.PreferenceConfig: sigmoid_norm and sft, combined losses
(MPO), LD-DPO's ld_alpha, f-DPO's f_divergence_type, WPO's use_weighting, TR-DPO's reference
updates, the aot_unpaired rename, and TRL's refusals. Each formula against a python-float or
numpy transcription written from TRL's code (per-token log-probs computed with numpy from the
logits), plus cases with known answers."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from paperjax.align import data, dpo, logprobs
from paperjax.align import train as align_train
from paperjax.align.logprobs import SequenceLogProbs
from paperjax.models.training import train
from paperjax.models.transformer import llama

B, T, V = 4, 9, 7
# Completion masks: prompt first, a formatting hole (row 1), padding; lengths differ inside each pair.
CHOSEN_MASK = np.array(
  [
    [0, 0, 1, 1, 1, 1, 1, 0, 0],
    [0, 0, 0, 1, 0, 1, 1, 1, 1],
    [0, 1, 1, 0, 0, 0, 0, 0, 0],
    [0, 0, 1, 1, 1, 0, 0, 0, 0],
  ],
  bool,
)
REJECTED_MASK = np.array(
  [
    [0, 0, 1, 1, 0, 0, 0, 0, 0],
    [0, 0, 0, 1, 1, 0, 0, 0, 0],
    [0, 1, 1, 1, 1, 1, 1, 0, 0],
    [0, 0, 1, 1, 1, 0, 0, 0, 0],
  ],
  bool,
)


def ls(x):  # log sigmoid, scalar
  return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


def _np_token_logprobs(logits, tokens):
  """lp[b, t] = log softmax(logits[b, t - 1])[tokens[b, t]] and log sum_v p_v^2, numpy float64."""
  z = logits.astype(np.float64)
  logp = z - z.max(-1, keepdims=True)
  logp = logp - np.log(np.exp(logp).sum(-1, keepdims=True))
  lp = np.zeros(tokens.shape)
  sq = np.zeros(tokens.shape)
  for b in range(tokens.shape[0]):
    for t in range(1, tokens.shape[1]):
      lp[b, t] = logp[b, t - 1, tokens[b, t]]
      sq[b, t] = math.log(np.sum(np.exp(2 * logp[b, t - 1])))
  return lp, sq


class Side:
  """One side (chosen or rejected) under one model: logits, tokens, mask, and its numpy truth."""

  def __init__(self, rng, mask, scale=1.0):
    self.logits = rng.normal(0, scale, (B, T, V)).astype(np.float32)
    self.tokens = rng.integers(0, V, (B, T))
    self.mask = mask
    self.lp, self.sq = _np_token_logprobs(self.logits, self.tokens)

  def seq(self, per_token=True):
    return logprobs.sequence_logprobs(
      jnp.asarray(self.logits), jnp.asarray(self.tokens), jnp.asarray(self.mask), per_token=per_token
    )

  def total(self, b):
    return float(np.sum(self.lp[b][self.mask[b]]))

  def count(self, b):
    return int(self.mask[b].sum())

  def ld_total(self, b, shared, alpha):
    """Completion tokens in order: the first `shared` count fully, the rest times alpha."""
    out, k = 0.0, 0
    for t in range(T):
      if self.mask[b, t]:
        k += 1
        out += self.lp[b, t] * (1.0 if k <= shared else alpha)
    return out


@pytest.fixture
def sides(np_rng):
  """Policy and reference sides sharing tokens (the reference's logits differ)."""
  cw, cl = Side(np_rng, CHOSEN_MASK), Side(np_rng, REJECTED_MASK)
  rw, rl = Side(np_rng, CHOSEN_MASK), Side(np_rng, REJECTED_MASK)
  for ref, pol in ((rw, cw), (rl, cl)):
    ref.tokens = pol.tokens
    ref.lp, ref.sq = _np_token_logprobs(ref.logits, ref.tokens)
  return cw, cl, rw, rl


def _pair(sides, per_token=True):
  return dpo.PairLogProbs(*(s.seq(per_token) for s in sides))


def _rhos(sides, alpha=None):
  cw, cl, rw, rl = sides
  out = []
  for b in range(B):
    if alpha is None:
      out.append((cw.total(b) - rw.total(b), cl.total(b) - rl.total(b)))
    else:
      shared = min(cw.count(b), cl.count(b))
      out.append(
        (
          cw.ld_total(b, shared, alpha) - rw.ld_total(b, shared, alpha),
          cl.ld_total(b, shared, alpha) - rl.ld_total(b, shared, alpha),
        )
      )
  return out


def _mean(xs):
  return sum(xs) / len(xs)


# ---- per-token log-probs ----


def test_per_token_fields_match_numpy(sides):
  cw = sides[0]
  s = cw.seq()
  m = CHOSEN_MASK
  np.testing.assert_allclose(s.token_BT, np.where(m, cw.lp, 0), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(s.log_sum_sq_BT, np.where(m, cw.sq, 0), rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(s.mask_BT, m.astype(np.float32))
  plain = cw.seq(per_token=False)
  np.testing.assert_allclose(s.sum_B, plain.sum_B, rtol=1e-6)
  assert plain.token_BT is None and plain.mask_BT is None and plain.log_sum_sq_BT is None
  # Two arrays still make a SequenceLogProbs, as before.
  assert SequenceLogProbs(plain.sum_B, plain.count_B).token_BT is None


# ---- sigmoid_norm, combined losses (MPO) ----


def test_loss_weights_combine_like_trl(sides):
  """MPO: sum_k w_k mean_B(loss_k); bco_pair without its shift, sft one token mean."""
  cfg = dpo.PreferenceConfig(loss=("sigmoid", "bco_pair", "sft"), loss_weights=(0.8, 0.2, 1.0), beta=0.3)
  loss, _ = dpo.preference_loss(_pair(sides), cfg)
  cw = sides[0]
  sig = _mean([-ls(0.3 * (w - l)) for w, l in _rhos(sides)])
  bco = _mean([-ls(0.3 * w) - ls(-0.3 * l) for w, l in _rhos(sides)])
  sft = -sum(cw.total(b) for b in range(B)) / sum(cw.count(b) for b in range(B))
  assert float(loss) == pytest.approx(0.8 * sig + 0.2 * bco + 1.0 * sft, rel=1e-5)
  # Weights default to 1.
  ones, _ = dpo.preference_loss(_pair(sides), dpo.PreferenceConfig(loss=("sigmoid", "sft"), beta=0.3))
  assert float(ones) == pytest.approx(sig + sft, rel=1e-5)


def test_sigmoid_norm_reads_per_token_ratios(sides):
  cw, cl, _, _ = sides
  loss, _ = dpo.preference_loss(_pair(sides), dpo.PreferenceConfig(loss="sigmoid_norm", beta=2.0))
  per = [-ls(2.0 * (w / cw.count(b) - l / cl.count(b))) for b, (w, l) in enumerate(_rhos(sides))]
  assert float(loss) == pytest.approx(_mean(per), rel=1e-5)


# ---- LD-DPO ----


@pytest.mark.parametrize("name", ["sigmoid", "ipo"])
def test_ld_alpha_matches_transcription(name, sides):
  cw, cl, _, _ = sides
  cfg = dpo.PreferenceConfig(loss=name, beta=0.5, ld_alpha=0.3)
  loss, metrics = dpo.preference_loss(_pair(sides), cfg)
  rhos = _rhos(sides, alpha=0.3)
  if name == "sigmoid":
    expected = _mean([-ls(0.5 * (w - l)) for w, l in rhos])
  else:  # TRL divides the weighted sums by the full lengths
    expected = _mean([(w / cw.count(b) - l / cl.count(b) - 1 / (2 * 0.5)) ** 2 for b, (w, l) in enumerate(rhos)])
  assert float(loss) == pytest.approx(expected, rel=1e-5)
  assert float(metrics["reward_margin"]) == pytest.approx(_mean([0.5 * (w - l) for w, l in rhos]), rel=1e-5)


def test_ld_alpha_one_is_plain_and_zero_drops_the_verbose_tail(sides, np_rng):
  plain, _ = dpo.preference_loss(_pair(sides), dpo.PreferenceConfig())
  one, _ = dpo.preference_loss(_pair(sides), dpo.PreferenceConfig(ld_alpha=1.0))
  assert float(one) == pytest.approx(float(plain), rel=1e-6)
  # Row 2's rejected completion (5 tokens) is longer than its chosen (2): its last 3 are the tail.
  cw, cl, rw, rl = sides
  changed = Side(np_rng, REJECTED_MASK)
  changed.tokens = cl.tokens
  changed.logits = cl.logits.copy()
  changed.logits[2, 4:] += np_rng.normal(0, 3, (T - 4, V)).astype(np.float32)  # scores tokens 5.. (tail)

  def loss(alpha, rejected):
    return float(dpo.preference_loss(_pair((cw, rejected, rw, rl)), dpo.PreferenceConfig(ld_alpha=alpha))[0])

  assert loss(0.0, changed) == pytest.approx(loss(0.0, cl), rel=1e-6)
  assert abs(loss(0.5, changed) - loss(0.5, cl)) > 1e-4


def test_sft_ignores_ld_weighting(sides):
  """In MPO with a reference-based loss, the sft term reads the plain sums (TRL)."""
  cw = sides[0]
  mixed, _ = dpo.preference_loss(_pair(sides), dpo.PreferenceConfig(loss=("sigmoid", "sft"), ld_alpha=0.0))
  alone, _ = dpo.preference_loss(_pair(sides), dpo.PreferenceConfig(ld_alpha=0.0))
  sft = -sum(cw.total(b) for b in range(B)) / int(CHOSEN_MASK.sum())
  assert float(mixed) - float(alone) == pytest.approx(sft, rel=1e-5)


@pytest.mark.parametrize("loss", ["sft", "simpo", "orpo", "cpo", "slic", ("simpo", "sft")])
def test_ld_alpha_with_reference_free_losses_only_is_refused(loss):
  """They read plain sums: ld_alpha would have no effect (TRL accepts it silently)."""
  with pytest.raises(ValueError, match=r"ld_alpha: LD-DPO weights the log-probs of reference-based losses only"):
    dpo.PreferenceConfig(loss=loss, ld_alpha=0.5)


# ---- f-DPO ----


def _f(kind, rho, coef=0.5):
  if kind == "reverse_kl":
    return rho
  if kind == "forward_kl":  # f'(u) = 1 - 1/u
    return 1 - math.exp(-rho)
  if kind == "js_divergence":  # f'(u) = log(2u / (1 + u))
    u = math.exp(rho)
    return math.log(2 * u / (1 + u))
  return (math.exp((coef - 1) * rho) - 1) / (coef - 1)  # (u^(c-1) - 1) / (c - 1)


@pytest.mark.parametrize("kind", ["forward_kl", "js_divergence", "alpha_divergence"])
@pytest.mark.parametrize("name", ["sigmoid", "ipo", "sigmoid_norm", "hinge"])
def test_f_divergence_matches_transcription(kind, name, sides):
  cw, cl, _, _ = sides
  cfg = dpo.PreferenceConfig(loss=name, beta=0.4, f_divergence_type=kind, f_alpha_divergence_coef=0.3)
  loss, _ = dpo.preference_loss(_pair(sides), cfg)
  per = []
  for b, (w, l) in enumerate(_rhos(sides)):
    sw, sl = _f(kind, w, 0.3), _f(kind, l, 0.3)
    if name in ("ipo", "sigmoid_norm"):  # TRL: f of the summed log-ratio, then per token
      sw, sl = sw / cw.count(b), sl / cl.count(b)
    d = sw - sl
    per.append(
      {"sigmoid": -ls(0.4 * d), "sigmoid_norm": -ls(0.4 * d), "hinge": max(0.0, 1 - 0.4 * d)}.get(
        name, (d - 1 / 0.8) ** 2
      )
    )
  assert float(loss) == pytest.approx(_mean(per), rel=1e-4)


def test_alpha_divergence_at_one_is_reverse_kl(sides):
  plain, _ = dpo.preference_loss(_pair(sides), dpo.PreferenceConfig(loss="ipo"))
  at_one, _ = dpo.preference_loss(
    _pair(sides), dpo.PreferenceConfig(loss="ipo", f_divergence_type="alpha_divergence", f_alpha_divergence_coef=1.0)
  )
  assert float(at_one) == pytest.approx(float(plain), rel=1e-6)


@pytest.mark.parametrize("name", ["nca_pair", "bco_pair", "sppo_hard", "aot", "aot_unpaired", "apo_zero", "apo_down"])
def test_f_divergence_refused_where_trl_refuses(name):
  only = r"f_divergence_type: 'js_divergence' is only supported for loss types built on the chosen-rejected reward"
  with pytest.raises(ValueError, match=only + r" difference .*beta log Z\(x\) term that cancels only"):
    dpo.PreferenceConfig(loss=name, f_divergence_type="js_divergence")
  with pytest.raises(ValueError, match="Use the default 'reverse_kl'"):
    dpo.PreferenceConfig(loss=("sigmoid", name), f_divergence_type="forward_kl")


def test_f_divergence_accepted_where_trl_accepts():
  for name in ("sigmoid", "sigmoid_norm", "hinge", "ipo", "exo_pair", "robust", "discopop", "sft"):
    dpo.PreferenceConfig(loss=name, f_divergence_type="forward_kl", label_smoothing=1e-3 if name == "exo_pair" else 0.0)


# ---- WPO ----


def _wpo(side, b):
  m = side.mask[b]
  return math.exp(float(np.sum((side.lp[b] - side.sq[b])[m])) / max(int(m.sum()), 1))


@pytest.mark.parametrize("loss", ["sigmoid", "sft", ("sigmoid", "sft")])
def test_wpo_weights_each_pair(loss, sides):
  cw, cl, _, _ = sides
  cfg = dpo.PreferenceConfig(loss=loss, beta=0.5, use_weighting=True)
  value, metrics = dpo.preference_loss(_pair(sides), cfg)
  weights = [_wpo(cw, b) * _wpo(cl, b) for b in range(B)]
  sig = _mean([-ls(0.5 * (w - l)) * weights[b] for b, (w, l) in enumerate(_rhos(sides))])
  sft = -sum(cw.total(b) for b in range(B)) / int(CHOSEN_MASK.sum()) * _mean(weights)  # TRL crashes here
  expected = {"sigmoid": sig, "sft": sft}.get(loss, sig + sft) if isinstance(loss, str) else sig + sft
  assert float(value) == pytest.approx(expected, rel=1e-5)
  assert float(metrics["wpo_weight"]) == pytest.approx(_mean(weights), rel=1e-5)
  assert all(0 < w <= 1 for w in weights)  # p(y_t) <= sum_v p_v^2 need not hold per token, but on average here


def test_wpo_weights_carry_no_gradient(sides):
  pair = _pair(sides)
  cfg = dpo.PreferenceConfig(use_weighting=True)

  def fn(token_BT, log_sum_sq_BT):
    chosen = pair.chosen._replace(token_BT=token_BT, log_sum_sq_BT=log_sum_sq_BT)
    return dpo.preference_loss(pair._replace(chosen=chosen), cfg)[0]

  g_token, g_sq = jax.grad(fn, argnums=(0, 1))(pair.chosen.token_BT, pair.chosen.log_sum_sq_BT)
  assert not np.any(np.asarray(g_token)) and not np.any(np.asarray(g_sq))


# ---- the aot_unpaired rename ----


def test_aot_pair_is_an_alias_of_aot_unpaired(sides):
  assert dpo.LOSSES["aot_pair"] is dpo.LOSSES["aot_unpaired"] and dpo.ALIASES == {"aot_pair": "aot_unpaired"}
  with pytest.warns(DeprecationWarning, match="'aot_pair' is an alias of 'aot_unpaired'"):
    old = dpo.PreferenceConfig(loss="aot_pair", label_smoothing=0.1)
  new = dpo.PreferenceConfig(loss="aot_unpaired", label_smoothing=0.1)
  assert float(dpo.preference_loss(_pair(sides), old)[0]) == float(dpo.preference_loss(_pair(sides), new)[0])


# ---- refusals ----


@pytest.mark.parametrize(
  "kw, error, match",
  [
    (
      dict(loss=("sigmoid", "sft"), loss_weights=(1.0,)),
      ValueError,
      r"loss_weights: expected one weight per loss type \(2 for \('sigmoid', 'sft'\)\), got 1",
    ),
    (
      dict(loss="exo_pair"),
      ValueError,
      r"label_smoothing: exo_pair needs 0 < eps < 1 \(the EXO paper recommends 1e-3\), got 0.0",
    ),
    (
      dict(loss=("exo_pair", "robust"), label_smoothing=0.6),
      ValueError,
      r"label_smoothing: expected 0 <= eps < 0.5, got 0.6",
    ),
    (
      dict(loss="aot", use_weighting=True),
      ValueError,
      r"use_weighting: WPO weighting is not implemented for \['aot'\]: those losses sort the batch",
    ),
    (dict(loss=("sigmoid", "aot_unpaired"), use_weighting=True), ValueError, r"not implemented for \['aot_unpaired'\]"),
    (dict(ld_alpha=1.5), ValueError, r"PreferenceConfig.ld_alpha: expected float in \[0, 1\] or None, got float 1.5"),
    (dict(ld_alpha=-0.1), ValueError, r"PreferenceConfig.ld_alpha"),
    (dict(loss=()), ValueError, r"loss: expected a loss name or a non-empty tuple"),
    (dict(loss=("sigmoid", "ppo")), ValueError, r"loss: unknown 'ppo'"),
    (dict(loss=["sigmoid"]), TypeError, r"PreferenceConfig.loss: expected str or a tuple of \(str\), got list"),
    (dict(f_divergence_type="kl"), ValueError, r"PreferenceConfig.f_divergence_type: expected one of 'reverse_kl'"),
    (dict(ref_model_mixup_alpha=1.5), ValueError, r"PreferenceConfig.ref_model_mixup_alpha"),
    (dict(ref_model_sync_steps=0), ValueError, r"PreferenceConfig.ref_model_sync_steps"),
  ],
)
def test_config_refusals(kw, error, match):
  with pytest.raises(error, match=match):
    dpo.PreferenceConfig(**kw)


def test_options_refuse_missing_per_token_log_probs(sides):
  plain = _pair(sides, per_token=False)
  with pytest.raises(ValueError, match=r"lp.chosen: ld_alpha needs per-token log-probs \(token_BT, mask_BT are None\)"):
    dpo.preference_loss(plain, dpo.PreferenceConfig(ld_alpha=0.5))
  with pytest.raises(ValueError, match=r"lp.ref_chosen: ld_alpha needs per-token"):
    dpo.preference_loss(_pair(sides)._replace(ref_chosen=plain.ref_chosen), dpo.PreferenceConfig(ld_alpha=0.5))
  with pytest.raises(ValueError, match=r"lp.chosen: use_weighting needs per-token log-probs \(token_BT, log_sum_sq_BT"):
    dpo.preference_loss(plain, dpo.PreferenceConfig(use_weighting=True))


# ---- TR-DPO ----


def test_mix_reference():
  ref = {"w": np.array([1.0, 2.0], np.float32), "b": {"c": np.float32(4.0)}}
  policy = {"w": np.array([3.0, -2.0], np.float32), "b": {"c": np.float32(0.0)}}
  mixed = align_train.mix_reference(ref, policy, 0.25)
  np.testing.assert_allclose(mixed["w"], [1.5, 1.0])
  assert float(mixed["b"]["c"]) == 3.0
  np.testing.assert_array_equal(align_train.mix_reference(ref, policy, 1.0)["w"], policy["w"])  # the "hard" update
  np.testing.assert_array_equal(align_train.mix_reference(ref, policy, 0.0)["w"], ref["w"])
  with pytest.raises(ValueError, match=r"alpha: expected a finite number in \[0, 1\], got 1.5"):
    align_train.mix_reference(ref, policy, 1.5)
  with pytest.raises(ValueError, match=r"policy_params\['w'\]: expected shape \(2,\)"):
    align_train.mix_reference(ref, {**policy, "w": np.zeros(3, np.float32)}, 0.5)
  with pytest.raises(
    ValueError, match=r"policy_params: expected the leaves of the config's init; missing: policy_params\['b'\]\['c'\]"
  ):
    align_train.mix_reference(ref, {"w": policy["w"], "b": {}}, 0.5)


def test_sync_reference_every_sync_steps():
  ref = {"w": np.zeros(2, np.float32)}
  pcfg = dpo.PreferenceConfig(sync_ref_model=True, ref_model_mixup_alpha=0.5, ref_model_sync_steps=3)

  def state(step):
    return train.TrainState(jnp.int32(step), {"w": np.ones(2, np.float32)}, None)

  assert align_train.sync_reference(ref, state(2), pcfg) is ref
  assert align_train.sync_reference(ref, state(0), pcfg) is ref
  np.testing.assert_allclose(align_train.sync_reference(ref, state(3), pcfg)["w"], [0.5, 0.5])
  np.testing.assert_allclose(align_train.sync_reference(ref, state(6), pcfg)["w"], [0.5, 0.5])
  assert align_train.sync_reference(ref, state(3), dpo.PreferenceConfig(ref_model_sync_steps=3)) is ref  # off


# ---- the training step provides per-token log-probs ----

MODEL = llama.LlamaConfig(vocab_size=8, dim=8, n_layers=1, n_heads=2, n_kv_heads=1, ffn_dim=16, max_seq_len=16)
TCFG = train.TrainConfig(batch_size=2, total_steps=2, warmup_steps=1)
# Two pairs of different completion lengths (prompt BOS 5 SEP).
PAIRS = data.from_token_arrays(
  np.array([[1, 5, 2], [1, 6, 2]]), np.array([[4, 4, 3], [4, 3, 0]]), np.array([[6, 3, 0], [6, 6, 3]])
)


def test_preference_step_with_ld_alpha_and_wpo():
  pcfg = dpo.PreferenceConfig(ld_alpha=0.5, use_weighting=True, beta=0.5)
  params = llama.init(jax.random.key(0), MODEL)
  ref_params = jax.tree.map(lambda x: x * 0.9, params)
  step = align_train.make_preference_step(MODEL, TCFG, pcfg)
  reference = align_train.reference_logprobs(ref_params, MODEL, PAIRS, per_token=True)
  sums_only = tuple(SequenceLogProbs(s.sum_B, s.count_B) for s in reference)
  with pytest.raises(ValueError, match=r"reference.chosen.token_BT: ld_alpha needs per-token reference log-probs"):
    step(train.start_state(params, TCFG), PAIRS, sums_only)
  _, metrics = step(train.start_state(params, TCFG), PAIRS, reference)
  policy = align_train.reference_logprobs(params, MODEL, PAIRS, per_token=True)  # the same values, compiled once
  expected, _ = dpo.preference_loss(dpo.PairLogProbs(*policy, *reference), pcfg)
  plain, _ = dpo.preference_loss(dpo.PairLogProbs(*policy, *reference), dpo.PreferenceConfig(beta=0.5))
  assert float(metrics["loss"]) == pytest.approx(float(expected), rel=1e-5)
  assert abs(float(expected) - float(plain)) > 1e-4  # the options changed the loss
