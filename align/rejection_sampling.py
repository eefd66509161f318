"""Rejection sampling (Llama 2/3 post-training): best-of-Y samples per prompt by reward.

Shapes: B prompts, Y sampled responses per prompt (the argument `k`, the papers' K), T prompt
width, N new tokens (or page copies), L layers, S page slots, G kv heads, K head dim, V vocabulary,
P pages (a block table's entries).

Each prompt is prefilled once into pages of a paged KV cache (`models.serving.blocks`,
`ops.paged_attention`); the block manager then forks it Y times, so the Y samples read one
copy of the prompt's full pages, and only the partly filled last page is copied (copy on
write) before they decode (vLLM's parallel sampling). Llama only: its `PagedKVCache`.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from paperjax.models.serving import blocks, generate
from paperjax.models.transformer import llama
from paperjax.ops import checks, paged_attention

PAGE_SIZE = 16

# (prompts_BT, prompt_lengths_B, completions_BN, completion_lengths_B) -> rewards_B
RewardFn = Callable[[jax.Array, jax.Array, jax.Array, jax.Array], jax.Array]


class Samples(NamedTuple):
  best_BN: jax.Array  # the highest-reward completion of each prompt
  best_lengths_B: jax.Array
  best_rewards_B: jax.Array
  samples_BYN: jax.Array
  lengths_BY: jax.Array
  rewards_BY: jax.Array


def concat(prompts_BT, prompt_lengths_B, completions_BN, completion_lengths_B) -> tuple[jax.Array, jax.Array]:
  """prompt[:len] + completion[:len] per row, right-padded to T + N; returns (tokens, lengths).

  Value checks (prompt lengths in 1 .. T, completion lengths in 0 .. N) run on concrete inputs,
  or inside `ops.checks.checked`."""
  checks.check_array("prompts_BT", prompts_BT, 2, integer=True, shape="[B, T]")
  checks.check_array("completions_BN", completions_BN, 2, integer=True, shape="[B, N]")
  batch = prompts_BT.shape[0]
  if completions_BN.shape[0] != batch:
    raise ValueError(f"completions_BN: expected {batch} rows like prompts_BT, got shape {completions_BN.shape}")
  prompt_lengths_B = checks.check_lengths(prompt_lengths_B, batch, prompts_BT.shape[1], name="prompt_lengths_B")
  completion_lengths_B = checks.check_lengths(
    completion_lengths_B, batch, completions_BN.shape[1], name="completion_lengths_B", low=0
  )
  out = jnp.pad(prompts_BT, ((0, 0), (0, completions_BN.shape[1])))
  slots = prompt_lengths_B[:, None] + jnp.arange(completions_BN.shape[1])
  out = out.at[jnp.arange(batch)[:, None], slots].set(completions_BN, mode="drop")
  return out, prompt_lengths_B + completion_lengths_B


def best_of_k(
  key: jax.Array,
  params: dict,
  cfg: llama.LlamaConfig,
  prompts_BT: jax.Array,
  prompt_lengths_B: jax.Array,
  reward_fn: RewardFn,
  *,
  k: int,
  max_new_tokens: int,
  stop_ids: Sequence[int] = (),
  temperature: float = 1.0,
  top_k: int | None = None,
  top_p: float | None = None,
) -> Samples:
  """Samples k completions per prompt from a shared prefill and keeps the argmax reward.

  `reward_fn` must return finite float rewards [B * k] (a NaN would win the argmax)."""
  if not isinstance(cfg, llama.LlamaConfig):
    raise TypeError(f"cfg: expected a llama.LlamaConfig (paged sampling is Llama's), got {type(cfg).__name__}")
  prompts_BT = jnp.asarray(prompts_BT)
  prompt_lengths_B = jnp.asarray(prompt_lengths_B)
  stop_ids = generate.check_args(cfg, prompts_BT, prompt_lengths_B, max_new_tokens, stop_ids, temperature, top_k, top_p)
  prompt_lengths_B = prompt_lengths_B.astype(jnp.int32)
  _check_k(k)
  pages = shared_pages(np.asarray(prompt_lengths_B).tolist(), k, max_new_tokens, PAGE_SIZE)
  arrays = tuple(
    jnp.asarray(x) for x in (pages.prompt_tables_BP, pages.sample_tables_BP, pages.copy_src_N, pages.copy_dst_N)
  )
  samples, lengths = _sample(
    key,
    params,
    prompts_BT,
    prompt_lengths_B,
    arrays,
    cfg,
    k,
    max_new_tokens,
    stop_ids,
    float(temperature),
    top_k,
    top_p,
    pages.num_pages,
  )
  rewards = reward_fn(jnp.repeat(prompts_BT, k, axis=0), jnp.repeat(prompt_lengths_B, k), samples, lengths)
  batch = prompts_BT.shape[0]
  checks.check_array("reward_fn", rewards, 1, shape=f"[B * k] = [{batch * k}] rewards")
  if not jnp.issubdtype(rewards.dtype, jnp.floating):
    raise TypeError(f"reward_fn: expected float rewards, got {rewards.dtype}")
  if tuple(rewards.shape) != (batch * k,):
    raise ValueError(f"reward_fn: expected rewards [B * k] = [{batch * k}], got shape {tuple(rewards.shape)}")
  checks.check_finite("reward_fn", rewards)
  samples_BYN = samples.reshape(batch, k, -1)
  lengths_BY, rewards_BY = lengths.reshape(batch, k), rewards.reshape(batch, k)
  best_B = jnp.argmax(rewards_BY, axis=1)
  rows = jnp.arange(batch)
  return Samples(
    samples_BYN[rows, best_B], lengths_BY[rows, best_B], rewards_BY[rows, best_B], samples_BYN, lengths_BY, rewards_BY
  )


def shared_pages(prompt_lengths: Sequence[int], k: int, max_new_tokens: int, page_size: int) -> SharedPages:
  """Block tables for k forked samples of each prompt: the prompt's pages (prefilled once) and
  each sample's own pages for its new tokens, with the copy-on-write copies to make first."""
  _check_pages_args(prompt_lengths, k, max_new_tokens, page_size)
  manager = blocks.BlockManager(
    num_blocks=pages_needed(prompt_lengths, k, max_new_tokens, page_size), block_size=page_size
  )
  copies: list[tuple[int, int]] = []
  for b, length in enumerate(prompt_lengths):
    manager.allocate(b, range(length))  # token values do not matter: nothing is prefix-cached here
  prompt_tables = [manager.block_table(b) for b in range(len(prompt_lengths))]
  for b in range(len(prompt_lengths)):
    for y in range(k):
      manager.fork(b, (b, y))
    manager.free_sequence(b)  # the samples hold the prompt's pages now
    for y in range(k):
      copies += manager.append((b, y), max_new_tokens)
  width = max(len(t) for t in manager.tables.values())
  table = lambda rows: np.array([row + [0] * (width - len(row)) for row in rows], np.int32)
  sample_tables = [manager.block_table((b, y)) for b in range(len(prompt_lengths)) for y in range(k)]
  src, dst = (np.array(x, np.int32).reshape(-1) for x in zip(*copies)) if copies else (np.zeros(0, np.int32),) * 2
  return SharedPages(manager.num_blocks, table(prompt_tables), table(sample_tables), src, dst)


