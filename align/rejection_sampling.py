"""Rejection sampling (Llama 2/3 post-training): best-of-Y samples per prompt by reward.

Shapes: B prompts, Y sampled responses per prompt (the argument `k`, the papers' K), T prompt
width, N new tokens, L layers, S cache slots, G kv heads, K head dim, V vocabulary.

Each prompt is prefilled once; its KV cache is then repeated Y times and the Y samples
decode from the shared prefix (vLLM-style prefix sharing, here by copying the cache).
Llama only: the repeat is written for its `KVCache`.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp

from paperjax.models.serving import generate
from paperjax.models.transformer import llama

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
  """prompt[:len] + completion[:len] per row, right-padded to T + N; returns (tokens, lengths)."""
  batch = prompts_BT.shape[0]
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
  """Samples k completions per prompt from a shared prefill and keeps the argmax reward."""
  prompts_BT = jnp.asarray(prompts_BT)
  prompt_lengths_B = jnp.asarray(prompt_lengths_B, jnp.int32)
  stop_ids = generate.check_args(cfg, prompts_BT, prompt_lengths_B, max_new_tokens, stop_ids, temperature, top_k, top_p)
  if not isinstance(k, int) or k < 1:
    raise ValueError(f"k: expected an int >= 1, got {k!r}")
  samples, lengths = _sample(
    key, params, prompts_BT, prompt_lengths_B, cfg, k, max_new_tokens, stop_ids, float(temperature), top_k, top_p
  )
  rewards = reward_fn(jnp.repeat(prompts_BT, k, axis=0), jnp.repeat(prompt_lengths_B, k), samples, lengths)
  batch = prompts_BT.shape[0]
  samples_BYN = samples.reshape(batch, k, -1)
  lengths_BY, rewards_BY = lengths.reshape(batch, k), rewards.reshape(batch, k)
  best_B = jnp.argmax(rewards_BY, axis=1)
  rows = jnp.arange(batch)
  return Samples(
    samples_BYN[rows, best_B], lengths_BY[rows, best_B], rewards_BY[rows, best_B], samples_BYN, lengths_BY, rewards_BY
  )


@functools.partial(jax.jit, static_argnums=(4, 5, 6, 7, 8, 9, 10))
def _sample(key, params, prompts_BT, prompt_lengths_B, cfg, k, max_new_tokens, stop_ids, temperature, top_k, top_p):
  capacity = prompts_BT.shape[1] + max_new_tokens
  logits_BV, cache = llama.prefill(params, prompts_BT, cfg, lengths_B=prompt_lengths_B, capacity=capacity)
  repeat = lambda x, axis: jnp.repeat(x, k, axis=axis)
  cache = llama.KVCache(repeat(cache.k_LBSGK, 1), repeat(cache.v_LBSGK, 1), repeat(cache.lengths_B, 0))
  return generate.decode(
    key, params, cfg, cache, repeat(logits_BV, 0), max_new_tokens, stop_ids, temperature, top_k, top_p
  )
