import numpy as np
import pytest

from paperjax.models import jrt_prompt, synthetic


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
