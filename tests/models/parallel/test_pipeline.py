"""The GPipe pipeline on 8 host devices equals the unpipelined model: training loss and
gradients, prefill and decode; its schedule idles (S - 1) / (M + S - 1) of each stage."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from paperjax.models import sharding
from paperjax.models.parallel import pipeline
from paperjax.models.training import lm
from paperjax.models.training.train import TrainConfig
from paperjax.models.transformer import llama

CFG = llama.LlamaConfig(vocab_size=64, dim=32, n_layers=4, n_heads=4, n_kv_heads=2, ffn_dim=64, max_seq_len=64)
# No warm-up: the first step's learning rate is the peak, so the step moves every parameter.
# Adam's first update is g / (|g| + eps): at the default eps 1e-8 a gradient entry of ~1e-10
# (float noise between meshes) moves its parameter by a share of lr that noise decides; at
# 1e-5 the update is smooth in g and a mesh must match one device to 1e-5.
TCFG = TrainConfig(batch_size=8, seq_len=8, warmup_steps=0, total_steps=10, eps=1e-5)


@pytest.fixture(scope="module")
def params():
  return llama.init(jax.random.key(0), CFG)


@pytest.fixture(scope="module")
def batch():
  ids_N = np.random.default_rng(0).integers(0, CFG.vocab_size, 2000)
  return lm.batch_at(ids_N, np.arange(ids_N.size) // 30, 0, TCFG)  # packed documents: positions restart


def test_pipelined_loss_and_grads_equal_the_model(params, batch):
  ref_loss, ref_grads = jax.jit(jax.value_and_grad(lm.loss_fn), static_argnums=2)(params, batch, CFG)
  mesh = sharding.make_mesh(pipe=4, data=2)
  param_sh = pipeline.param_shardings(CFG, mesh)
  fn = jax.jit(jax.value_and_grad(lambda p, b: pipeline.loss(p, b, CFG, mesh, 4)), out_shardings=(None, param_sh))
  with jax.set_mesh(mesh):
    loss, grads = fn(jax.device_put(params, param_sh), batch)
  chex.assert_trees_all_close(loss, ref_loss, atol=1e-5, rtol=1e-5)
  chex.assert_trees_all_close(grads, ref_grads, atol=1e-5, rtol=1e-5)
  assert grads["layers"]["w1"].sharding.spec[0] == "pipe"  # each stage holds its own layers


def test_pipelined_training_step_equals_the_model(batch, assert_step_equals):
  """Two stages x four data shards, two micro-batches: one AdamW step, the same state."""
  key = jax.random.key(0)
  start = lm.init_state(key, CFG, TCFG)
  ref_state, ref_metrics = lm.make_train_step(CFG, TCFG)(start, batch)
  run = pipeline.training(key, CFG, TCFG, sharding.make_mesh(pipe=2, data=4), 2)
  state, metrics = run.step(run.state, batch)
  assert_step_equals(state, ref_state, start)
  chex.assert_trees_all_close(metrics["grad_norm"], ref_metrics["grad_norm"], atol=1e-5, rtol=1e-5)
  assert state.opt_state[1][0].nu["layers"]["wq"].sharding.spec[0] == "pipe"


def test_pipelined_prefill_and_decode_equal_the_model(params):
  rng = np.random.default_rng(1)
  tokens_BT = jnp.asarray(rng.integers(0, CFG.vocab_size, (8, 6)), jnp.int32)
  lengths_B = jnp.asarray([6, 3, 5, 1, 6, 2, 4, 6], jnp.int32)  # right-padded prompts
  ref_logits, ref_cache = llama.prefill(params, tokens_BT, CFG, lengths_B=lengths_B, capacity=8)
  mesh = sharding.make_mesh(pipe=4, data=2)
  staged = jax.device_put(params, pipeline.param_shardings(CFG, mesh))
  logits, cache = pipeline.prefill(staged, tokens_BT, CFG, mesh, 2, lengths_B=lengths_B, capacity=8)
  chex.assert_trees_all_close(logits, ref_logits, atol=1e-5)
  chex.assert_trees_all_close(cache, ref_cache, atol=1e-5)
  assert cache.k_LBSGK.sharding.spec == jax.sharding.PartitionSpec("pipe", "data")  # stage-local caches
  for _ in range(2):
    token_B = jnp.argmax(ref_logits, -1).astype(jnp.int32)
    ref_logits, ref_cache = llama.decode(params, token_B, ref_cache, CFG)
    logits, cache = pipeline.decode(staged, token_B, cache, CFG, mesh, 2)
    chex.assert_trees_all_close(logits, ref_logits, atol=1e-5)
    chex.assert_trees_all_close(cache, ref_cache, atol=1e-5)


@pytest.mark.parametrize("n_micro", [1, 3, 8])
def test_schedule_busy_ticks_and_order(n_micro):
  """Stage s adds s + 1 to its input: the outputs say every micro-batch went through every
  stage in order, and each stage ran exactly M of its M + S - 1 ticks."""
  mesh = sharding.make_mesh(pipe=4, data=2)
  layers = jnp.arange(4.0)[:, None]  # one "layer" per stage holding its own index

  def stage(layers, x_BTD, extras, state):
    return x_BTD * 10 + layers[0, 0] + 1 + 0 * extras, state

  x_NBTD = jnp.broadcast_to(jnp.arange(n_micro, dtype=jnp.float32)[:, None, None, None], (n_micro, 2, 1, 1))
  with jax.set_mesh(mesh):
    y, _, busy = jax.jit(lambda l, x: pipeline.gpipe(stage, l, x, mesh, extras=jnp.zeros_like(x)))(layers, x_NBTD)
  expected = ((x_NBTD * 10 + 1) * 10 + 2) * 10 + 3  # stage 0, 1, 2, 3 in order
  chex.assert_trees_all_close(y, expected * 10 + 4)
  np.testing.assert_array_equal(busy, [n_micro] * 4)
  S = 4
  bubble = 1 - busy.sum() / (S * (n_micro + S - 1))
  np.testing.assert_allclose(bubble, (S - 1) / (n_micro + S - 1))


def test_bad_pipeline_meshes_name_the_axis(params):
  mesh = sharding.make_mesh(pipe=8)
  with pytest.raises(ValueError, match=r"layers.*size 4.*\('pipe',\)"):
    pipeline.param_shardings(CFG, mesh)
  with pytest.raises(ValueError, match="n_micro: expected a divisor of the batch 8, got 3"):
    pipeline.training(jax.random.key(0), CFG, TCFG, sharding.make_mesh(pipe=4, data=2), 3)
  with pytest.raises(ValueError, match="axis 'data' of size 2 does not divide the 1 rows"):
    pipeline.training(jax.random.key(0), CFG, TCFG, sharding.make_mesh(pipe=4, data=2), 8)
