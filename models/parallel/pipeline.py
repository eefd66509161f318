"""GPipe pipeline parallelism over a `pipe` mesh axis: training, prefill and decode.

Shapes: N micro-batches (chunks of the batch), B rows (of the batch, or of one
micro-batch), T time, D model width, L layers, V vocabulary, S cache slots, G kv heads,
K head dim. (In GPipe's formulas below, S counts stages instead.)

In GPipe's notation below, the pipeline has S stages (mesh axis `pipe`) and M = N
micro-batches. The scan-stacked layers [L, ...] are split into S stages by sharding their leading axis
over `pipe` (`sharding.RULES["pp"]`: stage s holds layers s L/S .. (s + 1) L/S - 1; the
[S, L/S, ...] view costs nothing). Inside `jax.shard_map`, tick t = 0 .. M + S - 2 runs
micro-batch m = t - s on stage s when 0 <= m < M:

  stage 0 reads micro-batch t; stage s > 0 reads what stage s - 1 produced at tick t - 1
  (`lax.ppermute` one stage forward); stage S - 1 writes output m.

So each stage idles S - 1 of its M + S - 1 ticks: the bubble (S - 1) / (M + S - 1). The
backward pass is the transpose of this scan (ppermute's transpose sends cotangents one
stage back), run after the whole forward: GPipe's schedule, with each stage's weight
gradients accumulated over the M micro-batches before the optimizer step. Data
parallelism composes on the `data` axis: each data shard pipelines its own rows.

Inference (Llama 3 405B's recipe, pipeline across nodes): prefill and decode pipeline
micro-batches of rows the same way; each stage keeps the KV cache of its own layers and
updates the rows of the micro-batch it runs. Micro-batch m holds rows m, M + m, 2M + m,
... (a reshape [B] -> [B / M, M] that keeps each data shard's rows local).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec

from paperjax.models import sharding
from paperjax.models.training import lm
from paperjax.models.training.train import TrainConfig
from paperjax.models.transformer import llama
from paperjax.ops import checks, norms

StageFn = Callable[[Any, jax.Array, Any, Any], tuple[jax.Array, Any]]
RULES = sharding.RULES["pp"]


def gpipe(
  stage_fn: StageFn,
  layers: Any,
  x_NBTD: jax.Array,
  mesh: Mesh,
  *,
  extras: Any = None,
  state: Any = None,
) -> tuple[jax.Array, Any, jax.Array]:
  """Runs M micro-batches through S = mesh.shape["pipe"] stages of `layers`.

  stage_fn(stage_layers, x_BTD, extras, state) -> (x_BTD, state) is one stage's work on
  one micro-batch: its layers [L / S, ...], the micro-batch's rows, its slice of `extras`
  and of `state`. `layers` has leaves [L, ...]; `extras` (per micro-batch inputs such as
  positions) has leaves [N, B, ...]; `state` (per layer and micro-batch, such as KV
  caches) has leaves [L, N, B, ...] and is updated only where a stage ran a real
  micro-batch. Rows are split over `data`.

  Returns (the last stage's outputs [N, B, T, D], the state, busy [S]: how many of its
  M + S - 1 ticks each stage ran a real micro-batch).
  """
  S, M = mesh.shape["pipe"], x_NBTD.shape[0]
  n_layers = jax.tree.leaves(layers)[0].shape[0]
  if n_layers % S:
    raise ValueError(f"mesh: axis 'pipe' of size {S} does not divide the {n_layers} layers")
  if mesh.shape["fsdp"] > 1 or mesh.shape["tensor"] > 1:
    raise ValueError(f"mesh: the pipeline composes with data parallelism only; got {dict(mesh.shape)}")
  rows = PartitionSpec(None, "data")
  state_spec = PartitionSpec("pipe", None, "data")

  def per_stage(layers, x_NBTD, extras, state):
    stage = jax.lax.axis_index("pipe")
    # Marked device-varying once here, so the backward sums their cotangents once (over the
    # data shards, over the stages) after the loop, instead of in every tick.
    layers = jax.lax.pcast(layers, "data", to="varying")
    x_NBTD = jax.lax.pcast(x_NBTD, "pipe", to="varying")

    def tick(carry, t):
      inbox_BTD, out_NBTD, state = carry
      m = t - stage
      real = (m >= 0) & (m < M)
      mc = jnp.clip(m, 0, M - 1)
      x_BTD = jnp.where(stage == 0, x_NBTD[mc], inbox_BTD)
      state_m = jax.tree.map(lambda s: s[:, mc], state)
      y_BTD, new_m = stage_fn(layers, x_BTD, jax.tree.map(lambda e: e[mc], extras), state_m)
      state = jax.tree.map(lambda s, new, old: s.at[:, mc].set(jnp.where(real, new, old)), state, new_m, state_m)
      out_NBTD = out_NBTD.at[mc].set(jnp.where(real & (stage == S - 1), y_BTD, out_NBTD[mc]))
      inbox_BTD = jax.lax.ppermute(y_BTD, "pipe", [(i, i + 1) for i in range(S - 1)])
      return (inbox_BTD, out_NBTD, state), real

    init = (jnp.zeros_like(x_NBTD[0]), jnp.zeros_like(x_NBTD), state)
    (_, out_NBTD, state), real_ticks = jax.lax.scan(tick, init, jnp.arange(M + S - 1))
    y_NBTD = jax.lax.psum(jnp.where(stage == S - 1, out_NBTD, 0), "pipe")  # the last stage's, everywhere
    return y_NBTD, state, real_ticks.sum(dtype=jnp.int32)[None]

  run = jax.shard_map(
    per_stage,
    mesh=mesh,
    in_specs=(PartitionSpec("pipe"), rows, rows, state_spec),
    out_specs=(rows, state_spec, PartitionSpec("pipe")),
  )
  return run(layers, x_NBTD, extras, state)


def to_micro(x_B: jax.Array, n_micro: int) -> jax.Array:
  """[B, ...] -> [N, B / N, ...]: micro-batch m holds rows m, N + m, 2N + m, ..."""
  return jnp.swapaxes(x_B.reshape(x_B.shape[0] // n_micro, n_micro, *x_B.shape[1:]), 0, 1)


def from_micro(x_NB: jax.Array) -> jax.Array:
  """The inverse of `to_micro`."""
  return jnp.swapaxes(x_NB, 0, 1).reshape(-1, *x_NB.shape[2:])


def _check_micro(batch: int, n_micro: int, mesh: Mesh) -> None:
  if n_micro < 1 or batch % n_micro:
    raise ValueError(f"n_micro: expected a divisor of the batch {batch}, got {n_micro}")
  if (batch // n_micro) % mesh.shape["data"]:
    raise ValueError(
      f"mesh: axis 'data' of size {mesh.shape['data']} does not divide the {batch // n_micro} rows of a micro-batch"
    )


def loss(params: dict, batch: lm.Batch, cfg: llama.LlamaConfig, mesh: Mesh, n_micro: int) -> jax.Array:
  """`lm.loss_fn` with the layers pipelined over n_micro micro-batches."""
  llama.check_params(params, cfg)
  lm.check_batch(batch, cfg)
  tokens_BT = jnp.asarray(batch.tokens_BT)
  _check_micro(tokens_BT.shape[0], n_micro, mesh)
  micro = functools.partial(to_micro, n_micro=n_micro)
  x_BTD = params["embed"][tokens_BT].astype(cfg.dtype)
  extras = (micro(jnp.asarray(batch.positions_BT)), micro(jnp.asarray(batch.segment_ids_BT)))

  def stage(layers, x_BTD, extras, state):
    positions_BT, segments_BT = extras
    return llama.run_layers(layers, x_BTD, cfg, positions_BT=positions_BT, segment_ids_BT=segments_BT)[0], state

  y_NBTD, _, _ = gpipe(stage, params["layers"], micro(x_BTD), mesh, extras=extras)
  hidden_BTD = norms.rms_norm(from_micro(y_NBTD), params["final_norm"].astype(cfg.dtype), cfg.norm_eps)
  return lm.masked_nll(llama.unembed(params, hidden_BTD, cfg), batch)


def training(
  key: jax.Array,
  cfg: llama.LlamaConfig,
  tcfg: TrainConfig,
  mesh: Mesh,
  n_micro: int,
  *,
  params: dict | None = None,
) -> lm.ShardedTraining:
  """A Llama training run pipelined over mesh axis `pipe` (and data-parallel over `data`):
  the state is sharded by `RULES` (each stage holds its layers and their Adam moments),
  and one step runs the GPipe schedule over n_micro micro-batches. `params` (optional)
  start the run instead of `llama.init(key)`."""
  _check_micro(tcfg.batch_size, n_micro, mesh)
  return lm.laid_out(key, cfg, tcfg, mesh, RULES, lambda p, batch: loss(p, batch, cfg, mesh, n_micro), params=params)


def _cached(params, tokens_BT, cache, num_new_B, cfg, mesh, n_micro):
  """Hidden states [B, T, D] after the final norm and the cache after tokens_BT, pipelined."""
  _check_micro(tokens_BT.shape[0], n_micro, mesh)
  micro = functools.partial(to_micro, n_micro=n_micro)
  x_BTD = params["embed"][tokens_BT].astype(cfg.dtype)
  kv = (jax.vmap(micro)(cache.k_LBSGK), jax.vmap(micro)(cache.v_LBSGK))  # [L, N, B / N, S, G, K]

  def stage(layers, x_BTD, extras, kv):
    lengths_B, new_B = extras
    y_BTD, kv_cache = llama.run_layers(
      layers, x_BTD, cfg, state=llama.KVCache(kv[0], kv[1], lengths_B), num_new_B=new_B
    )
    assert kv_cache is not None
    return y_BTD, (kv_cache.k_LBSGK, kv_cache.v_LBSGK)

  y_NBTD, (k, v), _ = gpipe(
    stage, params["layers"], micro(x_BTD), mesh, extras=(micro(cache.lengths_B), micro(num_new_B)), state=kv
  )
  hidden_BTD = norms.rms_norm(from_micro(y_NBTD), params["final_norm"].astype(cfg.dtype), cfg.norm_eps)
  cache = llama.KVCache(jax.vmap(from_micro)(k), jax.vmap(from_micro)(v), cache.lengths_B + num_new_B)
  return hidden_BTD, cache


def prefill(
  params: dict,
  tokens_BT: jax.Array,
  cfg: llama.LlamaConfig,
  mesh: Mesh,
  n_micro: int,
  *,
  lengths_B: jax.Array | None = None,
  capacity: int | None = None,
) -> tuple[jax.Array, llama.KVCache]:
  """`llama.prefill` pipelined: n_micro micro-batches of rows flow through the stages.

  Returns the float32 logits [B, V] after each row's last real token and the KV cache
  [L, B, C, G, K], whose layers stay on their stages. Checks params, ids and lengths
  (1 .. T) on the host, then runs one jitted program."""
  llama.check_params(params, cfg)
  batch, time = checks.check_tokens(tokens_BT, cfg.vocab_size)
  lengths_B = jnp.full((batch,), time, jnp.int32) if lengths_B is None else checks.check_lengths(lengths_B, batch, time)
  capacity = time if capacity is None else capacity
  if not time <= capacity <= cfg.max_seq_len:
    raise ValueError(f"capacity: expected T={time} .. max_seq_len={cfg.max_seq_len}, got {capacity}")
  _check_micro(batch, n_micro, mesh)
  return _prefill(params, tokens_BT, lengths_B, cfg, mesh, n_micro, capacity)


@functools.partial(jax.jit, static_argnames=("cfg", "mesh", "n_micro", "capacity"))
def _prefill(params, tokens_BT, lengths_B, cfg, mesh, n_micro, capacity):
  batch = tokens_BT.shape[0]
  empty = llama.init_state(cfg, batch, capacity)
  hidden_BTD, cache = _cached(params, tokens_BT, empty, lengths_B, cfg, mesh, n_micro)
  last_B1D = hidden_BTD[jnp.arange(batch), lengths_B - 1][:, None]
  return llama.unembed(params, last_B1D, cfg)[:, 0], cache


def decode(
  params: dict, token_B: jax.Array, cache: llama.KVCache, cfg: llama.LlamaConfig, mesh: Mesh, n_micro: int
) -> tuple[jax.Array, llama.KVCache]:
  """`llama.decode` pipelined: one token per row, rows in n_micro micro-batches. Checks
  params, ids, the cache's shapes and its room for one more token on the host."""
  llama.check_params(params, cfg)
  checks.check_array("token_B", token_B, 1, integer=True, shape="[B]")
  checks.check_tokens(token_B[:, None], cfg.vocab_size, name="token_B")
  if not isinstance(cache, llama.KVCache):
    raise TypeError(f"cache: expected a llama.KVCache (from prefill), got {type(cache).__name__}")
  want = (cfg.n_layers, token_B.shape[0], cache.capacity, cfg.n_kv_heads, cfg.k)
  if cache.k_LBSGK.shape != want or cache.lengths_B.shape != token_B.shape:
    raise ValueError(f"cache: expected keys of shape {want} for these tokens and config, got {cache.k_LBSGK.shape}")
  checks.check_in("cache.lengths_B", cache.lengths_B, 0, cache.capacity - 1, what="lengths (room for one token)")
  _check_micro(token_B.shape[0], n_micro, mesh)
  return _decode(params, token_B, cache, cfg, mesh, n_micro)


@functools.partial(jax.jit, static_argnames=("cfg", "mesh", "n_micro"))
def _decode(params, token_B, cache, cfg, mesh, n_micro):
  new_B = jnp.ones_like(cache.lengths_B)
  hidden_B1D, cache = _cached(params, token_B[:, None], cache, new_B, cfg, mesh, n_micro)
  return llama.unembed(params, hidden_B1D, cfg)[:, 0], cache


def param_shardings(cfg: llama.LlamaConfig, mesh: Mesh) -> Any:
  """Stage-sharded NamedShardings of Llama's params on `mesh` (layers over `pipe`)."""
  return sharding.param_shardings(llama.param_shapes(cfg), llama.param_axes(cfg), mesh, RULES)
