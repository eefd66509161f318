"""Every decoding model through `models.protocol` alone: prefill + decode == forward, chunked
continuation, activation sites, greedy generation, named scopes."""

import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from paperjax.models import protocol
from paperjax.models.recurrent import based, jrt_rnn
from paperjax.models.serving import generate
from paperjax.models.transformer import llama
from paperjax.ops import norms

WIDTH = 6  # prompt width T
_BASED = based.BasedConfig(vocab_size=64, dim=32, n_blocks=2, n_heads=2, feature_dim=4, window=3, ffn_dim=64, chunk=4)
CONFIGS = {
  "llama": llama.PRESETS["tiny"],
  "based": _BASED,
  # M = 4 < T: a full row reads 4 prompt tokens as encoder and 2 as decoder, a 3-token row
  # is all encoder; each row's encoder is its own first M tokens, whatever the batch width.
  "jrt_rnn": jrt_rnn.JRTConfig(based=_BASED, prefix_len=4, mask_id=63),
}
MODULES = {"llama": llama, "based": based, "jrt_rnn": jrt_rnn}


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def model(request):
  cfg = CONFIGS[request.param]
  module = protocol.model_for(cfg)
  return request.param, module, cfg, module.init(jax.random.key(0), cfg)


def _reference_cfg(name, cfg, prompt_length):
  """The config whose plain forward over an unpadded row computes what the padded prefill
  does: a JRT-RNN prompt shorter than M is all encoder (the paper pads it to M)."""
  return dataclasses.replace(cfg, prefix_len=min(cfg.prefix_len, prompt_length)) if name == "jrt_rnn" else cfg


def test_every_model_satisfies_the_protocol():
  for name, cfg in CONFIGS.items():
    assert protocol.model_for(cfg) is MODULES[name]
    assert isinstance(MODULES[name], protocol.DecodingModel)
  with pytest.raises(TypeError, match="cfg: expected a config of"):
    protocol.model_for(object())


def test_param_axes_mirror_params(model):
  _, module, cfg, params = model
  axes = module.param_axes(cfg)
  is_axes = lambda x: isinstance(x, tuple)
  assert jax.tree.structure(params) == jax.tree.structure(axes, is_leaf=is_axes)
  for leaf, names in zip(jax.tree.leaves(params), jax.tree.leaves(axes, is_leaf=is_axes)):
    assert leaf.ndim == len(names)


def test_prefill_then_decode_equals_forward(model, key, jitted):
  """Right-padded prompts of lengths 6 and 3, then 4 decode steps each, against the
  parallel forward over each row's own unpadded sequence."""
  name, module, cfg, params = model
  new = 4
  lengths = np.array([WIDTH, 3])
  rows = np.asarray(jax.random.randint(key, (2, WIDTH + new), 1, 60))
  prompts = np.where(np.arange(WIDTH) < lengths[:, None], rows[:, :WIDTH], 0)  # right padding
  prefill, decode = jitted(module.prefill, cfg, capacity=WIDTH + new), jitted(module.decode, cfg)
  logits, state = prefill(params, jnp.asarray(prompts), lengths_B=jnp.asarray(lengths))
  steps = [logits]
  for i in range(new):  # teacher-forced: row b's next token is rows[b, lengths[b] + i]
    logits, state = decode(params, jnp.asarray(rows[np.arange(2), lengths + i]), state)
    steps.append(logits)
  for b, length in enumerate(lengths):
    seq = jnp.asarray(rows[b : b + 1, : length + new])
    ref_cfg = _reference_cfg(name, cfg, int(length))
    full, _ = jitted(protocol.model_for(ref_cfg).forward, ref_cfg)(params, seq)
    for i, got in enumerate(steps):
      np.testing.assert_allclose(got[b], full[0, length - 1 + i], rtol=2e-4, atol=2e-4)


def test_forward_continues_from_the_prefill_state(model, key, jitted):
  _, module, cfg, params = model
  tokens = jax.random.randint(key, (2, WIDTH + 5), 1, 60)
  forward = jitted(module.forward, cfg)
  full, none = forward(params, tokens)
  assert none is None  # no state in, none out
  last, state = jitted(module.prefill, cfg, capacity=WIDTH + 5)(params, tokens[:, :WIDTH])
  np.testing.assert_allclose(last, full[:, WIDTH - 1], rtol=2e-4, atol=2e-4)
  shapes = jax.tree.map(jnp.shape, state)
  chunk, state = forward(params, tokens[:, WIDTH:], state=state)
  np.testing.assert_allclose(chunk, full[:, WIDTH:], rtol=2e-4, atol=2e-4)
  assert jax.tree.map(jnp.shape, state) == shapes  # a cache or a recurrent state: fixed shapes


