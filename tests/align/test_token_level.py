"""TDPO and CRINGE against transcriptions written differently (python loops over tokens and the
vocabulary, numpy with a fixed sample), the cases whose answer is known (policy == reference,
the stop-gradient, gradient signs, the sampler's distribution), a tiny Llama training step, and
bad inputs."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from paperjax.align import data, dpo, logprobs, tasks, token_level
from paperjax.align.token_level import CringeConfig, TDPOConfig, TokenTerms
from paperjax.models.training import train
from paperjax.models.transformer import llama

TASK = tasks.SortTask(length=2, num_digits=4)  # vocabulary 8
MODEL = llama.LlamaConfig(vocab_size=8, dim=8, n_layers=1, n_heads=2, n_kv_heads=1, ffn_dim=16, max_seq_len=16)


def ls(x):  # log sigmoid, scalar
  return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


def _log_softmax_row(row):
  top = max(row)
  total = sum(math.exp(v - top) for v in row)
  return [v - top - math.log(total) for v in row]


def slow_terms(policy, ref, tokens, mask):
  """(rho, D_SeqKL) per row with python floats: a loop over positions and the vocabulary."""
  rho, kl = [], []
  for b in range(len(tokens)):
    r = k = 0.0
    for t in range(1, len(tokens[b])):
      if not mask[b][t]:
        continue
      lp, lq = _log_softmax_row(policy[b][t - 1]), _log_softmax_row(ref[b][t - 1])
      r += lp[tokens[b][t]] - lq[tokens[b][t]]
      k += sum(math.exp(lq[v]) * (lq[v] - lp[v]) for v in range(len(lp)))
    rho.append(r)
    kl.append(k)
  return rho, kl


def _side(np_rng, batch=3, time=6, vocab=7, scale=1.0):
  policy = np_rng.normal(0, scale, (batch, time, vocab)).astype(np.float32)
  ref = (policy + np_rng.normal(0, 0.7, policy.shape)).astype(np.float32)
  tokens = np_rng.integers(0, vocab, (batch, time)).astype(np.int32)
  mask = np.zeros((batch, time), bool)
  for b, (start, end) in enumerate([(2, 6), (1, 4), (3, 5)][:batch]):
    mask[b, start:end] = True
  return policy, ref, tokens, mask


def test_sequential_kl_and_rho_match_a_loop(np_rng):
  policy, ref, tokens, mask = _side(np_rng)
  terms = token_level.token_terms(jnp.asarray(policy), jnp.asarray(ref), jnp.asarray(tokens), jnp.asarray(mask))
  rho, kl = slow_terms(policy.tolist(), ref.tolist(), tokens.tolist(), mask.tolist())
  assert min(kl) > 0.05  # the rows differ, so the comparison is not 0 == 0
  np.testing.assert_allclose(terms.rho_B, rho, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(terms.seq_kl_B, kl, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(token_level.sequential_kl(policy, ref, mask), kl, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(terms.count_B, mask.sum(1))
  expected_logps = logprobs.sequence_logprobs(jnp.asarray(policy), jnp.asarray(tokens), jnp.asarray(mask)).sum_B
  np.testing.assert_allclose(terms.logps_B, expected_logps, rtol=1e-6)


def test_kl_literal_two_token_vocabulary():
  """Position 0 predicts token 1: KL(q || p) for q = (1/2, 1/2), p = softmax(0, log 3) = (1/4, 3/4)."""
  policy = np.array([[[0.0, math.log(3)], [5.0, 5.0]]], np.float32)
  ref = np.zeros((1, 2, 2), np.float32)
  kl = token_level.sequential_kl(policy, ref, np.array([[False, True]]))
  expected = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)  # = 0.5 log(4/3)
  assert float(kl[0]) == pytest.approx(expected, rel=1e-6)


def slow_tdpo(rho_w, rho_l, kl_w, kl_l, cfg):
  u = cfg.beta * (rho_w - rho_l)
  delta = cfg.beta * (kl_l - kl_w) if cfg.variant == 1 else cfg.alpha * (cfg.beta * kl_l - cfg.beta * kl_w)
  return -ls(u - delta)


def _terms(rho, kl):
  rho, kl = np.asarray(rho, np.float32), np.asarray(kl, np.float32)
  return TokenTerms(jnp.asarray(rho), jnp.asarray(kl), jnp.asarray(rho - 5.0), jnp.ones_like(jnp.asarray(rho)))


@pytest.mark.parametrize("variant", [1, 2])
def test_tdpo_loss_matches_scalar_transcription(variant, np_rng):
  rho_w, rho_l = np_rng.normal(0, 2, 5), np_rng.normal(0, 2, 5)
  kl_w, kl_l = np_rng.uniform(0, 3, 5), np_rng.uniform(0, 3, 5)
  cfg = TDPOConfig(beta=0.3, alpha=0.7, variant=variant)
  loss, metrics = token_level.tdpo_loss(_terms(rho_w, kl_w), _terms(rho_l, kl_l), cfg)
  rows = zip(*(x.astype(np.float32).tolist() for x in (rho_w, rho_l, kl_w, kl_l)))
  expected = np.mean([slow_tdpo(*row, cfg) for row in rows])
  assert float(loss) == pytest.approx(expected, rel=1e-5)
  assert float(metrics["rewards_chosen"]) == pytest.approx(float(np.mean(0.3 * (rho_w + kl_w))), rel=1e-5)
  assert float(metrics["kl_rejected"]) == pytest.approx(float(np.mean(kl_l)), rel=1e-5)


@pytest.mark.parametrize("variant", [1, 2])
def test_policy_equal_to_reference_gives_zero_kl_and_ln2(variant, np_rng):
  policy, _, tokens, mask = _side(np_rng)
  side = token_level.token_terms(jnp.asarray(policy), jnp.asarray(policy), jnp.asarray(tokens), jnp.asarray(mask))
  assert np.all(np.asarray(side.seq_kl_B) == 0) and np.all(np.asarray(side.rho_B) == 0)
  loss, metrics = token_level.tdpo_loss(side, side, TDPOConfig(variant=variant))
  assert float(loss) == pytest.approx(math.log(2), abs=1e-7)
  assert float(metrics["reward_margin"]) == 0.0


def test_tdpo2_with_alpha_0_is_sigmoid_dpo(np_rng):
  """With alpha = 0 the KL terms drop out: DPO's sigmoid loss on the same log-ratios (dpo.py)."""
  pw, rw, tw, mw = _side(np_rng)
  pl, rl, tl, ml = _side(np_rng)
  chosen = token_level.token_terms(*map(jnp.asarray, (pw, rw, tw, mw)))
  rejected = token_level.token_terms(*map(jnp.asarray, (pl, rl, tl, ml)))
  loss, _ = token_level.tdpo_loss(chosen, rejected, TDPOConfig(beta=0.4, alpha=0.0))
  seq = lambda logits, tokens, mask: logprobs.sequence_logprobs(*map(jnp.asarray, (logits, tokens, mask)))
  pair = dpo.PairLogProbs(seq(pw, tw, mw), seq(pl, tl, ml), seq(rw, tw, mw), seq(rl, tl, ml))
  expected, _ = dpo.preference_loss(pair, dpo.PreferenceConfig(beta=0.4))
  assert float(loss) == pytest.approx(float(expected), rel=1e-5)


