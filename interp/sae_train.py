"""Training an SAE on a model's activations: the activation stream, the step, the loop.

Shapes: B batch rows (tokens), T time, D the site's width, F dictionary features, N tokens
in a buffer.

Activations come from any protocol model's `forward_with_sites` at one site (SAELens'
`hook_name`, e.g. "blocks.1.hook_resid_post"): windows of tokens run through the model and
their [B, T, D] activations are flattened into a numpy shuffle buffer, from which batches
of rows are drawn (`ActivationStream`). Inputs are scaled by s = sqrt(D / E||x||^2)
(`sae.normalization_scale`, estimated on the first buffer); `export` folds s back.

One step (`make_step`): Adam on the architecture's loss with a linear lr warm-up and a
linear warm-up of the sparsity coefficient; for unit-norm decoders, the decoder gradient's
parallel part is removed before the update and the rows renormalised after it; BatchTopK's
inference threshold follows its EMA; each latent's tokens-since-fired counter (dead latents:
>= cfg.dead_tokens) feeds AuxK. The standard SAE may resample its dead latents
(Anthropic's procedure, `resample_dead`). `train` runs the loop with optional orbax
checkpoints and resumes from the latest one.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import zlib
from collections.abc import Callable, Iterable, Iterator
from typing import Annotated, Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct

from paperjax.interp import sae
from paperjax.models import protocol
from paperjax.models.training import checkpoints
from paperjax.ops import checks

_Rate = Annotated[float, checks.Range(low=0, high=math.inf, low_open=True, high_open=True)]  # finite, > 0
_Decay = Annotated[float, checks.Range(low=0, high=1, high_open=True)]  # an Adam decay rate, in [0, 1)


@checks.config
class TrainConfig:
  """steps of batch_size rows; Adam (b1, b2) at lr after a linear warm-up of lr_warmup_steps
  (JumpReLU's log-thresholds at threshold_lr, default lr: Adam moves a log-threshold about lr
  per step, so a short run needs a larger rate to reach its sparsity); lambda warmed up
  linearly over penalty_warmup_steps; the standard SAE resamples dead latents every
  resample_every steps (0: never). Every field is checked at construction (`ops.checks.config`)."""

  steps: checks.PositiveInt
  batch_size: checks.PositiveInt = 1024
  lr: _Rate = 1e-3
  threshold_lr: _Rate | None = None
  lr_warmup_steps: checks.NonNegativeInt = 0
  penalty_warmup_steps: checks.NonNegativeInt = 0
  b1: _Decay = 0.9
  b2: _Decay = 0.999
  resample_every: checks.NonNegativeInt = 0

  def __post_init__(self):
    for name in ("lr_warmup_steps", "penalty_warmup_steps", "resample_every"):
      if getattr(self, name) > self.steps:
        raise ValueError(f"{name}: expected 0 <= {name} <= steps={self.steps}, got {getattr(self, name)}")


@struct.dataclass
class SAEState:
  step: jax.Array  # int32 scalar
  params: dict
  opt_state: optax.OptState
  since_fired_F: jax.Array  # int32 [F]: training tokens since each latent last fired
  scale: jax.Array  # float32 scalar: the inputs are activations * scale
  fingerprint: jax.Array  # uint32 scalar: CRC-32 of the SAE and training configs (resume checks it)


def check_pair(cfg: sae.SAEConfig, tcfg: TrainConfig) -> None:
  """Raises on a training setting the architecture has no use for."""
  if not isinstance(cfg, sae.SAEConfig):
    raise TypeError(f"cfg: expected an sae.SAEConfig, got {type(cfg).__name__}")
  if not isinstance(tcfg, TrainConfig):
    raise TypeError(f"tcfg: expected an sae_train.TrainConfig, got {type(tcfg).__name__}")
  if tcfg.threshold_lr is not None and cfg.architecture != "jumprelu":
    raise ValueError(
      f"threshold_lr: only JumpReLU has thresholds to train, got {tcfg.threshold_lr} for {cfg.architecture}"
    )
  if tcfg.penalty_warmup_steps and cfg.architecture not in ("standard", "gated", "jumprelu"):
    raise ValueError(
      f"penalty_warmup_steps: {cfg.architecture} has no sparsity penalty, got {tcfg.penalty_warmup_steps}"
    )
  if tcfg.resample_every and cfg.architecture != "standard":
    raise ValueError(
      f"resample_every: resampling is for the standard SAE, got {tcfg.resample_every} for {cfg.architecture}"
    )


def optimizer(tcfg: TrainConfig) -> optax.GradientTransformation:
  """Adam with lr's warm-up; with threshold_lr, a second Adam for log_threshold."""

  def adam(peak: float) -> optax.GradientTransformation:
    lr = optax.linear_schedule(0.0, peak, tcfg.lr_warmup_steps) if tcfg.lr_warmup_steps else peak
    return optax.adam(lr, tcfg.b1, tcfg.b2)

  if tcfg.threshold_lr is None:
    return adam(tcfg.lr)
  labels = lambda params: {name: "threshold" if name == "log_threshold" else "rest" for name in params}
  return optax.multi_transform({"rest": adam(tcfg.lr), "threshold": adam(tcfg.threshold_lr)}, labels)


