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
