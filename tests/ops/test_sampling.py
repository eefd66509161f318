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
