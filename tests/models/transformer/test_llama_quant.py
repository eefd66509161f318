"""Quantization policies on Llama params: what they touch, the forward they feed (prefill,
decode and generate included), and their errors."""

import dataclasses

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from paperjax.models.serving import generate
from paperjax.models.transformer import llama, llama_quant
from paperjax.ops import quant

CFG = dataclasses.replace(llama.PRESETS["tiny"], n_layers=4)


@pytest.fixture(scope="module")
def params():
  return llama.init(jax.random.key(0), CFG)


def _leaves_by_layer(qparams):
  """{(layer, name): leaf} over the segments, layers numbered across them."""
  return {
    (layer, name): leaf
    for start, stop, segment in llama.layer_segments(qparams, CFG)
    for name, leaf in segment.items()
    for layer in range(start, stop)
  }


def test_segmented_float_layers_equal_one_stack(params):
  """Cutting the stack into scanned segments changes nothing: logits, cache and every site."""
  cut = lambda a, b: jax.tree.map(lambda w: w[a:b], params["layers"])
  segmented = {**params, "layers": (cut(0, 1), cut(1, 3), cut(3, 4))}
  tokens = jax.random.randint(jax.random.key(2), (2, 7), 0, CFG.vocab_size)
  sites = llama.site_names(CFG)
  whole = llama.forward_with_sites(params, tokens, CFG, sites, state=llama.init_state(CFG, 2, 8))
  parts = llama.forward_with_sites(segmented, tokens, CFG, sites, state=llama.init_state(CFG, 2, 8))
  chex.assert_trees_all_close(parts, whole, rtol=1e-6, atol=1e-6)
  with pytest.raises(ValueError, match=r"expected 4 layers over its segments, got sizes \[1, 2, 2\]"):
    llama.forward({**params, "layers": (cut(0, 1), cut(1, 3), cut(2, 4))}, tokens, CFG)


@pytest.mark.parametrize("name", sorted(llama_quant.POLICIES))
def test_policy_touches_exactly_the_ffn_weights_of_the_middle_layers(params, name):
  qparams = llama_quant.quantize_params(params, CFG, llama_quant.POLICIES[name])
  touched = {key for key, leaf in _leaves_by_layer(qparams).items() if isinstance(leaf, quant.QuantizedTensor)}
  assert touched == {(layer, w) for layer in range(1, CFG.n_layers - 1) for w in ("w1", "w3", "w2")}
  assert qparams["embed"] is params["embed"] and qparams["unembed"] is params["unembed"]
  first = qparams["layers"][0]
  np.testing.assert_array_equal(first["w1"], params["layers"]["w1"][:1])  # exempt layers are untouched


def test_without_the_exemption_every_layer_is_one_quantized_stack(params):
  policy = dataclasses.replace(llama_quant.POLICIES["w8a8"], skip_first_last=False)
  qparams = llama_quant.quantize_params(params, CFG, policy)
  assert isinstance(qparams["layers"], dict)
  # One scale per output channel per layer.
  chex.assert_shape([qparams["layers"]["w1"].q, qparams["layers"]["w1"].scale], [(4, 64, 128), (4, 1, 128)])


@pytest.mark.parametrize("name, tol", [("int8_weight_row", 0.02), ("w8a8", 0.05), ("llama3_fp8", 0.3)])
def test_quantized_forward_stays_near_float_and_decodes_like_it_prefills(params, name, tol, jitted):
  qparams = llama_quant.quantize_params(params, CFG, llama_quant.POLICIES[name])
  tokens = jax.random.randint(jax.random.key(1), (2, 9), 0, CFG.vocab_size)
  ref, _ = jitted(llama.forward, CFG)(params, tokens)
  got, _ = jitted(llama.forward, CFG)(qparams, tokens)
  assert 0 < float(jnp.max(jnp.abs(got - ref))) < tol * float(jnp.max(jnp.abs(ref)))
  logits, cache = jitted(llama.prefill, CFG, capacity=12)(qparams, tokens[:, :6])
  np.testing.assert_allclose(logits, got[:, 5], rtol=1e-4, atol=1e-4)
  for t in range(6, 9):  # the quantized cache path equals the quantized parallel forward
    logits, cache = jitted(llama.decode, CFG)(qparams, tokens[:, t], cache)
    np.testing.assert_allclose(logits, got[:, t], rtol=1e-4, atol=1e-4)
  _, _, acts = llama.forward_with_sites(qparams, tokens, CFG, ("blocks.3.hook_resid_post",))
  assert acts["blocks.3.hook_resid_post"].shape == (2, 9, CFG.dim)


def test_generate_takes_quantized_params(params):
  qparams = llama_quant.quantize_params(params, CFG, llama_quant.POLICIES["llama3_fp8"])
  prompts, lengths = jnp.array([[1, 2, 3], [4, 5, 0]]), jnp.array([3, 2])
  tokens, _ = generate.generate(jax.random.key(0), qparams, CFG, prompts, lengths, max_new_tokens=4, temperature=0.0)
  full, _ = llama.forward(qparams, jnp.concatenate([prompts[:1], tokens[:1, :3]], axis=1), CFG)
  np.testing.assert_array_equal(tokens[0, :4], jnp.argmax(full[0, 2:], axis=-1))  # greedy == argmax of the forward


def test_weight_memory(params):
  qparams = llama_quant.quantize_params(params, CFG, llama_quant.POLICIES["w8a8"])
  ffn = sum(params["layers"][w][1:3].size for w in ("w1", "w3", "w2"))
  scales = 2 * (128 + 128 + 64)  # two quantized layers, one float32 scale per output channel
  assert llama_quant.weight_bytes(params) - llama_quant.weight_bytes(qparams) == ffn * 3 - scales * 4


def test_errors(params):
  bad = jax.tree.map(lambda x: x, params)
  bad["layers"]["w2"] = bad["layers"]["w2"].at[2, 0, 0].set(jnp.nan)
  with pytest.raises(ValueError, match=r"params\['layers'\]\['w2'\]: NaN or inf in layers \[2\]"):
    llama_quant.quantize_params(bad, CFG, llama_quant.POLICIES["w8a8"])
  with pytest.raises(ValueError, match="leaves none to quantize"):
    two = dataclasses.replace(CFG, n_layers=2)
    llama_quant.quantize_params(llama.init(jax.random.key(0), two), two, llama_quant.POLICIES["w8a8"])
  with pytest.raises(ValueError, match="granularity: quantized activations"):
    llama_quant.QuantPolicy(weights="int8", granularity="row", activations="int8")
  with pytest.raises(ValueError, match=r"targets: expected a tuple of \(one of 'w1', 'w3', 'w2'\), got tuple"):
    llama_quant.QuantPolicy(weights="int8", targets=("wq",))
  with pytest.raises(ValueError, match="activations: expected None or the weights' format 'int8', got 'fp8'"):
    llama_quant.QuantPolicy(weights="int8", activations="fp8")
  with pytest.raises(ValueError, match="scale_ub"):
    llama_quant.QuantPolicy(weights="int8", activations="int8", scale_ub=10.0)
  qparams = llama_quant.quantize_params(params, CFG, llama_quant.POLICIES["w8a8"])
  with pytest.raises(TypeError, match="already-quantized"):
    llama_quant.quantize_params(qparams, CFG, llama_quant.POLICIES["w8a8"])
