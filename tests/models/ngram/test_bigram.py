"""Count-table models against hand-worked tables, a dict-counting loop and sampling laws."""

import collections

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from paperjax.models.ngram import bigram


def test_hand_worked_bigram_with_empty_row():
  # Pairs of 0 1 0 2 0 1: (0,1) x2, (0,2), (1,0), (2,0); token 3 never precedes anything.
  table = bigram.fit(np.array([0, 1, 0, 2, 0, 1]), vocab_size=4)
  expected = np.array(
    [
      [0, 2 / 3, 1 / 3, 0],
      [1, 0, 0, 0],
      [1, 0, 0, 0],
      [1 / 3, 1 / 3, 1 / 3, 0],  # no data: uniform over the other tokens, itself 0
    ]
  )
  np.testing.assert_allclose(table.probs_CV, expected, rtol=1e-6)
  # log-prob sum by hand: p(1|0) p(0|1) p(2|0) = 2/3 * 1 * 1/3.
  assert bigram.perplexity(table, np.array([0, 1, 0, 2])) == pytest.approx((2 / 9) ** (-1 / 3), rel=1e-6)


def _dict_counts(rows, masks, order):
  counts = collections.Counter()
  for row, mask in zip(rows, masks):
    for t in range(order, len(row)):
      if all(mask[t - order : t + 1]):
        counts[tuple(row[t - order : t]), row[t]] += 1
  return counts


@pytest.mark.parametrize("order", [0, 1, 2, 3])
def test_counts_match_dict_loop(order, np_rng):
  vocab = 4
  tokens = np_rng.integers(0, vocab, (3, 40))
  mask = np_rng.random((3, 40)) > 0.1
  counts = np.asarray(bigram.count(tokens, vocab_size=vocab, order=order, mask_BT=mask))
  chex.assert_shape(counts, (vocab**order, vocab))
  expected = np.zeros_like(counts)
  for (context, nxt), n in _dict_counts(tokens.tolist(), mask.tolist(), order).items():
    expected[int(np.ravel_multi_index(context, (vocab,) * order)) if order else 0, nxt] = n
  np.testing.assert_array_equal(counts, expected)


def test_order_two_empty_rows_zero_the_last_context_token(np_rng):
  table = bigram.fit(np.array([0, 1, 2, 0, 1, 2]), vocab_size=3, order=2)
  probs = np.asarray(table.probs_CV).reshape(3, 3, 3)
  np.testing.assert_allclose(probs[0, 1], [0, 0, 1])  # seen: (0,1) -> 2 twice
  np.testing.assert_allclose(probs[2, 2], [0.5, 0.5, 0])  # unseen context ending in 2
  np.testing.assert_allclose(probs.sum(-1), 1, rtol=1e-6)


def test_alpha_smoothing_and_unigram():
  counts = bigram.count(np.array([0, 0, 1]), vocab_size=3, order=0)
  np.testing.assert_array_equal(counts, [[2, 1, 0]])
  table = bigram.probabilities(counts, alpha=1.0)
  np.testing.assert_allclose(table.probs_CV, [[3 / 6, 2 / 6, 1 / 6]], rtol=1e-6)
  assert table.order == 0


def test_next_token_probs_reads_the_last_tokens():
  table = bigram.fit(np.array([0, 1, 2, 0, 1, 2]), vocab_size=3, order=2)
  probs = bigram.next_token_probs(table, jnp.array([[2, 2, 0, 1], [0, 0, 1, 2]]))
  np.testing.assert_allclose(probs, [[0, 0, 1], [1, 0, 0]])


def _chain(vocab=5):
  """0 -> 1 -> 2 -> 3 (EOS) deterministically; 4 -> 4."""
  probs = np.zeros((vocab, vocab), np.float32)
  for a, b in [(0, 1), (1, 2), (2, 3), (3, 3), (4, 4)]:
    probs[a, b] = 1
  return bigram.NgramTable(jnp.asarray(probs), order=1)


def test_generate_stops_at_eos_and_at_the_limit(key):
  tokens, lengths = bigram.generate(
    key, _chain(), jnp.array([[0], [2], [4]]), max_new_tokens=6, eos_id=3, temperature=0.0
  )
  np.testing.assert_array_equal(tokens[0], [1, 2, 3, 3, 3, 3])
  np.testing.assert_array_equal(lengths, [3, 1, 6])  # EOS counted; the 4-loop never stops
  tokens, lengths = bigram.generate(key, _chain(), jnp.array([[0]]), max_new_tokens=2, eos_id=3)
  np.testing.assert_array_equal(tokens, [[1, 2]])
  np.testing.assert_array_equal(lengths, [2])


