"""Data, FSDP and tensor parallelism on 8 host devices equal one device; bad meshes raise."""

import dataclasses

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from paperjax.models import sharding
from paperjax.models.recurrent import based
from paperjax.models.training import checkpoints, lm
from paperjax.models.training.train import TrainConfig, optimizer
from paperjax.models.transformer import llama

CFG = llama.LlamaConfig(vocab_size=64, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=64, max_seq_len=64)
# No warm-up: the first step's learning rate is the peak, so the step moves every parameter.
# Adam's first update is g / (|g| + eps): at the default eps 1e-8 a gradient entry of ~1e-10
# (float noise between meshes) moves its parameter by a share of lr that noise decides; at
# 1e-5 the update is smooth in g and a mesh must match one device to 1e-5.
TCFG = TrainConfig(batch_size=8, seq_len=8, warmup_steps=0, total_steps=10, eps=1e-5)
STRATEGIES = [
  ("dp", {"data": 8}),
  ("fsdp", {"fsdp": 8}),
  ("tp", {"data": 4, "tensor": 2}),
  ("fsdp_tp", {"fsdp": 4, "tensor": 2}),  # data x fsdp x tensor: the train-step test below
]


@pytest.fixture(scope="module")
def setup():
  rng = np.random.default_rng(0)
  ids_N = rng.integers(0, CFG.vocab_size, 2000)
  batch = lm.batch_at(ids_N, np.arange(ids_N.size) // 30, 0, TCFG)  # packed: documents of 30 tokens
  params = llama.init(jax.random.key(0), CFG)
  loss, grads = jax.jit(jax.value_and_grad(lm.loss_fn), static_argnums=2)(params, batch, CFG)
  return batch, params, loss, grads


@pytest.mark.parametrize(("strategy", "sizes"), STRATEGIES, ids=lambda x: str(x))
def test_loss_and_grads_equal_one_device(setup, strategy, sizes):
  batch, params, ref_loss, ref_grads = setup
  mesh, rules = sharding.make_mesh(**sizes), sharding.RULES[strategy]
  cfg = dataclasses.replace(CFG, axis_rules=rules)
  param_sh = sharding.param_shardings(params, llama.param_axes(cfg), mesh, rules)
  fn = jax.jit(
    jax.value_and_grad(lambda p, b: lm.loss_fn(p, b, cfg)),
    in_shardings=(param_sh, sharding.batch_sharding(mesh, rules)),
    out_shardings=(None, param_sh),
  )
  with jax.set_mesh(mesh):
    loss, grads = fn(params, batch)
  chex.assert_trees_all_close(loss, ref_loss, atol=1e-5, rtol=1e-5)
  chex.assert_trees_all_close(grads, ref_grads, atol=1e-5, rtol=1e-5)
  # Megatron's split: column-parallel wq/w1 on their output axis, row-parallel wo/w2 on their input axis.
  layers = grads["layers"]
  tensor = "tensor" if sizes.get("tensor", 1) > 1 else None
  fsdp = "fsdp" if sizes.get("fsdp", 1) > 1 else None
  assert layers["wq"].sharding.spec == jax.sharding.PartitionSpec(None, fsdp, tensor, None)
  assert layers["w1"].sharding.spec == jax.sharding.PartitionSpec(None, fsdp, tensor)
  assert layers["wo"].sharding.spec == jax.sharding.PartitionSpec(None, tensor, None, fsdp)
  assert layers["w2"].sharding.spec == jax.sharding.PartitionSpec(None, tensor, fsdp)


def test_train_step_and_restore_onto_a_smaller_mesh(setup, tmp_path, assert_step_equals):
  batch, _, _, _ = setup
  key = jax.random.key(0)
  start = lm.init_state(key, CFG, TCFG)
  ref_state, ref_metrics = lm.make_train_step(CFG, TCFG)(start, batch)
  run = lm.sharded_training(key, CFG, TCFG, sharding.make_mesh(data=2, fsdp=2, tensor=2), "fsdp_tp")
  state, metrics = run.step(run.state, batch)
  assert_step_equals(state, ref_state, start)
  chex.assert_trees_all_close(metrics["loss"], ref_metrics["loss"], atol=1e-5)
  mu = state.opt_state[1][0].mu  # Adam's first moment is sharded like its parameter
  assert mu["layers"]["w1"].sharding == state.params["layers"]["w1"].sharding
  assert len(state.params["layers"]["w1"].addressable_shards) == 8

  manager = checkpoints.checkpoint_manager(tmp_path)
  checkpoints.save(manager, state)
  small = sharding.make_mesh(fsdp=2, tensor=2, devices=jax.devices()[:4])
  rules = sharding.RULES["fsdp_tp"]
  target = sharding.state_shardings(state, llama.param_axes(CFG), small, rules, optimizer(TCFG))
  like = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, target)
  restored = checkpoints.restore(manager, like)
  chex.assert_trees_all_close(restored, state)
  w1 = restored.params["layers"]["w1"]
  assert w1.sharding.mesh.devices.size == 4 and w1.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor")


