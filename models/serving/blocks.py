"""The block manager of a paged KV cache: which pool pages each sequence owns (vLLM).

Host-side bookkeeping with explicit state, no device arrays: the engine asks it for pages
and applies what it returns (page copies) to the pool (`ops.paged_attention`).

- A pool of `num_blocks` blocks (pages) of `block_size` tokens. A sequence's block table
  lists its blocks in token order: token i lives in block table[i // block_size].
- Reference counts: a block is referenced once per table that holds it. `fork` lets a child
  share every block of its parent (parallel samples read one copy of the prompt).
- Copy-on-write: before a sequence writes into a block that another table also holds (a
  shared, partly filled last block), the block is copied to a fresh one; `append` returns
  the (source, destination) copies the caller must make in the pool before writing.
- Prefix cache: a full block is identified by hash(parent block's hash, its tokens), a
  SHA-256 of the bytes (never Python's `hash()`, which is salted per process and collides by
  design), so a hit means the whole prefix up to and including the block is identical.
  `commit` registers a sequence's full blocks once their K/V are written; `allocate` reuses
  cached blocks for a new prompt's leading full blocks. A cached block whose count drops to 0
  stays in the cache, evictable in LRU order; a fresh allocation takes a never-cached free
  block first, then evicts the least recently used cached one.
- Conservation: every block is exactly one of free, cached-and-unreferenced (evictable), or
  referenced by at least one table.
Operations that cannot be satisfied raise (MemoryError when blocks run out) and leave the
state unchanged.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
from collections.abc import Hashable, Sequence

import numpy as np

ROOT_HASH = bytes(32)  # the parent hash of a sequence's first block


def block_hash(parent: bytes, tokens: Sequence[int]) -> bytes:
  """SHA-256 of the parent block's hash and the block's token ids (int32 little-endian)."""
  ids = np.asarray(tokens)
  if ids.size and (not np.issubdtype(ids.dtype, np.integer) or ids.min() < -(2**31) or ids.max() >= 2**31):
    # a cast to int32 would truncate 1.7 to 1 or wrap 2^32 to 0: two prompts could share a prefix hash
    raise ValueError(f"tokens: expected int32 token ids, got {ids.dtype} {_show(ids)}")
  return hashlib.sha256(parent + ids.astype("<i4").tobytes()).digest()


def _check_ids(tokens: Sequence[int]) -> list[int]:
  """tokens as a list of python ints, each a token id in [0, 2^31)."""
  ids = np.asarray(tokens)
  if ids.ndim != 1 or (ids.size and not np.issubdtype(ids.dtype, np.integer)):
    raise ValueError(f"tokens: expected int32 token ids, got {ids.dtype} {_show(ids)} of shape {ids.shape}")
  if ids.size and (ids.min() < 0 or ids.max() >= 2**31):
    raise ValueError(f"tokens: expected int32 token ids >= 0, got {_show(ids[(ids < 0) | (ids >= 2**31)])}")
  return ids.tolist()


def _show(ids: np.ndarray) -> str:
  return str(ids.ravel()[:6].tolist())[:-1] + (", ...]" if ids.size > 6 else "]")


@dataclasses.dataclass
class BlockManager:
  """Free list, block tables, reference counts and the prefix cache (module docstring)."""

  num_blocks: int
  block_size: int
  # The state below is built by __post_init__ and the operations, never passed in (init=False):
  # a free list handed to the constructor could list a block twice.
  free: collections.deque[int] = dataclasses.field(default_factory=collections.deque, init=False)
  ref_counts: list[int] = dataclasses.field(default_factory=list, init=False)
  tables: dict[Hashable, list[int]] = dataclasses.field(default_factory=dict, init=False)
  num_tokens: dict[Hashable, int] = dataclasses.field(default_factory=dict, init=False)  # slots reserved per sequence
  cached: dict[bytes, int] = dataclasses.field(default_factory=dict, init=False)  # prefix hash -> block
  hash_of: dict[int, bytes] = dataclasses.field(default_factory=dict, init=False)  # block -> prefix hash
  evictable: collections.OrderedDict[int, None] = dataclasses.field(default_factory=collections.OrderedDict, init=False)
  # Per sequence: the prefix hashes of its leading full blocks that `commit` (or a prefix hit)
  # has computed, so each commit hashes only the blocks filled since.
  prefix_hashes: dict[Hashable, list[bytes]] = dataclasses.field(default_factory=dict, init=False)
  # Per sequence: the tokens known so far (the prompt, extended by commits); a commit must agree
  # with them, or its hashes would name K/V computed for other tokens.
  known_tokens: dict[Hashable, list[int]] = dataclasses.field(default_factory=dict, init=False)

  def __post_init__(self):
    for name in ("num_blocks", "block_size"):
      value = getattr(self, name)
      if not isinstance(value, (int, np.integer)) or isinstance(value, (bool, np.bool_)) or value < 1:
        raise ValueError(f"{name}: expected an int >= 1, got {type(value).__name__} {value!r}")
    self.ref_counts = [0] * self.num_blocks
    self.free.extend(range(self.num_blocks))

  # ---- queries

  @property
  def num_free_blocks(self) -> int:
    """Blocks an allocation can take: free plus evictable cached ones."""
    return len(self.free) + len(self.evictable)

  def blocks_for(self, num_tokens: int) -> int:
    if not isinstance(num_tokens, (int, np.integer)) or isinstance(num_tokens, (bool, np.bool_)) or num_tokens < 0:
      raise ValueError(f"num_tokens: expected an int >= 0, got {type(num_tokens).__name__} {num_tokens!r}")
    return -(-num_tokens // self.block_size)

  def block_table(self, seq_id: Hashable) -> list[int]:
    return list(self._table(seq_id))

  def cached_prefix(self, tokens: Sequence[int]) -> list[int]:
    """The cached blocks of tokens' leading full blocks, stopping at the first miss; never
    the whole prompt (its last token must be computed to get the next-token logits)."""
    return self._prefix_hits(tokens)[0]

  def _prefix_hits(self, tokens: Sequence[int]) -> tuple[list[int], list[bytes]]:
    blocks: list[int] = []
    hashes: list[bytes] = []
    for start in range(0, len(tokens) - 1 - (len(tokens) - 1) % self.block_size, self.block_size):
      prefix = block_hash(hashes[-1] if hashes else ROOT_HASH, tokens[start : start + self.block_size])
      if prefix not in self.cached:
        break
      blocks.append(self.cached[prefix])
      hashes.append(prefix)
    return blocks, hashes

  def can_allocate(self, tokens: Sequence[int]) -> bool:
    hits = self.cached_prefix(tokens)
    reused_evictable = sum(b in self.evictable for b in hits)
    return self.blocks_for(len(tokens)) - len(hits) <= self.num_free_blocks - reused_evictable

  # ---- operations

  def allocate(self, seq_id: Hashable, tokens: Sequence[int]) -> int:
    """Blocks for a new sequence's prompt `tokens`; returns how many leading tokens already
    have their K/V in the pool (prefix-cache hits, a multiple of block_size, < len(tokens))."""
    if seq_id in self.tables:
      raise ValueError(f"seq_id: {seq_id!r} already has blocks")
    if len(tokens) < 1:
      raise ValueError("tokens: expected a non-empty prompt")
    tokens = _check_ids(tokens)
    if self.blocks_for(len(tokens)) > self.num_blocks:
      raise MemoryError(
        f"tokens: a {len(tokens)}-token prompt needs {self.blocks_for(len(tokens))} blocks, "
        f"the pool has {self.num_blocks} in all"
      )
    if not self.can_allocate(tokens):
      raise MemoryError(f"tokens: not enough free blocks for {len(tokens)} tokens ({self.num_free_blocks} free)")
    hits, hashes = self._prefix_hits(tokens)
    for block in hits:
      self._ref(block)
    self.tables[seq_id] = hits + [self._take() for _ in range(self.blocks_for(len(tokens)) - len(hits))]
    self.num_tokens[seq_id] = len(tokens)
    self.prefix_hashes[seq_id] = hashes
    self.known_tokens[seq_id] = tokens
    return len(hits) * self.block_size

  def append(self, seq_id: Hashable, count: int = 1) -> list[tuple[int, int]]:
    """Reserves slots for `count` more tokens of a sequence; returns the (src, dst) block
    copies to make first (copy-on-write of a shared, partly filled last block)."""
    table, used = self._table(seq_id), self.num_tokens[seq_id]
    if not isinstance(count, (int, np.integer)) or isinstance(count, (bool, np.bool_)) or count < 1:
      raise ValueError(f"count: expected an int >= 1, got {count!r}")
    shared = self._shared_tail(seq_id)
    needed = self.blocks_needed(seq_id, count)
    if needed > self.num_free_blocks:
      raise MemoryError(f"seq_id: {seq_id!r} needs {needed} more blocks, {self.num_free_blocks} free")
    copies = []
    if shared:
      fresh = self._take()
      copies.append((table[-1], fresh))
      self._unref(table[-1])
      table[-1] = fresh
    table.extend(self._take() for _ in range(self.blocks_for(used + count) - len(table)))
    self.num_tokens[seq_id] = used + count
    return copies

  def blocks_needed(self, seq_id: Hashable, count: int) -> int:
    """Free blocks `append(seq_id, count)` takes: new blocks, plus a copy of a shared,
    partly filled last block."""
    table = self._table(seq_id)
    return self.blocks_for(self.num_tokens[seq_id] + count) - len(table) + self._shared_tail(seq_id)

  def _shared_tail(self, seq_id: Hashable) -> bool:
    table = self._table(seq_id)
    return self.num_tokens[seq_id] % self.block_size != 0 and self.ref_counts[table[-1]] > 1

  def fork(self, parent: Hashable, child: Hashable) -> None:
    """The child shares every block of the parent (copy-on-write later)."""
    if child in self.tables:
      raise ValueError(f"child: {child!r} already has blocks")
    table = self._table(parent)
    for block in table:
      self._ref(block)
    self.tables[child] = list(table)
    self.num_tokens[child] = self.num_tokens[parent]
    self.prefix_hashes[child] = list(self.prefix_hashes[parent])
    self.known_tokens[child] = list(self.known_tokens[parent])

  def commit(self, seq_id: Hashable, tokens: Sequence[int]) -> None:
    """Registers the full blocks of `tokens` (the sequence's tokens whose K/V are written) in
    the prefix cache. Blocks hashed by earlier commits keep their hashes (tokens only extend
    them). A block whose prefix another block holds stays uncached (one block per prefix),
    and takes the prefix at a later commit if that block was evicted meanwhile."""
    table = self._table(seq_id)
    if len(tokens) > self.num_tokens[seq_id]:
      raise ValueError(f"tokens: {len(tokens)} exceed the {self.num_tokens[seq_id]} slots of {seq_id!r}")
    tokens = _check_ids(tokens)
    known = self.known_tokens[seq_id]
    agree = min(len(known), len(tokens))
    if tokens[:agree] != known[:agree]:
      first = next(i for i in range(agree) if tokens[i] != known[i])
      raise ValueError(
        f"tokens: expected the tokens of {seq_id!r} (its prompt and earlier commits), got {tokens[first]} at index "
        f"{first} where it has {known[first]}"
      )
    hashes = list(self.prefix_hashes[seq_id])
    for i in range(len(hashes), len(tokens) // self.block_size):
      hashes.append(
        block_hash(hashes[-1] if hashes else ROOT_HASH, tokens[i * self.block_size : (i + 1) * self.block_size])
      )
    for i, prefix in enumerate(hashes):  # all checked before any is registered
      if self.hash_of.get(table[i], prefix) != prefix:
        raise ValueError(f"tokens: block {i} of {seq_id!r} is cached under another prefix")
    for block, prefix in zip(table, hashes):  # a block left out while another held its prefix may take it now
      if block not in self.hash_of and prefix not in self.cached:
        self.cached[prefix] = block
        self.hash_of[block] = prefix
    self.prefix_hashes[seq_id] = hashes
    if len(tokens) > len(known):
      self.known_tokens[seq_id] = tokens

  def free_sequence(self, seq_id: Hashable) -> None:
    """Drops a sequence's references (finished or preempted); unreferenced blocks go back to
    the free list, or stay cached as evictable."""
    for block in reversed(self._table(seq_id)):  # the tail first, so LRU evicts it first
      self._unref(block)
    del self.tables[seq_id], self.num_tokens[seq_id], self.prefix_hashes[seq_id], self.known_tokens[seq_id]

  # ---- internals

  def _table(self, seq_id: Hashable) -> list[int]:
    try:
      return self.tables[seq_id]
    except KeyError:
      raise KeyError(f"seq_id: no sequence {seq_id!r}") from None

  def _take(self) -> int:
    if self.free:
      block = self.free.popleft()
    else:
      block, _ = self.evictable.popitem(last=False)  # the least recently used cached block
      del self.cached[self.hash_of.pop(block)]
    self.ref_counts[block] = 1
    return block

  def _ref(self, block: int) -> None:
    self.evictable.pop(block, None)
    self.ref_counts[block] += 1

  def _unref(self, block: int) -> None:
    self.ref_counts[block] -= 1
    if self.ref_counts[block] == 0:
      if block in self.hash_of:
        self.evictable[block] = None
      else:
        self.free.append(block)
