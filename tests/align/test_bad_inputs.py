"""Bad input never passes silently (issue 31), align: each case is an eager call on tiny arrays (the
training steps' host check raises before anything compiles) that must raise the named exception
with a message naming the argument, the expectation and, where it helps, the value."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import checkify

from paperjax.align import data, dpo, logprobs, rejection_sampling, reward, tasks
from paperjax.align import train as align_train
from paperjax.align.logprobs import SequenceLogProbs
from paperjax.models.recurrent import based
from paperjax.models.training import train
from paperjax.models.transformer import llama
from paperjax.ops import checks

NAN = math.nan
KEY = jax.random.key(0)
TASK = tasks.SortTask(length=2, num_digits=4)  # vocabulary 8
MODEL = llama.LlamaConfig(vocab_size=8, dim=8, n_layers=1, n_heads=2, n_kv_heads=1, ffn_dim=16, max_seq_len=16)
TCFG = train.TrainConfig(batch_size=1, total_steps=2, warmup_steps=1)
# Rewards read before the model runs: a head, no trunk (the checks raise first).
HEAD_ONLY = {"model": {}, "head": {"w": np.zeros(8, np.float32), "b": np.zeros((), np.float32)}}
# One pair: prompt BOS 5 SEP, chosen 4 EOS, rejected 6 EOS (T = 5, completion tokens 3 and 4).
PAIR = data.from_token_arrays(np.array([[1, 5, 2]]), np.array([[4, 3]]), np.array([[6, 3]]))
# Two unpaired rows (KTO needs B >= 2): prompt BOS 5 SEP, completions 4 EOS and 6 EOS.
UNPAIRED = data.UnpairedBatch(
  np.array([[1, 5, 2, 4, 3], [1, 5, 2, 6, 3]], np.int32),
  np.array([[0, 0, 0, 1, 1]] * 2, bool),
  np.array([5, 5], np.int32),
  np.array([3, 3], np.int32),
  np.array([True, False]),
)


def _logits(batch=1, time=3, vocab=8) -> np.ndarray:
  return np.zeros((batch, time, vocab), np.float32)


def _seq(sums, counts=None) -> SequenceLogProbs:
  sums = np.asarray(sums, np.float32)
  return SequenceLogProbs(sums, np.ones_like(sums) if counts is None else np.asarray(counts, np.float32))


def _pair(chosen=(-1.0, -2.0), rejected=(-2.0, -1.0), ref=(-1.5, -1.5), counts=None) -> dpo.PairLogProbs:
  return dpo.PairLogProbs(_seq(chosen, counts), _seq(rejected), _seq(ref), _seq(ref))


def _preference_step():
  return align_train.make_preference_step(MODEL, TCFG, dpo.PreferenceConfig())


def _kto(desirable, **kw):
  s = _seq([-1.0, -2.0])
  return dpo.kto_loss(s, s, desirable, s, s, **kw)


CASES = [
  # ---- logprobs: the user's cases (NaN for id 9 at V=8, -1 wrapped to 7), then the rest ----
  pytest.param(
    lambda: logprobs.token_logprobs(_logits(), np.array([[0, 9, 1]])),
    ValueError,
    r"tokens_BT: expected ids in \[0, 8\), got \[9\] at index \[\(0, 1\)\]",
    id="token-id-9-of-8",
  ),
  pytest.param(
    lambda: logprobs.token_logprobs(_logits(), np.array([[0, 1, -1]])),
    ValueError,
    r"tokens_BT: expected ids in \[0, 8\), got \[-1\]",
    id="token-id-negative",
  ),
  pytest.param(
    lambda: logprobs.token_logprobs(_logits(), np.array([[0.0, 1.0, 2.0]])),
    TypeError,
    r"tokens_BT: expected integer",
    id="token-float-ids",
  ),
  pytest.param(
    lambda: logprobs.token_logprobs(np.zeros((1, 3, 8), np.int32), np.array([[0, 1, 2]])),
    TypeError,
    r"logits_BTV: expected a floating dtype",
    id="token-int-logits",
  ),
  pytest.param(
    lambda: logprobs.token_logprobs(np.zeros((3, 8), np.float32), np.array([[0, 1, 2]])),
    ValueError,
    r"logits_BTV: expected \[B, T, V\]",
    id="token-rank-2-logits",
  ),
  pytest.param(
    lambda: logprobs.token_logprobs(_logits(time=4), np.array([[0, 1, 2]])),
    ValueError,
    r"tokens_BT: expected shape \(1, 4\)",
    id="token-shape",
  ),
  pytest.param(
    lambda: logprobs.completion_mask(np.zeros((1, 4), np.int32), np.array([0]), np.array([4])),
    ValueError,
    r"prompt_lengths_B: expected lengths in \[1, 4\], got \[0\]",
    id="mask-prompt-length-0",
  ),
  pytest.param(
    lambda: logprobs.completion_mask(np.zeros((1, 4), np.int32), np.array([2]), np.array([9])),
    ValueError,
    r"lengths_B: expected lengths in \[1, 4\], got \[9\]",
    id="mask-length-9-of-4",
  ),
  pytest.param(
    lambda: logprobs.completion_mask(np.zeros((1, 4), np.int32), np.array([3]), np.array([2])),
    ValueError,
    r"lengths_B: expected lengths - prompt_lengths_B in \[0, 4\], got \[-1\]",
    id="mask-length-before-prompt",
  ),
  pytest.param(
    lambda: logprobs.completion_mask(np.zeros((1, 4), np.int32), np.array([1]), np.array([4]), exclude_ids=(2.5,)),
    TypeError,
    r"exclude_ids: expected token ids",
    id="mask-float-exclude",
  ),
  pytest.param(
    lambda: logprobs.sequence_logprobs(_logits(), np.zeros((1, 3), np.int32), np.zeros((1, 3), np.float32)),
    TypeError,
    r"mask_BT: expected a bool mask",
    id="seq-float-mask",
  ),
  pytest.param(
    lambda: logprobs.sequence_logprobs(_logits(), np.zeros((1, 3), np.int32), np.array([[True, True, False]])),
    ValueError,
    r"mask_BT: expected False at position 0 .*, got \[True\] at index \[0\]",
    id="seq-mask-position-0",
  ),
  # ---- reward: the user's case (lengths 0 and 9 at T=3 read like 3), then the rest ----
  pytest.param(
    lambda: reward.rewards(HEAD_ONLY, np.zeros((2, 3), np.int32), np.array([0, 3]), MODEL),
    ValueError,
    r"lengths_B: expected lengths in \[1, 3\], got \[0\] at index \[0\]",
    id="reward-length-0",
  ),
  pytest.param(
    lambda: reward.rewards(HEAD_ONLY, np.zeros((2, 3), np.int32), np.array([3, 9]), MODEL),
    ValueError,
    r"lengths_B: expected lengths in \[1, 3\], got \[9\] at index \[1\]",
    id="reward-length-9-of-3",
  ),
  pytest.param(
    lambda: reward.rewards(HEAD_ONLY, np.array([[1, 8, 2]]), np.array([3]), MODEL),
    ValueError,
    r"tokens_BT: expected ids in \[0, 8\), got \[8\]",
    id="reward-id-out-of-vocab",
  ),
  pytest.param(
    lambda: reward.rewards({"model": {}, "head": {"w": np.zeros(4), "b": 0.0}}, np.zeros((1, 3), np.int32), [3], MODEL),
    ValueError,
    r"params\['head'\]: expected w \[8\] and a scalar b",
    id="reward-head-shape",
  ),
  pytest.param(
    lambda: reward.bradley_terry_loss(np.zeros(2, np.float32), np.zeros(2, np.float32), centering=NAN),
    ValueError,
    r"centering: expected >= 0, got nan",
    id="bt-centering-nan",
  ),
  pytest.param(
    lambda: reward.bradley_terry_loss(np.array([0.0, NAN], np.float32), np.zeros(2, np.float32)),
    ValueError,
    r"r_chosen_B: expected finite values, got \[nan\] at index \[1\]",
    id="bt-nan-reward",
  ),
  pytest.param(
    lambda: reward.bradley_terry_loss(np.zeros(2, np.int32), np.zeros(2, np.int32)),
    TypeError,
    r"r_chosen_B: expected a float array",
    id="bt-int-rewards",
  ),
  pytest.param(lambda: reward.ranked_pairs(3.0), TypeError, r"num_ranked: expected an int >= 2", id="ranked-float"),
  # ---- dpo ----
  pytest.param(
    lambda: dpo.PreferenceConfig(beta=NAN),
    ValueError,
    r"PreferenceConfig.beta: expected float > 0, got float nan",
    id="pref-beta-nan",
  ),
  pytest.param(
    lambda: dpo.PreferenceConfig(beta="0.1"),
    TypeError,
    r"PreferenceConfig.beta: expected float > 0, got str",
    id="pref-beta-str",
  ),
  pytest.param(
    lambda: dpo.PreferenceConfig(rpo_alpha=-1.0),
    ValueError,
    r"PreferenceConfig.rpo_alpha: expected float >= 0",
    id="pref-rpo-negative",
  ),
  pytest.param(
    lambda: dpo.PreferenceConfig(discopop_tau=0.0),
    ValueError,
    r"PreferenceConfig.discopop_tau: expected float > 0",
    id="pref-tau-0",
  ),
  pytest.param(
    lambda: dpo.PreferenceConfig(label_smoothing=1.0),
    ValueError,
    r"PreferenceConfig.label_smoothing: expected float in \[0, 1\)",
    id="pref-eps-1",
  ),
  pytest.param(
    lambda: dpo.PreferenceConfig(gamma=NAN),
    ValueError,
    r"PreferenceConfig.gamma: expected float, got float nan",
    id="pref-gamma-nan",
  ),
  pytest.param(
    lambda: dpo.PreferenceConfig(loss="dpo"), ValueError, r"loss: unknown 'dpo'; registered: \[", id="pref-loss-name"
  ),
  pytest.param(
    lambda: dpo.preference_loss(_pair(), {"loss": "sigmoid"}),
    TypeError,
    r"cfg: expected a dpo.PreferenceConfig",
    id="pref-cfg-dict",
  ),
  pytest.param(
    lambda: dpo.preference_loss(_pair(chosen=(0.3, -2.0)), dpo.PreferenceConfig()),
    ValueError,
    r"lp.chosen.sum_B: expected log-probs in \[-inf, 0\], got \[0.3",
    id="pref-positive-logprob",
  ),
  pytest.param(
    lambda: dpo.preference_loss(_pair(rejected=(NAN, -1.0)), dpo.PreferenceConfig()),
    ValueError,
    r"lp.rejected.sum_B: expected finite values, got \[nan\]",
    id="pref-nan-logprob",
  ),
  pytest.param(
    lambda: dpo.preference_loss(_pair(counts=(-1.0, 2.0)), dpo.PreferenceConfig()),
    ValueError,
    r"lp.chosen.count_B: expected token counts in \[0, inf\], got \[-1.0\]",
    id="pref-negative-count",
  ),
  pytest.param(
    lambda: _kto(np.array([1.0, -1.0], np.float32)), TypeError, r"desirable_B: expected a bool array", id="kto-labels"
  ),
  pytest.param(
    lambda: _kto(np.array([True, False]), desirable_weight=NAN),
    ValueError,
    r"desirable_weight, undesirable_weight: expected >= 0, got nan",
    id="kto-weight-nan",
  ),
  pytest.param(
    lambda: dpo.kto_loss(_seq([-1.0]), _seq([-1.0]), np.array([True]), _seq([-1.0, -2.0]), _seq([-1.0])),
    ValueError,
    r"kl_policy, kl_reference: expected one shape",
    id="kto-kl-shapes",
  ),
  # ---- rejection sampling ----
  pytest.param(
    lambda: rejection_sampling.concat(np.zeros((1, 3), np.int32), np.array([9]), np.zeros((1, 2), np.int32), [2]),
    ValueError,
    r"prompt_lengths_B: expected lengths in \[1, 3\], got \[9\]",
    id="concat-prompt-length",
  ),
  pytest.param(
    lambda: rejection_sampling.concat(np.zeros((1, 3), np.int32), [3], np.zeros((1, 2), np.int32), np.array([-1])),
    ValueError,
    r"completion_lengths_B: expected lengths in \[0, 2\], got \[-1\]",
    id="concat-completion-length",
  ),
  pytest.param(
    lambda: rejection_sampling.shared_pages([3], 2, 4, 0),
    ValueError,
    r"page_size: expected an int >= 1, got 0",
    id="pages-size-0",
  ),
  pytest.param(
    lambda: rejection_sampling.shared_pages([3], True, 4, 16),
    ValueError,
    r"k: expected an int >= 1, got True",
    id="pages-k-bool",
  ),
  pytest.param(
    lambda: rejection_sampling.pages_needed([3, 0], 2, 4, 16),
    ValueError,
    r"prompt_lengths: expected .* ints >= 1",
    id="pages-prompt-0",
  ),
  pytest.param(
    lambda: rejection_sampling.best_of_k(
      KEY,
      {},
      based.BasedConfig(vocab_size=8, dim=8, n_blocks=1),
      np.zeros((1, 2), np.int32),
      [2],
      None,
      k=2,
      max_new_tokens=1,
    ),
    TypeError,
    r"cfg: expected a llama.LlamaConfig",
    id="best-of-k-not-llama",
  ),
  pytest.param(
    lambda: rejection_sampling.best_of_k(
      KEY, {}, MODEL, np.zeros((1, 2), np.int32), np.array([2.0]), None, k=2, max_new_tokens=1
    ),
    TypeError,
    r"prompt_lengths_B: expected integer",
    id="best-of-k-float-lengths",
  ),
  # ---- tasks ----
  pytest.param(lambda: tasks.SortTask(length=0), ValueError, r"SortTask.length: expected int >= 1", id="task-length-0"),
  pytest.param(
    lambda: tasks.SortTask(num_digits=2.5),
    TypeError,
    r"SortTask.num_digits: expected int >= 1, got float",
    id="task-digits-float",
  ),
  pytest.param(
    lambda: TASK.demonstrations(np.random.default_rng(0), np.array([[1, 4, 5, 2]]), NAN),
    ValueError,
    r"noise: expected finite values, got \[nan\]",
    id="task-noise-nan",
  ),
  pytest.param(
    lambda: TASK.demonstrations(np.random.default_rng(0), np.array([[1, 4, 5, 2]]), 1.5),
    ValueError,
    r"noise: expected probabilities in \[0, 1\], got \[1.5\]",
    id="task-noise-above-1",
  ),
  pytest.param(
    lambda: TASK.score(np.array([[1, 4, 5, 2]]), np.array([[4]])),
    ValueError,
    r"completions: expected \[n=1, >= length=2\]",
    id="task-short-completions",
  ),
  pytest.param(
    lambda: TASK.target(np.array([[1, 4, 5, 6, 2]])),
    ValueError,
    r"prompts: expected integer ids \[n, length \+ 2 = 4\]",
    id="task-prompt-width",
  ),
  pytest.param(
    lambda: TASK.target(np.array([[1, 4, 9, 2]])),
    ValueError,
    r"prompts: expected digit ids in \[4, 7\], got \[9\]",
    id="task-prompt-digit",
  ),
  pytest.param(
    lambda: tasks.SortTask(num_digits=1).preference_pairs(np.random.default_rng(0), 2),
    ValueError,
    r"num_digits: preference pairs need at least 2 digits",
    id="task-pairs-one-digit",
  ),
  pytest.param(lambda: TASK.prompts(np.random.default_rng(0), -1), ValueError, r"n: expected an int >= 0", id="task-n"),
  # ---- training steps: the batch is checked on the host before the jitted step ----
  pytest.param(
    lambda: align_train.sft_batch(np.zeros((1, 4), np.int32), np.ones((1, 4), np.float32)),
    TypeError,
    r"completion_mask_BT: expected a bool mask",
    id="sft-float-mask",
  ),
  pytest.param(
    lambda: align_train.sft_batch(np.zeros((1, 4), np.int32), np.ones((1, 4), bool)),
    ValueError,
    r"completion_mask_BT: expected False at position 0",
    id="sft-mask-position-0",
  ),
  pytest.param(
    lambda: align_train.check_batch(PAIR._replace(chosen_BT=PAIR.chosen_BT + 5), 8),
    ValueError,
    r"batch.chosen_BT: expected ids in \[0, 8\), got \[10, 9, 8\]",
    id="batch-id-out-of-vocab",
  ),
  pytest.param(
    lambda: align_train.check_batch(PAIR._replace(rejected_lengths_B=np.array([0], np.int32)), 8),
    ValueError,
    r"batch.rejected_lengths_B: expected lengths in \[1, 5\], got \[0\]",
    id="batch-length-0",
  ),
  pytest.param(
    lambda: align_train.check_batch(PAIR._replace(chosen_lengths_B=np.array([4], np.int32)), 8),
    ValueError,
    r"batch.chosen_mask_BT: expected False in the prompt, at position 0 and past each row's length, got \[True\] "
    r"at index \[\(0, 4",
    id="batch-mask-past-length",
  ),
  pytest.param(
    lambda: align_train.check_batch(PAIR._replace(rejected_mask_BT=PAIR.rejected_mask_BT | (np.arange(5) == 2)), 8),
    ValueError,
    r"batch.rejected_mask_BT: expected False in the prompt, .*got \[True\] at index \[\(0, 2\)\]",
    id="batch-mask-in-prompt",
  ),
  pytest.param(
    lambda: align_train.check_batch(PAIR._replace(prompt_lengths_B=np.array([6], np.int32)), 8),
    ValueError,
    r"batch.prompt_lengths_B: expected lengths in \[1, 5\], got \[6\]",
    id="batch-prompt-length-6",
  ),
  pytest.param(
    lambda: align_train.make_kto_step(MODEL, TCFG)(None, UNPAIRED._replace(prompt_lengths_B=np.array([-1, 3])), None),
    ValueError,
    r"batch.prompt_lengths_B: expected lengths in \[1, 5\], got \[-1\]",
    id="kto-step-negative-prompt-length",
  ),
  pytest.param(
    lambda: align_train.make_kto_step(MODEL, TCFG)(None, UNPAIRED._replace(lengths_B=np.array([9, 5])), None),
    ValueError,
    r"batch.lengths_B: expected lengths in \[1, 5\], got \[9\]",
    id="kto-step-length-past-t",
  ),
  pytest.param(
    lambda: align_train.make_kto_step(MODEL, TCFG)(None, UNPAIRED, (_seq([-1.0, -2.0]), _seq([-1.0, -2.0], [1, -1]))),
    ValueError,
    r"reference\[1\].count_B: expected token counts in \[0, inf\], got \[-1.0\]",
    id="kto-step-reference-negative-count",
  ),
  pytest.param(
    lambda: align_train.check_batch(PAIR._replace(margin_B=np.array([NAN], np.float32)), 8),
    ValueError,
    r"batch.margin_B: expected finite values",
    id="batch-margin-nan",
  ),
  pytest.param(
    lambda: align_train.check_batch(PAIR._replace(chosen_mask_BT=PAIR.chosen_mask_BT.astype(np.int32)), 8),
    TypeError,
    r"batch.chosen_mask_BT: expected a bool mask",
    id="batch-int-mask",
  ),
  pytest.param(
    lambda: align_train.check_batch(PAIR._asdict(), 8),
    TypeError,
    r"batch: expected an align.data.PreferenceBatch",
    id="batch-dict",
  ),
  pytest.param(
    lambda: align_train.make_reward_step(MODEL, TCFG)(None, PAIR._replace(chosen_BT=PAIR.chosen_BT - 2)),
    ValueError,
    r"batch.chosen_BT: expected ids in \[0, 8\), got \[-1\]",
    id="reward-step-bad-batch",
  ),
  pytest.param(
    lambda: align_train.make_preference_step(MODEL, TCFG, dpo.PreferenceConfig())(
      None, PAIR._replace(rejected_lengths_B=np.array([6], np.int32)), None
    ),
    ValueError,
    r"batch.rejected_lengths_B: expected lengths in \[1, 5\], got \[6\]",
    id="preference-step-bad-batch",
  ),
  # ---- the preference step's reference log-probs, checked on the host with the batch ----
  pytest.param(
    lambda: _preference_step()(None, PAIR, None),
    TypeError,
    r"reference: expected a \(chosen, rejected\) pair of logprobs.SequenceLogProbs .*got a NoneType",
    id="preference-step-reference-none",
  ),
  pytest.param(
    lambda: _preference_step()(None, PAIR, (_seq([-1.0]),) * 3),
    TypeError,
    r"reference: expected a \(chosen, rejected\) pair .*got a tuple of length 3",
    id="preference-step-reference-3-tuple",
  ),
  pytest.param(
    lambda: _preference_step()(None, PAIR, (_seq([-1.0]), np.zeros(1, np.float32))),
    TypeError,
    r"reference.rejected: expected logprobs.SequenceLogProbs, got ndarray",
    id="preference-step-reference-not-seq",
  ),
  pytest.param(
    lambda: _preference_step()(None, PAIR, (_seq([0.5]), _seq([-1.0]))),
    ValueError,
    r"reference.chosen.sum_B: expected log-probs in \[-inf, 0\], got \[0.5\] at index \[0\]",
    id="preference-step-reference-positive",
  ),
  pytest.param(
    lambda: _preference_step()(None, PAIR, (_seq([-1.0]), _seq([NAN]))),
    ValueError,
    r"reference.rejected.sum_B: expected finite values, got \[nan\]",
    id="preference-step-reference-nan",
  ),
  pytest.param(
    lambda: _preference_step()(None, PAIR, (_seq([-1.0], [-2.0]), _seq([-1.0]))),
    ValueError,
    r"reference.chosen.count_B: expected token counts in \[0, inf\], got \[-2.0\]",
    id="preference-step-reference-negative-count",
  ),
  pytest.param(
    lambda: _preference_step()(None, PAIR, (_seq([-1.0, -2.0]), _seq([-1.0, -2.0]))),
    ValueError,
    r"reference.chosen.sum_B: expected shape \(1,\) like the batch, got \(2,\)",
    id="preference-step-reference-batch-shape",
  ),
  pytest.param(
    lambda: align_train.check_batch(PAIR._replace(margin_B=np.array([1], np.int32)), 8),
    TypeError,
    r"batch.margin_B: expected float margins, got int32",
    id="batch-margin-int",
  ),
  pytest.param(
    lambda: align_train.reference_logprobs({}, MODEL, PAIR._replace(chosen_BT=PAIR.chosen_BT + 5)),
    ValueError,
    r"batch.chosen_BT: expected ids in \[0, 8\)",
    id="reference-bad-batch",
  ),
  pytest.param(
    lambda: align_train.make_reward_step(MODEL, TCFG, centering=-1.0),
    ValueError,
    r"centering: expected >= 0",
    id="reward-step-centering",
  ),
  pytest.param(
    lambda: align_train.make_preference_step(MODEL, TCFG, {"loss": "sigmoid"}),
    TypeError,
    r"pcfg: expected a dpo.PreferenceConfig",
    id="preference-step-cfg-dict",
  ),
]


@pytest.mark.parametrize("call, error, match", CASES)
def test_bad_input(call, error, match):
  with pytest.raises(error, match=match):
    call()


def test_the_batch_this_file_corrupts_is_valid():
  # Each batch case changes one field of PAIR: PAIR itself passes.
  align_train.check_batch(PAIR, 8)
  assert PAIR.chosen_mask_BT.tolist() == [[False, False, False, True, True]]
  align_train.check_unpaired(UNPAIRED, 8)


def test_batch_takes_bfloat16_margins():
  # ml_dtypes' bfloat16 is no np.floating: the dtype check uses jnp.issubdtype.
  align_train.check_batch(PAIR._replace(margin_B=jnp.zeros(1, jnp.bfloat16)), 8)


def test_preference_step_is_train_make_step():
  # The host-checked step exposes train.make_step's jitted program, which compiles as is.
  params = llama.init(KEY, MODEL)
  step = _preference_step()
  state = train.start_state(params, TCFG)
  reference = align_train.reference_logprobs(params, MODEL, PAIR)
  assert step.jitted.lower(state, PAIR, reference).compile() is not None
  _, metrics = step(state, PAIR, reference)
  assert float(metrics["loss"]) == pytest.approx(math.log(2), abs=1e-6)


def test_token_logprobs_checks_compile_into_checked():
  fn = checks.checked(logprobs.token_logprobs)
  logits = jnp.zeros((1, 3, 8))
  np.testing.assert_allclose(fn(logits, jnp.array([[0, 1, 2]])), [[0.0, -math.log(8), -math.log(8)]], rtol=1e-6)
  with pytest.raises(checkify.JaxRuntimeError, match=r"tokens_BT: expected ids in \[0, 8\), got 9"):
    fn(logits, jnp.array([[0, 9, 1]]))
  assert jax.jit(logprobs.token_logprobs)(logits, jnp.array([[0, 9, 1]])).shape == (1, 3)  # plain jit: no check


def test_best_of_k_refuses_a_nan_reward():
  # A NaN reward would win the argmax (jnp.argmax picks NaN): the rewards are checked first.
  params = llama.init(KEY, MODEL)

  def nan_reward(prompts, prompt_lengths, completions, completion_lengths):
    return jnp.where(jnp.arange(completions.shape[0]) == 1, jnp.nan, 0.0)

  with pytest.raises(ValueError, match=r"reward_fn: expected finite values, got \[nan\] at index \[1\]"):
    rejection_sampling.best_of_k(KEY, params, MODEL, np.array([[1, 5, 2]]), [3], nan_reward, k=2, max_new_tokens=1)
