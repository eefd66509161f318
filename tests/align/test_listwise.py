"""Listwise losses (LiPO-lambda, RRHF, PRO) against slow loops written from the papers' equations,
the cases whose answer is known (floor, reversal, Y = 2, ties, gradient direction), bad inputs,
and one tiny listwise training step."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import checkify

from paperjax.align import data, dpo, listwise, tasks
from paperjax.align.logprobs import SequenceLogProbs
from paperjax.models.training import train
from paperjax.models.transformer import llama
from paperjax.ops import checks

# ---- slow references: python floats, loops over pairs and prefixes ----


def softplus(x):  # log(1 + e^x), scalar and stable
  return x + math.log1p(math.exp(-x)) if x > 0 else math.log1p(math.exp(x))


def slow_ranks(s):
  order = sorted(range(len(s)), key=lambda i: (-s[i], i))
  tau = [0] * len(s)
  for r, i in enumerate(order):
    tau[i] = r + 1
  return tau


def slow_lipo(w, w_ref, psi, beta, normalized):
  y = len(psi)
  s = [beta * (a - b) for a, b in zip(w, w_ref)]
  labels = [p - min(psi) for p in psi] if normalized else list(psi)
  gain = [2.0**p - 1 for p in labels]
  tau = slow_ranks(s)
  idcg = sum(g / math.log2(2 + k) for k, g in enumerate(sorted(gain, reverse=True))) if normalized else 1.0
  total = 0.0
  for i in range(y):
    for j in range(y):
      if psi[i] > psi[j]:
        delta = abs(gain[i] - gain[j]) * abs(1 / math.log2(1 + tau[i]) - 1 / math.log2(1 + tau[j]))
        total += delta / (idcg if idcg > 0 else 1.0) * softplus(-(s[i] - s[j]))
  return total


def slow_rrhf(w, n, psi):
  p = [a / max(c, 1.0) for a, c in zip(w, n)]
  return sum(max(0.0, p[i] - p[j]) for i in range(len(p)) for j in range(len(p)) if psi[i] < psi[j])


def slow_pro(w, n, psi, temperature):
  """The paper's prefix sum over the list sorted best first; completions tied with the
  prefix's head are left out of its denominator."""
  p = [a / max(c, 1.0) for a, c in zip(w, n)]
  order = sorted(range(len(p)), key=lambda i: -psi[i])
  total = 0.0
  for pos, k in enumerate(order):
    rest = [i for i in order[pos + 1 :] if psi[i] < psi[k]]
    if not rest:
      continue
    if temperature == "dynamic":
      inv_t = {i: psi[k] - psi[i] for i in rest}
      own = p[k] * max(inv_t.values())
    else:
      inv_t = {i: 1 / temperature for i in rest}
      own = p[k] / temperature
    denominator = math.exp(own) + sum(math.exp(p[i] * inv_t[i]) for i in rest)
    total += -(own - math.log(denominator))
  return total


def slow_loss(name, w, w_ref, n, psi, *, beta=0.1, normalized=True, temperature="dynamic", sft_weight=None):
  if name == "lipo_lambda":
    rank, paper_weight = slow_lipo(w, w_ref, psi, beta, normalized), 0.0
  elif name == "rrhf":
    rank, paper_weight = slow_rrhf(w, n, psi), 1.0
  else:
    rank, paper_weight = slow_pro(w, n, psi, temperature), 0.05 * (len(psi) - 1) ** 2
  best = [i for i in range(len(psi)) if psi[i] == max(psi)]
  nll = -sum(w[i] for i in best) / len(best)
  return rank + (paper_weight if sft_weight is None else sft_weight) * nll


def _lists(rng, batch, y, *, integer_scores):
  counts = rng.integers(1, 12, (batch, y)).astype(np.float32)
  w = (-counts * rng.uniform(0.2, 2.0, (batch, y))).astype(np.float32)
  w_ref = np.minimum(w + rng.normal(0, 2, (batch, y)), 0).astype(np.float32)
  if integer_scores:  # ties likely
    scores = rng.integers(0, 3, (batch, y)).astype(np.float32)
  else:
    scores = rng.normal(0, 1.5, (batch, y)).astype(np.float32)
  return w, w_ref, counts, scores