def pages_needed(prompt_lengths: Sequence[int], k: int, max_new_tokens: int, page_size: int) -> int:
  """Pool pages for shared sampling: each prompt's pages once, plus each sample's pages past the
  prompt's full pages (its copy of a partly filled last page, and its new tokens), less one
  per partly filled last page: the last sample to fork writes the original."""
  _check_pages_args(prompt_lengths, k, max_new_tokens, page_size)
  return sum(
    -(-n // page_size) + k * (-(-(n + max_new_tokens) // page_size) - n // page_size) - (n % page_size > 0)
    for n in prompt_lengths
  )


def _check_k(k) -> None:
  if not checks.is_int(k) or k < 1:
    raise ValueError(f"k: expected an int >= 1, got {k!r}")


def _check_pages_args(prompt_lengths: Sequence[int], k: int, max_new_tokens: int, page_size: int) -> None:
  lengths = list(prompt_lengths)
  if not lengths or not all(checks.is_int(n) and n >= 1 for n in lengths):
    raise ValueError(f"prompt_lengths: expected a non-empty sequence of ints >= 1, got {prompt_lengths!r}")
  _check_k(k)
  if not checks.is_int(max_new_tokens) or max_new_tokens < 1:
    raise ValueError(f"max_new_tokens: expected an int >= 1, got {max_new_tokens!r}")
  if not checks.is_int(page_size) or page_size < 1:
    raise ValueError(f"page_size: expected an int >= 1, got {page_size!r}")


class SharedPages(NamedTuple):
  num_pages: int
  prompt_tables_BP: np.ndarray  # int32, padded with 0
  sample_tables_BP: np.ndarray  # int32 [B * Y, P], the samples of prompt b at rows b * Y .. b * Y + Y - 1
  copy_src_N: np.ndarray  # copy-on-write: page src -> dst before decoding
  copy_dst_N: np.ndarray


@functools.partial(jax.jit, static_argnums=(5, 6, 7, 8, 9, 10, 11, 12))
def _sample(
  key,
  params,
  prompts_BT,
  prompt_lengths_B,
  pages_arrays,
  cfg,
  k,
  max_new_tokens,
  stop_ids,
  temperature,
  top_k,
  top_p,
  num_pages,
):
  prompt_tables_BP, sample_tables_BP, src_N, dst_N = pages_arrays
  k_pages, v_pages = llama.init_pages(cfg, num_pages, PAGE_SIZE)
  empty = llama.PagedKVCache(k_pages, v_pages, prompt_tables_BP, jnp.zeros_like(prompt_lengths_B))
  logits_BTV, prompt_cache = llama.forward(params, prompts_BT, cfg, state=empty, num_new_B=prompt_lengths_B)
  assert isinstance(prompt_cache, llama.PagedKVCache)
  logits_BV = logits_BTV[jnp.arange(prompts_BT.shape[0]), prompt_lengths_B - 1]
  k_pages, v_pages = (
    paged_attention.copy_pages(p, src_N, dst_N, layers=cfg.n_layers)
    for p in (prompt_cache.k_pages_GPSK, prompt_cache.v_pages_GPSK)
  )
  cache = llama.PagedKVCache(k_pages, v_pages, sample_tables_BP, jnp.repeat(prompt_lengths_B, k))
  return generate.decode(
    key, params, cfg, cache, jnp.repeat(logits_BV, k, axis=0), max_new_tokens, stop_ids, temperature, top_k, top_p
  )