def test_tdpo2_stops_the_gradient_of_the_chosen_kl():
  """TDPO1 rewards a larger chosen KL (descent raises it); TDPO2's stop-gradient removes that
  push; both lower the rejected KL."""
  rho_w, rho_l, kl = jnp.float32([0.2]), jnp.float32([0.5]), jnp.float32([1.0])

  def loss(kl_w, kl_l, variant):
    cfg = TDPOConfig(beta=0.5, alpha=0.5, variant=variant)
    side = lambda rho, kl: TokenTerms(rho, kl, rho - 5.0, jnp.ones(1))
    return token_level.tdpo_loss(side(rho_w, kl_w), side(rho_l, kl_l), cfg)[0]

  g1_w, g1_l = jax.grad(loss, argnums=(0, 1))(kl, kl, 1)
  g2_w, g2_l = jax.grad(loss, argnums=(0, 1))(kl, kl, 2)
  assert float(g1_w[0]) < 0 and float(g2_w[0]) == 0.0
  assert float(g1_l[0]) > 0 and float(g2_l[0]) > 0
  assert float(g2_l[0]) == pytest.approx(0.5 * float(g1_l[0]), rel=1e-6)  # alpha weighs the rejected KL


def test_tdpo_gradient_raises_the_chosen_token_and_lowers_the_rejected(np_rng):
  policy, _, tokens, mask = _side(np_rng, batch=1)
  mask = np.zeros_like(mask)
  mask[0, 3] = True  # one scored token per side: token 3, predicted by logits 2
  cfg = TDPOConfig()

  def loss(policy_w, policy_l):
    chosen = token_level.token_terms(policy_w, jnp.asarray(policy), jnp.asarray(tokens), jnp.asarray(mask))
    rejected = token_level.token_terms(policy_l, jnp.asarray(policy), jnp.asarray(tokens), jnp.asarray(mask))
    return token_level.tdpo_loss(chosen, rejected, cfg)[0]

  g_w, g_l = jax.jit(jax.grad(loss, argnums=(0, 1)))(jnp.asarray(policy), jnp.asarray(policy))
  token = tokens[0, 3]
  assert float(g_w[0, 2, token]) < 0 < float(g_l[0, 2, token])
  assert np.all(np.asarray(g_w[0, [0, 1, 3, 4, 5]]) == 0)  # only the scored position moves