def _lp(w, w_ref=None, counts=None):
  counts = np.ones_like(w) if counts is None else counts
  policy = listwise.ListLogProbs(jnp.asarray(w, jnp.float32), jnp.asarray(counts, jnp.float32))
  ref = None if w_ref is None else listwise.ListLogProbs(jnp.asarray(w_ref, jnp.float32), policy.count_BY)
  return listwise.ListwiseLogProbs(policy, ref)


def _ref(name, w_ref):
  """w_ref for a loss that reads a reference, None for a reference-free one (which refuses one)."""
  return w_ref if listwise.LOSSES[name].reference else None


OPTIONS = [
  ("lipo_lambda", {}),
  ("lipo_lambda", {"ndcg_normalized": False, "beta": 0.5}),
  ("rrhf", {}),
  ("pro", {}),
  ("pro", {"pro_temperature": 0.7, "sft_weight": 0.3}),
]


@pytest.mark.parametrize("integer_scores", [True, False])
@pytest.mark.parametrize("name, options", OPTIONS)
def test_losses_match_slow_loops(np_rng, name, options, integer_scores):
  w, w_ref, counts, scores = _lists(np_rng, 5, 4, integer_scores=integer_scores)
  cfg = listwise.ListwiseConfig(loss=name, **options)
  loss, metrics = listwise.listwise_loss(_lp(w, _ref(name, w_ref), counts), jnp.asarray(scores), cfg)
  kw = {
    "beta": cfg.beta,
    "normalized": cfg.ndcg_normalized,
    "temperature": cfg.pro_temperature,
    "sft_weight": cfg.sft_weight,
  }
  slow = [
    slow_loss(name, w[b].tolist(), w_ref[b].tolist(), counts[b].tolist(), scores[b].tolist(), **kw) for b in range(5)
  ]
  assert float(loss) == pytest.approx(np.mean(slow), rel=1e-5, abs=1e-6)
  best_nll = [-np.mean(w[b][scores[b] == scores[b].max()]) for b in range(5)]
  assert float(metrics["nll_best"]) == pytest.approx(np.mean(best_nll), rel=1e-6)


def test_pro_matches_its_authors_training_loop(np_rng):
  """PRO's released code (DAMO-ConvAI PRO/train/utils/process_manager.py, compute_loss) read
  and rewritten in numpy: lists sorted best first, a loop over prefixes, then
  sft_weight (Y - 1)^2 times the mean summed NLL of the first completion."""
  w, _, counts, _ = _lists(np_rng, 4, 5, integer_scores=False)
  rewards = np.sort(np_rng.normal(0, 1, (4, 5)), axis=1)[:, ::-1].astype(np.float32)  # strict, best first
  p = w / counts
  total = 0.0
  for k in range(4):
    neg_t = rewards[:, k : k + 1] - rewards[:, k + 1 :]
    pos_t = neg_t.max(axis=1)
    denominator = np.exp(p[:, k] * pos_t) + np.exp(p[:, k + 1 :] * neg_t).sum(axis=1)
    total += np.mean(np.log(1e-10 + denominator) - p[:, k] * pos_t)
  total += 0.05 * 4**2 * np.mean(-w[:, 0])
  loss, _ = listwise.listwise_loss(_lp(w, None, counts), jnp.asarray(rewards), listwise.ListwiseConfig(loss="pro"))
  assert float(loss) == pytest.approx(total, rel=1e-5)


def test_ranks_and_lambda_weights_literal():
  assert listwise.ranks(jnp.array([[0.5, 2.0, 0.5, -1.0]])).tolist() == [[2, 1, 3, 4]]  # tie: earlier first
  weights = listwise.lambda_weights(jnp.array([[3.0, 2.0, 1.0]]), jnp.array([[2.0, 1.0, 0.0]]))
  # G = (3, 1, 0), 1/D = (1, 1/log2 3, 1/2), ideal DCG = 3 + 1/log2 3.
  expected = [[0.0, 0.2033, 0.4131], [0.2033, 0.0, 0.0361], [0.4131, 0.0361, 0.0]]
  np.testing.assert_allclose(weights[0], expected, atol=1e-4)
  # Adding a constant to every score changes nothing once normalised; the paper's raw form scales by 2^c.
  shifted = listwise.lambda_weights(jnp.array([[3.0, 2.0, 1.0]]), jnp.array([[7.0, 6.0, 5.0]]))
  np.testing.assert_allclose(shifted, weights, rtol=1e-5)
  raw = listwise.lambda_weights(jnp.array([[3.0, 2.0, 1.0]]), jnp.array([[2.0, 1.0, 0.0]]), ndcg_normalized=False)
  np.testing.assert_allclose(raw[0, 0, 1], 2 * (1 - 1 / math.log2(3)), rtol=1e-5)


