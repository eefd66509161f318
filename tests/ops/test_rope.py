"""RoPE: complex-number reference, the relative-position property, Llama 3.1 bands."""

import math

import jax.numpy as jnp
import numpy as np
import pytest

from paperjax.ops import rope


def test_matches_complex_rotation(np_rng):
  """Meta's formulation: (x_2i + i x_2i+1) * exp(i pos inv_freq_i)."""
  x = np_rng.normal(size=(2, 5, 3, 8)).astype(np.float32)
  pos = np_rng.integers(0, 1000, (2, 5))
  inv_freq = rope.inv_frequencies(8, theta=10_000.0)
  z = (x[..., 0::2] + 1j * x[..., 1::2]) * np.exp(1j * pos[:, :, None, None] * inv_freq.astype(np.float64))
  expected = np.stack([z.real, z.imag], axis=-1).reshape(x.shape)
  out = rope.apply_rope(jnp.asarray(x), jnp.asarray(pos, jnp.int32), jnp.asarray(inv_freq))
  np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-4)


def test_tables_rotate_several_tensors_at_the_same_positions(np_rng):
  """`tables` is cos and sin of position * inv_freq (numpy in float64); `rotate` with one
  table turns tensors of 3 heads and of 1 head (q's H and k's G) as the complex rotation."""
  pos = np_rng.integers(0, 5000, (2, 5))
  inv_freq = rope.inv_frequencies(8)
  cos, sin = rope.tables(jnp.asarray(pos, jnp.int32), jnp.asarray(inv_freq))
  angle = pos[:, :, None] * inv_freq.astype(np.float64)
  np.testing.assert_allclose(cos, np.cos(angle), atol=2e-3)  # float32 angles up to 5000 rad
  np.testing.assert_allclose(sin, np.sin(angle), atol=2e-3)
  for heads in (3, 1):
    x = np_rng.normal(size=(2, 5, heads, 8)).astype(np.float32)
    z = (x[..., 0::2] + 1j * x[..., 1::2]) * np.exp(1j * angle[:, :, None, :])
    expected = np.stack([z.real, z.imag], axis=-1).reshape(x.shape)
    np.testing.assert_allclose(rope.rotate(jnp.asarray(x), cos, sin), expected, atol=1e-2)


@pytest.mark.parametrize("scaling", [None, rope.RopeScaling()])
def test_scores_depend_only_on_relative_position(np_rng, scaling):
  q = jnp.asarray(np_rng.normal(size=(1, 1, 1, 64)), jnp.float32)
  k = jnp.asarray(np_rng.normal(size=(1, 1, 1, 64)), jnp.float32)
  inv_freq = jnp.asarray(rope.inv_frequencies(64, scaling=scaling))

  def score(m, n):
    rq = rope.apply_rope(q, jnp.array([[m]]), inv_freq)
    rk = rope.apply_rope(k, jnp.array([[n]]), inv_freq)
    return float(jnp.sum(rq * rk))

  base = score(7, 3)
  for shift in (1, 100, 5000):
    assert score(7 + shift, 3 + shift) == pytest.approx(base, rel=1e-3, abs=1e-3)
  assert score(9, 3) != pytest.approx(base, rel=1e-3)  # and it does depend on m - n


def test_llama31_bands_match_meta_transcription():
  """A per-frequency loop written like Meta's apply_scaling."""
  head_dim, theta = 128, 500_000.0
  factor, low, high, context = 8.0, 1.0, 4.0, 8192
  expected = []
  for i in range(0, head_dim, 2):
    freq = 1.0 / theta ** (i / head_dim)
    wavelen = 2 * math.pi / freq
    if wavelen < context / high:
      expected.append(freq)
    elif wavelen > context / low:
      expected.append(freq / factor)
    else:
      smooth = (context / wavelen - low) / (high - low)
      expected.append((1 - smooth) * freq / factor + smooth * freq)
  got = rope.inv_frequencies(
    head_dim,
    theta,
    rope.RopeScaling(factor=factor, low_freq_factor=low, high_freq_factor=high, original_max_position=context),
  )
  np.testing.assert_allclose(got, expected, rtol=1e-6)
  plain = rope.inv_frequencies(head_dim, theta)
  assert got[0] == plain[0] and got[-1] == pytest.approx(plain[-1] / factor)  # both ends of the band
  assert ((got < plain) & (got > plain / factor)).any()  # and some frequencies are blended


def test_errors():
  with pytest.raises(ValueError, match="head_dim"):
    rope.inv_frequencies(7)
  with pytest.raises(ValueError, match="low_freq_factor"):
    rope.RopeScaling(low_freq_factor=4.0, high_freq_factor=1.0)
  x = jnp.zeros((1, 2, 1, 4))
  inv = jnp.asarray(rope.inv_frequencies(4))
  with pytest.raises(ValueError, match="positions_BT"):
    rope.apply_rope(x, jnp.zeros((1, 3), jnp.int32), inv)
  with pytest.raises(TypeError, match="positions_BT"):
    rope.apply_rope(x, jnp.zeros((1, 2)), inv)
  with pytest.raises(ValueError, match="inv_freq_A"):
    rope.apply_rope(x, jnp.zeros((1, 2), jnp.int32), inv[:1])