def test_tdpo_step_on_a_tiny_llama(np_rng):
  """At the start the policy is the reference: ln 2 and no KL; a few steps raise the margin."""
  pairs = data.from_token_arrays(*TASK.preference_pairs(np_rng, 16))
  params = llama.init(jax.random.key(0), MODEL)
  tcfg = train.TrainConfig(batch_size=16, peak_lr=1e-2, total_steps=10, warmup_steps=1)
  step = token_level.make_tdpo_step(MODEL, tcfg, TDPOConfig(beta=0.5))
  state, first = step(train.start_state(params, tcfg), params, pairs)
  assert float(first["loss"]) == pytest.approx(math.log(2), abs=1e-6)
  assert float(first["kl_chosen"]) == pytest.approx(0.0, abs=1e-6) and float(first["grad_norm"]) > 0
  for _ in range(4):
    state, metrics = step(state, params, pairs)
  assert float(metrics["loss"]) < math.log(2) and float(metrics["reward_margin"]) > 0
  assert float(metrics["kl_chosen"]) > 0


# ---- CRINGE ----


def test_cringe_positives_follow_softmax_over_the_top_k_without_the_negative():
  """One position predicting token 1 (the negative, ranked 2nd); k = 3 samples from the top 4
  less the negative, in proportion to exp(logit); the rest never appear."""
  rows = 20000
  logit_V = np.array([2.0, 1.5, 1.0, 0.5, 0.0, -1.0], np.float32)  # top 4: ids 0, 1, 2, 3
  logits = np.broadcast_to(logit_V, (rows, 2, 6)).copy()
  tokens = np.ones((rows, 2), np.int32)
  positives = np.asarray(token_level.cringe_positives(jax.random.key(1), logits, tokens, 3))
  assert np.all(positives[:, 0] == -1)
  counts = np.bincount(positives[:, 1], minlength=6) / rows
  expected = np.exp(logit_V[[0, 2, 3]]) / np.exp(logit_V[[0, 2, 3]]).sum()
  tolerance = 5 * np.sqrt(expected * (1 - expected) / rows)  # 5 binomial standard errors
  np.testing.assert_array_less(np.abs(counts[[0, 2, 3]] - expected), tolerance)
  assert counts[[1, 4, 5]].sum() == 0


def test_cringe_positives_without_the_negative_in_the_top_k_plus_1():
  logits = np.array([[[3.0, 2.0, 1.0, 0.0, -1.0], [0, 0, 0, 0, 0]]], np.float32)
  logits = np.repeat(logits, 2000, axis=0)
  tokens = np.full((2000, 2), 4, np.int32)  # the negative ranks last
  positives = np.asarray(token_level.cringe_positives(jax.random.key(2), logits, tokens, 2))[:, 1]
  assert set(np.unique(positives).tolist()) == {0, 1}  # the top 2, never the 3rd


def numpy_cringe(logits, tokens, mask, desirable, positives, alpha):
  """Per-token NLL and contrastive terms in numpy, from the sampled positives."""
  total, count = 0.0, 0
  for b in range(logits.shape[0]):
    for t in range(1, logits.shape[1]):
      if not mask[b, t]:
        continue
      row = logits[b, t - 1].astype(np.float64)
      if desirable[b]:
        total += -(row[tokens[b, t]] - np.log(np.exp(row).sum()))
      else:
        s_pos, s_neg = row[positives[b, t]], row[tokens[b, t]]
        total += alpha * -np.log(np.exp(s_pos) / (np.exp(s_pos) + np.exp(s_neg)))
      count += 1
  return total / count