def fingerprint(cfg: sae.SAEConfig, tcfg: TrainConfig) -> int:
  """CRC-32 of both configs' fields except `steps`: a checkpoint resumes only the run it came
  from, which may be extended to more steps (the schedules depend on absolute steps only)."""
  fields = {k: v for k, v in dataclasses.asdict(tcfg).items() if k != "steps"}
  return zlib.crc32(repr((dataclasses.asdict(cfg), fields)).encode())


def start_state(params: dict, cfg: sae.SAEConfig, tcfg: TrainConfig, scale: float = 1.0) -> SAEState:
  opt_state = optimizer(tcfg).init(params)
  since_F = jnp.zeros((cfg.d_sae,), jnp.int32)
  return SAEState(jnp.int32(0), params, opt_state, since_F, jnp.float32(scale), jnp.uint32(fingerprint(cfg, tcfg)))


def dead(state: SAEState, cfg: sae.SAEConfig) -> jax.Array:
  """bool [F]: latents that have not fired in cfg.dead_tokens training tokens."""
  return state.since_fired_F >= cfg.dead_tokens


@functools.lru_cache(maxsize=32)
def make_step(cfg: sae.SAEConfig, tcfg: TrainConfig) -> Callable[[SAEState, jax.Array], tuple[SAEState, dict]]:
  """(state, x_BD scaled activations) -> (state, metrics): one training step (module
  docstring), jitted; metrics are loss, mse, sparsity, aux, l0 and dead (fraction). Cached
  per (cfg, tcfg), so every run of one setting shares one compiled step. The step checks
  its inputs on the host first: state's params have the config's shapes, x_BD is a float
  [batch_size, d_in] array of finite values. `step.jitted` is the jitted core, unchecked."""
  check_pair(cfg, tcfg)
  core = _step(cfg, tcfg)

  def step(state: SAEState, x_BD: jax.Array) -> tuple[SAEState, dict]:
    if not isinstance(state, SAEState):
      raise TypeError(f"state: expected an SAEState (sae_train.start_state), got {type(state).__name__}")
    sae.check_params(state.params, cfg)
    _check_batch("x_BD", x_BD, cfg, tcfg)
    return core(state, x_BD)

  step.jitted = core  # type: ignore[attr-defined]  # the jitted program, for timing and .lower()
  return step


def _check_batch(name: str, x_BD: Any, cfg: sae.SAEConfig, tcfg: TrainConfig) -> None:
  """x_BD: a float array [batch_size, d_in] of finite values (on the host, before the step)."""
  if hasattr(x_BD, "shape") and tuple(x_BD.shape) != (tcfg.batch_size, cfg.d_in):
    raise ValueError(
      f"{name}: expected arrays [batch_size={tcfg.batch_size}, d_in={cfg.d_in}], got {tuple(x_BD.shape)}"
    )
  sae.check_input(x_BD, cfg, name=name)