@pytest.mark.parametrize("name", sorted(listwise.LOSSES))
def test_ordered_list_is_near_the_floor_and_reversal_costs(name):
  # The policy already ranks the list as the scores do, by wide margins. PRO's dynamic temperature
  # compares p_k max_i(psi_k - psi_i) with p_i (psi_k - psi_i): with negative p the margins must be
  # ratios (-20, -40, -60 would tie its second term: -20 x 2 = -40 x 1).
  w = np.array([[-0.1, -20.0, -100.0, -400.0]], np.float32)
  lp = _lp(w, _ref(name, np.full_like(w, -30.0)))
  cfg = listwise.ListwiseConfig(loss=name, beta=1.0, sft_weight=0.0)
  ordered, _ = listwise.listwise_loss(lp, jnp.array([[3.0, 2.0, 1.0, 0.0]]), cfg)
  reversed_, metrics = listwise.listwise_loss(lp, jnp.array([[0.0, 1.0, 2.0, 3.0]]), cfg)
  assert 0 <= float(ordered) < 1e-6
  assert float(reversed_) > 1.0 and float(metrics["pair_accuracy"]) == 0.0


def test_two_completions_reduce_to_dpo_and_a_two_way_softmax(np_rng):
  w, w_ref, counts, _ = _lists(np_rng, 6, 2, integer_scores=False)
  scores = jnp.array([[1.0, 0.0]] * 6)
  lp = _lp(w, w_ref, counts)
  lipo, _ = listwise.listwise_loss(lp, scores, listwise.ListwiseConfig(loss="lipo_lambda", beta=0.3))
  pair = dpo.PairLogProbs(
    *(SequenceLogProbs(jnp.asarray(x[:, i]), jnp.asarray(counts[:, i])) for x in (w, w_ref) for i in (0, 1))
  )
  dpo_loss, _ = dpo.preference_loss(pair, dpo.PreferenceConfig(loss="sigmoid", beta=0.3))
  # Y = 2: one pair, whose Lambda weight is |1 - 1/log2 3| (normalised or not, for scores 1, 0).
  assert float(lipo) == pytest.approx((1 - 1 / math.log2(3)) * float(dpo_loss), rel=1e-5)
  lp = lp._replace(reference=None)  # pro and rrhf read none
  pro, _ = listwise.listwise_loss(lp, scores, listwise.ListwiseConfig(loss="pro", pro_temperature=1.0, sft_weight=0))
  softmax = -jax.nn.log_softmax(jnp.asarray(w / counts), axis=1)[:, 0]
  assert float(pro) == pytest.approx(float(softmax.mean()), rel=1e-5)
  rrhf, _ = listwise.listwise_loss(lp, scores, listwise.ListwiseConfig(loss="rrhf", sft_weight=0))
  assert float(rrhf) == pytest.approx(float(np.maximum(w[:, 1] / counts[:, 1] - w[:, 0] / counts[:, 0], 0).mean()))


@pytest.mark.parametrize("name", sorted(listwise.LOSSES))
def test_ties_contribute_nothing(np_rng, name):
  cfg = listwise.ListwiseConfig(loss=name, sft_weight=0.0)
  w, w_ref, counts, _ = _lists(np_rng, 3, 4, integer_scores=False)
  w_ref = _ref(name, w_ref)
  tied, _ = listwise.listwise_loss(_lp(w, w_ref, counts), jnp.zeros((3, 4)), cfg)
  assert float(tied) == 0.0
  # Swapping two completions tied in score (with their log-probs) leaves the loss unchanged.
  scores = jnp.array([[2.0, 1.0, 1.0, 0.0]] * 3)
  swap = [0, 2, 1, 3]
  a, _ = listwise.listwise_loss(_lp(w, w_ref, counts), scores, cfg)
  swapped_ref = None if w_ref is None else w_ref[:, swap]
  b, _ = listwise.listwise_loss(_lp(w[:, swap], swapped_ref, counts[:, swap]), scores, cfg)
  assert float(a) == pytest.approx(float(b), rel=1e-6) and float(a) > 0