def test_cringe_loss_matches_numpy_with_a_fixed_sample(np_rng):
  logits = np_rng.normal(0, 2, (4, 6, 9)).astype(np.float32)
  tokens = np_rng.integers(0, 9, (4, 6)).astype(np.int32)
  mask = np.arange(6)[None] >= np.array([[1], [2], [3], [2]])
  desirable = np.array([True, False, False, True])
  cfg = CringeConfig(k=3, alpha=0.7)
  key = jax.random.key(3)
  loss, metrics = token_level.cringe_loss(key, logits, tokens, mask, desirable, cfg)
  positives = np.asarray(token_level.cringe_positives(key, logits, tokens, cfg.k))
  expected = numpy_cringe(logits, tokens, mask, desirable, positives, cfg.alpha)
  assert float(loss) == pytest.approx(expected, rel=1e-5)
  nll_only = numpy_cringe(logits[[0, 3]], tokens[[0, 3]], mask[[0, 3]], desirable[[0, 3]], None, 1.0)
  assert float(metrics["nll"]) == pytest.approx(nll_only, rel=1e-5)


def test_cringe_pushes_the_negative_token_down_and_the_positive_up():
  logits = np.array([[[1.0, 2.0, 0.5, -1.0], [0.0, 0.0, 0.0, 0.0]]], np.float32)
  tokens = np.array([[0, 1]], np.int32)  # token 1 (the model's favourite) is the negative
  mask = np.array([[False, True]])
  key = jax.random.key(4)
  cfg = CringeConfig(k=1, alpha=1.0)  # the positive is then the best other token, id 0
  grad_fn = jax.jit(jax.grad(lambda x, good: token_level.cringe_loss(key, x, tokens, mask, good, cfg)[0]))
  grad = grad_fn(logits, np.array([False]))
  assert int(token_level.cringe_positives(key, logits, tokens, 1)[0, 1]) == 0
  g = np.asarray(grad[0, 0])
  assert g[1] > 0 > g[0], "descent must lower the negative token's logit and raise the positive's"
  assert g[2] == g[3] == 0  # the contrastive term reads two logits only
  # The same token marked desirable gets NLL, whose descent raises it.
  grad = grad_fn(logits, np.array([True]))
  assert float(grad[0, 0, 1]) < 0


def test_cringe_objective_on_a_tiny_llama(np_rng):
  prompts, chosen, rejected = TASK.preference_pairs(np_rng, 4)
  pairs = data.from_token_arrays(prompts, chosen, rejected)
  batch = data.UnpairedBatch(
    np.concatenate([pairs.chosen_BT, pairs.rejected_BT]),
    np.concatenate([pairs.chosen_mask_BT, pairs.rejected_mask_BT]),
    np.concatenate([pairs.chosen_lengths_B, pairs.rejected_lengths_B]),
    np.concatenate([pairs.prompt_lengths_B] * 2),
    np.array([True] * 4 + [False] * 4),
  )
  params = llama.init(jax.random.key(0), MODEL)
  cfg = CringeConfig(k=2)
  key = jax.random.key(5)
  objective = jax.jit(functools.partial(token_level.cringe_objective, model_cfg=MODEL, cfg=cfg))
  loss, _ = objective(params, key, batch)
  logits, _ = jax.jit(llama.forward, static_argnums=2)(params, jnp.asarray(batch.tokens_BT), MODEL)
  expected, _ = token_level.cringe_loss(key, logits, batch.tokens_BT, batch.mask_BT, batch.label_B, cfg)
  assert float(loss) == pytest.approx(float(expected), rel=1e-5)


# ---- bad inputs ----

LOGITS = np.zeros((1, 3, 8), np.float32)
TOKENS = np.array([[0, 1, 2]], np.int32)
MASK = np.array([[False, True, True]])
TERMS = _terms([0.0], [0.0])
TCFG = train.TrainConfig(batch_size=1, total_steps=2, warmup_steps=1)
BAD_PAIR = data.from_token_arrays(np.array([[1, 5, 2]]), np.array([[4, 3]]), np.array([[9, 3]]))  # id 9 of 8