@functools.lru_cache(maxsize=32)
def _step(cfg: sae.SAEConfig, tcfg: TrainConfig) -> Callable[[SAEState, jax.Array], tuple[SAEState, dict]]:
  """`make_step`'s jitted core, without the host checks."""
  tx = optimizer(tcfg)

  @jax.jit
  def step(state: SAEState, x_BD: jax.Array) -> tuple[SAEState, dict]:
    warm = jnp.minimum(1.0, (state.step + 1) / max(tcfg.penalty_warmup_steps, 1))
    dead_F = dead(state, cfg)
    (total, aux), grads = jax.value_and_grad(sae.loss, has_aux=True)(
      state.params, x_BD, cfg, penalty_scale=warm, dead_F=dead_F
    )
    if cfg.unit_norm_decoder:
      grads = sae.project_decoder_grads(grads, state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    if cfg.unit_norm_decoder:
      params = sae.normalize_decoder(params)
    f_BF = aux.pop("f_BF")
    aux.pop("pi_BF")
    if cfg.architecture == "batchtopk":
      params["threshold"] = sae.batchtopk_threshold(state.params["threshold"], f_BF, cfg.threshold_rate)
    fired_F = jnp.any(f_BF != 0, axis=0)
    since_F = jnp.where(fired_F, 0, jnp.minimum(state.since_fired_F + x_BD.shape[0], jnp.iinfo(jnp.int32).max // 2))
    metrics = {"loss": total, **aux, "dead": jnp.mean(dead_F.astype(jnp.float32))}
    return SAEState(state.step + 1, params, opt_state, since_F, state.scale, state.fingerprint), metrics

  return step


def resample_dead(state: SAEState, x_ND: jax.Array, cfg: sae.SAEConfig, key: jax.Array) -> SAEState:
  """Anthropic's resampling of dead latents (standard SAE): each dead latent f gets an input
  x_n drawn with probability proportional to its squared reconstruction error,
  W_dec[f] = (x_n - b_dec) / ||x_n - b_dec||, W_enc[:, f] = W_dec[f] * 0.2 * the mean alive
  encoder norm, b_enc[f] = 0, and its Adam moments reset; its counter restarts."""
  if cfg.architecture != "standard":
    raise ValueError(f"cfg: resampling is for the standard SAE, got {cfg.architecture}")
  sae.check_input(x_ND, cfg, name="x_ND")
  if x_ND.shape[0] < 1:
    raise ValueError(f"x_ND: expected at least one row to draw from, got shape {tuple(x_ND.shape)}")
  dead_F = np.asarray(dead(state, cfg))
  n_dead = int(dead_F.sum())
  if n_dead == 0:
    return state
  params = state.params
  err_N = np.asarray(jnp.sum((sae.reconstruct(params, x_ND, cfg) - x_ND) ** 2, axis=-1), np.float64) ** 2
  rng = np.random.default_rng(np.asarray(jax.random.key_data(key)).ravel())
  p_N = err_N / err_N.sum() if err_N.sum() > 0 else None
  rows = rng.choice(x_ND.shape[0], size=n_dead, replace=x_ND.shape[0] < n_dead, p=p_N)
  dirs_ND = np.asarray(x_ND)[rows] - np.asarray(params["b_dec"])
  dirs_ND /= np.maximum(np.linalg.norm(dirs_ND, axis=-1, keepdims=True), 1e-12)
  enc_norm_F = np.linalg.norm(np.asarray(params["W_enc"]), axis=0)
  alive_norm = float(enc_norm_F[~dead_F].mean()) if (~dead_F).any() else 1.0
  idx = np.flatnonzero(dead_F)
  params = params | {
    "W_dec": params["W_dec"].at[idx].set(dirs_ND),
    "W_enc": params["W_enc"].at[:, idx].set(dirs_ND.T * 0.2 * alive_norm),
    "b_enc": params["b_enc"].at[idx].set(0.0),
  }

  def reset(moment: dict) -> dict:  # zero the dead latents' rows of one Adam moment tree
    return moment | {
      "W_dec": moment["W_dec"].at[idx].set(0.0),
      "W_enc": moment["W_enc"].at[:, idx].set(0.0),
      "b_enc": moment["b_enc"].at[idx].set(0.0),
    }

  opt_state = state.opt_state
  for name in ("mu", "nu"):
    opt_state = optax.tree_utils.tree_set(opt_state, **{name: reset(optax.tree_utils.tree_get(opt_state, name))})
  return dataclasses.replace(
    state, params=params, opt_state=opt_state, since_fired_F=state.since_fired_F.at[idx].set(0)
  )


class ActivationStream:
  """Shuffled batches of one site's activations [B, D] (float32, unscaled).

  Windows of tokens (an iterator of int [B, T]) run through `model.forward_with_sites`;
  each refill flattens `refill_windows` of them into the buffer, which is shuffled (numpy,
  seeded) and served in order, so a batch mixes tokens of many windows and positions. The
  stream ends when the windows run out; the last rows short of a batch are dropped.
  """

  def __init__(
    self,
    params: Any,
    model_cfg: Any,
    site: str,
    windows: Iterator[np.ndarray],
    *,
    batch_size: int,
    refill_windows: int = 8,
    seed: int = 0,
  ):
    protocol.check_site(model_cfg, site)
    for name, value in (("batch_size", batch_size), ("refill_windows", refill_windows)):
      if not isinstance(value, (int, np.integer)) or isinstance(value, (bool, np.bool_)) or value < 1:
        raise ValueError(f"{name}: expected an int >= 1, got {value!r}")
    if isinstance(windows, np.ndarray) or not isinstance(windows, Iterable):
      raise TypeError(f"windows: expected an iterator of token arrays [B, T], got {type(windows).__name__}")
    self._collect = _collector(model_cfg, site)
    self._params, self._windows, self._vocab_size = params, iter(windows), model_cfg.vocab_size
    self.batch_size, self.refill_windows = batch_size, refill_windows
    self._rng = np.random.default_rng(seed)
    self._buffer: np.ndarray = np.zeros((0, 0), np.float32)
    self._pos = 0
    self.tokens_read = 0

  def _refill(self) -> bool:
    """Adds up to refill_windows windows to the unread rows and reshuffles; False when the
    windows have run out."""
    chunks = []
    for _ in range(self.refill_windows):
      window = next(self._windows, None)
      if window is None:
        break
      tokens_BT = jnp.asarray(window)
      checks.check_tokens(tokens_BT, self._vocab_size)
      chunks.append(np.asarray(self._collect(self._params, tokens_BT)))
    if not chunks:
      return False
    self.tokens_read += sum(len(c) for c in chunks)
    if self._pos < len(self._buffer):
      chunks.insert(0, self._buffer[self._pos :])
    self._buffer = np.concatenate(chunks)
    self._buffer = self._buffer[self._rng.permutation(len(self._buffer))]
    self._pos = 0
    return True

  def __iter__(self) -> ActivationStream:
    return self

  def __next__(self) -> np.ndarray:
    while len(self._buffer) - self._pos < self.batch_size:
      if not self._refill():
        self._pos = len(self._buffer)  # the stream has ended: drop the short remainder
        raise StopIteration
    batch = self._buffer[self._pos : self._pos + self.batch_size]
    self._pos += self.batch_size
    return batch


@functools.lru_cache(maxsize=16)
def _collector(model_cfg: Any, site: str) -> Callable[[Any, jax.Array], jax.Array]:
  model = protocol.model_for(model_cfg)

  @jax.jit
  def collect(params, tokens_BT):
    _, _, acts = model.forward_with_sites(params, tokens_BT, model_cfg, (site,))
    act_BTD = acts[site]
    return act_BTD.reshape(-1, act_BTD.shape[-1]).astype(jnp.float32)

  return collect


def collect(params: Any, model_cfg: Any, site: str, tokens_BT: Any) -> np.ndarray:
  """The activations at `site` of every token of tokens_BT, float32 [B * T, D]."""
  protocol.check_site(model_cfg, site)
  tokens_BT = jnp.asarray(tokens_BT)
  checks.check_tokens(tokens_BT, model_cfg.vocab_size)
  return np.asarray(_collector(model_cfg, site)(params, tokens_BT))


class Trained(NamedTuple):
  """A trained SAE: params on scaled inputs, the scale s, the final state, metrics per step."""

  params: dict
  scale: float
  state: SAEState
  history: dict[str, np.ndarray]


def train(
  key: jax.Array,
  cfg: sae.SAEConfig,
  tcfg: TrainConfig,
  batches: Iterable[np.ndarray],
  *,
  scale: float | None = None,
  checkpoint_dir: str | os.PathLike | None = None,
  checkpoint_every: int = 0,
) -> Trained:
  """Trains cfg on `batches` (unscaled activations [batch_size, D]) up to tcfg.steps steps.

  A fresh run estimates s on its first batch (unless `scale` is given) and starts b_dec at
  that batch's geometric median (scaled). With `checkpoint_dir`, the state (s included) is
  saved through orbax every `checkpoint_every` steps and at the end, and a run finding a
  checkpoint there resumes from its latest step; `batches` then continues where the caller's
  iterator is (pass the stream positioned after the batches already trained on).

  Every batch is checked on the host before its step (float [batch_size, d_in], finite); a
  stream that ends before tcfg.steps steps raises ValueError saying how many it gave.
  """
  check_pair(cfg, tcfg)
  if (
    not isinstance(checkpoint_every, (int, np.integer))
    or checkpoint_every < 0
    or (checkpoint_every and checkpoint_dir is None)
  ):
    raise ValueError(
      f"checkpoint_every: expected an int >= 0 and a checkpoint_dir, got {checkpoint_every!r}, {checkpoint_dir}"
    )
  if isinstance(batches, np.ndarray) or not isinstance(batches, Iterable):
    raise TypeError(f"batches: expected an iterator of arrays [batch_size, d_in], got {type(batches).__name__}")
  batches = iter(batches)
  read = 0  # batches drawn from the stream

  def draw(steps_done: int) -> np.ndarray:
    nonlocal read
    try:
      batch = next(batches)
    except StopIteration:
      raise ValueError(
        f"batches: the stream ran out after {read} batches, at step {steps_done} of the steps={tcfg.steps} "
        "requested (one batch per step: give a longer stream, or fewer steps)"
      ) from None
    read += 1
    if isinstance(batch, (list, tuple)) or hasattr(batch, "dtype"):
      batch = np.asarray(batch)
    _check_batch("batches", batch, cfg, tcfg)
    return np.asarray(batch, np.float32)

  first = draw(0)
  if scale is None:
    s = sae.normalization_scale(first)
  elif isinstance(scale, (bool, np.bool_)) or not isinstance(scale, (int, float, np.integer, np.floating)):
    raise TypeError(f"scale: expected a float > 0 or None, got {type(scale).__name__} {scale!r}")
  else:
    s = float(scale)
  if not 0 < s < math.inf:
    raise ValueError(f"scale: expected a finite float > 0, got {s}")
  init_key, resample_key = jax.random.split(key)
  state = start_state(sae.init(init_key, cfg, sae.geometric_median(first * s)), cfg, tcfg, s)
  manager = None if checkpoint_dir is None else checkpoints.checkpoint_manager(checkpoint_dir)
  step = _step(cfg, tcfg)  # the batches are checked on the host as they are drawn
  metrics: list[dict] = []
  batch: np.ndarray | None = first
  try:
    if manager is not None and manager.latest_step() is not None:
      state = checkpoints.restore(manager, state)
      if int(state.fingerprint) != fingerprint(cfg, tcfg):
        raise ValueError(f"checkpoint_dir: {checkpoint_dir} holds a run of different SAE or training configs")
      if scale is not None and not np.isclose(float(state.scale), scale):
        raise ValueError(f"scale: the checkpoint in {checkpoint_dir} has {float(state.scale)}, got {scale}")
    done = int(state.step)
    while done < tcfg.steps:  # metrics stay on the device until the end: no host sync per step
      if batch is None:
        batch = draw(done)
      x_BD = jnp.asarray(batch) * state.scale
      state, step_metrics = step(state, x_BD)
      metrics.append(step_metrics)
      done += 1
      if tcfg.resample_every and done % tcfg.resample_every == 0 and done < tcfg.steps:
        state = resample_dead(state, x_BD, cfg, jax.random.fold_in(resample_key, done))
      if manager is not None and checkpoint_every and done % checkpoint_every == 0:
        checkpoints.save(manager, state)
      batch = None
    if manager is not None and manager.latest_step() != done:
      checkpoints.save(manager, state)
  finally:
    if manager is not None:
      manager.close()
  history = {k: np.asarray([m[k] for m in metrics]) for k in (metrics[0] if metrics else {})}
  return Trained(state.params, float(state.scale), state, history)
