"""Continuous batching over a paged KV cache (vLLM / Orca, with Sarathi-Serve's chunked
prefill) for the Llama model.

Shapes: B rows of a model call (at most max_batch), T tokens per row (a prompt chunk's
width, or a decode window's steps), N tokens of a packed call, V vocabulary, D model width,
P block-table entries, L layers, G kv heads, S page slots, K head dim.

Requests join and leave the running batch at step granularity. Each `step()`:
1. admits waiting requests (first come, first served) while a row is free and the block
   manager can hold their context, reusing prefix-cached blocks (`models.serving.blocks`);
2. makes one model call:
   - while some running sequence has prompt tokens left to feed, a packed call
     (`llama.PackedPagedKVCache`): every decoding sequence's token first, then prompt chunks
     of at most prefill_chunk tokens from at most prefill_rows sequences, token_budget tokens
     in all (vLLM's scheduler; Sarathi-Serve's chunked prefill). Decode rows are one token
     wide, so a chunk does not pad them;
   - otherwise a decode window: T = min(decode_steps, the fewest tokens any running sequence
     may still generate) decode steps in one jitted loop on the device, each step feeding
     the token the previous one sampled;
3. samples on the device, each request's token i drawn with fold_in(key(seed), i) (so an
   output depends neither on its batch-mates nor on T), reads back the token ids only, and
   streams them; a sequence finishes on a stop id (its later tokens in a window are
   discarded) or at max_new_tokens, and its blocks are freed.
Before a call each sequence reserves the slots the call writes. When blocks run out, the
window shrinks to one step, and then the most recently admitted sequence is preempted (its
blocks freed) and later recomputed from its prompt plus the tokens it had generated. Padded
rows of a call write nothing (num_new = 0). With `overlap`, a window's continuation is
dispatched before the window's tokens are read (`Engine._continue`), so the host books one
window while the device runs the next.

Call shapes are bucketed so that a trace compiles a handful of programs: row counts and
chunk widths to multiples of a quarter of max_batch / prefill_rows / prefill_chunk, block
tables to a power-of-two width of at least MIN_PAGES (attention reads every slot a table
names).
`Stats` counts the signatures and splits a step's wall time into host work, model calls,
transfers and compiles.

Greedy outputs equal `generate.generate` of each request alone; `tests/models/serving`
checks this with requests of mixed lengths, chunked prefill, windows, stops and preemption.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import math
import time
from collections.abc import Hashable, Iterable, Iterator, Sequence
from typing import Annotated, Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from paperjax.models.serving import blocks, placement
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
  token_budget: checks.PositiveInt = 256  # real tokens per packed call (decode first, then chunks); padding on top
  decode_steps: checks.PositiveInt = 8  # most decode steps of one call (a window on the device)
  overlap: bool = True  # dispatch a window's continuation before reading its tokens

  def __post_init__(self):
    if self.block_size & (self.block_size - 1):  # the decode kernel's page tiles are powers of two
      raise ValueError(f"block_size: expected a power of two, got {self.block_size}")
    if self.token_budget < self.max_batch:
      raise ValueError(
        f"token_budget: expected >= max_batch={self.max_batch} (every running sequence's decode token, with "
        f"room for a prompt chunk whenever a row is free), got {self.token_budget}"
      )


MIN_PAGES = 4  # the narrowest block table of a call

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


@dataclasses.dataclass(eq=False)  # identity: `in self.running` compares objects, not tokens
class _Sequence:
  request: Request
  tokens: list[int]  # prompt then generated tokens
  computed: int = 0  # leading tokens whose K/V are in the pool
  admitted: int = 0  # admission order (the newest is preempted first)
  key_data: np.ndarray | None = None  # key(seed)'s data, for sampled requests

  @property
  def generated(self) -> int:
    return len(self.tokens) - len(self.request.prompt)

  @property
  def unfed(self) -> int:
    return len(self.tokens) - self.computed


@dataclasses.dataclass
class Stats:
  """Counts and wall seconds over the engine's life (`step` adds to them)."""

  steps: int = 0
  preemptions: int = 0
  prompt_tokens: int = 0  # prompt tokens admitted (recomputations included)
  cached_tokens: int = 0  # of which found in the prefix cache
  peak_blocks: int = 0  # most blocks referenced at once
  model_calls: int = 0  # jitted model calls (one per step; a decode window is one call)
  overlapped: int = 0  # of which dispatched before the call before them was read (`overlap`)
  decode_steps: int = 0  # decode iterations run on the device (a window of T steps counts T)
  fed_tokens: int = 0  # real tokens fed to the model (decode and prefill; padding excluded)
  padded_tokens: int = 0  # token rows computed, padding included
  host_s: float = 0.0  # wall seconds in step() outside model calls and transfers: scheduling, block tables, events
  model_s: float = 0.0  # wall seconds from a call's dispatch until its outputs are ready (compiling calls excluded)
  transfer_s: float = 0.0  # wall seconds copying ready outputs to the host
  shapes: int = 0  # distinct call signatures (kind, rows, widths, table width) this engine used
  compiles: int = 0  # calls that compiled a program (a signature new to this process)
  compile_s: float = 0.0  # wall seconds of those calls (the compile and one run)


