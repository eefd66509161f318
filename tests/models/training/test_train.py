"""Training: the schedule, packed batches, learning real text, checkpoint resume."""

import math
import warnings

import jax
import numpy as np
import pytest

from paperjax.models.data import corpus, tokenizer
from paperjax.models.training import checkpoints, lm, train
from paperjax.models.transformer import llama

V = 512
CFG = llama.LlamaConfig(vocab_size=V, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=192, max_seq_len=128)
# 100 steps at a peak of 1e-2 reach 0.75x the unigram cross-entropy on held-out text (250 at
# the default 3e-3 reached 0.71x, in twice the time).
TCFG = train.TrainConfig(batch_size=16, seq_len=64, total_steps=100, warmup_steps=10, peak_lr=1e-2)


@pytest.fixture(scope="module")
def data():
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", RuntimeWarning)
    tok = tokenizer.from_name("cl100k_base")
  train_docs, test_docs = corpus.split_documents(corpus.stdlib_documents(max_chars=1_500_000), (0.9, 0.1))
  train_stream, test_stream = corpus.tokenize(tok, train_docs), corpus.tokenize(tok, test_docs)
  kept = corpus.compact_vocab(train_stream.ids_N, V)
  return (
    (corpus.to_compact(train_stream.ids_N, kept), train_stream.segment_ids_N),
    (corpus.to_compact(test_stream.ids_N, kept), test_stream.segment_ids_N),
  )


@pytest.fixture(scope="module")
def step_fn():
  return lm.make_train_step(CFG, TCFG)


def test_schedule_warmup_then_cosine():
  lr = train.schedule(TCFG)
  assert float(lr(0)) == 0.0
  assert float(lr(4)) == pytest.approx(TCFG.peak_lr * 4 / 10)
  assert float(lr(10)) == pytest.approx(TCFG.peak_lr)
  mid = 10 + (100 - 10) / 2
  floor = TCFG.peak_lr * TCFG.final_lr_ratio
  assert float(lr(mid)) == pytest.approx(floor + (TCFG.peak_lr - floor) * 0.5, rel=1e-4)
  assert float(lr(100)) == pytest.approx(floor)


def test_make_step_applies_one_optimizer_update_and_reports_aux():
  tcfg = train.TrainConfig(total_steps=10, warmup_steps=0, peak_lr=0.1)
  params = {"w": np.array([1.0, -2.0], np.float32)}
  x = np.array([0.5, 0.5], np.float32)
  loss_fn = lambda p, x: (((p["w"] - x) ** 2).sum(), {"first": p["w"][0]})
  state = train.start_state(params, tcfg)
  new, metrics = train.make_step(loss_fn, tcfg)(state, x)
  grads = {"w": 2 * (params["w"] - x)}
  updates, _ = train.optimizer(tcfg).update(grads, state.opt_state, params)
  assert np.abs(updates["w"]).min() > 0.01
  np.testing.assert_allclose(new.params["w"], params["w"] + updates["w"], rtol=1e-6)
  assert int(new.step) == 1 and float(metrics["first"]) == 1.0
  assert float(metrics["loss"]) == pytest.approx(0.25 + 6.25)
  assert float(metrics["grad_norm"]) == pytest.approx(math.hypot(1.0, 5.0), rel=1e-6)
  assert float(metrics["lr"]) == pytest.approx(0.1)


def test_packed_batch_positions_and_target_mask():
  tokens = np.array([[1, 2, 3, 4, 5, 6]])
  segments = np.array([[7, 7, 8, 8, 8, 9]])
  batch = lm.packed_batch(tokens, segments)
  assert batch.tokens_BT.tolist() == [[1, 2, 3, 4, 5]] and batch.targets_BT.tolist() == [[2, 3, 4, 5, 6]]
  assert batch.positions_BT.tolist() == [[0, 1, 0, 1, 2]]
  assert batch.mask_BT.tolist() == [[True, False, True, True, False]]  # no target across documents
  assert batch.segment_ids_BT.tolist() == [[7, 7, 8, 8, 8]]


def test_batches_are_a_function_of_the_step(data):
  ids, segments = data[0]
  a, b = lm.batch_at(ids, segments, 5, TCFG), lm.batch_at(ids, segments, 5, TCFG)
  np.testing.assert_array_equal(a.tokens_BT, b.tokens_BT)
  assert not np.array_equal(a.tokens_BT, lm.batch_at(ids, segments, 6, TCFG).tokens_BT)
  resumed = next(lm.batches(ids, segments, TCFG, start_step=5))
  np.testing.assert_array_equal(resumed.targets_BT, a.targets_BT)
  with pytest.raises(ValueError, match="fewer than one window"):
    lm.batch_at(ids[:10], segments[:10], 0, TCFG)


def test_tiny_model_learns_the_corpus(data, step_fn):
  (train_ids, train_seg), (test_ids, test_seg) = data
  freq = np.bincount(train_ids, minlength=V) / train_ids.size
  test_freq = np.bincount(test_ids, minlength=V) / test_ids.size
  unigram_ce = -np.sum(test_freq * np.log(np.maximum(freq, 1e-12)))
  test_batch = lm.batch_at(
    test_ids, test_seg, 0, train.TrainConfig(batch_size=64, seed=1, total_steps=2, warmup_steps=0)
  )
  state = lm.init_state(jax.random.key(0), CFG, TCFG)
  initial = float(lm.eval_loss(state.params, test_batch, CFG))
  assert initial > math.log(V) - 0.5
  for i in range(TCFG.total_steps):
    state, metrics = step_fn(state, lm.batch_at(train_ids, train_seg, i, TCFG))
    assert np.isfinite(float(metrics["loss"]))
  final = float(lm.eval_loss(state.params, test_batch, CFG))
  assert final < 0.8 * unigram_ce, (final, unigram_ce)


def test_checkpoint_resume_gives_the_same_losses(data, step_fn, tmp_path):
  ids, segments = data[0]
  state = lm.init_state(jax.random.key(1), CFG, TCFG)
  for i in range(2):
    state, _ = step_fn(state, lm.batch_at(ids, segments, i, TCFG))
  manager = checkpoints.checkpoint_manager(tmp_path / "ckpt")
  checkpoints.save(manager, state)
  straight = []
  for i in range(2, 4):
    state, m = step_fn(state, lm.batch_at(ids, segments, i, TCFG))
    straight.append(float(m["loss"]))
  fresh_like = lm.init_state(jax.random.key(9), CFG, TCFG)
  resumed = checkpoints.restore(checkpoints.checkpoint_manager(tmp_path / "ckpt"), fresh_like)
  assert int(resumed.step) == 2
  again = []
  for i in range(int(resumed.step), 4):
    resumed, m = step_fn(resumed, lm.batch_at(ids, segments, i, TCFG))
    again.append(float(m["loss"]))
  np.testing.assert_allclose(again, straight, rtol=1e-6)
  with pytest.raises(FileNotFoundError, match="no checkpoint"):
    checkpoints.restore(checkpoints.checkpoint_manager(tmp_path / "empty"), fresh_like)
