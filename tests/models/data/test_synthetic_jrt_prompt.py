import numpy as np
import pytest

from paperjax.models.data import jrt_prompt, synthetic


def test_mqar_answers_are_the_paired_values(np_rng):
  batch = synthetic.mqar(np_rng, 16, num_pairs=6, num_queries=3, vocab_size=40)
  assert batch.tokens_BT.shape == (16, 18)
  for row, target, mask in zip(*batch):
    pairs = dict(zip(row[:12:2].tolist(), row[1:12:2].tolist()))
    assert len(pairs) == 6  # distinct keys
    scored = np.flatnonzero(mask)
    assert scored.tolist() == [12, 14, 16]
    for t in scored:
      assert target[t] == pairs[row[t]] == row[t + 1]
  again = synthetic.mqar(np.random.default_rng(0), 16, 6, 3, 40)
  np.testing.assert_array_equal(again.tokens_BT, synthetic.mqar(np.random.default_rng(0), 16, 6, 3, 40).tokens_BT)


@pytest.mark.parametrize("order", ["a_first", "b_first"])
def test_set_disjointness_has_exactly_one_shared_token(np_rng, order):
  batch = synthetic.set_disjointness(np_rng, 32, size_a=3, size_b=7, vocab_size=40, order=order)
  for row, target, mask in zip(*batch):
    first = row[1 : row.tolist().index(synthetic.SEP2)]
    second = row[row.tolist().index(synthetic.SEP2) + 1 : -1]
    small, large = (first, second) if order == "a_first" else (second, first)
    assert (len(small), len(large)) == (3, 7)
    shared = set(first.tolist()) & set(second.tolist())
    assert shared == {int(target[-1])}
    assert mask.tolist() == [False] * (len(row) - 1) + [True]


def test_synthetic_errors(np_rng):
  with pytest.raises(ValueError, match="vocab_size"):
    synthetic.mqar(np_rng, 2, num_pairs=20, num_queries=2, vocab_size=30)
  with pytest.raises(ValueError, match="num_queries"):
    synthetic.mqar(np_rng, 2, num_pairs=3, num_queries=4, vocab_size=30)
  with pytest.raises(ValueError, match="order"):
    synthetic.set_disjointness(np_rng, 2, 2, 2, 30, order="random")


def test_jrt_prompt_repeats_context_and_question():
  assert jrt_prompt.build("C", "Q?") == "C\n\nQ?\n\nC\n\nQ?"
  tokens = np.array([[5, 6, 7, 0], [8, 9, 0, 0]])
  out, lengths = jrt_prompt.repeat_rows(tokens, np.array([3, 2]))
  assert out.tolist() == [[5, 6, 7, 5, 6, 7, 0, 0], [8, 9, 8, 9, 0, 0, 0, 0]]
  assert lengths.tolist() == [6, 4]
  with pytest.raises(ValueError, match="lengths_B"):
    jrt_prompt.repeat_rows(tokens, np.array([5, 2]))


def test_recall_loss_scores_only_the_answers(np_rng):
  batch = synthetic.set_disjointness(np_rng, 4, size_a=2, size_b=3, vocab_size=20)
  logits = np_rng.normal(size=(*batch.tokens_BT.shape, 20)).astype(np.float32)
  logits[0, -1, batch.targets_BT[0, -1]] = 50.0  # row 0 answers correctly, rows 1-3 (almost surely) not
  logits[1:, -1, batch.targets_BT[1:, -1]] = -50.0
  loss, metrics = synthetic.recall_loss(logits, batch)
  last = logits[:, -1] - logits[:, -1].max(-1, keepdims=True)
  log_probs = last - np.log(np.exp(last).sum(-1, keepdims=True))
  np.testing.assert_allclose(loss, -log_probs[np.arange(4), batch.targets_BT[:, -1]].mean(), rtol=1e-5)
  assert float(metrics["accuracy"]) == 0.25
  logits[:, :-1] = 0.0  # unscored positions do not move the loss
  np.testing.assert_allclose(synthetic.recall_loss(logits, batch)[0], loss, rtol=1e-6)
  with pytest.raises(ValueError, match="logits_BTV"):
    synthetic.recall_loss(logits[:, :-1], batch)


def test_repeat_recall_reads_the_prompt_twice_and_scores_the_last_reading(np_rng):
  batch = synthetic.set_disjointness(np_rng, 3, size_a=2, size_b=4, vocab_size=20)
  twice = jrt_prompt.repeat_recall(batch, 2)
  time = batch.tokens_BT.shape[1]
  np.testing.assert_array_equal(twice.tokens_BT, np.concatenate([batch.tokens_BT, batch.tokens_BT], axis=1))
  np.testing.assert_array_equal(twice.targets_BT[:, :-1], twice.tokens_BT[:, 1:])  # still next tokens
  np.testing.assert_array_equal(twice.targets_BT[:, time:], batch.targets_BT)
  np.testing.assert_array_equal(
    twice.target_mask_BT, np.concatenate([np.zeros_like(batch.target_mask_BT), batch.target_mask_BT], axis=1)
  )
  assert all(np.array_equal(a, b) for a, b in zip(jrt_prompt.repeat_recall(batch, 1), batch))
  with pytest.raises(ValueError, match="repeats"):
    jrt_prompt.repeat_recall(batch, 0)
