"""Next-token language-model training on a token stream: packed windows, loss, steps.

Shapes: B batch, T time, V vocabulary, N tokens in the corpus stream.

Windows of T + 1 tokens are cut from the stream at random; documents packed into one
window are kept apart by segment ids (the model's document mask) and positions that
restart at each document, so this objective is for models with document masks
(`transformer.llama`). Cross-entropy is float32, averaged over target positions in the
mask. Data is stateless in the step: batch i is drawn from `default_rng([seed, i])`, so
a run resumed from a checkpoint at step i sees exactly the batches it would have seen.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
from collections.abc import Callable, Iterator
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from paperjax.models import sharding
from paperjax.models.training.train import TrainConfig, TrainState, make_step, optimizer, start_state
from paperjax.models.transformer import llama
from paperjax.ops import checks


class Batch(NamedTuple):
  """Inputs and targets of packed windows; segments keep documents apart."""

  tokens_BT: np.ndarray
  targets_BT: np.ndarray
  mask_BT: np.ndarray  # True where the target is the same document's next token
  segment_ids_BT: np.ndarray
  positions_BT: np.ndarray  # restart at 0 at each document start inside a window


def check_batch(batch: Batch, cfg: llama.LlamaConfig) -> None:
  """Raises unless the batch's five arrays are [B, T], ids lie in [0, V), targets too where
  mask_BT (a bool mask) reads them, and positions in [0, max_seq_len): on the host, before
  a jitted step (under jit the ids would be clamped and the loss silently wrong)."""
  if not isinstance(batch, Batch):
    raise TypeError(f"batch: expected an lm.Batch (lm.packed_batch, lm.batch_at), got {type(batch).__name__}")
  batch_size, time = checks.check_tokens(batch.tokens_BT, cfg.vocab_size, name="batch.tokens_BT")
  for name in ("targets_BT", "mask_BT", "segment_ids_BT", "positions_BT"):
    x = getattr(batch, name)
    checks.check_array(f"batch.{name}", x, 2, integer=name != "mask_BT", shape="[B, T]")
    if x.shape != (batch_size, time):
      raise ValueError(f"batch.{name}: expected shape {(batch_size, time)} (tokens_BT's), got {x.shape}")
  if batch.mask_BT.dtype != bool:
    raise TypeError(f"batch.mask_BT: expected bool (True where the target counts), got {batch.mask_BT.dtype}")
  # Targets the mask leaves out are never read (HF's -100 ignore index is fine there).
  xp, (mask_BT, targets_BT) = checks.on_host(batch.mask_BT, batch.targets_BT)
  bad = lambda v: (v < 0) | (v >= cfg.vocab_size)
  read_BT = xp.where(mask_BT, targets_BT, 0)
  checks.check_values("batch.targets_BT", read_BT, bad, f"ids in [0, {cfg.vocab_size}) where mask_BT")
  checks.check_in("batch.positions_BT", batch.positions_BT, 0, cfg.max_seq_len - 1, what="positions")


def init_state(key: jax.Array, cfg: llama.LlamaConfig, tcfg: TrainConfig) -> TrainState:
  """Step 0 of a fresh Llama: `init(key, cfg)` with a new optimizer state."""
  return start_state(llama.init(key, cfg), tcfg)


def loss_fn(params: dict, batch: Batch, cfg: llama.LlamaConfig) -> jax.Array:
  """mean over masked positions of -log softmax(logits)[target], in float32."""
  logits_BTV, _ = llama.forward(
    params,
    jnp.asarray(batch.tokens_BT),
    cfg,
    positions_BT=jnp.asarray(batch.positions_BT),
    segment_ids_BT=jnp.asarray(batch.segment_ids_BT),
  )
  return masked_nll(logits_BTV, batch)


def masked_nll(logits_BTV: jax.Array, batch: Batch) -> jax.Array:
  """mean over batch.mask_BT of -log softmax(logits_BTV)[batch.targets_BT], in float32."""
  nll_BT = optax.softmax_cross_entropy_with_integer_labels(logits_BTV, batch.targets_BT)
  mask_BT = batch.mask_BT.astype(jnp.float32)
  return jnp.sum(nll_BT * mask_BT) / jnp.maximum(mask_BT.sum(), 1.0)


def make_train_step(
  cfg: llama.LlamaConfig, tcfg: TrainConfig
) -> Callable[[TrainState, Batch], tuple[TrainState, dict]]:
  """A jitted (state, batch) -> (state, metrics) of next-token training with metrics loss,
  grad_norm, lr; `check_batch` runs on the host before each step."""
  return make_step(
    lambda params, batch: (loss_fn(params, batch, cfg), {}), tcfg, check_args=lambda b: check_batch(b, cfg)
  )


class ShardedTraining(NamedTuple):
  """A Llama training run laid out on a mesh (`sharded_training`)."""

  state: TrainState  # sharded: params by param_axes, Adam's moments like their params
  step: Callable[[TrainState, Batch], tuple[TrainState, dict]]
  cfg: llama.LlamaConfig  # with the strategy's activation rules
  shardings: sharding.Shardings


def sharded_training(
  key: jax.Array,
  cfg: llama.LlamaConfig,
  tcfg: TrainConfig,
  mesh: jax.sharding.Mesh,
  strategy: str,
  *,
  params: dict | None = None,
) -> ShardedTraining:
  """`init_state` and `make_train_step` laid out on `mesh` by `sharding.RULES[strategy]`
  (dp, fsdp, tp, fsdp_tp): the state is created sharded (never whole on one device), the
  step keeps it so, and batches are split over the batch axes. `params` (optional) start
  the run instead of `llama.init(key)`. Raises if the mesh does not divide the batch or a
  parameter dimension, naming the mesh axis."""
  if strategy not in sharding.RULES or strategy == "pp":
    raise ValueError(f"strategy: expected one of {[s for s in sharding.RULES if s != 'pp']}, got {strategy!r}")
  rules = sharding.RULES[strategy]
  cfg = dataclasses.replace(cfg, axis_rules=rules)
  sharding.check_batch(tcfg.batch_size, mesh, rules)
  return laid_out(key, cfg, tcfg, mesh, rules, lambda p, batch: loss_fn(p, batch, cfg), params=params)


def laid_out(
  key: jax.Array,
  cfg: llama.LlamaConfig,
  tcfg: TrainConfig,
  mesh: jax.sharding.Mesh,
  rules: sharding.Rules,
  loss: Callable[[dict, Batch], jax.Array],
  *,
  params: dict | None = None,
) -> ShardedTraining:
  """A training run minimising loss(params, batch) with its state sharded by `rules`:
  created on the mesh by a jitted init (or `params` put there), Adam's moments sharded
  like their parameters, and a step compiled for the mesh."""
  init = functools.partial(init_state, cfg=cfg, tcfg=tcfg)
  state_sh = sharding.state_shardings(jax.eval_shape(init, key), llama.param_axes(cfg), mesh, rules, optimizer(tcfg))
  if params is None:
    state = jax.jit(init, out_shardings=state_sh)(key)
  else:
    state = jax.device_put(start_state(params, tcfg), state_sh)
  shardings = sharding.Shardings(mesh, state_sh, sharding.batch_sharding(mesh, rules))
  step = make_step(
    lambda p, batch: (loss(p, batch), {}), tcfg, shardings=shardings, check_args=lambda b: check_batch(b, cfg)
  )
  return ShardedTraining(state, step, cfg, shardings)


def eval_loss(params: dict, batch: Batch, cfg: llama.LlamaConfig) -> jax.Array:
  """`loss_fn`, jitted, after `check_batch` on the host."""
  check_batch(batch, cfg)
  return _eval_loss(params, batch, cfg)


@functools.partial(jax.jit, static_argnums=2)
def _eval_loss(params: dict, batch: Batch, cfg: llama.LlamaConfig) -> jax.Array:
  return loss_fn(params, batch, cfg)


def batch_at(ids_N: np.ndarray, segment_ids_N: np.ndarray, step: int, tcfg: TrainConfig) -> Batch:
  """Batch `step`: batch_size random windows of seq_len + 1 tokens from the stream."""
  ids_N, segment_ids_N = np.asarray(ids_N), np.asarray(segment_ids_N)
  if ids_N.shape != segment_ids_N.shape or ids_N.ndim != 1:
    raise ValueError(f"ids_N, segment_ids_N: expected equal 1-D shapes, got {ids_N.shape}, {segment_ids_N.shape}")
  for name, x in (("ids_N", ids_N), ("segment_ids_N", segment_ids_N)):
    checks.check_array(name, x, 1, integer=True, shape="[N]")
    checks.check_in(name, x, 0, np.iinfo(np.int32).max, what="int32 ids")  # cast to int32 below
  if not isinstance(tcfg, TrainConfig):
    raise TypeError(f"tcfg: expected a TrainConfig, got {type(tcfg).__name__}")
  step = checks.check_int("step", step, 0)
  span = tcfg.seq_len + 1
  if ids_N.size < span:
    raise ValueError(f"ids_N: {ids_N.size} tokens are fewer than one window of {span}")
  starts = np.random.default_rng([tcfg.seed, step]).integers(0, ids_N.size - span + 1, tcfg.batch_size)
  index = starts[:, None] + np.arange(span)
  tokens, segments = ids_N[index].astype(np.int32), segment_ids_N[index].astype(np.int32)
  return packed_batch(tokens, segments)


def batches(ids_N: np.ndarray, segment_ids_N: np.ndarray, tcfg: TrainConfig, start_step: int = 0) -> Iterator[Batch]:
  """batch_at(step) for step = start_step, start_step + 1, ...: resume by passing state.step."""
  for step in itertools.count(start_step):
    yield batch_at(ids_N, segment_ids_N, step, tcfg)


def packed_batch(windows: np.ndarray, window_segments: np.ndarray) -> Batch:
  """Batch from windows of T + 1 tokens ([B, T + 1]: inputs and their next tokens) and their document ids."""
  seg_BT = window_segments[:, :-1]
  time = seg_BT.shape[1]
  starts_BT = np.concatenate([np.ones_like(seg_BT[:, :1], bool), seg_BT[:, 1:] != seg_BT[:, :-1]], axis=1)
  last_start_BT = np.maximum.accumulate(np.where(starts_BT, np.arange(time), 0), axis=1)
  return Batch(
    windows[:, :-1],
    windows[:, 1:],
    window_segments[:, 1:] == seg_BT,
    seg_BT,
    (np.arange(time) - last_start_BT).astype(np.int32),
  )
