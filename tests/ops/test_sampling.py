import jax
import jax.numpy as jnp
import numpy as np
import pytest

from paperjax.ops import sampling


def test_greedy_is_argmax_with_lowest_id_on_ties(key):
  logits = jnp.array([[0.1, 2.0, 2.0], [-jnp.inf, -1.0, -3.0]])
  np.testing.assert_array_equal(sampling.select(key, logits, 0.0), [1, 1])


def test_low_temperature_approaches_greedy(key):
  logits = jnp.tile(jnp.array([[1.0, 1.5, 0.2]]), (1000, 1))
  assert (np.asarray(sampling.select(key, logits, 1e-3)) == 1).all()


def test_errors(key):
  with pytest.raises(ValueError, match="temperature"):
    sampling.select(key, jnp.zeros((1, 3)), -0.5)
  with pytest.raises(ValueError, match="logits_BV"):
    sampling.select(key, jnp.zeros((3,)), 1.0)
  with pytest.raises(TypeError, match="logits_BV"):
    sampling.select(key, jnp.zeros((1, 3), jnp.int32), 1.0)


def test_sampled_frequencies_match_softmax(key):
  logits = jnp.array([2.0, -jnp.inf, 0.5, 1.0, -jnp.inf])
  rows = 50_000
  tokens = np.asarray(sampling.select(key, jnp.tile(logits, (rows, 1)), 1.0))
  freq = np.bincount(tokens, minlength=5) / rows
  expected = np.exp(np.asarray(logits) - 2.0)
  np.testing.assert_allclose(freq, expected / expected.sum(), atol=0.01)
  assert freq[1] == freq[4] == 0


def test_rows_are_independent(key):
  logits = jnp.log(jnp.array([[0.0, 1.0, 0.0], [1.0, 0.0, 0.0]]))
  np.testing.assert_array_equal(sampling.select(key, logits, 1.0), [1, 0])


def _support(logits_row):
  return set(np.flatnonzero(np.isfinite(np.asarray(logits_row))).tolist())


def test_top_k_keeps_exactly_k_with_ties_to_lower_ids():
  logits = jnp.array([[1.0, 3.0, 3.0, 0.5, 3.0], [5.0, 4.0, 3.0, 2.0, 1.0]])
  out = sampling.top_k_logits(logits, 2)
  assert _support(out[0]) == {1, 2} and _support(out[1]) == {0, 1}
  np.testing.assert_array_equal(out[1, :2], logits[1, :2])  # kept logits are untouched


def test_top_p_keeps_the_smallest_prefix_reaching_p(np_rng):
  probs = np.array([0.5, 0.05, 0.3, 0.15])
  logits = jnp.log(jnp.asarray(probs))[None, :]
  # Sorted: 0.5, 0.3, 0.15, 0.05 -> masses before: 0, .5, .8, .95.
  for p, expected in [(0.5, {0}), (0.51, {0, 2}), (0.8, {0, 2}), (0.81, {0, 2, 3}), (1.0, {0, 1, 2, 3}), (0.01, {0})]:
    assert _support(sampling.top_p_logits(logits, p)[0]) == expected, p
  # Against a sort-and-loop reference on random rows.
  logits = np_rng.normal(size=(20, 30)).astype(np.float32)
  out = np.asarray(sampling.top_p_logits(jnp.asarray(logits), 0.7))
  for row, got in zip(logits, out):
    probs = np.exp(row - row.max())
    probs /= probs.sum()
    kept, mass = set(), 0.0
    for i in np.argsort(-row, kind="stable"):
      if mass >= 0.7:
        break
      kept.add(int(i))
      mass += probs[i]
    assert _support(got) == kept


def test_select_samples_only_inside_the_filtered_support(key):
  logits = jnp.tile(jnp.log(jnp.array([0.4, 0.3, 0.2, 0.1])), (20_000, 1))
  top_k = np.asarray(sampling.select(key, logits, 1.0, top_k=2))
  assert set(np.unique(top_k)) == {0, 1}
  np.testing.assert_allclose(np.mean(top_k == 0), 0.4 / 0.7, atol=0.015)
  top_p = np.asarray(sampling.select(key, logits, 1.0, top_p=0.85))
  assert set(np.unique(top_p)) == {0, 1, 2}


def test_filter_errors():
  with pytest.raises(ValueError, match="top_k"):
    sampling.top_k_logits(jnp.zeros((1, 3)), 4)
  with pytest.raises(ValueError, match="top_p"):
    sampling.top_p_logits(jnp.zeros((1, 3)), 0.0)


def test_select_rows_equals_select_row_by_row(key):
  # Each row with its own key, temperature (0: greedy), top-k and top-p, one traced call; the
  # reference is `select` on the row alone with python settings. Row 3 has -inf logits and
  # row 5 a tie, where top-k must keep the lower id.
  rows, vocab = 40, 64
  rng = np.random.default_rng(0)
  logits = jnp.asarray(rng.normal(size=(rows, vocab)) * 3, jnp.float32)
  logits = logits.at[3, :10].set(-jnp.inf).at[5, 7].set(logits[5, 8])
  temperature = rng.choice([0.0, 0.5, 1.0, 2.0], rows)
  top_k = rng.choice([0, 1, 5, vocab], rows)  # 0: None
  top_p = rng.choice([0, 0.3, 0.9, 1.0], rows)  # 0: None
  keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(jnp.arange(rows))
  want = [
    int(
      sampling.select(
        keys[b],
        logits[b : b + 1],
        float(temperature[b]),
        top_k=None if top_k[b] == 0 else int(top_k[b]),
        top_p=None if top_p[b] == 0 else float(top_p[b]),
      )[0]
    )
    for b in range(rows)
  ]
  got = jax.jit(sampling.select_rows)(
    keys,
    logits,
    jnp.asarray(temperature, jnp.float32),
    jnp.asarray(np.where(top_k == 0, vocab, top_k), jnp.int32),
    jnp.asarray(np.where(top_p == 0, 2.0, top_p), jnp.float32),
  )
  assert got.tolist() == want
  assert len(set(want)) > 10  # the rows really differ
  with pytest.raises(ValueError, match=r"top_p_B: expected shape \(40,\), one per row"):
    sampling.select_rows(keys, logits, jnp.ones(rows), jnp.ones(rows, jnp.int32), jnp.ones(1))
