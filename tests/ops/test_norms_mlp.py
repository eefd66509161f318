import jax.numpy as jnp
import numpy as np
import pytest

from paperjax.ops import mlp, norms


def test_rms_norm_matches_numpy_and_keeps_dtype(np_rng):
  x = np_rng.normal(size=(2, 3, 16)).astype(np.float32) * 5
  g = np_rng.normal(size=16).astype(np.float32)
  expected = x / np.sqrt((x.astype(np.float64) ** 2).mean(-1, keepdims=True) + 1e-5) * g
  np.testing.assert_allclose(norms.rms_norm(jnp.asarray(x), jnp.asarray(g)), expected, rtol=1e-5)
  out = norms.rms_norm(jnp.asarray(x, jnp.bfloat16), jnp.asarray(g))
  assert out.dtype == jnp.bfloat16
  with pytest.raises(ValueError, match="scale_D"):
    norms.rms_norm(jnp.asarray(x), jnp.ones(3))


def test_swiglu_matches_numpy(np_rng):
  x = np_rng.normal(size=(2, 3, 8)).astype(np.float32)
  w1, w3 = np_rng.normal(size=(2, 8, 12)).astype(np.float32)
  w2 = np_rng.normal(size=(12, 8)).astype(np.float32)
  gate = x @ w1
  expected = (gate / (1 + np.exp(-gate)) * (x @ w3)) @ w2
  np.testing.assert_allclose(mlp.swiglu(*map(jnp.asarray, (x, w1, w3, w2))), expected, rtol=1e-4, atol=1e-4)
  with pytest.raises(ValueError, match="w1_DE"):
    mlp.swiglu(jnp.asarray(x), jnp.asarray(w1), jnp.asarray(w3), jnp.asarray(w2[:4]))
