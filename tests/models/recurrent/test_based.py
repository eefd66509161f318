"""Based hybrid stack: decode equals the parallel forward, chunked prefill too, constant state."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from paperjax.models.recurrent import based

CFG = based.BasedConfig(vocab_size=64, dim=32, n_blocks=2, n_heads=2, feature_dim=4, window=4, ffn_dim=64, chunk=4)


@pytest.fixture(scope="module")
def params():
  return based.init(jax.random.key(0), CFG)


def test_decode_equals_parallel_forward_with_constant_state(params, key, jitted):
  tokens = jax.random.randint(key, (2, 11), 0, CFG.vocab_size)
  forward, decode = jitted(based.forward, CFG), jitted(based.decode, CFG)
  full, _ = forward(params, tokens)
  logits, state = forward(params, tokens[:, :5], state=based.init_state(CFG, 2))  # a chunk from an empty state
  np.testing.assert_allclose(logits, full[:, :5], rtol=1e-4, atol=1e-4)
  prefilled = state
  for t in range(5, 11):  # beyond the window (4) and across linear-attention chunks
    step, state = decode(params, tokens[:, t], state)
    np.testing.assert_allclose(step, full[:, t], rtol=1e-4, atol=1e-4)
    chex.assert_trees_all_equal_shapes(state, prefilled)
  np.testing.assert_array_equal(state.length_B, [11, 11])


def test_window_layer_forgets_tokens_outside_the_window(params, key, jitted):
  """With the recurrent mixers silenced (conv gate 0, linear output 0) only the windows mix
  tokens: through 2 blocks of window 4, position t sees tokens t - 6 .. t and no earlier."""
  quiet = {
    **params,
    "conv": {**params["conv"], "w_gate": jnp.zeros_like(params["conv"]["w_gate"])},
    "linear": {**params["linear"], "wo": jnp.zeros_like(params["linear"]["wo"])},
  }
  tokens = jax.random.randint(key, (1, 14), 0, CFG.vocab_size)
  changed = tokens.at[0, :5].set((tokens[0, :5] + 1) % CFG.vocab_size)  # tokens 0 .. 4
  a, b = jitted(based.forward, CFG)(quiet, tokens)[0], jitted(based.forward, CFG)(quiet, changed)[0]
  np.testing.assert_allclose(a[:, 11:], b[:, 11:], rtol=1e-5, atol=1e-6)  # 11 - 6 = 5: out of reach
  assert not np.allclose(a[:, 10], b[:, 10])  # 10 - 6 = 4: still reached
  assert not np.allclose(
    jitted(based.forward, CFG)(params, tokens)[0][:, 13], jitted(based.forward, CFG)(params, changed)[0][:, 13]
  )  # recurrence remembers


def test_errors():
  with pytest.raises(ValueError, match="dim, n_heads"):
    based.BasedConfig(vocab_size=8, dim=30, n_blocks=1, n_heads=4)
  with pytest.raises(ValueError, match="window"):
    based.BasedConfig(vocab_size=8, dim=32, n_blocks=1, window=0)


def test_any_padding_mask_keeps_real_tokens_exact_under_jit(params, key, jitted):
  """Real tokens are numbered by rank, so left or right padding inside a jitted forward
  (where the mask's layout cannot be checked) leaves the real tokens' logits equal to the
  unpadded row's."""
  tokens = jax.random.randint(key, (1, 6), 1, CFG.vocab_size)
  ref, _ = jitted(based.forward, CFG)(params, tokens)
  pad = jnp.zeros((1, 3), tokens.dtype)
  forward = jitted(based.forward, CFG)
  for padded, mask in (
    (jnp.concatenate([pad, tokens], axis=1), jnp.arange(9)[None] >= 3),
    (jnp.concatenate([tokens, pad], axis=1), jnp.arange(9)[None] < 6),
  ):
    got, _ = forward(params, padded, key_mask_BT=mask)
    np.testing.assert_allclose(got[:, np.asarray(mask[0])], ref, rtol=1e-4, atol=1e-4)


def test_prefix_needs_encoder_projections(params):
  with pytest.raises(ValueError, match="params: prefix_len needs JRT-RNN's encoder projections"):
    based.forward(params, jnp.zeros((1, 4), jnp.int32), CFG, prefix_len=2)
