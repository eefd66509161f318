"""The continuous-batching engine: greedy outputs equal `generate.generate` of each request
alone (chunked prefill, preemption, prefix caching, stale pages), sampling independent of
batch-mates, streaming, and bad requests."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from paperjax.models.serving import engine, generate
from paperjax.models.transformer import llama

CFG = llama.PRESETS["tiny"]
WIDTH, MAX_NEW, STOP = 40, 12, 7  # every reference shares one compiled generate: prompts padded to WIDTH


@pytest.fixture(scope="module")
def params():
  return llama.init(jax.random.key(0), CFG)


def _requests(seed, count=10, system=()):
  rng = np.random.default_rng(seed)
  out = []
  for i in range(count):
    prompt = tuple(system) + tuple(int(x) for x in rng.integers(0, CFG.vocab_size, int(rng.integers(1, 25))))
    out.append(
      engine.Request(id=f"r{i}", prompt=prompt, max_new_tokens=int(rng.integers(1, MAX_NEW + 1)), stop_ids=(STOP,))
    )
  return out


def _alone(params, request):
  """generate.generate on this request alone; greedy, so the first n of MAX_NEW tokens are
  what max_new_tokens=n gives."""
  prompt = np.zeros((1, WIDTH), np.int32)
  prompt[0, : len(request.prompt)] = request.prompt
  tokens, length = generate.generate(
    jax.random.key(0), params, CFG, prompt, [len(request.prompt)], max_new_tokens=MAX_NEW, stop_ids=request.stop_ids
  )
  return np.asarray(tokens[0, : int(length[0])]).tolist()[: request.max_new_tokens]


def _assert_matches_alone(params, requests, outputs):
  assert set(outputs) == {r.id for r in requests}
  for r in requests:
    assert outputs[r.id] == _alone(params, r), r.id


def _nan_pool(eng):
  eng.k_pages_GPSK = jnp.full_like(eng.k_pages_GPSK, jnp.nan)
  eng.v_pages_GPSK = jnp.full_like(eng.v_pages_GPSK, jnp.nan)


SMALL = engine.EngineConfig(num_blocks=64, block_size=4, max_batch=4, prefill_rows=2, prefill_chunk=8)


def test_greedy_outputs_equal_generate_alone(params):
  # 10 requests through 4 rows: prompts of 1-24 tokens prefilled in chunks of 8 while others
  # decode; the pool starts as NaN, so a read of an unwritten slot would show.
  requests = _requests(0)
  eng = engine.Engine(params, CFG, SMALL)
  _nan_pool(eng)
  _assert_matches_alone(params, requests, eng.generate(requests))
  assert eng.stats.preemptions == 0 and eng.manager.num_free_blocks == SMALL.num_blocks


def test_preemption_recomputes_and_freed_pages_never_leak(params):
  # A 10-block pool cannot hold 4 growing sequences: the newest are preempted and recomputed.
  # After every step, every free block is poisoned with NaN.
  requests = _requests(1)
  eng = engine.Engine(params, CFG, engine.EngineConfig(**{**vars(SMALL), "num_blocks": 10}))
  outputs: dict = {}
  for r in requests:
    eng.add(r)
  while not eng.idle:
    for event in eng.step():
      outputs.setdefault(event.id, []).append(event.token)
    freed = np.array(list(eng.manager.free), np.int32)  # evictable cached blocks keep their K/V: hits reuse it
    pages = (freed[None] + 10 * np.arange(CFG.n_layers)[:, None]).ravel()  # block b of layer l is page 10 l + b
    eng.k_pages_GPSK = eng.k_pages_GPSK.at[:, pages].set(jnp.nan)
    eng.v_pages_GPSK = eng.v_pages_GPSK.at[:, pages].set(jnp.nan)
  assert eng.stats.preemptions > 0
  _assert_matches_alone(params, requests, outputs)


@pytest.mark.parametrize("caching", [True, False])
def test_prefix_cache_serves_a_shared_system_prompt(params, caching):
  system = tuple(range(100, 116))  # 16 tokens: 4 full blocks
  requests = _requests(2, count=5, system=system)
  eng = engine.Engine(
    params, CFG, SMALL if caching else engine.EngineConfig(**{**vars(SMALL), "prefix_caching": False})
  )
  outputs = eng.generate(requests[:1])  # computes and caches the system prompt
  outputs |= eng.generate(requests[1:])
  _assert_matches_alone(params, requests, outputs)
  assert eng.stats.cached_tokens == (4 * 16 if caching else 0)


def test_sampled_tokens_do_not_depend_on_batch_mates(params):
  sampled = engine.Request(id="s", prompt=(3, 1, 4, 1, 5), max_new_tokens=10, temperature=1.0, top_k=50, seed=9)
  alone = engine.Engine(params, CFG, SMALL).generate([sampled])
  crowded = engine.Engine(params, CFG, SMALL).generate([*_requests(3, count=5), sampled])
  assert alone["s"] == crowded["s"]
  reseeded = engine.Engine(params, CFG, SMALL).generate([engine.Request(**{**vars(sampled), "seed": 10})])
  assert reseeded["s"] != alone["s"]


def test_outputs_do_not_depend_on_the_decode_window(params):
  # Greedy and sampled requests with decode windows of 1 and 8 steps on the device: the same
  # tokens (each sampled token i uses fold_in(key(seed), i), whatever window it falls in).
  requests = [
    *_requests(6, count=6),
    engine.Request(id="s1", prompt=(3, 1, 4), max_new_tokens=12, temperature=1.0, seed=1),
    engine.Request(id="s2", prompt=(2, 7, 1, 8), max_new_tokens=9, temperature=0.7, top_k=20, top_p=0.9, seed=2),
  ]
  runs = {}
  for steps in (1, 8):
    eng = engine.Engine(params, CFG, engine.EngineConfig(**{**vars(SMALL), "decode_steps": steps}))
    runs[steps] = (eng.generate(requests), eng.stats)
  assert runs[1][0] == runs[8][0]
  assert runs[8][1].model_calls < runs[1][1].model_calls  # windows ran
  _assert_matches_alone(params, requests[:6], {r.id: runs[8][0][r.id] for r in requests[:6]})


@pytest.mark.parametrize("overlap", [False, True])
def test_a_stop_inside_a_window_ends_the_request_there(params, overlap):
  # One request alone: its prompt's call samples token 0, then a window of min(8, 11) = 8 steps
  # (with overlap, also its continuation of the last 3, dispatched before the window is read).
  # Its stop id is its own greedy token 4 (or the first earlier occurrence): the later tokens
  # are discarded and every block is freed.
  prompt = (5, 9, 2, 6, 5, 3)
  free = engine.Request(id="free", prompt=prompt, max_new_tokens=MAX_NEW)
  greedy = _alone(params, free)
  stop = greedy[4]
  end = greedy.index(stop) + 1
  eng = engine.Engine(params, CFG, engine.EngineConfig(**{**vars(SMALL), "overlap": overlap}))
  events = list(eng.run([engine.Request(id="r", prompt=prompt, max_new_tokens=MAX_NEW, stop_ids=(stop,))]))
  assert [e.token for e in events] == greedy[:end]
  assert [e.finished for e in events] == [False] * (end - 1) + [True]
  assert eng.stats.steps == 2
  assert (eng.stats.model_calls, eng.stats.decode_steps) == ((3, 11) if overlap else (2, 8))
  assert eng.manager.num_free_blocks == SMALL.num_blocks and eng.idle
  # A continuation whose every row stopped is dropped: the engine serves the next request at once.
  assert eng.generate([engine.Request(id="next", prompt=prompt, max_new_tokens=2)])["next"] == greedy[:2]


def test_one_model_call_per_step_packs_decode_and_prefill_under_the_token_budget(params):
  # A budget of 10 tokens with 4 rows: decode tokens first, then prompt chunks of at most 8
  # from at most 2 sequences. Every step is one call, and some call packs both kinds.
  ecfg = engine.EngineConfig(**{**vars(SMALL), "token_budget": 10, "overlap": False})
  requests = _requests(7, count=8)
  eng = engine.Engine(params, CFG, ecfg)
  for r in requests:
    eng.add(r)
  outputs: dict = {}
  mixed = 0
  while not eng.idle:
    fed, calls, steps = eng.stats.fed_tokens, eng.stats.model_calls, eng.stats.decode_steps
    decoding = sum(s.unfed == 1 for s in eng.running)
    for event in eng.step():
      outputs.setdefault(event.id, []).append(event.token)
    assert eng.stats.model_calls == calls + 1
    if eng.stats.decode_steps - steps <= 1:  # a packed call (or a window of one step)
      assert eng.stats.fed_tokens - fed <= ecfg.token_budget
      mixed += decoding > 0 and eng.stats.fed_tokens - fed > decoding
  assert mixed > 0
  assert eng.stats.padded_tokens < 2 * eng.stats.fed_tokens  # decode rows are not padded to a chunk's width
  _assert_matches_alone(params, requests, outputs)
  # Signatures: rows and widths in powers of two up to 4 rows, 2 chunk rows of width <= 8, and
  # power-of-two table widths: a handful of programs, not one per step.
  assert eng.stats.shapes <= 12 < eng.stats.steps


def test_overlapped_windows_give_the_same_tokens(params):
  # Continuations dispatched before their window is read, over a trace with stops, preemption
  # (a 10-block pool) and a sampled request: the same tokens as without overlap.
  requests = [*_requests(8, count=8), engine.Request(id="s", prompt=(4, 4, 2), max_new_tokens=12, temperature=1.0)]
  # Also 4 of them alone (no queue): continuations then run back to back.
  runs = {}
  for blocks, served in ((10, requests), (64, requests[-4:])):
    for overlap in (False, True):
      ecfg = engine.EngineConfig(**{**vars(SMALL), "num_blocks": blocks, "overlap": overlap})
      eng = engine.Engine(params, CFG, ecfg)
      runs[blocks, overlap] = (eng.generate(served), eng.stats)
    assert runs[blocks, True][0] == runs[blocks, False][0]
    _assert_matches_alone(params, served[:-1], {r.id: runs[blocks, True][0][r.id] for r in served[:-1]})
  assert all(stats.overlapped == 0 for (_, overlap), (_, stats) in runs.items() if not overlap)
  assert runs[64, True][1].overlapped >= 2  # continuations ran
  assert runs[10, True][1].preemptions > 0


def test_windows_need_free_blocks_only_for_new_slots(params):
  # Three 2-token prompts with 9 new tokens each fit one 16-slot block apiece, in a pool with
  # one block to spare: one packed call samples token 1, one window of 8 steps the rest (had a
  # copy-on-write been charged per row, every window would have shrunk to one step: 10 calls).
  requests = [engine.Request(id=i, prompt=(i + 1, 2), max_new_tokens=9) for i in range(3)]
  eng = engine.Engine(
    params, CFG, engine.EngineConfig(num_blocks=4, block_size=16, max_batch=3, prefill_rows=3, overlap=False)
  )
  eng.generate(requests)
  assert (eng.stats.model_calls, eng.stats.decode_steps) == (2, 8)


def test_events_stream_in_order_and_finish_once(params):
  requests = _requests(4, count=6)
  events = list(engine.Engine(params, CFG, SMALL).run(requests))
  for r in requests:
    mine = [e for e in events if e.id == r.id]
    assert [e.finished for e in mine] == [False] * (len(mine) - 1) + [True]
    assert len(mine) == r.max_new_tokens or mine[-1].token == STOP


def test_bad_requests_raise_and_the_rest_finish_unharmed(params):
  good = _requests(5, count=3)
  eng = engine.Engine(params, CFG, SMALL)
  eng.add(good[0])
  ok = dict(id="bad", prompt=(1, 2), max_new_tokens=2)
  bad = [  # the Request's own fields raise as it is built; the rest when the engine checks it against the model
    ({"prompt": ()}, ValueError, "Request.prompt: expected a non-empty"),
    ({"prompt": (1, CFG.vocab_size)}, ValueError, r"request.prompt: expected ids in \[0, 255\], got \[256\]"),
    ({"max_new_tokens": 0}, ValueError, "Request.max_new_tokens: expected int >= 1"),
    ({"prompt": (1,) * 250, "max_new_tokens": 10}, ValueError, "exceed the context max_seq_len=256"),
    ({"stop_ids": (-1,)}, ValueError, "Request.stop_ids"),
    ({"stop_ids": (CFG.vocab_size,)}, ValueError, "request.stop_ids"),
    ({"temperature": -1.0}, ValueError, "temperature"),
    ({"seed": 2**63}, ValueError, "Request.seed"),
    ({"seed": 1.5}, TypeError, "Request.seed"),
    ({"max_new_tokens": True}, TypeError, "Request.max_new_tokens"),
    ({"stop_ids": (2.0,)}, TypeError, "Request.stop_ids"),
    ({"id": "r0"}, ValueError, "already queued or running"),
  ]
  for change, error, message in bad:
    with pytest.raises(error, match=message):
      eng.add(engine.Request(**{**ok, **change}))
  with pytest.raises(TypeError, match="cfg: the engine serves Llama"):
    engine.Engine(params, object(), SMALL)  # type: ignore[arg-type]
  with pytest.raises(ValueError, match="block_size: expected a power of two, got 12"):
    engine.EngineConfig(num_blocks=2, block_size=12)
  with pytest.raises(ValueError, match="token_budget: expected >= max_batch=8 .*, got 4"):
    engine.EngineConfig(num_blocks=2, token_budget=4)
  with pytest.raises(ValueError, match="EngineConfig.decode_steps"):
    engine.EngineConfig(num_blocks=2, decode_steps=0)
  tiny_pool = engine.Engine(params, CFG, engine.EngineConfig(num_blocks=2, block_size=4))
  with pytest.raises(ValueError, match="more than the whole pool .* even alone"):
    tiny_pool.add(engine.Request(**{**ok, "prompt": (1,) * 8}))
  _assert_matches_alone(params, good, eng.generate(good[1:]))  # r0, queued before the bad ones, included