def test_a_tied_pair_adds_nothing_to_the_pairwise_sums():
  # psi = (1, 1, 0), p = (-5, -1, -2): RRHF sums the strict pairs (0, 2) -> 3 and (1, 2) -> 0; the
  # tied pair (0, 1) would add 4 in one direction or the other if it counted.
  cfg = listwise.ListwiseConfig(loss="rrhf", sft_weight=0)
  got, _ = listwise.listwise_loss(_lp(np.array([[-5.0, -1.0, -2.0]])), jnp.array([[1.0, 1.0, 0.0]]), cfg)
  assert float(got) == pytest.approx(3.0)


@pytest.mark.parametrize("name", sorted(listwise.LOSSES))
def test_gradient_raises_the_best_and_lowers_the_worst(name):
  # Policy ranks the list backwards, so every loss has work to do (RRHF's hinge is active).
  w = np.array([[-30.0, -20.0, -10.0, -5.0]], np.float32)
  lp = _lp(w, _ref(name, np.full_like(w, -15.0)))
  cfg = listwise.ListwiseConfig(loss=name, sft_weight=0.0)
  scores = jnp.array([[3.0, 2.0, 1.0, 0.0]])

  def loss(sums):
    policy = lp.policy._replace(sum_BY=sums)
    return listwise.listwise_loss(lp._replace(policy=policy), scores, cfg)[0]

  grad = np.asarray(jax.grad(loss)(lp.policy.sum_BY))[0]
  assert grad[0] < 0 < grad[3]  # descent raises the best's log-prob and lowers the worst's
  # The NLL term alone pushes only the best completion up.
  nll = listwise.ListwiseConfig(loss=name, sft_weight=1.0)
  nll_grad = jax.grad(
    lambda s: listwise.listwise_loss(lp._replace(policy=lp.policy._replace(sum_BY=s)), scores, nll)[0]
  )
  assert float((nll_grad(lp.policy.sum_BY) - jax.grad(loss)(lp.policy.sum_BY))[0, 0]) == pytest.approx(-1.0)


# ---- bad inputs ----

W = np.array([[-1.0, -2.0, -3.0]], np.float32)