BAD = [
  pytest.param(lambda: TDPOConfig(beta=0.0), ValueError, r"TDPOConfig.beta: expected float > 0", id="tdpo-beta"),
  pytest.param(lambda: TDPOConfig(variant=3), ValueError, r"TDPOConfig.variant: expected one of 1, 2", id="variant"),
  pytest.param(lambda: TDPOConfig(alpha=-1.0), ValueError, r"TDPOConfig.alpha: expected float >= 0", id="alpha"),
  pytest.param(
    lambda: token_level.sequential_kl(LOGITS, np.zeros((1, 3, 7), np.float32), MASK),
    ValueError,
    r"ref_logits_BTV: expected shape \(1, 3, 8\) like policy_logits_BTV",
    id="kl-ref-shape",
  ),
  pytest.param(
    lambda: token_level.sequential_kl(LOGITS, LOGITS, np.array([[True, True, True]])),
    ValueError,
    r"mask_BT: expected False at position 0",
    id="kl-mask-position-0",
  ),
  pytest.param(
    lambda: token_level.sequential_kl(LOGITS, LOGITS, np.array([[0, 1, 1]])),
    TypeError,
    r"mask_BT: expected a bool mask",
    id="kl-int-mask",
  ),
  pytest.param(
    lambda: token_level.token_terms(LOGITS, LOGITS, np.array([[0, 8, 2]]), MASK),
    ValueError,
    r"tokens_BT: expected ids in \[0, 8\), got \[8\]",
    id="terms-token-id",
  ),
  pytest.param(
    lambda: token_level.tdpo_loss(TERMS, _terms([0.0, 1.0], [0.0, 0.0]), TDPOConfig()),
    ValueError,
    r"chosen, rejected: expected one batch shape \[B\]",
    id="tdpo-batch-mismatch",
  ),
  pytest.param(
    lambda: token_level.tdpo_loss(TERMS, _terms([0.0], [-1.0]), TDPOConfig()),
    ValueError,
    r"rejected.seq_kl_B: expected KL divergences >= 0, got \[-1.0\]",
    id="tdpo-negative-kl",
  ),
  pytest.param(
    lambda: token_level.tdpo_loss(TERMS, _terms([math.nan], [0.0]), TDPOConfig()),
    ValueError,
    r"rejected.rho_B: expected finite values",
    id="tdpo-nan",
  ),
  pytest.param(
    lambda: token_level.tdpo_loss(TERMS, TERMS, dpo.PreferenceConfig()),
    TypeError,
    r"cfg: expected a token_level.TDPOConfig",
    id="tdpo-cfg",
  ),
  pytest.param(
    lambda: token_level.tdpo_loss((0.0, 0.0, 0.0, 0.0), TERMS, TDPOConfig()),
    TypeError,
    r"chosen: expected token_level.TokenTerms",
    id="tdpo-tuple",
  ),
  pytest.param(
    lambda: token_level.tdpo_objective({}, {}, object(), model_cfg=MODEL, cfg=TDPOConfig()),
    TypeError,
    r"batch: expected an align.data.PreferenceBatch",
    id="tdpo-objective-batch",
  ),
  pytest.param(
    lambda: token_level.make_tdpo_step(MODEL, TCFG, TDPOConfig())(None, None, BAD_PAIR),
    ValueError,
    r"batch.rejected_BT: expected ids in \[0, 8\), got \[9\]",
    id="tdpo-step-checks-the-batch",
  ),
  pytest.param(
    lambda: token_level.make_tdpo_step(MODEL, TCFG, dpo.PreferenceConfig()),
    TypeError,
    r"cfg: expected a token_level.TDPOConfig",
    id="tdpo-step-cfg",
  ),
  pytest.param(lambda: CringeConfig(k=0), ValueError, r"CringeConfig.k: expected int >= 1", id="cringe-k"),
  pytest.param(
    lambda: token_level.cringe_positives(jax.random.key(0), LOGITS, TOKENS, 8),
    ValueError,
    r"k: expected an int < V = 8",
    id="cringe-k-vocab",
  ),
  pytest.param(
    lambda: token_level.cringe_loss(jax.random.key(0), LOGITS, TOKENS, MASK, np.array([1]), CringeConfig()),
    TypeError,
    r"desirable_B: expected a bool array",
    id="cringe-int-labels",
  ),
  pytest.param(
    lambda: token_level.cringe_loss(jax.random.key(0), LOGITS, TOKENS, MASK, np.array([True, False]), CringeConfig()),
    ValueError,
    r"desirable_B: expected shape \(1,\)",
    id="cringe-label-shape",
  ),
  pytest.param(
    lambda: token_level.cringe_loss(jax.random.key(0), LOGITS, TOKENS[:, :2], MASK, np.array([True]), CringeConfig()),
    ValueError,
    r"tokens_BT: expected shape \(1, 3\)",
    id="cringe-token-shape",
  ),
  pytest.param(
    lambda: token_level.cringe_objective({}, jax.random.key(0), object(), model_cfg=MODEL, cfg=CringeConfig()),
    TypeError,
    r"batch: expected an align.data.UnpairedBatch",
    id="cringe-objective-batch",
  ),
]


@pytest.mark.parametrize(("call", "error", "message"), BAD)
def test_bad_inputs(call, error, message):
  with pytest.raises(error, match=message):
    call()
