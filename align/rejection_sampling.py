"""Rejection sampling: Llama 2/3's best-of-Y samples per prompt by reward, and RSO's statistical
rejection sampling from the optimal policy.

Shapes: B prompts, Y sampled responses per prompt (the argument `k`, the papers' K), T prompt
width, N new tokens (or page copies), L layers, S page slots, G kv heads, K head dim, V vocabulary,
P pages (a block table's entries).

RSO (Liu et al. 2023, arXiv 2309.06657): from Y samples of the SFT policy per prompt and their
rewards, `rso_accept` draws samples of the optimal-policy estimate
pi*(y|x) ∝ pi_sft(y|x) exp(r(x, y) / beta) by the paper's Algorithm 1, and `rso_pairs` makes
one (chosen, rejected) preference pair of each prompt's accepted samples.

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


# ---- RSO: statistical rejection sampling (arXiv 2309.06657) ----


class Accepted(NamedTuple):
  accepted_BY: jax.Array  # bool: the samples Algorithm 1 accepted
  round_BY: jax.Array  # int32: the pass over the candidates that accepted each sample (from 0), -1 where none did


class RSOPairs(NamedTuple):
  chosen_B: jax.Array  # int32 index in [0, Y): the highest-reward accepted sample; -1 where not valid_B
  rejected_B: jax.Array  # int32: the lowest-reward accepted sample; -1 where not valid_B
  valid_B: jax.Array  # bool: 2 or more samples accepted, with different rewards
  accepted_BY: jax.Array
  round_BY: jax.Array

  @property
  def pairs(self) -> jax.Array:
    """int32 [B, 2]: (chosen, rejected) indices into each prompt's Y samples."""
    return jnp.stack([self.chosen_B, self.rejected_B], axis=1)


def rso_accept(
  key: jax.Array, rewards_BY: jax.Array, *, num_samples: int, beta: float, valid_BY: jax.Array | None = None
) -> Accepted:
  """Statistical rejection sampling (RSO's Algorithm 1): num_samples of each prompt's Y SFT samples,
  drawn without replacement towards pi*(y|x) ∝ pi_sft(y|x) exp(r(x, y) / beta).

  Each pass over the samples not yet accepted computes their max reward r_max and accepts
  each in turn with probability exp((r - r_max) / beta) (so the best remaining one always),
  stopping as soon as num_samples are accepted; passes repeat until then (at most
  num_samples passes). The visiting order is a random permutation of each prompt's samples,
  drawn from `key` once and kept for every pass: the paper walks them in their given order,
  which for i.i.d. samples is such an order, and the permutation makes beta -> inf a uniform
  choice of num_samples whatever order the caller's samples are in. beta -> 0 keeps the
  num_samples best. Samples with valid_BY False (bool [B, Y], default all valid; e.g. a
  failed generation) are never accepted and their rewards never read; a prompt with fewer
  valid samples than num_samples accepts them all.

  Checks rewards (float [B, Y], finite where valid), num_samples (1 .. Y) and beta (> 0, finite)
  eagerly; the sampling is one jitted program."""
  rewards_BY, valid_BY = _check_rso(rewards_BY, num_samples, beta, valid_BY)
  accepted_BY, round_BY = _rso_accept(key, rewards_BY, valid_BY, jnp.float32(beta), num_samples)
  return Accepted(accepted_BY, round_BY)


def rso_pairs(
  key: jax.Array, rewards_BY: jax.Array, *, beta: float, num_samples: int = 2, valid_BY: jax.Array | None = None
) -> RSOPairs:
  """One preference pair per prompt from RSO's accepted samples (`rso_accept`): chosen = the
  accepted sample of highest reward, rejected = the one of lowest (with num_samples = 2, the two
  accepted ones ranked by reward; ties go to the lower index).

  The paper pairs its 8 accepted samples up and labels each pair with a pairwise reward-ranking
  model; this keeps one pair per prompt ranked by the given pointwise rewards. valid_B is False
  for a prompt with fewer than 2 accepted samples (fewer than 2 valid ones) or whose accepted
  rewards are all equal (no preference); its indices are -1, so select rows with valid_B first."""
  rewards_BY, valid_BY = _check_rso(rewards_BY, num_samples, beta, valid_BY)
  if num_samples < 2:
    raise ValueError(f"num_samples: expected an int >= 2 (a pair needs two accepted samples), got {num_samples}")
  accepted_BY, round_BY = _rso_accept(key, rewards_BY, valid_BY, jnp.float32(beta), num_samples)
  chosen_B, rejected_B, valid_B = _rank_pairs(rewards_BY, valid_BY, accepted_BY)
  return RSOPairs(chosen_B, rejected_B, valid_B, accepted_BY, round_BY)