@pytest.mark.parametrize(
  "call, error, message",
  [
    (lambda: listwise.ListwiseConfig(loss="listnet"), ValueError, r"loss: unknown 'listnet'"),
    (lambda: listwise.ListwiseConfig(pro_temperature=0.0), ValueError, r"pro_temperature"),
    (lambda: listwise.ListwiseConfig(pro_temperature="hot"), ValueError, r"pro_temperature"),
    (lambda: listwise.ListwiseConfig(sft_weight=-1.0), ValueError, r"sft_weight"),
    (lambda: listwise.listwise_loss(_lp(W), jnp.zeros((1, 3)), listwise.ListwiseConfig()), ValueError,
     r"lp: loss 'lipo_lambda' needs reference log-probs"),
    (lambda: listwise.listwise_loss(_lp(W, W[:, :2]), jnp.zeros((1, 3)), listwise.ListwiseConfig()), ValueError,
     r"lp.reference.count_BY: expected shape"),
    (lambda: listwise.listwise_loss(_lp(W, W), jnp.zeros((1, 3)), listwise.ListwiseConfig(loss="rrhf")), ValueError,
     r"lp.reference: loss 'rrhf' reads no reference log-probs; pass reference=None"),
    (lambda: listwise.listwise_loss(_lp(W, W, -np.ones_like(W)), jnp.zeros((1, 3)), listwise.ListwiseConfig()),
     ValueError, r"lp.policy.count_BY: expected token counts in \[0, inf\]"),
    (lambda: listwise.listwise_loss(_lp(W, W, np.full_like(W, np.nan)), jnp.zeros((1, 3)), listwise.ListwiseConfig()),
     ValueError, r"lp.policy.count_BY: expected finite values"),
    (lambda: listwise.listwise_loss(_lp(W), jnp.zeros((1, 4)), listwise.ListwiseConfig(loss="rrhf")), ValueError,
     r"scores_BY: expected shape \(1, 3\)"),
    (lambda: listwise.listwise_loss(_lp(W), jnp.array([[0.0, math.nan, 1.0]]), listwise.ListwiseConfig(loss="pro")),
     ValueError, r"scores_BY: expected finite values, got \[nan\]"),
    (lambda: listwise.listwise_loss(_lp(-W), jnp.zeros((1, 3)), listwise.ListwiseConfig(loss="rrhf")), ValueError,
     r"lp.policy.sum_BY: expected log-probs in \[-inf, 0\]"),
    (lambda: listwise.listwise_loss(_lp(W[:, :1]), jnp.zeros((1, 1)), listwise.ListwiseConfig(loss="rrhf")),
     ValueError, r"lp.policy.sum_BY: expected Y >= 2"),
    (lambda: listwise.listwise_loss(W, jnp.zeros((1, 3)), listwise.ListwiseConfig(loss="rrhf")), TypeError,
     r"lp: expected a listwise.ListwiseLogProbs"),
    (lambda: listwise.listwise_loss(_lp(W), jnp.zeros((1, 3)), dpo.PreferenceConfig()), TypeError,
     r"cfg: expected a listwise.ListwiseConfig"),
    (lambda: listwise.check_reference(_lp(W).policy, (2, 3), loss="lipo_lambda"), ValueError,
     r"reference: expected shape \(2, 3\) like the batch, got \(1, 3\)"),
    (lambda: listwise.check_reference(SequenceLogProbs(W[0], W[0]), (1, 3)), TypeError,
     r"reference: expected listwise.ListLogProbs"),
  ],
)  # fmt: skip
def test_bad_loss_inputs_raise(call, error, message):
  with pytest.raises(error, match=message):
    call()


def test_value_checks_survive_jit_inside_checked():
  loss = checks.checked(listwise.listwise_loss, static_argnames="cfg")
  with pytest.raises(checkify.JaxRuntimeError, match=r"scores_BY: expected finite values"):
    loss(_lp(W), jnp.array([[0.0, math.nan, 1.0]]), cfg=listwise.ListwiseConfig(loss="rrhf"))


# One list: prompt BOS 5 SEP, completions (4 EOS) and (6 EOS); vocabulary 8.
LIST = data.listwise_from_token_arrays(np.array([[1, 5, 2]]), np.array([[[4, 3], [6, 3]]]))


@pytest.mark.parametrize(
  "batch, error, message",
  [
    (LIST._replace(tokens_BYT=LIST.tokens_BYT + 5), ValueError, r"batch.tokens_BYT: expected ids in \[0, 8\)"),
    (LIST._replace(mask_BYT=np.ones_like(LIST.mask_BYT)), ValueError, r"batch.mask_BYT: expected False at position 0"),
    (LIST._replace(mask_BYT=LIST.mask_BYT | (np.arange(5) == 1)), ValueError,
     r"batch.mask_BYT: expected False at position 0, in the prompt .* at index \[\(0, 0, 1\)"),
    (LIST._replace(mask_BYT=LIST.mask_BYT.astype(np.int32)), TypeError, r"batch.mask_BYT: expected a bool mask"),
    (LIST._replace(lengths_BY=np.array([[2, 5]], np.int32)), ValueError,
     r"batch.lengths_BY: expected lengths >= the prompt's length"),
    (LIST._replace(scores_BY=np.array([[1.0, np.inf]], np.float32)), ValueError,
     r"batch.scores_BY: expected finite values"),
    (LIST._replace(scores_BY=np.array([[1, 0]])), TypeError, r"batch.scores_BY: expected float scores"),
    (LIST._replace(tokens_BYT=LIST.tokens_BYT[:, :1]), ValueError, r"batch.tokens_BYT: expected Y >= 2"),
    (LIST._asdict(), TypeError, r"batch: expected an align.data.ListwiseBatch"),
  ],
)  # fmt: skip
def test_bad_batches_raise(batch, error, message):
  with pytest.raises(error, match=message):
    listwise.check_batch(batch, 8)


