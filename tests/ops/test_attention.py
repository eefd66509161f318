"""GQA attention against a per-query numpy loop; masks; the XLA path; errors."""

import jax.numpy as jnp
import numpy as np
import pytest

from paperjax.ops import attention


def _loop_reference(q, k, v, mask):
  batch, time, heads, dim = q.shape
  groups = k.shape[2]
  out = np.zeros_like(q, dtype=np.float64)
  for b in range(batch):
    for t in range(time):
      for h in range(heads):
        g = h * groups // heads
        visible = np.flatnonzero(mask[b, t])
        scores = np.array([q[b, t, h] @ k[b, s, g] for s in visible]) / np.sqrt(dim)
        w = np.exp(scores - scores.max())
        out[b, t, h] = (w / w.sum()) @ v[b, visible, g]
  return out


def _qkv(np_rng, batch=2, time=6, heads=4, groups=2, dim=8, kv_time=None):
  kv_time = kv_time or time
  q = np_rng.normal(size=(batch, time, heads, dim)).astype(np.float32)
  k = np_rng.normal(size=(batch, kv_time, groups, dim)).astype(np.float32)
  v = np_rng.normal(size=(batch, kv_time, groups, dim)).astype(np.float32)
  return q, k, v


@pytest.mark.parametrize("impl", ["reference", "xla"])
def test_matches_loop_with_causal_document_and_length_masks(np_rng, impl):
  q, k, v = _qkv(np_rng)
  idx = jnp.tile(jnp.arange(6), (2, 1))
  seg = jnp.array([[0, 0, 0, 1, 1, 1], [0, 0, 0, 0, 0, 0]])
  mask = attention.make_mask(idx, idx, q_segment_ids_BT=seg, kv_segment_ids_BS=seg, kv_length_B=jnp.array([6, 4]))
  expected_mask = np.tril(np.ones((6, 6), bool))[None].repeat(2, 0)
  expected_mask[0, 3:, :3] = False
  expected_mask[1, :, 4:] = False
  np.testing.assert_array_equal(mask, expected_mask)
  out = attention.attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), mask, impl=impl)
  np.testing.assert_allclose(out[:, :4], _loop_reference(q, k, v, expected_mask)[:, :4], rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(out[0], _loop_reference(q, k, v, expected_mask)[0], rtol=1e-4, atol=1e-5)


def test_gqa_equals_mha_with_repeated_kv_heads(np_rng):
  q, k, v = _qkv(np_rng, heads=6, groups=2)
  mask = attention.make_mask(jnp.tile(jnp.arange(6), (2, 1)), jnp.tile(jnp.arange(6), (2, 1)))
  gqa = attention.attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), mask)
  mha = attention.attention(jnp.asarray(q), jnp.repeat(k, 3, axis=2), jnp.repeat(v, 3, axis=2), mask)
  np.testing.assert_allclose(gqa, mha, rtol=1e-5, atol=1e-6)


def test_document_mask_isolates_documents(np_rng):
  q, k, v = _qkv(np_rng, batch=1)
  idx = jnp.arange(6)[None]
  seg = jnp.array([[0, 0, 1, 1, 1, 2]])
  mask = attention.make_mask(idx, idx, q_segment_ids_BT=seg, kv_segment_ids_BS=seg)
  out = attention.attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), mask)
  k2, v2 = k.copy(), v.copy()
  k2[:, [0, 1, 5]] += 10.0  # perturb documents 0 and 2
  v2[:, [0, 1, 5]] -= 3.0
  out2 = attention.attention(jnp.asarray(q), jnp.asarray(k2), jnp.asarray(v2), mask)
  np.testing.assert_allclose(out[:, 2:5], out2[:, 2:5], rtol=1e-6)  # document 1 unchanged
  assert not np.allclose(out[:, :2], out2[:, :2])


def test_bf16_inputs_keep_dtype_and_fp32_softmax(np_rng):
  q, k, v = _qkv(np_rng)
  out = attention.attention(jnp.asarray(q, jnp.bfloat16), jnp.asarray(k, jnp.bfloat16), jnp.asarray(v, jnp.bfloat16))
  assert out.dtype == jnp.bfloat16
  ref = attention.attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v))
  np.testing.assert_allclose(np.asarray(out, np.float32), ref, atol=0.06)


def test_errors(np_rng):
  q, k, v = _qkv(np_rng, heads=4, groups=3)
  with pytest.raises(ValueError, match="H=4 must be a multiple of kv heads G=3"):
    attention.attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v))
  q, k, v = _qkv(np_rng)
  with pytest.raises(TypeError, match="one dtype"):
    attention.attention(jnp.asarray(q), jnp.asarray(k, jnp.bfloat16), jnp.asarray(v))
  with pytest.raises(ValueError, match="mask_BTS"):
    attention.attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), jnp.ones((2, 6, 5), bool))
  with pytest.raises(ValueError, match="v_BSGK"):
    attention.attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v[:, :3]))
  with pytest.raises(ValueError, match="impl"):
    attention.attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), impl="cudnn")


def test_sliding_window_sees_only_the_window(np_rng):
  q = jnp.asarray(np_rng.normal(size=(1, 8, 2, 4)), jnp.float32)
  k = jnp.asarray(np_rng.normal(size=(1, 8, 1, 4)), jnp.float32)
  v = jnp.asarray(np_rng.normal(size=(1, 8, 1, 4)), jnp.float32)
  out = attention.sliding_window_attention(q, k, v, 3)
  k2, v2 = k.at[:, :4].add(5.0), v.at[:, :4].add(5.0)  # outside the window of positions >= 6
  np.testing.assert_allclose(attention.sliding_window_attention(q, k2, v2, 3)[:, 6:], out[:, 6:], rtol=1e-6)
  assert not np.allclose(attention.sliding_window_attention(q, k2, v2, 3)[:, 5], out[:, 5])


def test_window_mask_literal():
  """Window 2 over positions 0..3, then a decode step at position 4 whose cache holds 2..3
  and one empty slot (-1)."""
  idx = jnp.arange(4)[None]
  expected = [[1, 0, 0, 0], [1, 1, 0, 0], [0, 1, 1, 0], [0, 0, 1, 1]]
  np.testing.assert_array_equal(attention.window_mask(idx, idx, 2)[0], np.array(expected, bool))
  step = attention.window_mask(jnp.array([[4]]), jnp.array([[-1, 2, 3, 4]]), 2)
  np.testing.assert_array_equal(step[0], [[False, False, True, True]])


def test_sliding_window_errors():
  x = jnp.zeros((1, 2, 1, 4))
  with pytest.raises(ValueError, match="window"):
    attention.sliding_window_attention(x, x, x, 0)
  with pytest.raises(ValueError, match="q_positions_BT, k_positions_BS"):
    attention.sliding_window_attention(x, x, x, 2, q_positions_BT=jnp.zeros((1, 3), jnp.int32))
