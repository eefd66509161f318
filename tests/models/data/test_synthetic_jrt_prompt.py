import chex
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


def _best_fixed_half_rule(batch: synthetic.RecallBatch, size_b: int, vocab_size: int) -> float:
  """Accuracy of the best rule that sees only which fixed half (first or second) each of the
  second set's tokens lies in: for each membership pattern, the position that held the
  answer most often in the first half of the rows, scored on the second half."""
  second = batch.tokens_BT[:, -1 - size_b : -1]
  half = (vocab_size - synthetic.FIRST) // 2
  pattern = ((second >= synthetic.FIRST + half) * (2 ** np.arange(size_b))).sum(1)
  answer = np.argmax(second == batch.targets_BT[:, -1:], axis=1)
  fit = len(answer) // 2
  counts = np.zeros((2**size_b, size_b))
  np.add.at(counts, (pattern[:fit], answer[:fit]), 1)
  return float(np.mean(counts.argmax(1)[pattern[fit:]] == answer[fit:]))


def test_random_halves_leave_no_fixed_half_shortcut():
  size_a, size_b, vocab = 3, 4, 40
  rows = 20_000
  draw = lambda halves: synthetic.set_disjointness(
    np.random.default_rng(0), rows, size_a, size_b, vocab, "a_first", halves=halves
  )
  assert _best_fixed_half_rule(draw("fixed"), size_b, vocab) == 1.0  # the shortcut the old task had
  # Random halves: the shared token and B's own tokens are exchangeable under any fixed split,
  # so no such rule beats guessing among B's tokens (1/4; 3 standard errors are 0.013).
  assert _best_fixed_half_rule(draw("random"), size_b, vocab) < 1 / size_b + 0.015


def test_random_halves_are_drawn_per_example():
  vocab, half = 40, 18
  batch = synthetic.set_disjointness(np.random.default_rng(1), 256, 5, 5, vocab, "a_first")
  a, b = batch.tokens_BT[:, 1:6], batch.tokens_BT[:, 7:12]
  assert ((a >= synthetic.FIRST) & (a < synthetic.FIRST + 2 * half)).all()
  lower_share = (a < synthetic.FIRST + half).mean(1)
  assert lower_share.min() < 0.5 < lower_share.max()  # A lies in different halves in different rows
  assert {len(set(x) | set(y)) for x, y in zip(a.tolist(), b.tolist())} == {9}  # one shared token, else disjoint
  again = synthetic.set_disjointness(np.random.default_rng(1), 256, 5, 5, vocab, "a_first")
  np.testing.assert_array_equal(again.tokens_BT, batch.tokens_BT)  # seeded
  fixed = synthetic.set_disjointness(np.random.default_rng(1), 256, 5, 5, vocab, "a_first", halves="fixed")
  assert (fixed.tokens_BT[:, 1:6] < synthetic.FIRST + half).all()


def test_synthetic_errors(np_rng):
  with pytest.raises(ValueError, match="vocab_size"):
    synthetic.mqar(np_rng, 2, num_pairs=20, num_queries=2, vocab_size=30)
  with pytest.raises(ValueError, match="num_queries"):
    synthetic.mqar(np_rng, 2, num_pairs=3, num_queries=4, vocab_size=30)
  with pytest.raises(ValueError, match="order"):
    synthetic.set_disjointness(np_rng, 2, 2, 2, 30, order="random")
  with pytest.raises(ValueError, match="halves"):
    synthetic.set_disjointness(np_rng, 2, 2, 2, 30, halves="none")  # type: ignore[arg-type]


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
  chex.assert_trees_all_equal(jrt_prompt.repeat_recall(batch, 1), batch)
  mqar = synthetic.mqar(np_rng, 3, num_pairs=4, num_queries=2, vocab_size=30)  # context C, C, then the queries
  context = jrt_prompt.repeat_recall(mqar, 2, context_len=8)
  np.testing.assert_array_equal(context.tokens_BT, np.concatenate([mqar.tokens_BT[:, :8], mqar.tokens_BT], axis=1))
  np.testing.assert_array_equal(context.targets_BT[:, :-1], context.tokens_BT[:, 1:])
  np.testing.assert_array_equal(context.targets_BT[:, 8:], mqar.targets_BT)
  assert context.target_mask_BT[:, :8].sum() == 0 and (context.target_mask_BT[:, 8:] == mqar.target_mask_BT).all()
  with pytest.raises(ValueError, match="context_len"):
    jrt_prompt.repeat_recall(mqar, 2, context_len=13)
  with pytest.raises(ValueError, match="repeats"):
    jrt_prompt.repeat_recall(batch, 0)
