"""JRT-RNN: prefill (Eq. 4) + decode equals the parallel forward; left padding; Eq. 5 masks."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from paperjax.models.recurrent import based, jrt_rnn

CFG = jrt_rnn.JRTConfig(
  based=based.BasedConfig(vocab_size=64, dim=32, n_blocks=2, n_heads=2, feature_dim=4, window=4, ffn_dim=64, chunk=4),
  prefix_len=6,
  mask_id=63,
)


@pytest.fixture(scope="module")
def params():
  return jrt_rnn.init(jax.random.key(1), CFG)


def test_prefill_then_decode_equals_forward(params, key):
  tokens = jax.random.randint(key, (2, 10), 0, 60)
  full, _ = jrt_rnn.forward(params, tokens, CFG)
  encoder, _ = jrt_rnn.forward(params, tokens[:, :6], CFG)  # the encoder region alone
  np.testing.assert_allclose(encoder, full[:, :6], rtol=1e-4, atol=1e-4)
  logits, state = jrt_rnn.prefill(params, tokens[:, :6], CFG)  # Eq. 4's state
  np.testing.assert_allclose(logits, full[:, 5], rtol=1e-4, atol=1e-4)
  for t in range(6, 10):
    step, state = jrt_rnn.decode(params, tokens[:, t], state, CFG)
    np.testing.assert_allclose(step, full[:, t], rtol=1e-4, atol=1e-4)


def test_encoder_is_non_causal(params, key):
  tokens = jax.random.randint(key, (1, 8), 0, 60)
  changed = tokens.at[0, 5].set((tokens[0, 5] + 1) % 60)  # a late encoder token
  a, b = jrt_rnn.forward(params, tokens, CFG)[0], jrt_rnn.forward(params, changed, CFG)[0]
  assert not np.allclose(a[:, 0], b[:, 0])  # position 0 already reads it
  base_cfg = CFG.based
  c, _ = based.forward(params, tokens, base_cfg)
  d, _ = based.forward(params, changed, base_cfg)
  np.testing.assert_allclose(c[:, :5], d[:, :5], rtol=1e-6)  # plain Based is causal


def test_left_padded_prompt_matches_the_unpadded_one(params, key):
  prompt = jax.random.randint(key, (1, 6), 0, 60)
  padded, mask = based.left_pad(np.asarray(prompt[:, 2:]), np.array([4]), 6)
  assert padded.tolist() == [[0, 0, *np.asarray(prompt[0, 2:]).tolist()]] and mask.tolist() == [
    [False, False, True, True, True, True]
  ]
  short_cfg = jrt_rnn.JRTConfig(based=CFG.based, prefix_len=4, mask_id=63)
  unpadded, _ = jrt_rnn.forward(params, prompt[:, 2:], short_cfg)
  got, _ = jrt_rnn.forward(params, jnp.asarray(padded), CFG, key_mask_BT=jnp.asarray(mask))
  np.testing.assert_allclose(got[:, 2:], unpadded, rtol=1e-4, atol=1e-4)


def test_loss_masks_select_the_spec_positions():
  masked = jnp.array([[True, False, True, False, True, True, False, True]])
  keep = jnp.array([[False, True, True, True, True, True, True, True]])
  ntp, mlm = jrt_rnn.loss_masks(8, 4, masked, keep)
  assert ntp.tolist() == [[False, False, False, False, True, True, True, False]]  # t >= M with a next token
  assert mlm.tolist() == [[False, False, True, False, False, False, False, False]]  # masked, real, t < M


def test_loss_combines_ntp_and_mlm(params, key):
  tokens = jax.random.randint(key, (4, 10), 0, 60)
  total, parts = jrt_rnn.loss(params, tokens, CFG, jax.random.key(3))
  assert int(parts["masked"]) > 0
  expected = (1.0 * parts["ntp"] + 0.25 * parts["mlm"]) / 1.25
  assert float(total) == pytest.approx(float(expected), rel=1e-6)
  grads = jax.grad(lambda p: jrt_rnn.loss(p, tokens, CFG, jax.random.key(3))[0])(params)
  assert float(jnp.abs(grads["linear"]["wk_e"]).sum()) > 0  # the encoder projections learn


def test_errors(params):
  with pytest.raises(ValueError, match="fewer than the encoder length M=6"):
    jrt_rnn.forward(params, jnp.zeros((1, 4), jnp.int32), CFG)
  with pytest.raises(ValueError, match="mask_id"):
    jrt_rnn.JRTConfig(based=CFG.based, prefix_len=4, mask_id=64)
  with pytest.raises(ValueError, match="lengths_B"):
    based.left_pad(np.zeros((1, 8), np.int32), np.array([8]), 6)