def test_sites_chain_into_the_logits(model, key, jitted):
  """resid_post of block l is resid_pre of block l + 1; the last one, normed and unembedded,
  is the logits."""
  _, module, cfg, params = model
  names = module.site_names(cfg)
  layers = len(names) // len(set(n.split(".", 2)[2] for n in names))
  wanted = tuple(f"blocks.{l}.{kind}" for l in range(layers) for kind in ("hook_resid_pre", "hook_resid_post"))
  assert set(wanted) <= set(names)
  tokens = jax.random.randint(key, (2, WIDTH), 1, 60)
  run = jax.jit(module.forward_with_sites, static_argnums=(2, 3))
  logits, _, acts = run(params, tokens, cfg, wanted)
  plain, _ = jitted(module.forward, cfg)(params, tokens)
  np.testing.assert_allclose(logits, plain, rtol=1e-5, atol=1e-5)
  assert sorted(acts) == sorted(wanted)
  for name in wanted:
    assert acts[name].shape == (2, WIDTH, _BASED.dim if module is not llama else cfg.dim)
  for l in range(layers - 1):
    np.testing.assert_array_equal(acts[f"blocks.{l}.hook_resid_post"], acts[f"blocks.{l + 1}.hook_resid_pre"])
  hidden = norms.rms_norm(acts[f"blocks.{layers - 1}.hook_resid_post"], params["final_norm"])
  unembed = params["embed"].T if getattr(cfg, "tie_embeddings", False) else params["unembed"]
  np.testing.assert_allclose(hidden @ unembed, logits, rtol=1e-4, atol=1e-4)
  with pytest.raises(ValueError, match="sites: 'blocks.9.hook_resid_pre' is not a site"):
    module.forward_with_sites(params, tokens, cfg, ("blocks.9.hook_resid_pre",))
  with pytest.raises(TypeError, match="sites: expected a sequence"):
    module.forward_with_sites(params, tokens, cfg, "blocks.0.hook_resid_pre")


def test_llama_mixer_sites_add_up(key):
  cfg = CONFIGS["llama"]
  params = llama.init(key, cfg)
  sites = tuple(f"blocks.1.{kind}" for kind in llama.SITE_KINDS)
  _, _, acts = llama.forward_with_sites(params, jnp.arange(8)[None], cfg, sites)
  a = {name.split(".")[-1]: x for name, x in acts.items()}
  np.testing.assert_allclose(a["hook_resid_pre"] + a["hook_attn_out"], a["hook_resid_mid"], rtol=1e-6)
  np.testing.assert_allclose(a["hook_resid_mid"] + a["hook_mlp_out"], a["hook_resid_post"], rtol=1e-6)


def test_greedy_generation_equals_argmax_of_forward(model, key, jitted):
  """`generate` through the protocol vs recomputing the whole sequence at every step."""
  _, _, cfg, params = model
  prompts = jax.random.randint(key, (2, WIDTH), 1, 60)
  tokens, lengths = generate.generate(key, params, cfg, prompts, jnp.array([WIDTH, WIDTH]), max_new_tokens=3)
  np.testing.assert_array_equal(lengths, [3, 3])
  seq = np.asarray(prompts)
  for i in range(3):
    logits, _ = jitted(protocol.model_for(cfg).forward, cfg)(params, jnp.asarray(seq))
    expected = np.asarray(jnp.argmax(logits[:, -1], axis=-1))
    np.testing.assert_array_equal(np.asarray(tokens[:, i]), expected)
    seq = np.concatenate([seq, expected[:, None]], axis=1)


def test_layers_run_under_named_scopes(model):
  _, module, cfg, params = model
  lowered = jax.jit(lambda p, t: module.forward(p, t, cfg)[0]).lower(params, jnp.zeros((1, WIDTH), jnp.int32))
  scopes = set(re.findall(r"(?:layer|block)/[a-z_]+", lowered.as_text(debug_info=True)))
  expected = {"layer/attention", "layer/mlp"} if module is llama else {"block/conv", "block/window_attention"}
  assert expected <= scopes, scopes


def test_configs_are_keyword_only():
  with pytest.raises(TypeError):
    llama.LlamaConfig(256, 64, 2, 4, 2, 128)  # type: ignore[misc]
  with pytest.raises(TypeError):
    based.BasedConfig(64, 32, 2)  # type: ignore[misc]
