"""Bad inputs to the models a user in a hurry would pass: Llama, Based, JRT-RNN, training,
the pipeline and quantization policies. Each raises naming the argument; nothing clamps,
wraps or runs on silently (issue 31's cases among them)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import checkify

from paperjax.models import protocol, sharding
from paperjax.models.parallel import pipeline
from paperjax.models.recurrent import based, jrt_rnn
from paperjax.models.training import lm
from paperjax.models.training.train import TrainConfig
from paperjax.models.transformer import llama, llama_quant
from paperjax.ops import checks

CFG = llama.LlamaConfig(vocab_size=64, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=64, max_seq_len=16)
PARAMS = llama.init(jax.random.key(0), CFG)
TOKENS = jnp.array([[1, 2, 3, 4]])
BASED = based.BasedConfig(vocab_size=32, dim=16, n_blocks=1, n_heads=2, feature_dim=4, window=4, ffn_dim=32)
BASED_PARAMS = based.init(jax.random.key(0), BASED)
JRT = jrt_rnn.JRTConfig(based=BASED, prefix_len=2, mask_id=31)
TCFG = TrainConfig(batch_size=2, seq_len=4, warmup_steps=0, total_steps=10)


def llama_cfg(**changes):
  return dataclasses.replace(CFG, **changes)


def with_leaf(path, value):
  """PARAMS with the leaf at path (a tuple of keys) replaced."""
  params = jax.tree.map(lambda x: x, PARAMS)
  node = params
  for key in path[:-1]:
    node = node[key]
  node[path[-1]] = value
  return params


def without(key):
  return {k: v for k, v in PARAMS.items() if k != key}


def batch(tokens=None, **changes):
  windows = np.arange(10).reshape(2, 5) if tokens is None else tokens
  b = lm.packed_batch(windows.astype(np.int32), np.zeros_like(windows, np.int32))
  return b._replace(**changes)


def train_step(b):
  return lm.make_train_step(CFG, TCFG)(lm.init_state(jax.random.key(0), CFG, TCFG), b)


def mesh():
  return sharding.make_mesh(pipe=2, devices=jax.devices()[:2])


def full_cache():
  cache = llama.init_state(CFG, 1, 4)
  return dataclasses.replace(cache, lengths_B=jnp.array([4], jnp.int32))


CASES = [
  # LlamaConfig: every field by its annotation, cross-field rules in __post_init__.
  pytest.param(
    lambda: llama_cfg(head_dim=0), ValueError, r"LlamaConfig.head_dim: expected int >= 1 or None, got int 0"
  ),
  pytest.param(lambda: llama_cfg(head_dim=-2), ValueError, r"head_dim: expected int >= 1", id="head_dim-negative"),
  pytest.param(lambda: llama_cfg(head_dim=7), ValueError, r"head_dim: RoPE needs an even head dim"),
  pytest.param(lambda: llama_cfg(norm_eps=-1.0), ValueError, r"norm_eps: expected float > 0, got float -1.0"),
  pytest.param(lambda: llama_cfg(norm_eps=float("nan")), ValueError, r"norm_eps: expected float > 0, got float nan"),
  pytest.param(lambda: llama_cfg(n_layers="2"), TypeError, r"n_layers: expected int >= 1, got str '2'"),
  pytest.param(lambda: llama_cfg(n_layers=2.0), TypeError, r"n_layers: expected int >= 1, got float 2.0"),
  pytest.param(lambda: llama_cfg(vocab_size=0), ValueError, r"vocab_size: expected int >= 1, got int 0"),
  pytest.param(lambda: llama_cfg(dim=True), TypeError, r"dim: expected int >= 1, got bool True"),
  pytest.param(lambda: llama_cfg(rope_theta=0.5), ValueError, r"rope_theta: expected float > 1"),
  pytest.param(
    lambda: llama_cfg(rope_scaling={"rope_type": "llama3", "factor": 8.0, "original_max_position_embeddings": 8192}),
    TypeError,
    r"rope_scaling: expected RopeScaling or None, got dict .* build a RopeScaling\(\.\.\.\) \(llama_import",
    id="rope_scaling-hf-dict",
  ),
  pytest.param(lambda: llama_cfg(remat="everything"), ValueError, r"remat: expected one of 'none', 'full'"),
  pytest.param(lambda: llama_cfg(unroll=1), TypeError, r"unroll: expected bool, got int 1"),
  pytest.param(lambda: llama_cfg(unroll=True, remat="full"), ValueError, r"unroll, remat: a remat policy needs"),
  pytest.param(lambda: llama_cfg(dtype="bf16"), TypeError, r"dtype: expected a float dtype or its name"),
  pytest.param(lambda: llama_cfg(n_kv_heads=3), ValueError, r"n_heads, n_kv_heads: query heads must be a multiple"),
  pytest.param(lambda: llama_cfg(max_seq_len=0), ValueError, r"max_seq_len: expected int >= 1"),
  pytest.param(lambda: llama_cfg(tie_embeddings="yes"), TypeError, r"tie_embeddings: expected bool, got str"),
  pytest.param(lambda: llama_cfg(attention_impl="flash"), ValueError, r"attention_impl: expected one of 'reference'"),
  pytest.param(lambda: llama_cfg(axis_rules={"batch": "data"}), TypeError, r"axis_rules: expected a tuple of"),
  # Params that do not fit the config: named leaf, both shapes.
  pytest.param(
    lambda: llama.forward(with_leaf(("embed",), jnp.zeros((128, 32))), TOKENS, CFG),
    ValueError,
    r"params\['embed'\]: expected shape \(64, 32\) for this config, got \(128, 32\)",
    id="embed-vocab",
  ),
  pytest.param(
    lambda: llama.forward(with_leaf(("unembed",), jnp.zeros((32, 128))), TOKENS, CFG),
    ValueError,
    r"params\['unembed'\]: expected shape \(32, 64\)",
    id="unembed-vocab",
  ),
  pytest.param(
    lambda: llama.forward(with_leaf(("layers", "wk"), jnp.zeros((2, 32, 4, 8))), TOKENS, CFG),
    ValueError,
    r"params\['layers'\]\['wk'\]: expected shape \(2, 32, 2, 8\) for this config, got \(2, 32, 4, 8\)",
    id="wk-kv-heads",
  ),
  pytest.param(
    lambda: llama.forward(with_leaf(("final_norm",), jnp.zeros((16,))), TOKENS, CFG),
    ValueError,
    r"params\['final_norm'\]: expected shape \(32,\)",
    id="norm-width",
  ),
  pytest.param(
    lambda: llama.forward(without("final_norm"), TOKENS, CFG),
    ValueError,
    r"missing: params\['final_norm'\]; unexpected: none",
  ),
  pytest.param(
    lambda: llama.forward({**PARAMS, "lm_head": PARAMS["unembed"]}, TOKENS, CFG),
    ValueError,
    r"missing: none; unexpected: params\['lm_head'\]",
    id="extra-leaf",
  ),
  pytest.param(
    lambda: llama.forward(PARAMS, TOKENS, llama_cfg(n_layers=3)),
    ValueError,
    r"params\['layers'\]: expected 3 layers over its segments, got sizes \[2\]",
    id="layer-count",
  ),
  pytest.param(lambda: llama.forward(list(PARAMS.values()), TOKENS, CFG), TypeError, r"params: expected the dict"),
  pytest.param(
    lambda: llama.forward(PARAMS, TOKENS, dataclasses.asdict(CFG)), TypeError, r"cfg: expected a LlamaConfig"
  ),
  pytest.param(lambda: protocol.model_for({"vocab_size": 64}), TypeError, r"cfg: expected a config of"),
  pytest.param(lambda: protocol.check_site(CFG, "blocks.9.hook_resid_pre"), ValueError, r"site: .* is not a site"),
  # Token ids and their companions.
  pytest.param(lambda: llama.forward(PARAMS, [[1, 2, 3]], CFG), TypeError, r"tokens_BT: expected an array \[B, T\]"),
  pytest.param(lambda: llama.forward(PARAMS, jnp.zeros((1, 4)), CFG), TypeError, r"tokens_BT: expected integer"),
  pytest.param(lambda: llama.forward(PARAMS, jnp.arange(4), CFG), ValueError, r"tokens_BT: expected \[B, T\], got"),
  pytest.param(
    lambda: llama.forward(PARAMS, jnp.array([[1, 2, 300]]), CFG),
    ValueError,
    r"tokens_BT: expected ids in \[0, 64\), got \[300\] at index \[\(0, 2\)\]",
    id="id-too-large",
  ),
  pytest.param(lambda: llama.forward(PARAMS, jnp.array([[-1, 2]]), CFG), ValueError, r"tokens_BT: .* got \[-1\]"),
  pytest.param(
    lambda: llama.forward(PARAMS, TOKENS, CFG, positions_BT=jnp.array([[0, 1, 2, 99]])),
    ValueError,
    r"positions_BT: expected positions \(max_seq_len=16\) in \[0, 15\], got \[99\]",
    id="position-too-large",
  ),
  pytest.param(
    lambda: llama.forward(PARAMS, TOKENS, CFG, segment_ids_BT=jnp.zeros((1, 3), jnp.int32)),
    ValueError,
    r"segment_ids_BT: expected integer shape \(1, 4\)",
    id="segments-shape",
  ),
  pytest.param(lambda: llama.forward(PARAMS, jnp.zeros((1, 17), jnp.int32), CFG), ValueError, r"exceed max_seq_len=16"),
  pytest.param(
    lambda: llama.prefill(PARAMS, TOKENS, CFG, lengths_B=jnp.array([0])), ValueError, r"lengths_B: expected lengths in"
  ),
  pytest.param(lambda: llama.prefill(PARAMS, TOKENS, CFG, lengths_B=jnp.array([9])), ValueError, r"got \[9\] at index"),
  pytest.param(
    lambda: llama.prefill(PARAMS, jnp.ones((2, 3), jnp.int32), CFG, lengths_B=[3.0, 2.7]),
    TypeError,
    r"lengths_B: expected integers \[2\], got float",
    id="lengths-float",
  ),
  pytest.param(lambda: llama.prefill(PARAMS, TOKENS, CFG, capacity=2), ValueError, r"capacity: expected >= T=4"),
  pytest.param(
    lambda: llama.decode(PARAMS, jnp.array([1]), full_cache(), CFG),
    ValueError,
    r"state: expected row lengths <= capacity 4, got \[5\]",
    id="decode-past-capacity",
  ),
  pytest.param(lambda: llama.decode(PARAMS, jnp.array([64]), llama.init_state(CFG, 1, 4), CFG), ValueError, r"ids in"),
  pytest.param(lambda: llama_cfg(dtype="int8"), ValueError, r"dtype: expected a float dtype, got int8"),
  pytest.param(lambda: llama.init(jax.random.key(0), None), TypeError, r"cfg: expected a LlamaConfig, got NoneType"),
  pytest.param(lambda: llama.init_state(CFG, 2.0, 4), TypeError, r"batch: expected an int, got float 2.0"),
  pytest.param(lambda: llama.prefill(PARAMS, TOKENS, CFG, capacity=16.0), TypeError, r"capacity: expected an int"),
  pytest.param(lambda: llama.forward_with_sites(PARAMS, TOKENS, CFG, [0]), TypeError, r"sites: expected site names"),
  pytest.param(
    lambda: llama.forward(PARAMS, TOKENS, CFG, positions_BT=[[0, 1, 2, 3]]),
    TypeError,
    r"positions_BT: expected an array",
  ),
  pytest.param(
    lambda: llama.decode(PARAMS, jnp.array([1]), (full_cache().k_LBSGK, full_cache().v_LBSGK), CFG),
    TypeError,
    r"state: expected a llama.KVCache, PagedKVCache or PackedPagedKVCache",
    id="decode-tuple-state",
  ),
  pytest.param(
    lambda: llama.forward(PARAMS, TOKENS, CFG, state=llama.init_state(CFG, 1, 8), num_new_B=jnp.array([-2])),
    ValueError,
    r"num_new_B: expected counts of new tokens in \[0, 4\], got \[-2\]",
    id="num-new-negative",
  ),
  pytest.param(
    lambda: llama.forward(PARAMS, TOKENS, CFG, state=llama.init_state(CFG, 1, 8), num_new_B=jnp.array([1.0])),
    TypeError,
    r"num_new_B: expected integers",
    id="num-new-float",
  ),
  pytest.param(
    lambda: llama.decode(PARAMS, jnp.array([1]), dataclasses.replace(full_cache(), lengths_B=jnp.array([-1])), CFG),
    ValueError,
    r"state.lengths_B: expected lengths in \[0, 4\], got \[-1\]",
    id="negative-cache-length",
  ),
  pytest.param(lambda: llama.init_state(CFG, 1, 17), ValueError, r"capacity: expected an int in \[1, 16\], got 17"),
  # Training: the host checks before the jitted step.
  pytest.param(lambda: train_step(batch(np.full((2, 5), 100_000))), ValueError, r"batch.tokens_BT: expected ids in"),
  pytest.param(
    lambda: train_step(batch(targets_BT=np.full((2, 4), 64, np.int32))),
    ValueError,
    r"batch.targets_BT: expected ids in \[0, 64\) where mask_BT, got \[64, 64",
    id="step-target-too-large",
  ),
  pytest.param(
    lambda: train_step(batch(mask_BT=np.ones((2, 3), bool))),
    ValueError,
    r"batch.mask_BT: expected shape \(2, 4\) \(tokens_BT's\), got \(2, 3\)",
    id="step-mask-shape",
  ),
  pytest.param(
    lambda: train_step(batch(positions_BT=np.full((2, 4), 16, np.int32))),
    ValueError,
    r"batch.positions_BT: expected positions in \[0, 15\]",
    id="step-positions",
  ),
  pytest.param(lambda: train_step(dict(batch()._asdict())), TypeError, r"batch: expected an lm.Batch"),
  pytest.param(lambda: TrainConfig(peak_lr=float("nan")), ValueError, r"peak_lr: expected float > 0, got float nan"),
  pytest.param(lambda: TrainConfig(peak_lr=0.0), ValueError, r"TrainConfig.peak_lr: expected float > 0"),
  pytest.param(lambda: TrainConfig(warmup_steps=10, total_steps=10), ValueError, r"warmup_steps: expected < total"),
  pytest.param(lambda: TrainConfig(b2=1.0), ValueError, r"b2: expected float in \[0, 1\)"),
  pytest.param(lambda: TrainConfig(batch_size=0), ValueError, r"batch_size: expected int >= 1"),
  pytest.param(lambda: TrainConfig(seed=-1), ValueError, r"seed: expected int >= 0"),
  pytest.param(lambda: TrainConfig(final_lr_ratio=2.0), ValueError, r"final_lr_ratio: expected float in \[0, 1\]"),
  pytest.param(
    lambda: TrainConfig(clip_norm=float("inf")), ValueError, r"clip_norm: expected float > 0, got float inf"
  ),
  pytest.param(lambda: lm.batch_at(np.arange(3), np.zeros(3, int), 0, TCFG), ValueError, r"ids_N: 3 tokens are fewer"),
  pytest.param(
    lambda: lm.sharded_training(jax.random.key(0), CFG, TCFG, mesh(), "zero3"), ValueError, r"strategy: expected one of"
  ),
  # The pipeline checks on the host before its jitted core (it had no length check).
  pytest.param(
    lambda: pipeline.prefill(PARAMS, jnp.array([[1, 1000]] * 2), CFG, mesh(), 1),
    ValueError,
    r"tokens_BT: expected ids in \[0, 64\), got \[1000, 1000\]",
    id="pipeline-id",
  ),
  pytest.param(
    lambda: pipeline.prefill(PARAMS, jnp.ones((2, 4), jnp.int32), CFG, mesh(), 1, lengths_B=jnp.array([0, 4])),
    ValueError,
    r"lengths_B: expected lengths in \[1, 4\], got \[0\]",
    id="pipeline-length-0",
  ),
  pytest.param(
    lambda: pipeline.prefill(PARAMS, jnp.ones((2, 4), jnp.int32), CFG, mesh(), 1, lengths_B=jnp.array([4, 99])),
    ValueError,
    r"lengths_B: expected lengths in \[1, 4\], got \[99\]",
    id="pipeline-length-99",
  ),
  pytest.param(
    lambda: pipeline.prefill(PARAMS, jnp.ones((2, 4), jnp.int32), CFG, mesh(), 3),
    ValueError,
    r"n_micro: expected a divisor of the batch 2, got 3",
    id="pipeline-micro",
  ),
  pytest.param(
    lambda: pipeline.prefill(PARAMS, jnp.ones((2, 4), jnp.int32), CFG, mesh(), 1, capacity=99),
    ValueError,
    r"capacity: expected T=4 \.\. max_seq_len=16, got 99",
    id="pipeline-capacity",
  ),
  pytest.param(
    lambda: pipeline.decode(PARAMS, jnp.array([70]), llama.init_state(CFG, 1, 4), CFG, mesh(), 1),
    ValueError,
    r"token_B: expected ids in \[0, 64\)",
    id="pipeline-decode-id",
  ),
  pytest.param(
    lambda: pipeline.decode(PARAMS, jnp.array([1]), full_cache(), CFG, mesh(), 1),
    ValueError,
    r"cache.lengths_B: expected lengths \(room for one token\) in \[0, 3\], got \[4\]",
    id="pipeline-decode-full",
  ),
  pytest.param(
    lambda: pipeline.decode(PARAMS, jnp.array([1]), llama.init_state(CFG, 2, 4), CFG, mesh(), 1),
    ValueError,
    r"cache: expected keys of shape \(2, 1, 4, 2, 8\)",
    id="pipeline-decode-cache-batch",
  ),
  # Based and JRT-RNN.
  pytest.param(lambda: dataclasses.replace(BASED, window=0), ValueError, r"BasedConfig.window: expected int >= 1"),
  pytest.param(lambda: dataclasses.replace(BASED, norm_eps=float("nan")), ValueError, r"norm_eps: expected float > 0"),
  pytest.param(lambda: dataclasses.replace(BASED, dim=30), ValueError, r"dim, n_heads: head dim"),
  pytest.param(lambda: dataclasses.replace(BASED, chunk="64"), TypeError, r"chunk: expected int >= 1, got str"),
  pytest.param(
    lambda: based.forward(BASED_PARAMS, jnp.array([[1, 32]]), BASED),
    ValueError,
    r"tokens_BT: expected ids in \[0, 32\)",
  ),
  pytest.param(
    lambda: based.forward({**BASED_PARAMS, "unembed": jnp.zeros((16, 64))}, jnp.array([[1]]), BASED),
    ValueError,
    r"params\['unembed'\]: expected shape \(16, 32\)",
    id="based-unembed",
  ),
  pytest.param(
    lambda: based.prefill(BASED_PARAMS, jnp.ones((1, 3), jnp.int32), BASED, lengths_B=jnp.array([0])),
    ValueError,
    r"lengths_B: expected lengths in \[1, 3\], got \[0\]",
    id="based-length-0",
  ),
  pytest.param(
    lambda: based.decode(
      BASED_PARAMS, jnp.array([1]), dataclasses.replace(based.init_state(BASED, 1), length_B=jnp.array([-5])), BASED
    ),
    ValueError,
    r"state.length_B: expected counts of tokens seen >= 0, got \[-5\]",
    id="based-negative-length",
  ),
  pytest.param(
    lambda: based.decode(BASED_PARAMS, jnp.array([1]), "cache", BASED), TypeError, r"state: expected a based.State"
  ),
  pytest.param(
    lambda: train_step(batch(mask_BT=np.ones((2, 4), np.float32))),
    TypeError,
    r"batch.mask_BT: expected bool",
    id="step-float-mask",
  ),
  pytest.param(
    lambda: lm.batch_at(np.arange(50) + 0.7, np.zeros(50, int), 0, TCFG), TypeError, r"ids_N: expected integers"
  ),
  pytest.param(
    lambda: lm.batch_at(np.arange(50) + 2**32, np.zeros(50, int), 0, TCFG), ValueError, r"ids_N: expected int32 ids in"
  ),
  pytest.param(
    lambda: lm.batch_at(np.arange(50), np.zeros(50, int), -1, TCFG), ValueError, r"step: expected an int in \[0"
  ),
  pytest.param(
    lambda: lm.eval_loss(PARAMS, batch(np.full((2, 5), 1000)), CFG), ValueError, r"batch.tokens_BT: expected ids in"
  ),
  pytest.param(
    lambda: llama_quant.quantize_params(PARAMS, llama_cfg(n_layers=4), llama_quant.POLICIES["int8_weight_row"]),
    ValueError,
    r"params\['layers'\]: expected 4 layers",
    id="quantize-other-config",
  ),
  pytest.param(
    lambda: llama_quant.quantize_params(PARAMS, CFG, "llama3_fp8"), TypeError, r"policy: expected a QuantPolicy"
  ),
  pytest.param(lambda: dataclasses.replace(JRT, mask_id=32), ValueError, r"mask_id: expected an id in \[0, 32\)"),
  pytest.param(lambda: dataclasses.replace(JRT, mask_id=-1), ValueError, r"mask_id: expected int >= 0"),
  pytest.param(lambda: dataclasses.replace(JRT, mlm_prob=1.0), ValueError, r"mlm_prob: expected float in \[0, 1\)"),
  pytest.param(lambda: dataclasses.replace(JRT, ntp_weight=0.0, mlm_weight=0.0), ValueError, r"ntp_weight, mlm_weight"),
  pytest.param(lambda: dataclasses.replace(JRT, encoder="eq4"), ValueError, r"encoder: expected one of 'eq3'"),
  pytest.param(lambda: dataclasses.replace(JRT, based={"vocab_size": 32}), TypeError, r"based: expected BasedConfig"),
  pytest.param(
    lambda: jrt_rnn.forward(BASED_PARAMS, jnp.ones((1, 3), jnp.int32), JRT),
    ValueError,
    r"params: encoder='eq3' expects linear encoder params \('wk_e', 'wv_e'\), got \(\)",
    id="jrt-without-encoder",
  ),
  pytest.param(
    lambda: jrt_rnn.forward(BASED_PARAMS, jnp.ones((1, 1), jnp.int32), JRT), ValueError, r"fewer than the enc"
  ),
  # Quantization policies.
  pytest.param(lambda: llama_quant.QuantPolicy(weights="int4"), ValueError, r"weights: expected one of 'int8', 'fp8'"),
  pytest.param(
    lambda: llama_quant.QuantPolicy(weights="int8", granularity="col"), ValueError, r"granularity: expected one of"
  ),
  pytest.param(
    lambda: llama_quant.QuantPolicy(weights="fp8", activations="fp8", scale_ub=-1.0),
    ValueError,
    r"scale_ub: expected float > 0 or None",
    id="quant-scale_ub",
  ),
  pytest.param(
    lambda: llama_quant.QuantPolicy(weights="int8", targets=()), ValueError, r"targets: expected a non-empty"
  ),
  pytest.param(
    lambda: llama_quant.QuantPolicy(weights="int8", targets="w1"), TypeError, r"targets: expected a tuple of"
  ),
  pytest.param(
    lambda: llama_quant.QuantPolicy(weights="int8", activations="fp8"), ValueError, r"activations: expected None or"
  ),
]


@pytest.mark.parametrize("call, error, match", CASES)
def test_bad_input(call, error, match):
  with pytest.raises(error, match=match):
    call()


def test_checked_keeps_the_value_checks_inside_jit():
  """Under a plain jax.jit the ids are tracers and an out-of-range id is clamped (the
  documented limit); `checks.checked` compiles the same check into the program."""
  plain = jax.jit(llama.forward, static_argnames="cfg")
  bad = jnp.array([[1, 2, 300]])
  clamped = plain(PARAMS, bad, cfg=CFG)[0]
  np.testing.assert_allclose(clamped, plain(PARAMS, jnp.array([[1, 2, 63]]), cfg=CFG)[0])  # 300 read as 63
  forward = checks.checked(llama.forward, static_argnames="cfg")
  with pytest.raises(checkify.JaxRuntimeError, match=r"tokens_BT: expected ids in \[0, 64\), got 300 at flat index 2"):
    forward(PARAMS, bad, cfg=CFG)
  np.testing.assert_array_equal(forward(PARAMS, TOKENS, cfg=CFG)[0], plain(PARAMS, TOKENS, cfg=CFG)[0])


def test_targets_the_mask_leaves_out_are_not_read():
  """HF's ignore index -100 where mask_BT is False passes the check and changes nothing."""
  good = batch()
  ignored = good._replace(targets_BT=np.where(good.mask_BT, good.targets_BT, -100), mask_BT=good.mask_BT)
  np.testing.assert_allclose(lm.eval_loss(PARAMS, ignored, CFG), lm.eval_loss(PARAMS, good, CFG))


def test_a_bad_batch_leaves_the_state_unchanged():
  """The step raises before its jitted core runs: the caller's state is what it was."""
  state = lm.init_state(jax.random.key(0), CFG, TCFG)
  step = lm.make_train_step(CFG, TCFG)
  before = jax.tree.map(np.asarray, state)
  with pytest.raises(ValueError, match="batch.tokens_BT"):
    step(state, batch(np.full((2, 5), 100_000)))
  moved, _ = step(state, batch())
  assert not np.array_equal(moved.params["embed"], before.params["embed"])  # a good batch does move them
  jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, state), before)