def test_listwise_from_token_arrays_refuses_bad_scores():
  with pytest.raises(ValueError, match=r"scores: expected numbers of shape \(1, 2\)"):
    data.listwise_from_token_arrays(np.array([[1, 5, 2]]), np.array([[[4, 3], [6, 3]]]), np.zeros((1, 3)))
  with pytest.raises(ValueError, match=r"scores: expected finite values"):
    data.listwise_from_token_arrays(np.array([[1, 5, 2]]), np.array([[[4, 3], [6, 3]]]), np.array([[0.0, np.nan]]))


TINY = llama.LlamaConfig(vocab_size=8, dim=8, n_layers=1, n_heads=2, n_kv_heads=1, ffn_dim=16, max_seq_len=16)


def test_step_refuses_a_missing_reference_before_compiling():
  tcfg = train.TrainConfig(batch_size=1, total_steps=2, warmup_steps=1)
  step = listwise.make_listwise_step(TINY, tcfg, listwise.ListwiseConfig())
  params = llama.init(jax.random.key(0), TINY)
  state = train.TrainState(jnp.int32(0), params, train.optimizer(tcfg).init(params))
  with pytest.raises(TypeError, match=r"reference: expected listwise.ListLogProbs .*'lipo_lambda'"):
    step(state, LIST, None)
  # A reference-free loss refuses a reference rather than drop it.
  free = listwise.make_listwise_step(TINY, tcfg, listwise.ListwiseConfig(loss="rrhf"))
  reference = listwise.ListLogProbs(jnp.full((1, 2), -1.0), jnp.ones((1, 2)))
  with pytest.raises(ValueError, match=r"reference: loss 'rrhf' reads no reference log-probs \(it is reference-free\)"):
    free(state, LIST, reference)
  with pytest.raises(TypeError, match=r"lcfg: expected a listwise.ListwiseConfig"):
    listwise.make_listwise_step(TINY, tcfg, dpo.PreferenceConfig())


# ---- the training step ----

# The smallest task and model of tests/align (test_bad_inputs' TASK and MODEL): vocabulary 8, rows of 7 tokens.
TASK = tasks.SortTask(length=2, num_digits=4)


def _sort_lists(rng, batch, y):
  prompts = TASK.prompts(rng, batch)
  noise = np.linspace(0.05, 0.9, y)
  completions = np.stack([TASK.demonstrations(rng, prompts, n) for n in noise], axis=1)
  scores = np.stack([TASK.score(prompts, completions[:, i]) for i in range(y)], axis=1)
  return data.listwise_from_token_arrays(prompts, completions, scores.astype(np.float32))


def test_listwise_step_lowers_the_loss(np_rng):
  batch = _sort_lists(np_rng, 8, 4)
  params = llama.init(jax.random.key(0), TINY)
  reference = listwise.reference_logprobs(params, TINY, batch)
  # The B Y rows come back in their [B, Y] places: permuting the completions permutes the log-probs.
  perm = [2, 0, 3, 1]
  permuted = batch._replace(
    tokens_BYT=batch.tokens_BYT[:, perm], mask_BYT=batch.mask_BYT[:, perm], lengths_BY=batch.lengths_BY[:, perm]
  )
  np.testing.assert_allclose(listwise.reference_logprobs(params, TINY, permuted).sum_BY, reference.sum_BY[:, perm])
  tcfg = train.TrainConfig(batch_size=8, peak_lr=3e-3, total_steps=20, warmup_steps=1)
  state = train.TrainState(jnp.int32(0), params, train.optimizer(tcfg).init(params))
  step = listwise.make_listwise_step(TINY, tcfg, listwise.ListwiseConfig(loss="lipo_lambda", beta=0.5))
  state, first = step(state, batch, reference)  # learning rate 0 at step 0 (warm-up)
  state, _ = step(state, batch, reference)
  moved = jax.tree.map(lambda a, b: float(jnp.abs(a - b).max()), state.params, params)
  assert min(jax.tree.leaves(moved)) > 0
  for _ in range(8):
    state, metrics = step(state, batch, reference)
  assert float(metrics["loss"]) < float(first["loss"])
  assert float(metrics["pair_accuracy"]) > float(first["pair_accuracy"])
