"""Linear attention: the Taylor map, three equal causal forms, decode, PLA against Eq. 3, windows, convs."""

import math

import chex
import jax.numpy as jnp
import numpy as np
import pytest

from paperjax.ops import linear_attention as la


def _qkv(np_rng, batch=2, time=13, heads=3, d=4, v=5):
  q = jnp.asarray(np_rng.normal(size=(batch, time, heads, d)), jnp.float32)
  k = jnp.asarray(np_rng.normal(size=(batch, time, heads, d)), jnp.float32)
  val = jnp.asarray(np_rng.normal(size=(batch, time, heads, v)), jnp.float32)
  return la.taylor_features(q), la.taylor_features(k), val


def test_taylor_dot_product(np_rng):
  q, k = np_rng.normal(size=(2, 16)).astype(np.float32)
  s = float(q @ k) / math.sqrt(16)
  phi = la.taylor_features(jnp.asarray(np.stack([q, k])))
  assert phi.shape == (2, 1 + 16 + 256)
  assert float(phi[0] @ phi[1]) == pytest.approx(1 + s + s * s / 2, rel=1e-5)


def test_three_causal_forms_agree(np_rng):
  q, k, v = _qkv(np_rng)
  quad = la.causal_quadratic(q, k, v)
  chunked, state_c = la.causal_chunked(q, k, v, chunk=4)  # 13 is not a multiple of 4
  recurrent, state_r = la.causal_recurrent(q, k, v)
  np.testing.assert_allclose(chunked, quad, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(recurrent, quad, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(state_c.s_BHFK, state_r.s_BHFK, rtol=1e-4, atol=1e-4)


def test_matches_a_per_position_loop(np_rng):
  q, k, v = map(np.asarray, _qkv(np_rng, batch=1, time=6, heads=1))
  expected = np.zeros((6, v.shape[-1]))
  for i in range(6):
    w = np.array([q[0, i, 0] @ k[0, j, 0] for j in range(i + 1)])
    expected[i] = (w @ v[0, : i + 1, 0]) / (w.sum() + la.DEFAULT_EPS)
  np.testing.assert_allclose(la.causal_quadratic(*map(jnp.asarray, (q, k, v)))[0, :, 0], expected, rtol=1e-4)


def test_decode_continues_the_parallel_forward_with_constant_memory(np_rng):
  q, k, v = _qkv(np_rng, time=10)
  full = la.causal_quadratic(q, k, v)
  _, state = la.causal_chunked(q[:, :6], k[:, :6], v[:, :6], chunk=4)
  prefilled = state
  for t in range(6, 10):
    y, state = la.decode_step(state, q[:, t], k[:, t], v[:, t])
    np.testing.assert_allclose(y, full[:, t], rtol=1e-4, atol=1e-5)
    chex.assert_trees_all_equal_shapes(state, prefilled)  # the state does not grow with length


def test_non_causal_matches_loop(np_rng):
  q, k, v = map(np.asarray, _qkv(np_rng, batch=1, time=5, heads=1))
  mask = np.array([[1, 1, 0, 1, 1]], bool)
  got = la.non_causal(*map(jnp.asarray, (q, k, v)), key_mask_BT=jnp.asarray(mask))
  for i in range(5):
    w = np.array([q[0, i, 0] @ k[0, j, 0] if mask[0, j] else 0.0 for j in range(5)])
    np.testing.assert_allclose(got[0, i, 0], (w @ v[0, :, 0]) / (w.sum() + la.DEFAULT_EPS), rtol=1e-4)


def _pla_loop(q, kd, vd, ke, ve, m, keep):
  """Eq. 3 written per position: the encoder keys of the row's first M kept tokens, decoder
  keys j <= i (kept). A left-padded row's encoder is its own first M tokens, as unpadded."""
  t_len = q.shape[1]
  out = np.zeros((q.shape[0], t_len, q.shape[2], vd.shape[-1]))
  for b in range(q.shape[0]):
    for h in range(q.shape[2]):
      for i in range(t_len):
        num, den = 0.0, 0.0
        for j in np.flatnonzero(keep[b])[:m]:
          if keep[b, j]:
            w = q[b, i, h] @ ke[b, j, h]
            num, den = num + w * ve[b, j, h], den + w
        for j in range(i + 1):
          if keep[b, j]:
            w = q[b, i, h] @ kd[b, j, h]
            num, den = num + w * vd[b, j, h], den + w
        out[b, i, h] = num / (den + la.DEFAULT_EPS)
  return out


def test_prefix_linear_attention_matches_eq3(np_rng):
  q, kd, vd = _qkv(np_rng, time=9)
  _, ke, ve = _qkv(np_rng, time=9)
  keep = np.ones((2, 9), bool)
  keep[1, :2] = False  # row 1's prompt is left-padded by two tokens
  y, _ = la.prefix_linear_attention(q, kd, vd, ke, ve, 5, key_mask_BT=jnp.asarray(keep), chunk=4)
  expected = _pla_loop(*map(np.asarray, (q, kd, vd, ke, ve)), 5, keep)
  np.testing.assert_allclose(y, expected, rtol=1e-4, atol=1e-5)


def test_pla_prefill_state_then_decode(np_rng):
  q, kd, vd = _qkv(np_rng, time=9)
  _, ke, ve = _qkv(np_rng, time=9)
  full, _ = la.prefix_linear_attention(q, kd, vd, ke, ve, 5)
  _, state = la.prefix_linear_attention(q[:, :5], kd[:, :5], vd[:, :5], ke[:, :5], ve[:, :5], 5)  # Eq. 4: s_M, z_M
  for t in range(5, 9):
    y, state = la.decode_step(state, q[:, t], kd[:, t], vd[:, t])
    np.testing.assert_allclose(y, full[:, t], rtol=1e-4, atol=1e-5)


def test_short_conv_matches_numpy_and_steps(np_rng):
  x = np_rng.normal(size=(2, 7, 3)).astype(np.float32)
  kernel = np_rng.normal(size=(3, 3)).astype(np.float32)
  padded = np.pad(x, ((0, 0), (2, 0), (0, 0)))
  expected = sum(padded[:, w : w + 7] * kernel[w] for w in range(3))
  y, _ = la.short_conv(jnp.asarray(x), jnp.asarray(kernel))
  np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-6)
  _, state = la.short_conv(jnp.asarray(x[:, :4]), jnp.asarray(kernel))
  for t in range(4, 7):
    step, state = la.short_conv(jnp.asarray(x[:, t : t + 1]), jnp.asarray(kernel), state)
    np.testing.assert_allclose(step[:, 0], expected[:, t], rtol=1e-5, atol=1e-6)


def test_errors(np_rng):
  q, k, v = _qkv(np_rng)
  with pytest.raises(ValueError, match="prefix_len: expected 0 < M <= T=13"):
    la.prefix_linear_attention(q, k, v, k, v, 14)
  with pytest.raises(ValueError, match="phi_q_BTHF, phi_k_BTHF"):
    la.causal_quadratic(q, la.taylor_features(jnp.zeros((2, 13, 3, 5))), v)
  with pytest.raises(ValueError, match="v_BTHK"):
    la.causal_chunked(q, k, v[:, :5])
