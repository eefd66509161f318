"""Block manager of the paged KV cache: a randomized check against a simulated pool, the
prefix cache, LRU eviction, block hashes and error cases."""

import collections
import copy
import hashlib
import random

import numpy as np
import pytest

from paperjax.models.serving import blocks

POISON = "free"  # what a free block's slots hold in the simulated pool: reading it is a bug


def _state(mgr):
  return copy.deepcopy(vars(mgr))


def _assert_unchanged(mgr, before):
  after = vars(mgr)
  for name, value in before.items():
    assert after[name] == value, f"{name} changed by a failed operation"


class _Model:
  """An independent model of what the manager must guarantee.

  Each live sequence has the list of tokens it has written; slot i of a sequence holds
  the K/V of its prefix tokens[: i + 1], simulated as that tuple. The pool maps a block to
  its block_size slot values; the copies that `append` returns are applied to it and each
  sequence writes its new slots through its block table.
  """

  def __init__(self, mgr):
    self.mgr = mgr
    self.bs = mgr.block_size
    self.tokens = {}  # seq_id -> tokens written
    self.pool = {b: [POISON] * self.bs for b in range(mgr.num_blocks)}

  def write(self, seq_id, start):
    table, tokens = self.mgr.block_table(seq_id), self.tokens[seq_id]
    for i in range(start, len(tokens)):
      self.pool[table[i // self.bs]][i % self.bs] = tuple(tokens[: i + 1])

  def read(self, seq_id):
    table = self.mgr.block_table(seq_id)
    return [self.pool[table[i // self.bs]][i % self.bs] for i in range(len(self.tokens[seq_id]))]

  def holders(self):
    return collections.Counter(b for s in self.tokens for b in self.mgr.block_table(s))

  def check(self):
    mgr = self.mgr
    assert set(mgr.tables) == set(self.tokens) == set(mgr.num_tokens)
    held = self.holders()
    free, evictable = list(mgr.free), list(mgr.evictable)
    assert len(free) == len(set(free)), f"duplicates in the free list: {free}"
    assert not set(free) & set(evictable)
    assert not set(free) & set(held), f"free blocks {set(free) & set(held)} are in a block table"
    assert not set(evictable) & set(held), f"evictable blocks {set(evictable) & set(held)} are in a block table"
    assert len(free) + len(evictable) + len(held) == mgr.num_blocks
    assert mgr.num_free_blocks == len(free) + len(evictable)
    for b in range(mgr.num_blocks):
      assert mgr.ref_counts[b] == held[b], f"block {b}: ref count {mgr.ref_counts[b]}, held by {held[b]} tables"
    # The prefix cache: one block per prefix and one prefix per block; free blocks are uncached.
    assert {b: h for h, b in mgr.cached.items()} == mgr.hash_of
    assert set(evictable) <= set(mgr.hash_of)
    assert not set(free) & set(mgr.hash_of)
    for s, tokens in self.tokens.items():
      assert mgr.num_tokens[s] == len(tokens)
      assert len(mgr.tables[s]) == -(-len(tokens) // self.bs)
      expected = [tuple(tokens[: i + 1]) for i in range(len(tokens))]
      assert self.read(s) == expected, f"sequence {s} reads content it did not write"
    for b in free:  # a free block's content is garbage from here on
      self.pool[b] = [POISON] * self.bs


def _random_prompt(rng, history, bs):
  if history and rng.random() < 0.6:  # share a prefix with an earlier sequence
    base = rng.choice(history)
    prompt = base[: rng.randint(0, len(base))] + [rng.randint(0, 2) for _ in range(rng.randint(0, bs + 1))]
  else:
    prompt = [rng.randint(0, 2) for _ in range(rng.randint(1, 3 * bs))]
  return prompt or [rng.randint(0, 2)]


NUM_OPS = 300
NUM_BLOCKS = 16


@pytest.mark.parametrize("seed", range(5))
def test_random_operations_keep_invariants_and_content(seed):
  rng = random.Random(seed)
  bs = 1 + seed % 4
  mgr = blocks.BlockManager(num_blocks=NUM_BLOCKS, block_size=bs)
  model = _Model(mgr)
  history, next_id = [], 0
  seen = collections.Counter()
  for _ in range(NUM_OPS):
    free_weight = 2 if mgr.num_free_blocks > NUM_BLOCKS // 4 else 8  # a full pool mostly fails
    op = rng.choices(["allocate", "append", "fork", "commit", "free"], weights=[4, 3, 2, 2, free_weight])[0]
    live = sorted(model.tokens)
    if op != "allocate" and not live:
      op = "allocate"
    before = _state(mgr)
    if op == "allocate":
      prompt = _random_prompt(rng, history, bs)
      hits = mgr.cached_prefix(prompt)
      needed = -(-len(prompt) // bs) - len(hits)
      available = len(mgr.free) + len(mgr.evictable) - sum(b in mgr.evictable for b in hits)
      try:
        cached_tokens = mgr.allocate(next_id, prompt)
      except MemoryError:
        assert needed > available, "allocate failed although enough blocks were free"
        _assert_unchanged(mgr, before)
        seen["memory_error"] += 1
      else:
        assert needed <= available
        assert cached_tokens % bs == 0 and 0 <= cached_tokens < len(prompt)
        seen["hit"] += cached_tokens > 0
        model.tokens[next_id] = list(prompt)
        model.write(next_id, cached_tokens)  # only the uncached slots are computed
        history.append(list(prompt))
        next_id += 1
    elif op == "append":
      seq = rng.choice(live)
      count = rng.randint(1, 2 * bs)
      table, used = mgr.block_table(seq), len(model.tokens[seq])
      shared = used % bs != 0 and model.holders()[table[-1]] > 1
      needed = -(-(used + count) // bs) - len(table) + shared
      try:
        copies = mgr.append(seq, count)
      except MemoryError:
        assert needed > mgr.num_free_blocks, "append failed although enough blocks were free"
        _assert_unchanged(mgr, before)
        seen["memory_error"] += 1
      else:
        new_table = mgr.block_table(seq)
        if shared:
          assert copies == [(table[-1], new_table[len(table) - 1])]
          seen["copy"] += 1
        else:
          assert copies == []
        assert new_table[: len(table) - 1] == table[: len(table) - 1]
        for src, dst in copies:
          model.pool[dst] = list(model.pool[src])
        model.tokens[seq] += [rng.randint(0, 2) for _ in range(count)]
        model.write(seq, used)
        history.append(list(model.tokens[seq]))
    elif op == "fork":
      parent = rng.choice(live)
      mgr.fork(parent, next_id)
      model.tokens[next_id] = list(model.tokens[parent])
      next_id += 1
    elif op == "commit":
      seq = rng.choice(live)
      k = rng.randint(0, len(model.tokens[seq]))
      mgr.commit(seq, model.tokens[seq][:k])
      # Every full block of the committed tokens is now cached (under this or another block).
      assert len(mgr.cached_prefix([*model.tokens[seq][:k], 0])) == k // bs
    else:
      seq = rng.choice(live)
      mgr.free_sequence(seq)
      del model.tokens[seq]
    seen["evict"] += len(before["cached"]) > len(mgr.cached)
    model.check()
  # The run exercised what it checks.
  assert seen["memory_error"] > 0 and seen["hit"] > 0 and seen["evict"] > 0, seen
  if bs > 1:
    assert seen["copy"] > 0, seen


# ---- prefix cache


def _committed(mgr, seq_id, tokens):
  mgr.allocate(seq_id, tokens)
  mgr.commit(seq_id, tokens)
  return mgr.block_table(seq_id)


def test_prompts_differing_in_a_block_last_token_share_only_earlier_blocks():
  mgr = blocks.BlockManager(num_blocks=16, block_size=4)
  a = list(range(1, 14))  # 3 full blocks and one token
  table_a = _committed(mgr, "a", a)
  b = list(a)
  b[7] = 99  # the last token of block 1
  assert len(mgr.cached_prefix(b)) == 1
  assert mgr.allocate("b", b) == 4
  table_b = mgr.block_table("b")
  assert table_b[0] == table_a[0]
  assert not set(table_b[1:]) & set(table_a)
  assert mgr.ref_counts[table_a[0]] == 2 and mgr.ref_counts[table_a[1]] == 1


def test_one_token_longer_prompt_reuses_every_full_block():
  mgr = blocks.BlockManager(num_blocks=16, block_size=4)
  prompt = list(range(1, 13))  # exactly 3 blocks
  table_a = _committed(mgr, "a", prompt)
  assert mgr.allocate("b", [*prompt, 50]) == 12
  table_b = mgr.block_table("b")
  assert table_b[:3] == table_a
  assert table_b[3] not in table_a


@pytest.mark.parametrize("num_full", [1, 2, 3])
def test_prompt_of_whole_blocks_never_comes_whole_from_the_cache(num_full):
  mgr = blocks.BlockManager(num_blocks=16, block_size=4)
  prompt = list(range(1, 4 * num_full + 1))
  table_a = _committed(mgr, "a", prompt)
  assert len(mgr.cached) == num_full
  cached_tokens = mgr.allocate("b", prompt)
  assert cached_tokens == 4 * (num_full - 1) < len(prompt)
  table_b = mgr.block_table("b")
  assert table_b[:-1] == table_a[:-1]
  assert table_b[-1] != table_a[-1]  # the last block is computed again, into a fresh block


# ---- LRU eviction


def test_freed_cached_blocks_become_evictable_and_are_evicted_last_used_first():
  mgr = blocks.BlockManager(num_blocks=6, block_size=2)
  a = _committed(mgr, "a", [1, 2, 0])  # block a[0] cached, a[1] partial
  d = _committed(mgr, "d", [3, 4, 0])
  mgr.free_sequence("a")
  mgr.free_sequence("d")
  assert list(mgr.evictable) == [a[0], d[0]]
  never_cached = set(range(6)) - {a[0], d[0]}
  assert set(mgr.free) == never_cached
  assert mgr.num_free_blocks == 6
  assert mgr.cached_prefix([1, 2, 0]) == [a[0]] and mgr.cached_prefix([3, 4, 0]) == [d[0]]

  # A hit on a's prefix makes its block the most recently used.
  assert mgr.allocate("e", [1, 2, 7]) == 2
  assert a[0] not in mgr.evictable
  mgr.free_sequence("e")
  assert list(mgr.evictable) == [d[0], a[0]]

  # Fresh blocks come from the never-cached free list first ...
  cached_before = dict(mgr.cached)
  mgr.allocate("f", [9] * 8)  # 4 blocks: the whole free list
  assert set(mgr.block_table("f")) == never_cached
  assert mgr.cached == cached_before and list(mgr.evictable) == [d[0], a[0]]
  # ... then the least recently used cached block is evicted and its prefix forgotten.
  mgr.allocate("g", [8])
  assert mgr.block_table("g") == [d[0]]
  assert d[0] not in mgr.hash_of and mgr.cached_prefix([3, 4, 0]) == []
  assert mgr.cached_prefix([1, 2, 0]) == [a[0]]
  assert list(mgr.evictable) == [a[0]]


def test_an_evictable_hit_is_reused_and_not_counted_as_free_space():
  mgr = blocks.BlockManager(num_blocks=2, block_size=2)
  a = _committed(mgr, "a", [1, 2, 3])
  mgr.free_sequence("a")
  assert list(mgr.evictable) == [a[0]] and list(mgr.free) == [a[1]]
  assert mgr.allocate("b", [1, 2, 5]) == 2
  assert mgr.block_table("b") == a and not mgr.evictable and not mgr.free
  mgr.free_sequence("b")
  mgr.allocate("x", [9])  # takes the never-cached block
  assert mgr.block_table("x") == [a[1]]
  # The hit is the only block left, and the prompt needs one more.
  assert mgr.num_free_blocks == 1 and not mgr.can_allocate([1, 2, 5])
  before = _state(mgr)
  with pytest.raises(MemoryError, match="tokens"):
    mgr.allocate("c", [1, 2, 5])
  _assert_unchanged(mgr, before)
  assert mgr.can_allocate([1, 2])  # no hit (the last token is computed), so the cached block is evicted
  assert mgr.allocate("c", [1, 2]) == 0
  assert mgr.block_table("c") == [a[0]] and not mgr.cached and not mgr.hash_of


def test_a_hit_is_not_evicted_to_make_room_for_its_own_prompt():
  mgr = blocks.BlockManager(num_blocks=4, block_size=2)
  a = _committed(mgr, "a", [1, 2, 3])
  d = _committed(mgr, "d", [5, 6, 7])
  mgr.free_sequence("a")
  mgr.free_sequence("d")
  mgr.allocate("x", [9, 9, 9])  # the two never-cached blocks
  assert not mgr.free and list(mgr.evictable) == [a[0], d[0]]
  # The hit a[0] is the least recently used block; the fresh block must evict d[0] instead.
  assert mgr.allocate("b", [1, 2, 5]) == 2
  assert mgr.block_table("b") == [a[0], d[0]]
  assert mgr.ref_counts[a[0]] == mgr.ref_counts[d[0]] == 1 and not mgr.evictable
  assert mgr.cached_prefix([1, 2, 0]) == [a[0]] and mgr.cached_prefix([5, 6, 0]) == []


def test_freeing_a_sequence_makes_its_tail_the_first_to_be_evicted():
  mgr = blocks.BlockManager(num_blocks=4, block_size=2)
  c = _committed(mgr, "c", [1, 2, 3, 4, 5])  # two cached blocks and a partial one
  mgr.free_sequence("c")
  assert list(mgr.evictable) == [c[1], c[0]]
  mgr.allocate("x", [9] * 5)  # the two free blocks, then one eviction
  assert c[1] in mgr.block_table("x") and c[0] not in mgr.block_table("x")
  assert mgr.cached_prefix([1, 2, 3, 4, 5]) == [c[0]]


# ---- block_hash


def test_block_hash_is_sha256_of_parent_and_int32_tokens():
  parent = hashlib.sha256(b"some parent").digest()
  tokens = [0, 1, 2**31 - 1, 70000, 5]
  expected = hashlib.sha256(parent + np.asarray(tokens, "<i4").tobytes()).digest()
  assert blocks.block_hash(parent, tokens) == expected
  for same in (tuple(tokens), np.array(tokens, np.int64), np.array(tokens, np.int32)):  # any container or dtype
    assert blocks.block_hash(parent, same) == expected, same
  assert blocks.block_hash(blocks.ROOT_HASH, tokens) != expected
  assert blocks.block_hash(parent, [1, 0, 2**31 - 1, 70000, 5]) != expected
  assert len(expected) == 32


# ---- errors


def test_prompt_larger_than_the_pool_raises_memory_error_naming_tokens():
  mgr = blocks.BlockManager(num_blocks=3, block_size=4)
  before = _state(mgr)
  with pytest.raises(MemoryError, match="tokens"):
    mgr.allocate("a", list(range(13)))
  _assert_unchanged(mgr, before)
  mgr.allocate("a", list(range(12)))  # exactly the pool fits


def test_full_pool_raises_memory_error_and_leaves_state_unchanged():
  mgr = blocks.BlockManager(num_blocks=3, block_size=2)
  mgr.allocate("a", [1, 2, 3])
  mgr.fork("a", "b")
  before = _state(mgr)
  with pytest.raises(MemoryError, match="tokens"):
    mgr.allocate("c", [1, 2, 3])
  _assert_unchanged(mgr, before)
  with pytest.raises(MemoryError):
    mgr.append("a", 3)  # copy-on-write of the shared last block plus one more block
  _assert_unchanged(mgr, before)
  assert mgr.append("a", 1) == [(mgr.block_table("b")[1], mgr.block_table("a")[1])]


def test_bad_arguments_raise_and_leave_state_unchanged():
  mgr = blocks.BlockManager(num_blocks=4, block_size=2)
  mgr.allocate("a", [1, 2, 3])
  before = _state(mgr)
  with pytest.raises(ValueError, match="tokens"):
    mgr.allocate("b", [])
  with pytest.raises(ValueError, match="'a'"):
    mgr.allocate("a", [1])
  with pytest.raises(ValueError, match="'a'"):
    mgr.fork("a", "a")
  for count in (0, -1):
    with pytest.raises(ValueError, match="count"):
      mgr.append("a", count)
  with pytest.raises(ValueError, match="tokens"):
    mgr.commit("a", [1, 2, 3, 4])  # more tokens than the sequence's slots
  _assert_unchanged(mgr, before)


@pytest.mark.parametrize(
  "call",
  [
    lambda m: m.append("ghost", 1),
    lambda m: m.fork("ghost", "child"),
    lambda m: m.commit("ghost", [1]),
    lambda m: m.free_sequence("ghost"),
    lambda m: m.block_table("ghost"),
  ],
  ids=["append", "fork", "commit", "free_sequence", "block_table"],
)
def test_unknown_sequence_raises_key_error_naming_it(call):
  mgr = blocks.BlockManager(num_blocks=4, block_size=2)
  mgr.allocate("a", [1, 2, 3])
  before = _state(mgr)
  with pytest.raises(KeyError, match="ghost"):
    call(mgr)
  _assert_unchanged(mgr, before)


def test_committed_blocks_are_hashed_once_and_never_recached_under_other_tokens():
  mgr = blocks.BlockManager(num_blocks=8, block_size=2)
  mgr.allocate("a", [5, 6, 7, 8, 9])
  mgr.allocate("b", [5, 6, 7, 8, 9])  # no hits yet: b's blocks are its own
  mgr.commit("a", [5, 6])
  mgr.commit("b", [5, 6, 7, 8])  # b's block 0 stays uncached (a's holds [5, 6]); block 1 is cached
  before = _state(mgr)
  with pytest.raises(ValueError, match=r"tokens: expected the tokens of 'b'.* got 1 at index 0 where it has 5"):
    mgr.commit("b", [1, 1, 7, 8])  # tokens b did not write: refused, nothing changes
  _assert_unchanged(mgr, before)
  assert mgr.cached_prefix([1, 1, 0]) == []  # b's block 0 holds [5, 6], not [1, 1]


def test_a_block_left_uncached_takes_over_its_prefix_after_the_holder_is_evicted():
  mgr = blocks.BlockManager(num_blocks=4, block_size=2)
  mgr.allocate("a", [5, 6, 1])
  mgr.allocate("b", [5, 6, 2])  # computed concurrently: no hit
  mgr.commit("a", [5, 6])
  mgr.commit("b", [5, 6])  # [5, 6] is cached under a's block; b's stays out
  a0, b0 = mgr.block_table("a")[0], mgr.block_table("b")[0]
  mgr.free_sequence("a")  # a's blocks: the cached one evictable, the other free
  mgr.allocate("c", [9, 9, 9])  # takes the free block, then evicts a0
  assert mgr.cached_prefix([5, 6, 0]) == []
  mgr.commit("b", [5, 6, 2])
  assert mgr.cached_prefix([5, 6, 0]) == [b0] != [a0]
