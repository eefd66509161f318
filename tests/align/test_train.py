"""Pipeline steps: SFT batches mask the prompt; reward and preference steps move the right way."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from paperjax.align import data, dpo, reward, tasks
from paperjax.align import train as align_train
from paperjax.models.training import train
from paperjax.models.transformer import llama

TASK = tasks.SortTask()
MODEL = llama.LlamaConfig(
  vocab_size=TASK.vocab_size, dim=32, n_layers=1, n_heads=2, n_kv_heads=1, ffn_dim=64, max_seq_len=32
)


def test_sft_batch_scores_completion_tokens_only():
  tokens = np.array([[1, 5, 6, 2, 7, 8, 3]])
  mask = np.arange(7)[None] >= 4
  batch = align_train.sft_batch(tokens, mask)
  assert batch.targets_BT.tolist() == [[5, 6, 2, 7, 8, 3]]
  assert batch.mask_BT.tolist() == [[False, False, False, True, True, True]]  # targets 7, 8, EOS


def test_preference_steps_raise_the_implicit_reward_margin(np_rng):
  pairs = data.from_token_arrays(*TASK.preference_pairs(np_rng, 64))
  tcfg = train.TrainConfig(batch_size=64, peak_lr=1e-3, total_steps=20, warmup_steps=1)
  params = llama.init(jax.random.key(0), MODEL)
  reference = align_train.reference_logprobs(params, MODEL, pairs)
  state = train.TrainState(jnp.int32(0), params, train.optimizer(tcfg).init(params))
  step = align_train.make_preference_step(MODEL, tcfg, dpo.PreferenceConfig(beta=0.5))
  state, first = step(state, pairs, reference)
  assert float(first["loss"]) == pytest.approx(np.log(2), abs=1e-6)  # policy == reference at the start
  for _ in range(10):
    state, metrics = step(state, pairs, reference)
  assert float(metrics["reward_margin"]) > 0.1 and float(metrics["loss"]) < float(first["loss"])


def test_reward_step_learns_to_rank(np_rng):
  pairs = data.from_token_arrays(*TASK.preference_pairs(np_rng, 64))
  tcfg = train.TrainConfig(batch_size=64, peak_lr=3e-3, total_steps=80, warmup_steps=1)
  params = reward.init(jax.random.key(1), MODEL)
  state = train.TrainState(jnp.int32(0), params, train.optimizer(tcfg).init(params))
  step = align_train.make_reward_step(MODEL, tcfg)
  state, first = step(state, pairs)
  assert float(first["loss"]) == pytest.approx(np.log(2), abs=1e-6)  # zero head: every reward is 0
  for _ in range(60):
    state, metrics = step(state, pairs)
  assert float(metrics["accuracy"]) > 0.8


def test_kto_mismatched_pairs_each_prompt_with_the_previous_rows_completion():
  """TRL 1.16's rotation: (x_1, y_3), (x_2, y_1), (x_3, y_2); with B = 3 the direction matters."""
  batch = data.UnpairedBatch(
    tokens_BT=np.array([[1, 5, 2, 7, 3, 0], [1, 6, 6, 2, 8, 3], [1, 4, 2, 9, 0, 0]]),
    mask_BT=np.array([[0, 0, 0, 1, 1, 0], [0, 0, 0, 0, 1, 1], [0, 0, 0, 1, 0, 0]], bool),
    lengths_B=np.array([5, 6, 4]),
    prompt_lengths_B=np.array([3, 4, 3]),
    label_B=np.array([True, False, True]),
  )
  kl = align_train.kto_mismatched(batch)
  rows = [list(r[:n]) for r, n in zip(kl.tokens_BT, kl.lengths_B)]
  assert rows == [[1, 5, 2, 9], [1, 6, 6, 2, 7, 3], [1, 4, 2, 8, 3]]
  assert kl.mask_BT.tolist() == [
    [False, False, False, True, False, False],
    [False, False, False, False, True, True],
    [False, False, False, True, True, False],
  ]
  assert kl.prompt_lengths_B.tolist() == [3, 4, 3]
  with pytest.raises(ValueError, match=r"batch.tokens_BT: expected \[B, T\] with B >= 2"):
    align_train.kto_mismatched(data.UnpairedBatch(*(x[:1] for x in batch)))
  with pytest.raises(TypeError, match=r"batch: expected an align.data.UnpairedBatch, got tuple"):
    align_train.kto_mismatched(tuple(batch))  # type: ignore[arg-type]


def test_kto_step_raises_desirable_and_lowers_undesirable_completions(np_rng):
  prompts = TASK.prompts(np_rng, 16)
  good = TASK.demonstrations(np_rng, prompts, 0.0)
  desirable = np.arange(16) % 2 == 0
  completions = np.where(desirable[:, None], good, TASK.demonstrations(np_rng, prompts, 1.0))
  tokens = np.concatenate([prompts, completions], axis=1).astype(np.int32)
  batch = data.UnpairedBatch(
    tokens,
    np.broadcast_to(np.arange(tokens.shape[1]) >= TASK.prompt_len, tokens.shape).copy(),
    np.full(16, tokens.shape[1], np.int32),
    np.full(16, TASK.prompt_len, np.int32),
    desirable,
  )
  tcfg = train.TrainConfig(batch_size=16, peak_lr=3e-3, total_steps=20, warmup_steps=0)
  params = llama.init(jax.random.key(2), MODEL)
  reference = align_train.kto_reference_logprobs(params, MODEL, batch)
  step = align_train.make_kto_step(MODEL, tcfg, beta=0.5)
  state, first = step(train.start_state(params, tcfg), batch, reference)
  assert float(first["loss"]) == pytest.approx(0.5, abs=1e-6)  # policy == reference: z = 0, rho = 0, 1 - sig(0)
  for _ in range(8):
    state, metrics = step(state, batch, reference)
  assert float(metrics["loss"]) < 0.45
  rho = np.asarray(align_train.kto_reference_logprobs(state.params, MODEL, batch)[0].sum_B - reference[0].sum_B)
  assert rho[desirable].mean() > 0 > rho[~desirable].mean()
  with pytest.raises(TypeError, match="batch.label_B: expected bool labels"):
    step(state, batch._replace(label_B=desirable.astype(np.float32)), reference)
  leaky = batch.mask_BT.copy()
  leaky[0, 1] = True  # a prompt token scored as completion
  with pytest.raises(ValueError, match="batch.mask_BT: expected False in the prompt"):
    step(state, batch._replace(mask_BT=leaky), reference)


def test_a_reference_free_step_refuses_reference_logprobs(np_rng):
  pairs = data.from_token_arrays(*TASK.preference_pairs(np_rng, 4))
  tcfg = train.TrainConfig(batch_size=4, total_steps=2, warmup_steps=0)
  params = llama.init(jax.random.key(0), MODEL)
  step = align_train.make_preference_step(MODEL, tcfg, dpo.PreferenceConfig(loss="simpo"))
  reference = align_train.reference_logprobs(params, MODEL, pairs)
  with pytest.raises(ValueError, match="reference: loss 'simpo' reads no reference log-probs"):
    step(train.start_state(params, tcfg), pairs, reference)