def test_generate_without_eos_runs_to_the_limit(key):
  _, lengths = bigram.generate(key, _chain(), jnp.array([[0]]), max_new_tokens=4)
  np.testing.assert_array_equal(lengths, [4])


@pytest.mark.parametrize("temperature", [1.0, 0.5, 2.0])
def test_sampling_follows_tempered_distribution(key, temperature):
  p = np.array([0.5, 0.3, 0.2, 0.0], np.float32)
  table = bigram.NgramTable(jnp.asarray(np.tile(p, (4, 1))), order=1)
  rows = 40_000
  tokens, _ = bigram.generate(key, table, jnp.zeros((rows, 1), jnp.int32), max_new_tokens=1, temperature=temperature)
  freq = np.bincount(np.asarray(tokens[:, 0]), minlength=4) / rows
  tempered = np.where(p > 0, p ** (1 / temperature), 0)
  tempered /= tempered.sum()
  np.testing.assert_allclose(freq, tempered, atol=0.01)
  assert freq[3] == 0  # probability zero is never drawn


def test_errors():
  with pytest.raises(MemoryError, match="vocab_size=100277, order=1"):
    bigram.count(np.array([0, 1]), vocab_size=100_277)
  with pytest.raises(MemoryError, match="order=3"):
    bigram.count(np.array([0, 1]), vocab_size=1000, order=3)
  with pytest.raises(ValueError, match="tokens_BT: id 7 outside"):
    bigram.count(np.array([0, 7]), vocab_size=4)
  with pytest.raises(TypeError, match="tokens_BT: expected integer"):
    bigram.count(np.array([0.0, 1.0]), vocab_size=4)
  with pytest.raises(ValueError, match="mask_BT"):
    bigram.count(np.array([[0, 1]]), vocab_size=4, mask_BT=np.ones((1, 3), bool))
  with pytest.raises(ValueError, match="order: expected"):
    bigram.count(np.array([0, 1]), vocab_size=4, order=-1)
  with pytest.raises(ValueError, match="alpha"):
    bigram.probabilities(jnp.ones((4, 4)), alpha=-1.0)
  table = _chain()
  with pytest.raises(ValueError, match="prompt_BO"):
    bigram.generate(jax.random.key(0), table, jnp.zeros((2, 0), jnp.int32), max_new_tokens=3)
  with pytest.raises(ValueError, match="max_new_tokens"):
    bigram.generate(jax.random.key(0), table, jnp.zeros((2, 1), jnp.int32), max_new_tokens=0)
  with pytest.raises(ValueError, match="temperature"):
    bigram.generate(jax.random.key(0), table, jnp.zeros((1, 1), jnp.int32), max_new_tokens=1, temperature=-1)
  with pytest.raises(ValueError, match="eos_id"):
    bigram.generate(jax.random.key(0), table, jnp.zeros((1, 1), jnp.int32), max_new_tokens=1, eos_id=9)


@pytest.mark.parametrize("order", [0, 1, 2])
def test_log_probs_match_a_position_loop(order, np_rng):
  vocab = 3
  train = np_rng.integers(0, vocab, 200)
  table = bigram.fit(train, vocab_size=vocab, order=order, alpha=0.5)
  probs = np.asarray(table.probs_CV).reshape((vocab,) * order + (vocab,))
  tokens = np_rng.integers(0, vocab, (2, 12))
  mask = np.ones_like(tokens, bool)
  mask[1, 5] = False
  lp, defined = bigram.log_probs(table, tokens, mask)
  for b in range(2):
    for t in range(12):
      ok = t >= order and mask[b, t - order : t + 1].all()
      assert bool(defined[b, t]) == ok
      if ok:
        assert float(lp[b, t]) == pytest.approx(np.log(probs[tuple(tokens[b, t - order : t + 1])]), rel=1e-5)
  expected = np.exp(-np.asarray(lp)[np.asarray(defined)].mean())
  assert bigram.perplexity(table, tokens, mask) == pytest.approx(expected, rel=1e-5)
