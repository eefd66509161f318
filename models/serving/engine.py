"""Continuous batching over a paged KV cache (vLLM / Orca) for the Llama model.

Shapes: B rows of one model call, T tokens per row (a prefill chunk, or 1 when decoding),
V vocabulary, L layers, G kv heads, P pages, S page slots, K head dim.

Requests join and leave the running batch at step granularity. Each `step()`:
1. admits waiting requests (first come, first served) while a row is free and the block
   manager can hold their context, reusing prefix-cached blocks (`models.serving.blocks`);
2. feeds every running sequence the tokens whose K/V are not in the pool yet: sequences
   with one such token (decoding) in one [max_batch, 1] call, those with more (prefilling a
   prompt, in chunks of `prefill_chunk`) in one [prefill_rows, prefill_chunk] call;
3. samples the next token of every sequence whose tokens are all fed, streams it, and
   finishes the sequence on a stop id or after max_new_tokens (its blocks are freed).
Before a decode step each sequence reserves a slot for its token; when blocks run out the
most recently admitted sequence is preempted (its blocks freed) and later recomputed from
its prompt plus the tokens it had generated, which it keeps. Padded rows of a call write
nothing (`num_new_B` = 0). Every call has one of two row counts and one of
log2(max_seq_len / block_size) + 1 table widths, so it compiles a few times.

Greedy outputs equal `generate.generate` of each request alone; `tests/models/serving`
checks this with requests of mixed lengths, chunked prefill and preemption.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import math
from collections.abc import Hashable, Iterable, Iterator, Sequence
from typing import Annotated, Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from paperjax.models.serving import blocks
from paperjax.models.transformer import llama
from paperjax.ops import checks, paged_attention, sampling


@checks.config
class EngineConfig:
  """The pool and the batch shapes; every field is checked at construction (`ops.checks.config`)."""

  num_blocks: checks.PositiveInt  # pages in the pool (per layer and kv head)
  block_size: checks.PositiveInt = 16  # tokens per page, a power of two
  max_batch: checks.PositiveInt = 8  # running sequences (rows of the decode call)
  prefill_rows: checks.PositiveInt = 2  # sequences prefilled per step
  prefill_chunk: checks.PositiveInt = 64  # prompt tokens per prefill row per step
  prefix_caching: bool = True

  def __post_init__(self):
    if self.block_size & (self.block_size - 1):  # the decode kernel's page tiles are powers of two
      raise ValueError(f"block_size: expected a power of two, got {self.block_size}")


_Temperature = Annotated[float, checks.Range(low=0, high=math.inf, high_open=True)]  # finite, >= 0
_TopP = Annotated[float, checks.Range(low=0, high=1, low_open=True)]
_Seed = Annotated[int, checks.Range(low=-(2**63), high=2**63, high_open=True)]  # a jax.random.key seed


@checks.config
class Request:
  """One generation request; sampling as in `ops.sampling.select` (temperature 0 is greedy).

  `prompt` and `stop_ids` take any sequence (or 1-D integer array) of token ids and are
  stored as tuples of ints; the ids' range is checked against the model in `Engine.add`.
  """

  id: Hashable
  prompt: Any  # tuple[int, ...] once constructed, non-empty
  max_new_tokens: checks.PositiveInt
  stop_ids: Any = ()  # tuple[int, ...] once constructed
  temperature: _Temperature = 0.0
  top_k: checks.PositiveInt | None = None
  top_p: _TopP | None = None
  seed: _Seed = 0  # token i is drawn with fold_in(key(seed), i)

  def __post_init__(self):
    object.__setattr__(self, "prompt", _token_ids("Request.prompt", self.prompt, empty=False))
    object.__setattr__(self, "stop_ids", _token_ids("Request.stop_ids", self.stop_ids, empty=True))


def _token_ids(name: str, ids: Any, *, empty: bool) -> tuple[int, ...]:
  """ids (a sequence or 1-D integer array of token ids) as a tuple of ints >= 0."""
  if isinstance(ids, (np.ndarray, jax.Array)):
    if ids.ndim != 1 or not np.issubdtype(ids.dtype, np.integer):
      raise TypeError(f"{name}: expected a 1-D integer array of token ids, got {ids.dtype} of shape {ids.shape}")
    ids = ids.tolist()
  if isinstance(ids, (str, bytes)) or not isinstance(ids, Sequence):
    raise TypeError(
      f"{name}: expected a sequence of int token ids (tokenize text first), got {type(ids).__name__} {ids!r:.60}"
    )
  bad = [i for i, x in enumerate(ids) if not checks.is_int(x)]
  if bad:
    x = ids[bad[0]]
    raise TypeError(f"{name}: expected int token ids, got {x!r} ({type(x).__name__}) at index {bad[0]}")
  if not empty and len(ids) == 0:
    raise ValueError(f"{name}: expected a non-empty sequence of token ids, got {ids!r}")
  values = tuple(int(x) for x in ids)
  negative = [i for i, x in enumerate(values) if x < 0]
  if negative:
    raise ValueError(f"{name}: expected ids >= 0, got {values[negative[0]]} at index {negative[0]}")
  return values


class Event(NamedTuple):
  """A streamed token: request id, the token, and whether the request finished with it."""

  id: Hashable
  token: int
  finished: bool


@dataclasses.dataclass
class _Sequence:
  request: Request
  tokens: list[int]  # prompt then generated tokens
  computed: int = 0  # leading tokens whose K/V are in the pool
  admitted: int = 0  # admission order (the newest is preempted first)

  @property
  def generated(self) -> int:
    return len(self.tokens) - len(self.request.prompt)


class _Ready(NamedTuple):
  """A sequence whose tokens are all fed: its greedy next token, and its logits' row."""

  seq: _Sequence
  greedy: int
  logits_BV: jax.Array
  row: int