def test_based_params_shard_through_param_axes():
  cfg = based.BasedConfig(vocab_size=64, dim=32, n_blocks=3, n_heads=2, feature_dim=4, ffn_dim=64, window=8)
  params = jax.eval_shape(lambda k: based.init(k, cfg), jax.random.key(0))
  mesh, rules = sharding.make_mesh(fsdp=4, tensor=2), sharding.RULES["fsdp_tp"]
  shardings = sharding.param_shardings(params, based.param_axes(cfg), mesh, rules)
  P = jax.sharding.PartitionSpec
  assert shardings["linear"]["wq"].spec == P(None, "fsdp", "tensor", None)
  assert shardings["conv"]["kernel"].spec == P(None, None, "fsdp")
  assert shardings["unembed"].spec == P("fsdp", "tensor")
  for leaf, s in zip(jax.tree.leaves(params), jax.tree.leaves(shardings)):
    assert len(s.spec) == len(leaf.shape)
    s.shard_shape(leaf.shape)  # raises unless the mesh divides every dimension it splits


def test_bad_meshes_and_rules_name_the_axis():
  rules = sharding.RULES["tp"]
  params = jax.eval_shape(lambda k: llama.init(k, CFG), jax.random.key(0))
  with pytest.raises(ValueError, match=r"kv_heads.*size 2.*'tensor'"):  # 2 kv heads over tensor 4
    sharding.param_shardings(params, llama.param_axes(CFG), sharding.make_mesh(data=2, tensor=4), rules)
  with pytest.raises(ValueError, match="axis 'fsdp' has size 2 but no rule"):
    sharding.param_shardings(params, llama.param_axes(CFG), sharding.make_mesh(fsdp=2, tensor=4), rules)
  with pytest.raises(ValueError, match=r"batch.*size 6.*\('data',\) of total size 4"):
    lm.sharded_training(
      jax.random.key(0), CFG, dataclasses.replace(TCFG, batch_size=6), sharding.make_mesh(data=4, tensor=2), "tp"
    )
  with pytest.raises(ValueError, match="logical axis 'experts': no sharding rule"):
    sharding.spec(("layers", "experts"), rules)
  with pytest.raises(ValueError, match="multiply to 6, but there are 8 devices"):
    sharding.make_mesh(data=2, tensor=3)
  with pytest.raises(ValueError, match="strategy: expected one of"):
    lm.sharded_training(jax.random.key(0), CFG, TCFG, sharding.make_mesh(data=8), "zero")


def test_shard_is_a_no_op_without_a_mesh():
  x = jnp.ones((2, 4, 8))
  assert sharding.shard(x, ("act_batch", "act_length", "act_embed"), sharding.RULES["dp"]) is x
  with jax.set_mesh(sharding.make_mesh(data=8)):
    assert sharding.shard(x, ("act_batch", "act_length", "act_embed"), ()) is x  # no rules: no constraint
    y = jax.jit(lambda x: sharding.shard(x, ("act_batch", None), sharding.RULES["dp"]))(jnp.ones((8, 2)))
  assert y.sharding.spec == jax.sharding.PartitionSpec("data")