class _Pending(NamedTuple):
  """A dispatched call whose tokens the host has not read."""

  kind: str  # "packed" or "window"
  rows: list[tuple[_Sequence, int]]  # each row's sequence and the tokens it fed at the first step
  placed: np.ndarray  # the output column of each row
  steps: int  # T
  out: jax.Array  # int32 [decode_steps, max_batch] tokens on the device


class _Sampling(NamedTuple):
  """Per-row sampling settings of a call (`ops.sampling.select_rows`), numpy on the host and
  arrays in the call; padded rows are greedy."""

  key_data_B: Any  # uint32 [B, ...]: key(seed)'s data
  generated_B: Any  # int32: the index of the row's next token
  temperature_B: Any  # float32, 0 greedy
  top_k_B: Any  # int32, V for none
  top_p_B: Any  # float32, 2 for none


class Engine:
  """Continuous batching over `llama` with a paged KV cache (module docstring).

  State: the device pools, the block manager, the waiting queue and the running sequences.
  `place` puts the weights, the pools and every call's inputs on devices
  (`models.serving.placement`; default: one device).
  """

  def __init__(
    self, params: dict, cfg: llama.LlamaConfig, engine_cfg: EngineConfig, *, place: placement.Placement | None = None
  ):
    if not isinstance(cfg, llama.LlamaConfig):
      raise TypeError(f"cfg: the engine serves Llama (a paged KV cache), got {type(cfg).__name__}")
    if not isinstance(engine_cfg, EngineConfig):
      raise TypeError(f"engine_cfg: expected an EngineConfig, got {type(engine_cfg).__name__}")
    llama.check_params(params, cfg)
    if place is not None and getattr(place, "cfg", cfg) != cfg:
      raise ValueError(
        "place: built for another model config than cfg (the engine's calls must constrain by its rules)"
      )
    self.place = placement.Placement() if place is None else place
    self.params, self.cfg, self.ecfg = self.place.params(params), cfg, engine_cfg
    self.manager = blocks.BlockManager(num_blocks=engine_cfg.num_blocks, block_size=engine_cfg.block_size)
    self.k_pages_GPSK, self.v_pages_GPSK = self.place.pools(  # shapes: each device makes its own shard
      *jax.eval_shape(lambda: llama.init_pages(cfg, engine_cfg.num_blocks, engine_cfg.block_size))
    )
    self.max_pages = -(-cfg.max_seq_len // engine_cfg.block_size)  # block-table width
    self.waiting: collections.deque[_Sequence] = collections.deque()
    self.running: list[_Sequence] = []
    self.stats = Stats()
    self._admissions = 0
    self._ids: set[Hashable] = set()
    self._signatures: set[tuple] = set()
    self._pending: _Pending | None = None  # a dispatched window not read yet (overlap)
    self._device_s = 0.0  # this step's seconds waiting on the device (compiles, model, transfers)
    self._key_shape = jax.random.key_data(jax.random.key(0)).shape

  def add(self, request: Request) -> None:
    """Queues a request; a bad one raises ValueError (TypeError: not a Request) here and leaves
    the engine as it was. Every request is checked on the host before any model call."""
    check_request(request, self.cfg, self.ecfg)
    if request.id in self._ids:
      raise ValueError(f"request.id: {request.id!r} is already queued or running")
    self._ids.add(request.id)
    key_data = None if request.temperature == 0 else np.asarray(jax.random.key_data(jax.random.key(request.seed)))
    self.waiting.append(_Sequence(request, list(request.prompt), key_data=key_data))

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
    """One model call: a packed prefill+decode call, or a decode window. With `overlap`, a
    window's continuation is dispatched before the window's tokens are read, so the host
    books one window while the device runs the next. Returns the streamed tokens, each
    request's in order."""
    start, self._device_s = time.perf_counter(), 0.0
    self.stats.steps += 1
    pending = self._pending
    if pending is None:
      self._admit()
      decoding = [s for s in self.running if s.unfed == 1]
      if any(s.unfed > 1 for s in self.running):
        decoding = self._reserve(decoding, 1)
        pending = self._packed(decoding, self._chunks(decoding))
      elif decoding:
        window = min(self.ecfg.decode_steps, min(s.request.max_new_tokens - s.generated for s in decoding))
        if window > 1 and not self._fits([(s, len(s.tokens) + window - 1) for s in decoding]):
          window = 1
        decoding = self._reserve(decoding, window)
        pending = self._window(decoding, window) if decoding else None
    events = []
    if pending is not None:
      self._pending = self._continue(pending) if self.ecfg.overlap else None
      events = self._advance(pending.rows, self._read(pending))
      running = set(map(id, self.running))
      if self._pending is not None and not any(id(s) in running for s, _ in self._pending.rows):
        self._pending = None  # every row stopped in the window read: nothing to wait for
    self.stats.peak_blocks = max(self.stats.peak_blocks, self.ecfg.num_blocks - self.manager.num_free_blocks)
    self.stats.host_s += time.perf_counter() - start - self._device_s
    return events

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

  def _chunks(self, decoding: list[_Sequence]) -> list[tuple[_Sequence, int]]:
    """Prompt chunks (sequence, tokens) after the decode tokens, in admission order: at most
    prefill_rows chunks of at most prefill_chunk tokens, token_budget tokens in all."""
    budget = self.ecfg.token_budget - len(decoding)
    chunks: list[tuple[_Sequence, int]] = []
    for seq in self.running:
      if seq.unfed > 1 and budget > 0 and len(chunks) < self.ecfg.prefill_rows:
        take = min(seq.unfed, self.ecfg.prefill_chunk, budget)
        chunks.append((seq, take))
        budget -= take
    return chunks

  def _fits(self, targets: list[tuple[_Sequence, int]]) -> bool:
    """Whether the free blocks hold every sequence's slots up to its target count."""
    manager = self.manager
    need = 0
    for seq, target in targets:
      more = target - manager.num_tokens[seq.request.id]
      need += manager.blocks_needed(seq.request.id, more) if more > 0 else 0
    return need <= manager.num_free_blocks

  def _reserve(self, decoding: list[_Sequence], window: int) -> list[_Sequence]:
    """Slots for the tokens a window of T steps feeds each decoding sequence (its last token
    and the T - 1 it samples before the last), preempting the newest sequences when the pool
    runs out; applies the copy-on-write copies. Returns the sequences still running."""
    copies: list[tuple[int, int]] = []
    for seq in sorted(decoding, key=lambda s: s.admitted):
      target = len(seq.tokens) + window - 1
      while seq in self.running and self.manager.num_tokens[seq.request.id] < target:
        try:
          copies += self.manager.append(seq.request.id, target - self.manager.num_tokens[seq.request.id])
        except MemoryError:
          self._preempt(max(self.running, key=lambda s: s.admitted))
    self._copy(copies)
    return [s for s in decoding if s in self.running]

  def _copy(self, copies: list[tuple[int, int]]) -> None:
    """Applies the block manager's copy-on-write copies to the pools."""
    if copies:
      # numpy, not jnp: copy_pages checks the page ids on the host, and a device array would be copied back.
      src: Any
      dst: Any
      src, dst = (np.asarray(x, np.int32) for x in zip(*copies))
      layers = self.cfg.n_layers
      with self.place.context():
        self.k_pages_GPSK = paged_attention.copy_pages(self.k_pages_GPSK, src, dst, layers=layers)
        self.v_pages_GPSK = paged_attention.copy_pages(self.v_pages_GPSK, src, dst, layers=layers)

  def _continue(self, pending: _Pending) -> _Pending | None:
    """Dispatches the window after an unread one (host/device overlap), when the next step
    would be a window of the same rows anyway: nothing to admit, and every slot it needs free
    without preempting. It assumes no row stops in the unread window; a row that does is
    dropped when that window is read, and its tokens in this one are discarded. Rows that
    reach max_new_tokens in the unread window are left out."""
    if pending.kind != "window" or (self.waiting and len(self.running) < self.ecfg.max_batch):
      return None
    ahead, running = pending.steps, set(map(id, self.running))
    live = [(r, s) for r, (s, _) in enumerate(pending.rows) if id(s) in running]
    going = [(r, s) for r, s in live if s.request.max_new_tokens - s.generated - ahead > 0]
    # A row that frees up (max_new_tokens), or may (a stop id), lets a waiting request in: admit instead.
    if not going or (self.waiting and (len(going) < len(live) or any(s.request.stop_ids for _, s in live))):
      return None
    window = min(self.ecfg.decode_steps, min(s.request.max_new_tokens - s.generated - ahead for _, s in going))
    targets = [(s, len(s.tokens) + ahead + window - 1) for _, s in going]
    if not self._fits(targets):
      return None
    copies: list[tuple[int, int]] = []
    for seq, target in targets:
      copies += self.manager.append(seq.request.id, target - self.manager.num_tokens[seq.request.id])
    self._copy(copies)
    self.stats.overlapped += 1
    return self._window([s for _, s in going], window, after=pending)

  def _preempt(self, seq: _Sequence) -> None:
    """Frees the sequence's blocks; it waits at the front and is recomputed (prompt plus the
    tokens it generated) when admitted again."""
    self.manager.free_sequence(seq.request.id)
    self.running.remove(seq)
    seq.computed = 0
    self.waiting.appendleft(seq)
    self.stats.preemptions += 1

  def _advance(self, rows: list[tuple[_Sequence, int]], tokens_TB: np.ndarray) -> list[Event]:
    """Books what a call fed and streams what it sampled. Row r of the call fed `fed` tokens
    at its first step (a decode token, or a prompt chunk) and one at each later step of a
    window; tokens_TB[j, r] is what row r sampled at step j. A chunk that does not end its
    prompt samples nothing; a finished sequence's later tokens are discarded."""
    events = []
    running = set(map(id, self.running))  # a continuation's rows may have finished in the window before
    live = [(r, seq, fed) for r, (seq, fed) in enumerate(rows) if id(seq) in running]
    for j in range(tokens_TB.shape[0]):
      going = []
      for r, seq, fed in live:
        seq.computed += fed
        if seq.unfed:
          continue
        request, token = seq.request, int(tokens_TB[j, r])
        seq.tokens.append(token)
        finished = token in request.stop_ids or seq.generated == request.max_new_tokens
        events.append(Event(request.id, token, finished))
        if finished:
          self.manager.free_sequence(request.id)
          self.running.remove(seq)
          running.discard(id(seq))
          self._ids.discard(request.id)
        else:
          going.append((r, seq, 1))
      live = going
    if self.ecfg.prefix_caching:  # each block that filled up in this call
      size, hashes = self.ecfg.block_size, self.manager.prefix_hashes
      for seq, _ in rows:
        if id(seq) in running and seq.computed // size > len(hashes[seq.request.id]):
          self.manager.commit(seq.request.id, seq.tokens[: seq.computed])
    return events

  # ---- model calls

  def _packed(self, decoding: list[_Sequence], chunks: list[tuple[_Sequence, int]]) -> _Pending:
    """Dispatches one packed call: the decode rows [B, 1], then the chunks [B', T]; it
    samples one token [1, B + B'] per row."""
    seqs = decoding + [seq for seq, _ in chunks]
    pages = self._pages(seqs)
    groups: list[tuple[np.ndarray, ...]] = []
    placed: list[int] = []
    if decoding:
      rows = _quarters(len(decoding), self.ecfg.max_batch)
      groups.append(self._group([(s, 1) for s in decoding], rows, 1, pages))
      placed += range(len(decoding))
    if chunks:
      width = _quarters(max(take for _, take in chunks), self.ecfg.prefill_chunk)
      start = groups[0][0].shape[0] if groups else 0
      groups.append(self._group(chunks, _quarters(len(chunks), self.ecfg.prefill_rows), width, pages))
      placed += range(start, start + len(chunks))
    total = sum(g[0].shape[0] for g in groups)
    sample, sampled = self._sampling(seqs, placed, total, [0] * len(seqs))
    signature = ("packed", tuple(g[0].shape for g in groups), pages, sampled)
    self.stats.decode_steps += bool(decoding)
    self.stats.fed_tokens += len(decoding) + sum(take for _, take in chunks)
    self.stats.padded_tokens += sum(g[0].size for g in groups)
    rows_fed = [(s, 1) for s in decoding] + chunks
    return self._dispatch(
      "packed", rows_fed, placed, 1, signature, _packed_call, tuple(groups), sample, sampled=sampled
    )

  def _window(self, decoding: list[_Sequence], window: int, *, after: _Pending | None = None) -> _Pending:
    """Dispatches T decode steps of the sequences in one call ([T, max_batch] tokens). A
    continuation (`_continue`) starts where the unread window `after` ends: its tokens are
    that window's last ones, picked on the device."""
    pages = self._pages(decoding)
    rows, ahead = _quarters(len(decoding), self.ecfg.max_batch), 0 if after is None else after.steps
    feeds = [(s, 1) for s in decoding]
    tokens_B1, tables_BP, lengths_B, new_B = self._group(feeds, rows, 1, pages, ahead=ahead)
    sample, sampled = self._sampling(decoding, range(len(decoding)), rows, [ahead] * len(decoding))
    if after is None:  # the tokens as a window of one step: the same input a continuation has
      last_TB: Any = np.zeros((self.ecfg.decode_steps, self.ecfg.max_batch), np.int32)
      last_TB[0, :rows], last, columns_B = tokens_B1[:, 0], 1, np.arange(rows, dtype=np.int32)
    else:
      running = {id(s): r for r, (s, _) in enumerate(after.rows)}
      last_TB, last = after.out, after.steps
      columns_B = np.zeros(rows, np.int32)
      columns_B[: len(decoding)] = [after.placed[running[id(s)]] for s in decoding]
    signature = ("window", rows, pages, sampled)
    steps = np.asarray(window, np.int32)
    args = (last_TB, np.asarray(last, np.int32), columns_B, tables_BP, lengths_B, new_B, steps, sample)
    self.stats.decode_steps += window
    self.stats.fed_tokens += window * len(feeds)
    self.stats.padded_tokens += window * rows
    placed = list(range(len(decoding)))
    return self._dispatch(
      "window", feeds, placed, window, signature, _window_call, *args, sampled=sampled, window=self.ecfg.decode_steps
    )

  def _dispatch(
    self, kind: str, rows: list, placed: list[int], steps: int, signature: tuple, fn: Any, *args: Any, **static: Any
  ) -> _Pending:
    """Dispatches a jitted call over the pools (donated and replaced) without waiting for it;
    a call that compiles is timed here."""
    inputs = jax.tree.map(lambda x: self.place.host(x) if isinstance(x, np.ndarray) else x, args)
    programs = _programs(fn)
    start = time.perf_counter()
    with self.place.context():
      out, self.k_pages_GPSK, self.v_pages_GPSK = fn(
        self.params, self.k_pages_GPSK, self.v_pages_GPSK, *inputs, cfg=self.cfg, **static
      )
    new = signature not in self._signatures
    self._signatures.add(signature)
    self.stats.shapes = len(self._signatures)
    if new if programs is None else (_programs(fn) or 0) > programs:
      self.stats.compiles += 1
      self.stats.compile_s += time.perf_counter() - start
      self._device_s += time.perf_counter() - start
    self.stats.model_calls += 1
    return _Pending(kind, rows, np.asarray(placed), steps, out)

  def _read(self, pending: _Pending) -> np.ndarray:
    """Waits for a call's tokens (model time) and copies them to the host (transfer time):
    [T, len(rows)] in the rows' order."""
    start = time.perf_counter()
    jax.block_until_ready(pending.out)
    ready = time.perf_counter()
    tokens = self.place.fetch(pending.out)
    done = time.perf_counter()
    self.stats.model_s += ready - start
    self.stats.transfer_s += done - ready
    self._device_s += done - start
    return tokens[: pending.steps, pending.placed]

  def _pages(self, seqs: list[_Sequence]) -> int:
    """The call's block-table width: the longest table rounded up to a power of two, at least
    MIN_PAGES (reading a few unused slots costs less than a program per short width)."""
    longest = max(len(self.manager.tables[s.request.id]) for s in seqs)
    return _bucket(longest, self.max_pages, MIN_PAGES)

  def _group(
    self,
    feeds: list[tuple[_Sequence, int]],
    rows: int,
    width: int,
    pages: int,
    *,
    ahead: int = 0,
  ) -> tuple[np.ndarray, ...]:
    """Host arrays of one group of a call: tokens [B, T], tables [B, P], lengths [B] and new
    tokens [B] (0 on padded rows), feeding each sequence `count` tokens from its first unfed
    (`ahead` tokens further on, whose ids the host does not know yet: their tokens stay 0)."""
    tokens_BT = np.zeros((rows, width), np.int32)
    tables_BP = np.zeros((rows, pages), np.int32)
    lengths_B, new_B = np.zeros(rows, np.int32), np.zeros(rows, np.int32)
    for row, (seq, count) in enumerate(feeds):
      table = self.manager.tables[seq.request.id]
      if not ahead:
        tokens_BT[row, :count] = seq.tokens[seq.computed : seq.computed + count]
      tables_BP[row, : len(table)] = table
      lengths_B[row], new_B[row] = seq.computed + ahead, count
    return tokens_BT, tables_BP, lengths_B, new_B

  def _sampling(
    self, seqs: list[_Sequence], placed: Iterable[int], rows: int, ahead: list[int]
  ) -> tuple[_Sampling | None, bool]:
    """The call's per-row sampling settings (sequence i at row placed[i], its next token
    ahead[i] past those booked) and whether any row samples; None when every row is greedy
    (fewer inputs to hand the device)."""
    if all(seq.request.temperature == 0 for seq in seqs):
      return None, False
    sample = _Sampling(
      np.zeros((rows, *self._key_shape), np.uint32),
      np.zeros(rows, np.int32),
      np.zeros(rows, np.float32),
      np.full(rows, self.cfg.vocab_size, np.int32),
      np.full(rows, 2.0, np.float32),
    )
    for seq, row, skip in zip(seqs, placed, ahead):
      r = seq.request
      sample.generated_B[row] = seq.generated + skip
      if r.temperature > 0:
        assert seq.key_data is not None
        sample.key_data_B[row] = seq.key_data
        sample.temperature_B[row] = r.temperature
        sample.top_k_B[row] = self.cfg.vocab_size if r.top_k is None else r.top_k
        sample.top_p_B[row] = 2.0 if r.top_p is None else r.top_p
    return sample, True


def _programs(fn: Any) -> int | None:
  """Programs a jitted function has compiled in this process (None where jax does not say)."""
  size = getattr(fn, "_cache_size", None)
  return None if size is None else size()


def _quarters(count: int, cap: int) -> int:
  """count (<= cap) rounded up to a multiple of a quarter of cap: a call's rows or chunk width
  take one of four sizes, so a trace compiles a handful of programs, and padding adds at most
  a quarter of cap."""
  quarter = -(-cap // 4)
  return min(cap, -(-count // quarter) * quarter)


def _bucket(count: int, cap: int, floor: int = 1) -> int:
  """count rounded up to a power of two, at least floor and at most cap (count <= cap)."""
  return min(cap, max(floor, 1 << (count - 1).bit_length()))


def _choose(sample: _Sampling | None, logits_BV: jax.Array, step: Any, sampled: bool) -> jax.Array:
  """Each row's next token: argmax, or (some row samples) `ops.sampling.select_rows` with row
  r's key fold_in(key(seed_r), generated_r + step)."""
  if sample is None or not sampled:
    return jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)  # = select at T=0
  keys_B = jax.vmap(jax.random.fold_in)(jax.random.wrap_key_data(sample.key_data_B), sample.generated_B + step)
  return sampling.select_rows(keys_B, logits_BV, sample.temperature_B, sample.top_k_B, sample.top_p_B)


@functools.partial(jax.jit, static_argnames=("cfg", "sampled"), donate_argnums=(1, 2))
def _packed_call(params, k_pages_GPSK, v_pages_GPSK, groups, sample, *, cfg, sampled):
  """One packed model call (`llama.PackedPagedKVCache`) over groups of (tokens [B, T], tables,
  lengths, new); unembeds only each row's last new token. Returns the next tokens [1, B] of
  the groups' rows in order, and the pools."""
  rows = tuple(llama.PagedRows(tables, lengths, new, tokens.shape[1]) for tokens, tables, lengths, new in groups)
  tokens_1N = jnp.concatenate([tokens.reshape(-1) for tokens, *_ in groups])[None]
  state = llama.PackedPagedKVCache(k_pages_GPSK, v_pages_GPSK, rows)
  hidden_1ND, after = llama.forward_hidden(params, tokens_1N, cfg, state=state)
  assert isinstance(after, llama.PackedPagedKVCache)
  last, start = [], 0
  for tokens, _, _, new in groups:
    rows_, width = tokens.shape
    last.append(start + jnp.arange(rows_) * width + jnp.maximum(new - 1, 0))
    start += rows_ * width
  logits_1BV = llama.unembed(params, hidden_1ND[:, jnp.concatenate(last)], cfg)
  return _choose(sample, logits_1BV[0], 0, sampled)[None], after.k_pages_GPSK, after.v_pages_GPSK


@functools.partial(jax.jit, static_argnames=("cfg", "sampled", "window"), donate_argnums=(1, 2))
def _window_call(
  params,
  k_pages_GPSK,
  v_pages_GPSK,
  last_TB,
  last,
  columns_B,
  tables_BP,
  lengths_B,
  new_B,
  steps,
  sample,
  *,
  cfg,
  sampled,
  window,
):
  """`steps` (<= window, traced) decode steps in one loop on the device: row r starts from
  token last_TB[last - 1, columns_B[r]] (the previous window's output, or the host's tokens
  as a window of one step; max_batch columns, so any two windows chain through one
  program), and step j feeds each row's token at slot lengths + j and samples the next.
  Padded rows (new 0) write nothing. Returns the sampled tokens [window, max_batch] (rows past B and
  steps past `steps` are 0) and the pools."""
  token_B = last_TB[last - 1][columns_B]
  rows = token_B.shape[0]

  def body(j, carry):
    token_B, k_pages, v_pages, out_TB = carry
    state = llama.PagedKVCache(k_pages, v_pages, tables_BP, lengths_B + j * new_B)
    hidden_B1D, after = llama.forward_hidden(params, token_B[:, None], cfg, state=state, num_new_B=new_B)
    assert isinstance(after, llama.PagedKVCache)
    token_B = _choose(sample, llama.unembed(params, hidden_B1D, cfg)[:, 0], j, sampled)
    return token_B, after.k_pages_GPSK, after.v_pages_GPSK, out_TB.at[j, :rows].set(token_B)

  init = (token_B, k_pages_GPSK, v_pages_GPSK, jnp.zeros((window, last_TB.shape[1]), jnp.int32))
  _, k_pages_GPSK, v_pages_GPSK, out_TB = jax.lax.fori_loop(0, steps, body, init)
  return out_TB, k_pages_GPSK, v_pages_GPSK


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
