"""Next-token training for `models.llama`: loss, AdamW step, data, orbax checkpoints.

Shapes: B batch, T time, V vocabulary, N tokens in the corpus stream.

Recipe (Llama 3 pretraining, scaled down): AdamW (b1 0.9, b2 0.95, weight decay 0.1 on
matrices, none on norm scales), linear warm-up then cosine decay, global-norm gradient
clipping at 1.0; cross-entropy in float32, averaged over target positions in the mask.

Data is stateless in the step: batch i is drawn from `default_rng([seed, i])`, so a run
resumed from a checkpoint at step i sees exactly the batches it would have seen.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import os
from collections.abc import Callable, Iterator
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from flax import struct

from paperjax.models.transformer import llama


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  batch_size: int = 16
  seq_len: int = 64
  peak_lr: float = 3e-3
  warmup_steps: int = 20
  total_steps: int = 300
  final_lr_ratio: float = 0.1  # cosine decays to peak_lr * final_lr_ratio
  weight_decay: float = 0.1
  b1: float = 0.9
  b2: float = 0.95
  eps: float = 1e-8
  clip_norm: float = 1.0
  seed: int = 0

  def __post_init__(self):
    if self.batch_size < 1 or self.seq_len < 1:
      raise ValueError(f"batch_size, seq_len: expected >= 1, got {self.batch_size}, {self.seq_len}")
    if not 0 <= self.warmup_steps < self.total_steps:
      raise ValueError(f"warmup_steps: expected 0 <= warmup < total_steps={self.total_steps}, got {self.warmup_steps}")
    if self.peak_lr <= 0 or self.clip_norm <= 0:
      raise ValueError(f"peak_lr, clip_norm: expected > 0, got {self.peak_lr}, {self.clip_norm}")


@struct.dataclass
class TrainState:
  step: jax.Array  # int32 scalar
  params: dict
  opt_state: optax.OptState


class Batch(NamedTuple):
  """Inputs and targets of packed windows; segments keep documents apart."""

  tokens_BT: np.ndarray
  targets_BT: np.ndarray
  mask_BT: np.ndarray  # True where the target is the same document's next token
  segment_ids_BT: np.ndarray
  positions_BT: np.ndarray  # restart at 0 at each document start inside a window


def schedule(tcfg: TrainConfig) -> optax.Schedule:
  """Linear warm-up from 0 to peak_lr, then cosine to peak_lr * final_lr_ratio."""
  return optax.warmup_cosine_decay_schedule(
    0.0, tcfg.peak_lr, tcfg.warmup_steps, tcfg.total_steps, tcfg.peak_lr * tcfg.final_lr_ratio
  )


def optimizer(tcfg: TrainConfig) -> optax.GradientTransformation:
  def decay_mask(params):  # no weight decay on RMSNorm scales
    return jax.tree_util.tree_map_with_path(lambda path, _: "norm" not in jax.tree_util.keystr(path), params)

  return optax.chain(
    optax.clip_by_global_norm(tcfg.clip_norm),
    optax.adamw(schedule(tcfg), tcfg.b1, tcfg.b2, tcfg.eps, weight_decay=tcfg.weight_decay, mask=decay_mask),
  )


def start_state(params: dict, tcfg: TrainConfig) -> TrainState:
  """Step 0: `params` with a fresh `optimizer(tcfg)` state (any model's pytree)."""
  return TrainState(jnp.int32(0), params, optimizer(tcfg).init(params))


def init_state(key: jax.Array, cfg: llama.LlamaConfig, tcfg: TrainConfig) -> TrainState:
  return start_state(llama.init(key, cfg), tcfg)


def loss_fn(params: dict, batch: Batch, cfg: llama.LlamaConfig) -> jax.Array:
  """mean over masked positions of -log softmax(logits)[target], in float32."""
  logits_BTV, _ = llama.forward(
    params, batch.tokens_BT, cfg, positions_BT=batch.positions_BT, segment_ids_BT=batch.segment_ids_BT
  )
  nll_BT = optax.softmax_cross_entropy_with_integer_labels(logits_BTV, batch.targets_BT)
  mask_BT = batch.mask_BT.astype(jnp.float32)
  return jnp.sum(nll_BT * mask_BT) / jnp.maximum(mask_BT.sum(), 1.0)


def make_step(
  objective: Callable[..., tuple[jax.Array, dict]], tcfg: TrainConfig
) -> Callable[..., tuple[TrainState, dict]]:
  """A jitted (state, *args) -> (state, metrics) minimising objective(params, *args) -> (loss, aux).

  One AdamW step of `optimizer(tcfg)`; metrics are loss, grad_norm, lr and the aux dict.
  """
  tx = optimizer(tcfg)
  lr = schedule(tcfg)

  @jax.jit
  def step(state: TrainState, *args):
    (loss, aux), grads = jax.value_and_grad(objective, has_aux=True)(state.params, *args)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads), "lr": lr(state.step), **aux}
    return TrainState(state.step + 1, params, opt_state), metrics

  return step


