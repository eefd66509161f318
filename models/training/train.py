"""Training for any model's pytree: AdamW step, schedule and state.

Recipe (Llama 3 pretraining, scaled down): AdamW (b1 0.9, b2 0.95, weight decay 0.1 on
matrices, none on norm scales), linear warm-up then cosine decay, global-norm gradient
clipping at 1.0. `make_step(objective, tcfg)` turns any (params, *args) -> (loss, aux)
into a jitted step; the LM objective lives in `training.lm`, the post-training ones in
`paperjax.align.train`, checkpoints in `training.checkpoints`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Any

import jax
import jax.numpy as jnp
import optax
from flax import struct

from paperjax.models.sharding import Shardings
from paperjax.ops import checks

Beta = Annotated[float, checks.Range(low=0, high=1, high_open=True)]  # an Adam decay rate


@checks.config
class TrainConfig:
  batch_size: checks.PositiveInt = 16
  seq_len: checks.PositiveInt = 64
  peak_lr: checks.PositiveFloat = 3e-3
  warmup_steps: checks.NonNegativeInt = 20
  total_steps: checks.PositiveInt = 300
  final_lr_ratio: checks.Fraction = 0.1  # cosine decays to peak_lr * final_lr_ratio
  weight_decay: checks.NonNegativeFloat = 0.1
  b1: Beta = 0.9
  b2: Beta = 0.95
  eps: checks.PositiveFloat = 1e-8
  clip_norm: checks.PositiveFloat = 1.0
  seed: checks.NonNegativeInt = 0

  def __post_init__(self):
    if self.warmup_steps >= self.total_steps:
      raise ValueError(f"warmup_steps: expected < total_steps={self.total_steps}, got {self.warmup_steps}")


@struct.dataclass
class TrainState:
  step: jax.Array  # int32 scalar
  params: Any
  opt_state: optax.OptState


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


def make_step(
  objective: Callable[..., tuple[jax.Array, dict]],
  tcfg: TrainConfig,
  *,
  shardings: Shardings | None = None,
  check_args: Callable[..., None] | None = None,
) -> Callable[..., tuple[TrainState, dict]]:
  """A jitted (state, *args) -> (state, metrics) minimising objective(params, *args) -> (loss, aux).

  One AdamW step of `optimizer(tcfg)`; metrics are loss, grad_norm, lr and the aux dict.
  `check_args(*args)` runs on the host before each call: the value checks (ids in range,
  ...) that cannot run inside the jitted step. The jitted program is `step.jitted` (for
  `.lower()`).
  With `shardings` (`models.sharding.Shardings`: a mesh, the state's shardings and the
  batch's, for steps of (state, batch)) the step is compiled for that mesh (what pjit became:
  jit with in/out shardings), runs inside it (so models' activation constraints apply),
  and returns the state sharded as it came in and the metrics replicated.
  """
  tx = optimizer(tcfg)
  lr = schedule(tcfg)

  def step(state: TrainState, *args):
    (loss, aux), grads = jax.value_and_grad(objective, has_aux=True)(state.params, *args)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads), "lr": lr(state.step), **aux}
    return TrainState(state.step + 1, params, opt_state), metrics

  if shardings is None:
    jitted = jax.jit(step)
  else:
    replicated = jax.sharding.NamedSharding(shardings.mesh, jax.sharding.PartitionSpec())
    out_shardings = (shardings.state, replicated)
    jitted = jax.jit(step, in_shardings=(shardings.state, shardings.batch), out_shardings=out_shardings)

  def checked_step(state: TrainState, *args):
    if check_args is not None:
      check_args(*args)
    if shardings is None:
      return jitted(state, *args)
    with jax.set_mesh(shardings.mesh):
      return jitted(state, *args)

  checked_step.jitted = jitted  # type: ignore[attr-defined]  # for .lower(): memory and HLO analysis
  return checked_step