def _check_rso(rewards_BY, num_samples, beta, valid_BY) -> tuple[jax.Array, jax.Array]:
  checks.check_array("rewards_BY", rewards_BY, 2, shape="[B, Y]")
  if not jnp.issubdtype(rewards_BY.dtype, jnp.floating):
    raise TypeError(f"rewards_BY: expected float rewards [B, Y], got {rewards_BY.dtype}")
  num_samples = checks.check_int("num_samples", num_samples, 1, rewards_BY.shape[1])
  checks.check_scalar("beta", beta, checks.Range(low=0, low_open=True))
  if valid_BY is None:
    valid_BY = np.ones(rewards_BY.shape, bool)
  checks.check_array("valid_BY", valid_BY, 2, shape="[B, Y]")
  if valid_BY.dtype != jnp.bool_:
    raise TypeError(f"valid_BY: expected a bool mask [B, Y] (True at usable samples), got {valid_BY.dtype}")
  if tuple(valid_BY.shape) != tuple(rewards_BY.shape):
    raise ValueError(f"valid_BY: expected shape {tuple(rewards_BY.shape)} like rewards_BY, got {tuple(valid_BY.shape)}")
  xp, (r_BY, v_BY) = checks.on_host(rewards_BY, valid_BY)
  checks.check_finite("rewards_BY", xp.where(v_BY, r_BY, 0.0))  # a NaN would never be accepted, or always
  return jnp.asarray(rewards_BY), jnp.asarray(valid_BY)


@jax.jit
def _rank_pairs(rewards_BY, valid_BY, accepted_BY):
  r_BY = jnp.where(valid_BY, rewards_BY.astype(jnp.float32), 0.0)
  chosen_B = jnp.argmax(jnp.where(accepted_BY, r_BY, -jnp.inf), axis=1)
  rejected_B = jnp.argmin(jnp.where(accepted_BY, r_BY, jnp.inf), axis=1)
  rows = jnp.arange(r_BY.shape[0])
  valid_B = (accepted_BY.sum(axis=1) >= 2) & (r_BY[rows, chosen_B] > r_BY[rows, rejected_B])
  chosen_B, rejected_B = (jnp.where(valid_B, i, -1).astype(jnp.int32) for i in (chosen_B, rejected_B))
  return chosen_B, rejected_B, valid_B


@functools.partial(jax.jit, static_argnums=4)
def _rso_accept(key, rewards_BY, valid_BY, beta, num_samples):
  batch, width = rewards_BY.shape
  order_key, pass_key = jax.random.split(key)
  order_BY = jnp.argsort(jax.random.uniform(order_key, (batch, width)), axis=1)  # each prompt's visiting order
  # In visiting order from here on: a pass's early stop is then a cumulative count along Y.
  r_BY = jnp.take_along_axis(jnp.where(valid_BY, rewards_BY.astype(jnp.float32), 0.0), order_BY, axis=1)
  remaining_BY = jnp.take_along_axis(valid_BY, order_BY, axis=1)

  def one_pass(i, carry):
    remaining_BY, round_BY = carry
    need_B = num_samples - jnp.sum(round_BY >= 0, axis=1)
    top_B = jnp.max(jnp.where(remaining_BY, r_BY, -jnp.inf), axis=1, keepdims=True)
    u_BY = jax.random.uniform(jax.random.fold_in(pass_key, i), (batch, width))
    # The best remaining sample gets exp(0) whatever beta: a beta that rounds (or flushes) to 0 in
    # float32 would make its (r - r_max) / beta = 0 / 0 = NaN and accept nothing.
    log_p_BY = jnp.where(remaining_BY & (r_BY < top_B), (r_BY - top_B) / beta, 0.0)
    passes_BY = remaining_BY & (u_BY < jnp.exp(log_p_BY))
    take_BY = passes_BY & (jnp.cumsum(passes_BY, axis=1) <= need_B[:, None])
    return remaining_BY & ~take_BY, jnp.where(take_BY, i, round_BY)

  # Each pass accepts the best remaining sample, so num_samples passes always suffice.
  start = (remaining_BY, jnp.full((batch, width), -1, jnp.int32))
  _, round_BY = jax.lax.fori_loop(0, num_samples, one_pass, start)
  round_BY = jnp.take_along_axis(round_BY, jnp.argsort(order_BY, axis=1), axis=1)  # back to the given order
  return round_BY >= 0, round_BY
