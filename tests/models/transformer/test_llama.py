"""Llama model: cache == no cache, document packing, parameter accounting, errors."""

import dataclasses

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from paperjax.models.transformer import llama

CFG = llama.PRESETS["tiny"]


@pytest.fixture(scope="module")
def params():
  return llama.init(jax.random.key(0), CFG)


@pytest.fixture(scope="module")
def forward():
  return jax.jit(llama.forward, static_argnums=2)


def test_prefill_then_decode_equals_full_forward(params, forward, key):
  tokens = jax.random.randint(key, (3, 12), 0, CFG.vocab_size)
  full, _ = forward(params, tokens, CFG)
  lengths = np.array([7, 3, 5])
  cache = llama.init_state(CFG, 3, 16)
  padded = jnp.where(jnp.arange(7) < lengths[:, None], tokens[:, :7], 0)
  pre, cache = forward(params, padded, CFG, state=cache, num_new_B=jnp.asarray(lengths))
  for b, n in enumerate(lengths):
    np.testing.assert_allclose(pre[b, :n], full[b, :n], rtol=1e-4, atol=1e-4)
  for step in range(5):  # each row decodes its own next token at its own position
    next_tokens = tokens[jnp.arange(3), lengths + step][:, None]
    out, cache = forward(params, next_tokens, CFG, state=cache)
    np.testing.assert_allclose(out[:, 0], full[jnp.arange(3), lengths + step], rtol=1e-4, atol=1e-4)
  np.testing.assert_array_equal(cache.lengths_B, lengths + 5)


def test_multi_token_chunks_with_cache(params, forward, key):
  tokens = jax.random.randint(key, (2, 9), 0, CFG.vocab_size)
  full, _ = forward(params, tokens, CFG)
  cache = llama.init_state(CFG, 2, 9)
  outs = []
  for chunk in (tokens[:, :4], tokens[:, 4:6], tokens[:, 6:]):
    out, cache = forward(params, chunk, CFG, state=cache)
    outs.append(out)
  np.testing.assert_allclose(jnp.concatenate(outs, axis=1), full, rtol=1e-4, atol=1e-4)


