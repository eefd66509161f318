"""Bad input never passes silently (issue 31): generation, the engine's requests and configs,
and the block manager raise an error naming the argument, the expectation and the value,
on the host, before any jitted work."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from paperjax.models.serving import blocks, engine, generate
from paperjax.models.transformer import llama

CFG = llama.PRESETS["tiny"]  # V = 256, max_seq_len = 256
KEY = jax.random.key(0)
PROMPTS = np.array([[1, 2, 3], [4, 5, 0]], np.int32)
LENGTHS = np.array([3, 2], np.int32)
NAN, INF = float("nan"), float("inf")


@functools.cache
def _params() -> dict:
  return llama.init(jax.random.key(0), CFG)


@functools.cache
def _engine() -> engine.Engine:
  return engine.Engine(_params(), CFG, engine.EngineConfig(num_blocks=8, block_size=4, max_batch=2, prefill_rows=1))


def _generate(prompts=PROMPTS, lengths=LENGTHS, **kwargs):
  return generate.generate(KEY, _params(), CFG, prompts, lengths, **{"max_new_tokens": 2, **kwargs})


def _request(**changes) -> engine.Request:
  return engine.Request(**{"id": "r", "prompt": (1, 2, 3), "max_new_tokens": 2, **changes})


def _add(**changes) -> None:
  _engine().add(_request(**changes))


GENERATE = [
  # The user's case: 2.7 was cast to 2 before the check. Float lengths are refused whatever their values.
  pytest.param(
    lambda: _generate(lengths=[3.0, 2.7]), TypeError, "prompt_lengths_B: expected integer", id="lengths-2.7"
  ),
  pytest.param(
    lambda: _generate(lengths=[3.0, 2.0]), TypeError, "prompt_lengths_B: expected integer", id="lengths-whole-float"
  ),
  pytest.param(
    lambda: _generate(lengths=[0, 2]),
    ValueError,
    r"prompt_lengths_B: expected lengths in \[1, 3\], got \[0\]",
    id="lengths-0",
  ),
  pytest.param(
    lambda: _generate(lengths=[4, 2]),
    ValueError,
    r"prompt_lengths_B: expected lengths in \[1, 3\], got \[4\]",
    id="lengths-past-T",
  ),
  pytest.param(
    lambda: _generate(lengths=[3]),
    ValueError,
    r"prompt_lengths_B: expected shape \(2,\), got \(1,\)",
    id="lengths-batch",
  ),
  pytest.param(lambda: _generate(lengths=3), TypeError, "prompt_lengths_B: expected an array", id="lengths-scalar"),
  pytest.param(
    lambda: _generate(PROMPTS + 254), ValueError, r"prompts_BT: expected ids in \[0, 256\), got \[256", id="prompt-id"
  ),
  pytest.param(
    lambda: _generate(PROMPTS - 1),
    ValueError,
    r"prompts_BT: expected ids in \[0, 256\), got \[-1\]",
    id="prompt-negative",
  ),
  pytest.param(
    lambda: _generate(PROMPTS.astype(np.float32)), TypeError, "prompts_BT: expected integer", id="prompt-float"
  ),
  pytest.param(lambda: _generate(PROMPTS[0]), ValueError, r"prompts_BT: expected \[B, T\]", id="prompt-1d"),
  pytest.param(
    lambda: _generate(max_new_tokens=0), ValueError, "max_new_tokens: expected an int >= 1, got 0", id="new-0"
  ),
  pytest.param(
    lambda: _generate(max_new_tokens=-4), ValueError, "max_new_tokens: expected an int >= 1, got -4", id="new-negative"
  ),
  pytest.param(lambda: _generate(max_new_tokens=2.5), ValueError, "max_new_tokens: expected an int", id="new-float"),
  pytest.param(lambda: _generate(max_new_tokens=True), ValueError, "max_new_tokens: expected an int", id="new-bool"),
  pytest.param(
    lambda: _generate(prompts=[[1, 2, 3], [4, 5]]),
    ValueError,
    r"prompts_BT: expected rows of one length \(right-pad them and pass prompt_lengths_B\), got row lengths \[3, 2\]",
    id="prompts-ragged-list",
  ),
  pytest.param(
    lambda: _generate(temperature=True), TypeError, "temperature: expected a real number", id="temperature-bool"
  ),
  pytest.param(
    lambda: _generate(max_new_tokens=254),
    ValueError,
    "max_new_tokens: prompt width 3 .* max_seq_len=256",
    id="new-past-context",
  ),
  pytest.param(
    lambda: _generate(temperature=NAN),
    ValueError,
    "temperature: expected >= 0 and finite, got nan",
    id="temperature-nan",
  ),
  pytest.param(
    lambda: _generate(temperature=INF),
    ValueError,
    "temperature: expected >= 0 and finite, got inf",
    id="temperature-inf",
  ),
  pytest.param(
    lambda: _generate(temperature=-0.5),
    ValueError,
    "temperature: expected >= 0 and finite, got -0.5",
    id="temperature-negative",
  ),
  pytest.param(
    lambda: _generate(temperature=1.0, top_k=0), ValueError, r"top_k: expected an int in \[1, 256\]", id="top-k-0"
  ),
  pytest.param(lambda: _generate(temperature=1.0, top_k=2.5), TypeError, "top_k: expected an int", id="top-k-float"),
  pytest.param(lambda: _generate(temperature=1.0, top_p=0.0), ValueError, "top_p: expected 0 < p <= 1", id="top-p-0"),
  pytest.param(lambda: _generate(temperature=1.0, top_p=NAN), ValueError, "top_p: expected 0 < p <= 1", id="top-p-nan"),
  pytest.param(
    lambda: _generate(stop_ids=2), TypeError, "stop_ids: expected a sequence of token ids, got int 2", id="stop-int"
  ),
  pytest.param(
    lambda: _generate(stop_ids=(2.7,)),
    ValueError,
    r"stop_ids: expected int ids in \[0, 256\), got \(2.7,\)",
    id="stop-float",
  ),
  pytest.param(
    lambda: _generate(stop_ids=(256,)), ValueError, r"stop_ids: expected int ids in \[0, 256\)", id="stop-256"
  ),
  pytest.param(
    lambda: generate.generate(KEY, _params(), None, PROMPTS, LENGTHS, max_new_tokens=1),
    TypeError,
    "cfg: expected a model config",
    id="cfg-none",
  ),
  # Text and chat front ends: one prompt string (not a list) would be read character by character.
  pytest.param(
    lambda: generate.generate_text(KEY, _params(), CFG, None, "hello", max_new_tokens=1),
    TypeError,
    "prompts: expected a list of strings",
    id="text-one-str",
  ),
  pytest.param(
    lambda: generate.generate_chat(KEY, _params(), CFG, None, [{"role": "user", "content": "hi"}], max_new_tokens=1),
    TypeError,
    "conversations: expected a list of conversations",
    id="chat-one-conversation",
  ),
]

ENGINE = [
  # The user's case: a text prompt failed inside the error message's own formatting.
  pytest.param(
    lambda: _request(prompt="hello"),
    TypeError,
    "Request.prompt: expected a sequence of int token ids .*got str 'hello'",
    id="request-text",
  ),
  pytest.param(
    lambda: _request(prompt=()), ValueError, "Request.prompt: expected a non-empty sequence", id="request-empty"
  ),
  pytest.param(
    lambda: _request(prompt=(1, 2.5)),
    TypeError,
    r"Request.prompt: expected int token ids, got 2.5 \(float\) at index 1",
    id="request-float-id",
  ),
  pytest.param(
    lambda: _request(prompt=(1, -1)),
    ValueError,
    "Request.prompt: expected ids >= 0, got -1 at index 1",
    id="request-negative-id",
  ),
  pytest.param(
    lambda: _request(prompt=np.ones((1, 3), int)),
    TypeError,
    r"Request.prompt: expected a 1-D integer array",
    id="request-2d-array",
  ),
  pytest.param(
    lambda: _request(prompt=jnp.ones(3)),
    TypeError,
    "Request.prompt: expected a 1-D integer array of token ids, got float32",
    id="request-float-array",
  ),
  pytest.param(
    lambda: _request(max_new_tokens=0),
    ValueError,
    "Request.max_new_tokens: expected int >= 1, got int 0",
    id="request-new-0",
  ),
  pytest.param(
    lambda: _request(max_new_tokens=2.0), TypeError, "Request.max_new_tokens: expected int", id="request-new-float"
  ),
  pytest.param(
    lambda: _request(temperature=NAN),
    ValueError,
    "Request.temperature: expected float in",
    id="request-temperature-nan",
  ),
  pytest.param(
    lambda: _request(temperature=INF),
    ValueError,
    r"Request.temperature: expected float in \[0, inf\)",
    id="request-temperature-inf",
  ),
  pytest.param(
    lambda: _request(top_p=1.5), ValueError, r"Request.top_p: expected float in \(0, 1\] or None", id="request-top-p"
  ),
  pytest.param(lambda: _request(top_k=0), ValueError, "Request.top_k: expected int >= 1 or None", id="request-top-k"),
  pytest.param(lambda: _request(seed=2**63), ValueError, "Request.seed: expected int in", id="request-seed"),
  pytest.param(
    lambda: _request(stop_ids=5),
    TypeError,
    "Request.stop_ids: expected a sequence of int token ids",
    id="request-stop-int",
  ),
  pytest.param(
    lambda: _request(id=[1]), TypeError, "Request.id: expected Hashable, got list", id="request-id-unhashable"
  ),
  pytest.param(
    lambda: _add(prompt=(1, 256)),
    ValueError,
    r"request.prompt: expected ids in \[0, 255\], got \[256\] at index \[1\]",
    id="add-id-256",
  ),
  pytest.param(
    lambda: _add(prompt=(1,) * 250, max_new_tokens=10),
    ValueError,
    "request.prompt: 250 prompt .* max_seq_len=256",
    id="add-past-context",
  ),
  pytest.param(
    lambda: _add(prompt=(1,) * 30, max_new_tokens=8),
    ValueError,
    "request: 38 tokens need 10 blocks, more than the whole pool",
    id="add-past-pool",
  ),
  pytest.param(
    lambda: _add(stop_ids=(999,)), ValueError, r"request.stop_ids: expected ids in \[0, 256\)", id="add-stop-999"
  ),
  pytest.param(
    lambda: _add(temperature=1.0, top_k=999), ValueError, r"top_k: expected an int in \[1, 256\]", id="add-top-k"
  ),
  pytest.param(
    lambda: _engine().add({"id": 1, "prompt": (1,)}),
    TypeError,
    "request: expected an engine.Request, got dict",
    id="add-dict",
  ),
  pytest.param(
    lambda: _engine().generate(_request()),
    TypeError,
    "requests: expected an iterable of Request, got one Request",
    id="generate-one",
  ),
  pytest.param(
    lambda: engine.EngineConfig(num_blocks=0),
    ValueError,
    "EngineConfig.num_blocks: expected int >= 1, got int 0",
    id="config-blocks-0",
  ),
  pytest.param(
    lambda: engine.EngineConfig(num_blocks=-8),
    ValueError,
    "EngineConfig.num_blocks: expected int >= 1",
    id="config-blocks-negative",
  ),
  pytest.param(
    lambda: engine.EngineConfig(num_blocks=8, block_size=12),
    ValueError,
    "block_size: expected a power of two, got 12",
    id="config-page-12",
  ),
  pytest.param(
    lambda: engine.EngineConfig(num_blocks=8, block_size=16.0),
    TypeError,
    "EngineConfig.block_size: expected int",
    id="config-page-float",
  ),
  pytest.param(
    lambda: engine.EngineConfig(num_blocks=8, max_batch=0), ValueError, "EngineConfig.max_batch", id="config-batch-0"
  ),
  pytest.param(
    lambda: engine.EngineConfig(num_blocks=8, prefix_caching="yes"),
    TypeError,
    "EngineConfig.prefix_caching: expected bool",
    id="config-caching-str",
  ),
  pytest.param(
    lambda: engine.Engine(_params(), CFG, {"num_blocks": 8}),
    TypeError,
    "engine_cfg: expected an EngineConfig, got dict",
    id="engine-dict-config",
  ),
  pytest.param(
    lambda: engine.Engine(_params(), llama.PRESETS["small"], engine.EngineConfig(num_blocks=8)),
    ValueError,
    r"params\['embed'\]: expected shape \(4096, 256\)",
    id="engine-params-of-another-model",
  ),
]


def _allocated_a() -> blocks.BlockManager:
  mgr = blocks.BlockManager(num_blocks=4, block_size=2)
  mgr.allocate("a", [1, 2, 3, 4, 5])
  return mgr


def _committed_other_tokens() -> None:
  _allocated_a().commit("a", [9, 9, 9, 9, 9])  # would let a later [9, 9, 9, 9, 1] hit a's K/V


BLOCKS = [
  pytest.param(
    lambda: blocks.BlockManager(num_blocks=0, block_size=4),
    ValueError,
    "num_blocks: expected an int >= 1, got int 0",
    id="blocks-0",
  ),
  pytest.param(
    lambda: blocks.BlockManager(num_blocks=4, block_size=2.5),
    ValueError,
    "block_size: expected an int >= 1, got float 2.5",
    id="page-float",
  ),
  pytest.param(
    lambda: blocks.BlockManager(num_blocks=4, block_size=2).allocate("s", [1.7, 2.2, 3.0]),
    ValueError,
    "tokens: expected int32 token ids, got float64",
    id="allocate-float",
  ),
  pytest.param(
    lambda: _committed_other_tokens(),
    ValueError,
    r"tokens: expected the tokens of 'a' \(its prompt and earlier commits\), got 9 at index 0 where it has 1",
    id="commit-other-tokens",
  ),
  pytest.param(
    lambda: _allocated_a().commit("a", [1, 2, 3, 4, 5, 6]),
    ValueError,
    r"tokens: 6 exceed the 5 slots of 'a'",
    id="commit-longer",
  ),
  pytest.param(
    lambda: _allocated_a().commit("a", [1, -2]),
    ValueError,
    r"tokens: expected int32 token ids >= 0, got \[-2\]",
    id="commit-negative-id",
  ),
  pytest.param(
    lambda: blocks.BlockManager(4, 2).allocate("s", [3, -1, 2]),
    ValueError,
    r"tokens: expected int32 token ids >= 0, got \[-1\]",
    id="allocate-negative-id",
  ),
  pytest.param(
    lambda: blocks.BlockManager(4, 2, [0]),  # type: ignore[call-arg]
    TypeError,
    r"BlockManager.__init__\(\) takes 3 positional arguments",
    id="blocks-internal-free",
  ),
  pytest.param(
    lambda: blocks.BlockManager(4, 2).blocks_for(-5),
    ValueError,
    r"num_tokens: expected an int >= 0, got int -5",
    id="blocks-for-negative",
  ),
  pytest.param(
    lambda: blocks.block_hash(blocks.ROOT_HASH, [2**40]),
    ValueError,
    r"tokens: expected int32 token ids, got int64 \[1099511627776\]",
    id="hash-overflow",
  ),
  pytest.param(
    lambda: _allocated().append("s", 1.5), ValueError, "count: expected an int >= 1, got 1.5", id="append-float"
  ),
]


def _allocated() -> blocks.BlockManager:
  manager = blocks.BlockManager(num_blocks=4, block_size=2)
  manager.allocate("s", [1, 2, 3])
  return manager


@pytest.mark.parametrize("call, error, match", GENERATE + ENGINE + BLOCKS)
def test_bad_input(call, error, match):
  with pytest.raises(error, match=match):
    call()


def test_generate_traces_under_jit():
  # The lengths go on as the array check_lengths returns: no np.asarray of a tracer.
  static = ("cfg", "max_new_tokens", "stop_ids", "temperature", "top_k", "top_p")
  jitted = jax.jit(generate.generate, static_argnames=static)
  tokens, lengths = jitted(KEY, _params(), CFG, jnp.asarray(PROMPTS), jnp.asarray(LENGTHS), max_new_tokens=2)
  want_tokens, want_lengths = _generate()
  np.testing.assert_array_equal(tokens, want_tokens)
  np.testing.assert_array_equal(lengths, want_lengths)


def test_bad_requests_leave_the_engine_as_it_was():
  eng = _engine()
  for change in ({"prompt": (1, 256)}, {"stop_ids": (999,)}):
    with pytest.raises(ValueError):
      eng.add(_request(id="bad", **change))
  assert eng.idle and not eng._ids
