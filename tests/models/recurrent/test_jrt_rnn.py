"""JRT-RNN: prefill (Eq. 4) + decode equals the parallel forward; left padding; Eq. 5 masks."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from paperjax.models.recurrent import based, jrt_rnn
from paperjax.ops import linear_attention as la
from paperjax.ops import mlp, norms

CFG = jrt_rnn.JRTConfig(
  based=based.BasedConfig(vocab_size=64, dim=32, n_blocks=2, n_heads=2, feature_dim=4, window=4, ffn_dim=64, chunk=4),
  prefix_len=6,
  mask_id=63,
)
# Two programs of one function (a gate at +-40 is exactly open or shut in float32): logits near 0
# differ by float32 rounding where XLA fuses them differently (up to 5.6e-7 seen without fusion emitters).
TWO_PROGRAMS = dict(rtol=1e-5, atol=1e-6)


@pytest.fixture(scope="module")
def params():
  return jrt_rnn.init(jax.random.key(1), CFG)


def test_prefill_then_decode_equals_forward(params, key, jitted):
  tokens = jax.random.randint(key, (2, 10), 0, 60)
  full, _ = jitted(jrt_rnn.forward, CFG)(params, tokens)
  encoder, _ = jitted(jrt_rnn.forward, CFG)(params, tokens[:, :6])  # the encoder region alone
  np.testing.assert_allclose(encoder, full[:, :6], rtol=1e-4, atol=1e-4)
  logits, state = jitted(jrt_rnn.prefill, CFG)(params, tokens[:, :6])  # Eq. 4's state
  np.testing.assert_allclose(logits, full[:, 5], rtol=1e-4, atol=1e-4)
  for t in range(6, 10):
    step, state = jitted(jrt_rnn.decode, CFG)(params, tokens[:, t], state)
    np.testing.assert_allclose(step, full[:, t], rtol=1e-4, atol=1e-4)


def test_encoder_is_non_causal(params, key, jitted):
  tokens = jax.random.randint(key, (1, 8), 0, 60)
  changed = tokens.at[0, 5].set((tokens[0, 5] + 1) % 60)  # a late encoder token
  a, b = jitted(jrt_rnn.forward, CFG)(params, tokens)[0], jitted(jrt_rnn.forward, CFG)(params, changed)[0]
  assert not np.allclose(a[:, 0], b[:, 0])  # position 0 already reads it
  base_cfg = CFG.based
  c, _ = jitted(based.forward, base_cfg)(params, tokens)
  d, _ = jitted(based.forward, base_cfg)(params, changed)
  np.testing.assert_allclose(c[:, :5], d[:, :5], rtol=1e-6)  # plain Based is causal


def test_left_padded_prompt_matches_the_unpadded_one(params, key, jitted):
  prompt = jax.random.randint(key, (1, 6), 0, 60)
  padded, mask = based.left_pad(np.asarray(prompt[:, 2:]), np.array([4]), 6)
  assert padded.tolist() == [[0, 0, *np.asarray(prompt[0, 2:]).tolist()]] and mask.tolist() == [
    [False, False, True, True, True, True]
  ]
  short_cfg = jrt_rnn.JRTConfig(based=CFG.based, prefix_len=4, mask_id=63)
  unpadded, _ = jitted(jrt_rnn.forward, short_cfg)(params, prompt[:, 2:])
  got, _ = jitted(jrt_rnn.forward, CFG)(params, jnp.asarray(padded), key_mask_BT=jnp.asarray(mask))
  np.testing.assert_allclose(got[:, 2:], unpadded, rtol=1e-4, atol=1e-4)


def test_loss_masks_select_the_spec_positions():
  masked = jnp.array([[True, False, True, False, True, True, False, True]])
  keep = jnp.array([[False, True, True, True, True, True, True, True]])
  ntp, mlm = jrt_rnn.loss_masks(8, 4, masked, keep)
  assert ntp.tolist() == [[False, False, False, False, True, True, True, False]]  # t >= M with a next token
  assert mlm.tolist() == [[False, False, True, False, False, False, False, False]]  # masked, real, t < M


def test_loss_combines_ntp_and_mlm(params, key):
  tokens = jax.random.randint(key, (4, 10), 0, 60)
  loss_and_grads = jax.jit(jax.value_and_grad(jrt_rnn.loss, has_aux=True), static_argnums=2)  # one compile
  (total, parts), grads = loss_and_grads(params, tokens, CFG, jax.random.key(3))
  assert int(parts["masked"]) > 0
  expected = (1.0 * parts["ntp"] + 0.25 * parts["mlm"]) / 1.25
  assert float(total) == pytest.approx(float(expected), rel=1e-6)
  assert float(jnp.abs(grads["linear"]["wk_e"]).sum()) > 0  # the encoder projections learn


def test_encoder_variants_against_eq3(params, key, jitted):
  tokens = jax.random.randint(key, (2, 9), 0, 60)
  zero_cfg = dataclasses.replace(CFG, encoder="zero_values")
  zero = jrt_rnn.init(jax.random.key(1), zero_cfg)
  assert "wv_e" not in zero["linear"] and jrt_rnn.param_axes(zero_cfg).keys() == zero.keys()
  silent = {**params, "linear": {**params["linear"], "wv_e": jnp.zeros_like(params["linear"]["wv_e"])}}
  np.testing.assert_allclose(  # encoder values 0: Eq. 3 with wv_e = 0
    jitted(jrt_rnn.forward, zero_cfg)(zero, tokens)[0],
    jitted(jrt_rnn.forward, CFG)(silent, tokens)[0],
    rtol=1e-5,
    atol=1e-5,
  )
  gated_cfg = dataclasses.replace(CFG, encoder="gated")
  gated = jrt_rnn.init(jax.random.key(1), gated_cfg)
  np.testing.assert_array_equal(gated["linear"]["encoder_gate"], jnp.full((2, 2), jrt_rnn.GATE_INIT))
  with_gate = lambda g: {**gated, "linear": {**gated["linear"], "encoder_gate": jnp.full((2, 2), g)}}
  np.testing.assert_allclose(  # gate open (sigmoid(40) is 1.0 in float32): Eq. 3, by another program
    jitted(jrt_rnn.forward, gated_cfg)(with_gate(40.0), tokens)[0],
    jitted(jrt_rnn.forward, CFG)(params, tokens)[0],
    **TWO_PROGRAMS,
  )
  np.testing.assert_allclose(  # gate shut: the encoder is gone and JRT-RNN is Based
    jitted(jrt_rnn.forward, gated_cfg)(with_gate(-40.0), tokens)[0],
    jitted(based.forward, CFG.based)(params, tokens)[0],
    **TWO_PROGRAMS,
  )


def test_encoder_share_equals_a_loop(params, key):
  tokens = jax.random.randint(key, (1, 8), 0, 60)
  share = np.asarray(jrt_rnn.encoder_share(params, tokens, CFG))
  assert share.shape == (2, 1, 8, 2)
  # The first block's linear layer by hand: its input is the block input after the conv sublayer.
  sites = jrt_rnn.forward_with_sites(params, tokens, CFG, ["blocks.0.hook_resid_pre"])[2]
  x = sites["blocks.0.hook_resid_pre"]
  pc, pl, b = jax.tree.map(lambda w: w[0], params["conv"]), jax.tree.map(lambda w: w[0], params["linear"]), CFG.based
  x = x + la.base_conv(norms.rms_norm(x, pc["norm"], b.norm_eps), pc["w_in"], pc["w_gate"], pc["kernel"])[0]
  x = x + mlp.swiglu(norms.rms_norm(x, pc["mlp_norm"], b.norm_eps), pc["w1"], pc["w3"], pc["w2"])
  h = np.asarray(norms.rms_norm(x, pl["norm"], b.norm_eps))[0]
  kernel = lambda a, c: 1 + a @ c / 2 + (a @ c) ** 2 / 8  # phi(q).phi(k) = 1 + s + s^2 / 2, s = q.k / sqrt(J), J = 4
  for head in range(2):
    q, kd, ke = (h @ np.asarray(pl[w])[:, head] for w in ("wq", "wk", "wk_e"))
    for i in range(8):
      enc = sum(kernel(q[i], ke[j]) for j in range(6))
      dec = sum(kernel(q[i], kd[j]) for j in range(i + 1))
      assert share[0, 0, i, head] == pytest.approx(enc / (enc + dec), rel=1e-4)
      assert enc >= 6 / 2 - 1e-5  # the Taylor kernel's floor: the encoder adds >= M / 2


def test_errors(params):
  with pytest.raises(ValueError, match="fewer than the encoder length M=6"):
    jrt_rnn.forward(params, jnp.zeros((1, 4), jnp.int32), CFG)
  with pytest.raises(ValueError, match="mask_id"):
    jrt_rnn.JRTConfig(based=CFG.based, prefix_len=4, mask_id=64)
  with pytest.raises(ValueError, match="lengths_B"):
    based.left_pad(np.zeros((1, 8), np.int32), np.array([8]), 6)
  with pytest.raises(ValueError, match="encoder"):
    dataclasses.replace(CFG, encoder="none")
  with pytest.raises(ValueError, match="encoder='gated' expects"):  # params of another variant
    jrt_rnn.forward(params, jnp.zeros((1, 8), jnp.int32), dataclasses.replace(CFG, encoder="gated"))