def test_packed_documents_equal_separate_forwards(params, forward, key):
  a = jax.random.randint(key, (1, 5), 0, CFG.vocab_size)
  b = jax.random.randint(jax.random.fold_in(key, 1), (1, 4), 0, CFG.vocab_size)
  packed = jnp.concatenate([a, b], axis=1)
  segments = jnp.array([[0] * 5 + [1] * 4])
  positions = jnp.array([list(range(5)) + list(range(4))])
  out, _ = forward(params, packed, CFG, positions_BT=positions, segment_ids_BT=segments)
  np.testing.assert_allclose(out[:, :5], forward(params, a, CFG)[0], rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(out[:, 5:], forward(params, b, CFG)[0], rtol=1e-4, atol=1e-4)


def test_xla_attention_and_remat_give_the_same_model(params, key):
  tokens = jax.random.randint(key, (2, 8), 0, CFG.vocab_size)

  def loss(p, cfg):
    return jnp.mean(llama.forward(p, tokens, cfg)[0] ** 2)

  grad = jax.jit(jax.grad(loss), static_argnums=1)
  g_ref = grad(params, CFG)
  for variant in (
    dataclasses.replace(CFG, attention_impl="xla", remat="full"),
    dataclasses.replace(CFG, remat="dots_saveable"),
    dataclasses.replace(CFG, unroll=True),
  ):
    chex.assert_trees_all_close(g_ref, grad(params, variant), rtol=1e-4, atol=1e-6)
  with pytest.raises(ValueError, match="remat: expected one of"):
    dataclasses.replace(CFG, remat="everything")
  with pytest.raises(ValueError, match="unroll, remat: a remat policy needs the scan"):
    dataclasses.replace(CFG, unroll=True, remat="full")
  with pytest.raises(TypeError, match="unroll: expected bool, got int 2"):
    dataclasses.replace(CFG, unroll=2)


def test_unrolled_layers_leave_no_loop_and_give_the_scans_numbers(params, key, jitted):
  tokens = jax.random.randint(key, (2, 8), 0, CFG.vocab_size)
  unrolled = dataclasses.replace(CFG, unroll=True)
  program = lambda cfg: jax.jit(lambda p: llama.forward(p, tokens, cfg)[0]).lower(params).as_text()
  assert "stablehlo.while" in program(CFG) and "stablehlo.while" not in program(unrolled)
  np.testing.assert_allclose(
    jitted(llama.forward, unrolled)(params, tokens)[0], jitted(llama.forward, CFG)(params, tokens)[0], atol=1e-5
  )


def test_remat_policy_changes_what_the_backward_pass_keeps(params, key):
  """Full remat recomputes the layer's matmuls in the backward pass; no remat does not."""
  tokens = jax.random.randint(key, (2, 8), 0, CFG.vocab_size)

  def jaxprs(remat):
    cfg = dataclasses.replace(CFG, remat=remat)
    loss = lambda p: jnp.mean(llama.forward(p, tokens, cfg)[0] ** 2)
    return str(jax.make_jaxpr(loss)(params)), str(jax.make_jaxpr(jax.grad(loss))(params))

  (none, none_grad), (dots, dots_grad), (full, full_grad) = map(jaxprs, ("none", "dots_saveable", "full"))
  assert "remat" not in none and "policy=DotsSaveable" in dots and "remat" in full  # each layer's policy
  assert full_grad.count("dot_general") > dots_grad.count("dot_general") == none_grad.count("dot_general")


def test_f32_params_with_bf16_compute(params, key, jitted):
  """param_dtype stays float32 (what the optimizer updates); activations, the KV cache and
  the gradient's path run in bfloat16; logits stay float32 and close to the f32 model."""
  mixed = dataclasses.replace(CFG, dtype="bfloat16")
  tokens = jax.random.randint(key, (2, 8), 0, CFG.vocab_size)
  chex.assert_type(jax.tree.leaves(llama.init(key, mixed)), jnp.float32)
  logits, _ = jitted(llama.forward, mixed)(params, tokens)
  ref, _ = jitted(llama.forward, CFG)(params, tokens)
  assert logits.dtype == jnp.float32
  np.testing.assert_allclose(logits, ref, rtol=0.05, atol=0.05)
  assert not np.allclose(logits, ref, rtol=1e-6, atol=1e-6)  # it did compute in bf16
  hidden, _ = llama.forward_hidden(params, tokens, mixed)
  assert hidden.dtype == jnp.bfloat16
  assert llama.init_state(mixed, 1, 4).k_LBSGK.dtype == jnp.bfloat16
  grads = jax.jit(jax.grad(lambda p: jnp.mean(llama.forward(p, tokens, mixed)[0])))(params)  # one compile
  chex.assert_type(jax.tree.leaves(grads), jnp.float32)
  with pytest.raises(TypeError, match="param_dtype: expected a float dtype or its name"):
    dataclasses.replace(CFG, param_dtype="float33")


def test_llama3_8b_accounting():
  cfg = llama.PRESETS["llama3_8b"]
  L, D, H, G, K, F, V = 32, 4096, 32, 8, 128, 14336, 128256
  per_layer = D * H * K + 2 * D * G * K + H * K * D + 3 * D * F + 2 * D
  assert cfg.num_params() == 2 * V * D + L * per_layer + D
  assert cfg.num_params() / 1e9 == pytest.approx(8.03, abs=0.01)  # the published 8B
  mha = dataclasses.replace(cfg, n_kv_heads=cfg.n_heads)
  assert cfg.kv_cache_bytes_per_token() == 2 * L * G * K * 2 == 128 * 1024
  assert mha.kv_cache_bytes_per_token() / cfg.kv_cache_bytes_per_token() == 4  # H / G
  assert llama.PRESETS["llama3_405b"].num_params() / 1e9 == pytest.approx(405.9, abs=0.5)
  assert llama.PRESETS["llama3_70b"].num_params() / 1e9 == pytest.approx(70.6, abs=0.2)


def test_errors(params):
  with pytest.raises(ValueError, match="n_heads, n_kv_heads"):
    dataclasses.replace(CFG, n_kv_heads=3)
  with pytest.raises(ValueError, match="even head dim"):
    dataclasses.replace(CFG, head_dim=7)
  with pytest.raises(TypeError, match="tokens_BT: expected integer"):
    llama.forward(params, jnp.zeros((1, 4)), CFG)
  with pytest.raises(ValueError, match=r"tokens_BT: expected ids in \[0, 256\)"):
    llama.forward(params, jnp.full((1, 4), 256), CFG)
  with pytest.raises(ValueError, match=r"positions_BT: expected positions \(max_seq_len=256\) in \[0, 255\]"):
    llama.forward(params, jnp.zeros((1, 2), jnp.int32), CFG, positions_BT=jnp.array([[0, 256]]))
  with pytest.raises(TypeError, match="positions_BT: expected integer"):
    llama.forward(params, jnp.zeros((1, 2), jnp.int32), CFG, positions_BT=jnp.zeros((1, 2)))
  cache = llama.init_state(CFG, 1, 4)
  with pytest.raises(ValueError, match="capacity 4"):
    llama.forward(params, jnp.zeros((1, 5), jnp.int32), CFG, state=cache)
  with pytest.raises(ValueError, match="segment_ids_BT"):
    llama.forward(params, jnp.zeros((1, 2), jnp.int32), CFG, state=cache, segment_ids_BT=jnp.zeros((1, 2), jnp.int32))
  with pytest.raises(ValueError, match="state: cache built for batch 1"):
    llama.forward(params, jnp.zeros((2, 2), jnp.int32), CFG, state=cache)
  with pytest.raises(ValueError, match="capacity"):
    llama.init_state(CFG, 1, 257)


def test_edits_replace_the_activation_for_the_rest_of_the_pass(params, key):
  tokens = jax.random.randint(key, (2, 10), 0, CFG.vocab_size)
  v_D = jax.random.normal(jax.random.key(1), (CFG.dim,))
  clean, _ = llama.forward(params, tokens, CFG)
  # Reference: adding v at layer 0's input is adding v to every embedding row.
  shifted, _ = llama.forward(dict(params, embed=params["embed"] + v_D), tokens, CFG)
  edited, _ = llama.forward(params, tokens, CFG, edits={"blocks.0.hook_resid_pre": lambda x: x + v_D})
  np.testing.assert_allclose(edited, shifted, rtol=1e-5, atol=1e-5)
  assert np.abs(edited - clean).max() > 1e-2
  # The residual stream after layer 0 is layer 1's input: the same edit at either name agrees,
  # and the sites record what their edit receives (layer 1's input then holds the edited value).
  sites = ("blocks.0.hook_resid_post", "blocks.1.hook_resid_pre")
  scale = lambda x: 2.0 * x
  post, _, acts = llama.forward_with_sites(params, tokens, CFG, sites, edits={sites[0]: scale})
  pre, _, _ = llama.forward_with_sites(params, tokens, CFG, (), edits={sites[1]: scale})
  np.testing.assert_allclose(post, pre, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(acts[sites[1]], 2.0 * acts[sites[0]], rtol=1e-6)
  # An identity edit at every site leaves the model unchanged.
  every = {name: (lambda x: x) for name in llama.site_names(CFG)}
  same, _ = llama.forward(params, tokens, CFG, edits=every)
  np.testing.assert_allclose(same, clean, rtol=1e-6, atol=1e-6)
  # Zeroing layer 1's MLP output equals a model whose w2 (MLP output weights) are 0 in layer 1.
  no_mlp = dict(params, layers=dict(params["layers"], w2=params["layers"]["w2"].at[1].set(0.0)))
  ablated, _ = llama.forward(params, tokens, CFG, edits={"blocks.1.hook_mlp_out": jnp.zeros_like})
  np.testing.assert_allclose(ablated, llama.forward(no_mlp, tokens, CFG)[0], rtol=1e-5, atol=1e-5)


def test_edits_reach_the_right_layer_of_a_segmented_stack(params, key):
  tokens = jax.random.randint(key, (2, 6), 0, CFG.vocab_size)
  halves = tuple(jax.tree.map(lambda w, s=s: w[s], params["layers"]) for s in (slice(0, 1), slice(1, 2)))
  segmented = dict(params, layers=halves)  # two scans, as llama_quant builds around quantized layers
  edits = {"blocks.1.hook_attn_out": lambda x: 3.0 * x}
  np.testing.assert_allclose(
    llama.forward(segmented, tokens, CFG, edits=edits)[0], llama.forward(params, tokens, CFG, edits=edits)[0], rtol=1e-5
  )


def test_edit_errors(params):
  tokens = jnp.zeros((1, 4), jnp.int32)
  with pytest.raises(ValueError, match="'blocks.2.hook_resid_pre' is not a site"):
    llama.forward(params, tokens, CFG, edits={"blocks.2.hook_resid_pre": lambda x: x})
  with pytest.raises(TypeError, match=r"edits\['blocks.0.hook_mlp_out'\]: expected a function"):
    llama.forward(params, tokens, CFG, edits={"blocks.0.hook_mlp_out": 1.0})
  with pytest.raises(ValueError, match="returned shape"):
    llama.forward(params, tokens, CFG, edits={"blocks.0.hook_mlp_out": lambda x: x[:, :1]})


def test_packed_paged_call_equals_the_model_row_by_row(params, forward, key):
  # Rows of different widths in one call (llama.PackedPagedKVCache): A decodes its 10th token
  # beside a padded decode row whose table names A's pages, while B prefills 5 of its prompt
  # tokens in a chunk of width 8; then B's next 2. Pages start as NaN: a read of an unwritten
  # slot, or a padded row's write, would show.
  a = jax.random.randint(key, (1, 10), 0, CFG.vocab_size)
  b = jax.random.randint(jax.random.fold_in(key, 1), (1, 7), 0, CFG.vocab_size)
  k, v = (jnp.full_like(x, jnp.nan) for x in llama.init_pages(CFG, 8, 4))
  table_a, table_b = jnp.array([[0, 1, 2, 0]], jnp.int32), jnp.array([[5, 6, 0, 0]], jnp.int32)
  _, cache = forward(params, a[:, :9], CFG, state=llama.PagedKVCache(k, v, table_a, jnp.zeros(1, jnp.int32)))
  decode = llama.PagedRows(
    jnp.concatenate([table_a, table_a]), jnp.array([9, 0], jnp.int32), jnp.array([1, 0], jnp.int32), 1
  )
  chunk = llama.PagedRows(table_b, jnp.array([0], jnp.int32), jnp.array([5], jnp.int32), 8)
  tokens = jnp.concatenate([a[0, 9:], jnp.zeros(1, jnp.int32), b[0, :5], jnp.zeros(3, jnp.int32)])[None]
  state = llama.PackedPagedKVCache(cache.k_pages_GPSK, cache.v_pages_GPSK, (decode, chunk))
  out, after = forward(params, tokens, CFG, state=state)
  full_a, full_b = forward(params, a, CFG)[0], forward(params, b, CFG)[0]
  np.testing.assert_allclose(out[0, 0], full_a[0, 9], rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(out[0, 2:7], full_b[0, :5], rtol=1e-4, atol=1e-4)
  assert [g.lengths_B.tolist() for g in after.groups] == [[10, 0], [5]]
  # The chunk's padding (B's positions 5-7: page 6, slots 1-3) was not written in any layer.
  assert jnp.isnan(after.k_pages_GPSK[:, jnp.array([6, 14]), 1:]).all()
  rest = llama.PackedPagedKVCache(
    after.k_pages_GPSK, after.v_pages_GPSK, (dataclasses.replace(after.groups[1], num_new_B=jnp.array([2], jnp.int32)),)
  )
  again, _ = forward(params, jnp.concatenate([b[0, 5:], jnp.zeros(6, jnp.int32)])[None], CFG, state=rest)
  np.testing.assert_allclose(again[0, :2], full_b[0, 5:], rtol=1e-4, atol=1e-4)
  with pytest.raises(ValueError, match=r"a packed call takes \[1, N\] tokens, N = 10"):
    llama.forward(params, tokens[:, :9], CFG, state=state)
  with pytest.raises(ValueError, match="num_new_B: a PackedPagedKVCache carries"):
    llama.forward(params, tokens, CFG, state=state, num_new_B=jnp.ones(1, jnp.int32))
  bad = dataclasses.replace(chunk, num_new_B=jnp.array([9], jnp.int32))
  with pytest.raises(ValueError, match=r"state.groups\[1\].num_new_B"):
    llama.forward(params, tokens, CFG, state=dataclasses.replace(state, groups=(decode, bad)))