@dataclasses.dataclass
class Stats:
  steps: int = 0
  preemptions: int = 0
  prompt_tokens: int = 0  # prompt tokens admitted (recomputations included)
  cached_tokens: int = 0  # of which found in the prefix cache
  peak_blocks: int = 0  # most blocks referenced at once


class Engine:
  """Continuous batching over `llama` with a paged KV cache (module docstring).

  State: the device pools, the block manager, the waiting queue and the running sequences.
  """

  def __init__(self, params: dict, cfg: llama.LlamaConfig, engine_cfg: EngineConfig):
    if not isinstance(cfg, llama.LlamaConfig):
      raise TypeError(f"cfg: the engine serves Llama (a paged KV cache), got {type(cfg).__name__}")
    if not isinstance(engine_cfg, EngineConfig):
      raise TypeError(f"engine_cfg: expected an EngineConfig, got {type(engine_cfg).__name__}")
    llama.check_params(params, cfg)
    self.params, self.cfg, self.ecfg = params, cfg, engine_cfg
    self.manager = blocks.BlockManager(num_blocks=engine_cfg.num_blocks, block_size=engine_cfg.block_size)
    self.k_pages_GPSK, self.v_pages_GPSK = llama.init_pages(cfg, engine_cfg.num_blocks, engine_cfg.block_size)
    self.max_pages = -(-cfg.max_seq_len // engine_cfg.block_size)  # block-table width
    self.waiting: collections.deque[_Sequence] = collections.deque()
    self.running: list[_Sequence] = []
    self.stats = Stats()
    self._admissions = 0
    self._ids: set[Hashable] = set()

  def add(self, request: Request) -> None:
    """Queues a request; a bad one raises ValueError (TypeError: not a Request) here and leaves
    the engine as it was. Every request is checked on the host before any model call."""
    check_request(request, self.cfg, self.ecfg)
    if request.id in self._ids:
      raise ValueError(f"request.id: {request.id!r} is already queued or running")
    self._ids.add(request.id)
    self.waiting.append(_Sequence(request, list(request.prompt)))

  @property
  def idle(self) -> bool:
    return not self.waiting and not self.running

  def run(self, requests: Iterable[Request] = ()) -> Iterator[Event]:
    """Adds the requests, then steps until every request finished, streaming events."""
    if isinstance(requests, Request):
      raise TypeError("requests: expected an iterable of Request, got one Request (wrap it in a list)")
    for request in requests:
      self.add(request)
    while not self.idle:
      yield from self.step()

  def generate(self, requests: Iterable[Request]) -> dict[Hashable, list[int]]:
    """Every request's generated tokens (stop token kept, as in `generate.generate`)."""
    if isinstance(requests, Request):
      raise TypeError("requests: expected an iterable of Request, got one Request (wrap it in a list)")
    out: dict[Hashable, list[int]] = {}
    for event in self.run(requests):
      out.setdefault(event.id, []).append(event.token)
    return out

  def step(self) -> list[Event]:
    self.stats.steps += 1
    self._admit()
    decoding = [s for s in self.running if len(s.tokens) - s.computed == 1]
    decoding = self._reserve(decoding)
    prefilling = [s for s in self.running if len(s.tokens) - s.computed > 1][: self.ecfg.prefill_rows]
    ready: list[_Ready] = []
    if decoding:
      ready += self._feed(decoding, 1)
    if prefilling:
      ready += self._feed(prefilling, self.ecfg.prefill_chunk)
    self.stats.peak_blocks = max(self.stats.peak_blocks, self.ecfg.num_blocks - self.manager.num_free_blocks)
    return self._sample(ready)

  # ---- scheduling

  def _admit(self) -> None:
    while self.waiting and len(self.running) < self.ecfg.max_batch:
      seq = self.waiting[0]
      if not self.manager.can_allocate(seq.tokens):
        break
      self.waiting.popleft()
      seq.computed = self.manager.allocate(seq.request.id, seq.tokens)  # 0 without caching: nothing is committed
      self._admissions += 1
      seq.admitted = self._admissions
      self.running.append(seq)
      self.stats.prompt_tokens += len(seq.tokens)
      self.stats.cached_tokens += seq.computed

  def _reserve(self, decoding: list[_Sequence]) -> list[_Sequence]:
    """A slot for each decoding sequence's token, preempting the newest sequences when the
    pool runs out; applies the copy-on-write copies. Returns the sequences still running."""
    copies: list[tuple[int, int]] = []
    for seq in sorted(decoding, key=lambda s: s.admitted):
      while seq in self.running and self.manager.num_tokens[seq.request.id] < len(seq.tokens):
        try:
          copies += self.manager.append(seq.request.id, 1)
        except MemoryError:
          self._preempt(max(self.running, key=lambda s: s.admitted))
    if copies:
      # numpy, not jnp: copy_pages checks the page ids on the host, and a device array would be copied back.
      src: Any
      dst: Any
      src, dst = (np.asarray(x, np.int32) for x in zip(*copies))
      layers = self.cfg.n_layers
      self.k_pages_GPSK = paged_attention.copy_pages(self.k_pages_GPSK, src, dst, layers=layers)
      self.v_pages_GPSK = paged_attention.copy_pages(self.v_pages_GPSK, src, dst, layers=layers)
    return [s for s in decoding if s in self.running]

  def _preempt(self, seq: _Sequence) -> None:
    """Frees the sequence's blocks; it waits at the front and is recomputed (prompt plus the
    tokens it generated) when admitted again."""
    self.manager.free_sequence(seq.request.id)
    self.running.remove(seq)
    seq.computed = 0
    self.waiting.appendleft(seq)
    self.stats.preemptions += 1

  # ---- model calls

  def _feed(self, seqs: list[_Sequence], width: int) -> list[_Ready]:
    """Feeds each sequence up to `width` of its unfed tokens in one call of fixed rows; the
    block tables are as wide as the longest one rounded up to a power of two (attention reads
    every slot a table names, so a few compiled widths beat one of max_seq_len)."""
    rows = self.ecfg.max_batch if width == 1 else self.ecfg.prefill_rows
    tables = [self.manager.block_table(seq.request.id) for seq in seqs]
    pages = min(self.max_pages, 1 << (max(map(len, tables)) - 1).bit_length())
    tokens_BT = np.zeros((rows, width), np.int32)
    tables_BP = np.zeros((rows, pages), np.int32)
    lengths_B, new_B = np.zeros(rows, np.int32), np.zeros(rows, np.int32)
    for row, (seq, table) in enumerate(zip(seqs, tables)):
      chunk = seq.tokens[seq.computed : seq.computed + width]
      tokens_BT[row, : len(chunk)] = chunk
      tables_BP[row, : len(table)] = table
      lengths_B[row], new_B[row] = seq.computed, len(chunk)
    logits_BV, greedy_B, self.k_pages_GPSK, self.v_pages_GPSK = _feed(
      self.params, self.k_pages_GPSK, self.v_pages_GPSK, tokens_BT, tables_BP, lengths_B, new_B, self.cfg
    )
    greedy = np.asarray(greedy_B)  # one transfer; logits stay on the device unless a row samples
    ready = []
    for row, seq in enumerate(seqs):
      seq.computed += int(new_B[row])
      if self.ecfg.prefix_caching:
        self.manager.commit(seq.request.id, seq.tokens[: seq.computed])
      if seq.computed == len(seq.tokens):
        ready.append(_Ready(seq, int(greedy[row]), logits_BV, row))
    return ready

  def _sample(self, ready: list[_Ready]) -> list[Event]:
    tokens = [  # every token first, then the state changes
      greedy
      if seq.request.temperature == 0
      else int(
        _select(
          jax.random.fold_in(jax.random.key(seq.request.seed), seq.generated),
          logits_BV[row],
          seq.request.temperature,
          seq.request.top_k,
          seq.request.top_p,
        )
      )
      for seq, greedy, logits_BV, row in ready
    ]
    events = []
    for (seq, *_), token in zip(ready, tokens):
      r = seq.request
      seq.tokens.append(token)
      finished = token in r.stop_ids or seq.generated == r.max_new_tokens
      events.append(Event(r.id, token, finished))
      if finished:
        self.manager.free_sequence(r.id)
        self.running.remove(seq)
        self._ids.discard(r.id)
    return events


@functools.partial(jax.jit, static_argnums=7, donate_argnums=(1, 2))
def _feed(params, k_pages_GPSK, v_pages_GPSK, tokens_BT, tables_BP, lengths_B, new_B, cfg):
  """One model call over the pool: the logits [B, V] after each row's last new token, their
  argmax (greedy rows need nothing else on the host), and the pools."""
  state = llama.PagedKVCache(k_pages_GPSK, v_pages_GPSK, tables_BP, lengths_B)
  logits_BTV, after = llama.forward(params, tokens_BT, cfg, state=state, num_new_B=new_B)
  assert isinstance(after, llama.PagedKVCache)
  last_BV = logits_BTV[jnp.arange(tokens_BT.shape[0]), jnp.maximum(new_B - 1, 0)]
  return last_BV, jnp.argmax(last_BV, axis=-1), after.k_pages_GPSK, after.v_pages_GPSK  # = select at T=0


@functools.partial(jax.jit, static_argnums=(2, 3, 4))
def _select(key, logits_V, temperature, top_k, top_p):
  return sampling.select(key, logits_V[None], temperature, top_k=top_k, top_p=top_p)[0]


def check_request(request: Request, cfg: llama.LlamaConfig, engine_cfg: EngineConfig) -> None:
  """ValueError naming the field for a request the engine cannot serve (its fields' own types
  and ranges were checked when the Request was built)."""
  if not isinstance(request, Request):
    raise TypeError(f"request: expected an engine.Request, got {type(request).__name__}")
  prompt = request.prompt
  checks.check_in("request.prompt", np.asarray(prompt), 0, cfg.vocab_size - 1, what="ids")
  total = len(prompt) + request.max_new_tokens
  if total > cfg.max_seq_len:
    raise ValueError(
      f"request.prompt: {len(prompt)} prompt + {request.max_new_tokens} new tokens exceed the context "
      f"max_seq_len={cfg.max_seq_len}"
    )
  if -(-total // engine_cfg.block_size) > engine_cfg.num_blocks:
    raise ValueError(
      f"request: {total} tokens need {-(-total // engine_cfg.block_size)} blocks, more than the whole pool "
      f"({engine_cfg.num_blocks} blocks of {engine_cfg.block_size}), even alone"
    )
  if any(s >= cfg.vocab_size for s in request.stop_ids):
    raise ValueError(f"request.stop_ids: expected ids in [0, {cfg.vocab_size}), got {request.stop_ids}")
  # temperature, top_k and top_p have their types and ranges from the Request's annotations;
  # only top_k's bound depends on the model.
  if request.top_k is not None and request.top_k > cfg.vocab_size:
    raise ValueError(f"request.top_k: expected an int in [1, {cfg.vocab_size}] or None, got {request.top_k}")