def make_train_step(
  cfg: llama.LlamaConfig, tcfg: TrainConfig
) -> Callable[[TrainState, Batch], tuple[TrainState, dict]]:
  """A jitted (state, batch) -> (state, metrics) of next-token training with metrics loss, grad_norm, lr."""
  return make_step(lambda params, batch: (loss_fn(params, batch, cfg), {}), tcfg)


@functools.partial(jax.jit, static_argnums=2)
def eval_loss(params: dict, batch: Batch, cfg: llama.LlamaConfig) -> jax.Array:
  return loss_fn(params, batch, cfg)


def batch_at(ids_N: np.ndarray, segment_ids_N: np.ndarray, step: int, tcfg: TrainConfig) -> Batch:
  """Batch `step`: batch_size random windows of seq_len + 1 tokens from the stream."""
  ids_N, segment_ids_N = np.asarray(ids_N), np.asarray(segment_ids_N)
  if ids_N.shape != segment_ids_N.shape or ids_N.ndim != 1:
    raise ValueError(f"ids_N, segment_ids_N: expected equal 1-D shapes, got {ids_N.shape}, {segment_ids_N.shape}")
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


def packed_batch(tokens_BS: np.ndarray, segments_BS: np.ndarray) -> Batch:
  """Batch from windows of S = T + 1 tokens and their document ids."""
  seg_BT = segments_BS[:, :-1]
  time = seg_BT.shape[1]
  starts_BT = np.concatenate([np.ones_like(seg_BT[:, :1], bool), seg_BT[:, 1:] != seg_BT[:, :-1]], axis=1)
  last_start_BT = np.maximum.accumulate(np.where(starts_BT, np.arange(time), 0), axis=1)
  return Batch(
    tokens_BS[:, :-1],
    tokens_BS[:, 1:],
    segments_BS[:, 1:] == seg_BT,
    seg_BT,
    (np.arange(time) - last_start_BT).astype(np.int32),
  )


def checkpoint_manager(directory: str | os.PathLike, max_to_keep: int = 3) -> ocp.CheckpointManager:
  """An orbax CheckpointManager (atomic: each step is finalised by a rename)."""
  return ocp.CheckpointManager(
    os.fspath(os.path.abspath(directory)), options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True)
  )


def save(manager: ocp.CheckpointManager, state: TrainState) -> None:
  manager.save(int(state.step), args=ocp.args.StandardSave(state))
  manager.wait_until_finished()


def restore(manager: ocp.CheckpointManager, like: TrainState, step: int | None = None) -> TrainState:
  """Restores `step` (default the latest) into the structure and dtypes of `like`."""
  step = manager.latest_step() if step is None else step
  if step is None:
    raise FileNotFoundError(f"manager: no checkpoint in {manager.directory}")
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, like)
  return manager.restore(step, args=ocp.args.StandardRestore(abstract))
