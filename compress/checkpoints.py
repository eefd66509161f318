"""ExCP-compressed training checkpoints through orbax's CheckpointManager.

  with ExcpCheckpointManager(directory, excp.ExcpConfig(), max_to_keep=3, keyframe_every=4) as manager:
    manager.save(state)                        # step int(state.step), coded against the last save
    state = manager.restore(like, step=100)    # replays the chain from its keyframe

- Orbax gives the atomic commit (a step directory appears only once its file is written)
  and the step numbering. A save that raises before the commit leaves the earlier
  checkpoints, and the chain, as they were.
- Deletion is atomic too: retention renames a step directory into `TRASH` (orbax's
  `todelete_subdir`, one `os.replace`), and the manager empties `TRASH` around each save. A
  kill inside orbax's own in-place deletion (file by file, 2-17 ms a step) left a step
  directory without its file, which no restart could read past.
- A step whose file is missing or unreadable (a directory left half deleted by an older
  version, or damaged) does not stop a manager from opening: it is read only by a restore
  whose chain runs through it, which raises naming the step, its file and what is wrong.
  Retention deletes it once no kept chain needs it, and a save never codes against it.
- The chain is linear in steps: a checkpoint's residual is against the reconstruction of
  the latest saved step, and every `keyframe_every`-th save is a keyframe, stored exactly.
  Each file records the fingerprint of its reference, so a broken chain raises. One
  manager writes a directory at a time, as with orbax's own.
- `max_to_keep` keeps the newest n steps and every step their chains go back through, so
  nothing a kept checkpoint needs is deleted (orbax's preservation policy, `KeepChains`).
- A `TrainState` is split into the codec's weights (params), m and v (the mu and nu of the
  one Adam state in opt_state) and the other leaves (step counts, stored exactly). The
  restored state keeps every count; only the weights and moments are approximations.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import numpy as np
import optax
import orbax.checkpoint as ocp
from etils import epath

from paperjax.compress import excp
from paperjax.models.training.train import TrainState
from paperjax.ops import checks

FILE = "excp.bin"
ITEM = ocp.checkpoint_manager.DEFAULT_ITEM_NAME  # the item directory orbax writes FILE in: <step>/default/excp.bin
TRASH = "excp-deleting"  # where retention renames a step before it is removed; not a step name, so never read


# ---------------------------------------------------------------------------- TrainState <-> codec


def _adam_moments(opt_state: Any) -> tuple[Any, Any]:
  try:
    mu, nu = optax.tree_utils.tree_get(opt_state, "mu"), optax.tree_utils.tree_get(opt_state, "nu")
  except KeyError as e:
    raise ValueError(f"opt_state: expected one Adam state (mu, nu), found several: {e}") from None
  if mu is None or nu is None:
    raise ValueError("opt_state: expected an Adam state with mu and nu (optax.adam or adamw), found none")
  return mu, nu


def _others(state: TrainState) -> TrainState:
  """The state without params, mu and nu: the leaves stored exactly."""
  return dataclasses.replace(state, params=None, opt_state=optax.tree_utils.tree_set(state.opt_state, mu=None, nu=None))


def _flat(tree: Any) -> dict[str, np.ndarray]:
  return {jax.tree_util.keystr(path): np.asarray(leaf) for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def split_state(state: TrainState) -> excp.Checkpoint:
  """The codec's view of a state: flat weights, m, v and other leaves, named by their pytree paths."""
  mu, nu = _adam_moments(state.opt_state)
  return excp.Checkpoint(_flat(state.params), _flat(mu), _flat(nu), _flat(_others(state)))


def _fill(like: Any, arrays: excp.Arrays, label: str) -> Any:
  leaves, treedef = jax.tree_util.tree_flatten_with_path(like)
  names = [jax.tree_util.keystr(path) for path, _ in leaves]
  if set(names) != set(arrays):
    raise ValueError(f"{label}: the checkpoint's leaves differ from like's: {sorted(set(names) ^ set(arrays))}")
  out = []
  for name, (_, leaf) in zip(names, leaves, strict=True):
    x = arrays[name]
    if x.shape != leaf.shape or x.dtype != leaf.dtype:
      expected, got = f"{leaf.dtype}{list(leaf.shape)}", f"{x.dtype}{list(x.shape)}"
      raise ValueError(f"{label}{name}: expected {expected} as in like, got {got}")
    out.append(jax.device_put(x))
  return jax.tree_util.tree_unflatten(treedef, out)


def merge_state(ckpt: excp.Checkpoint, like: TrainState) -> TrainState:
  """The inverse of `split_state`, into the structure of `like` (arrays or abstract).

  Every leaf's shape and dtype must equal like's (nothing is cast).
  """
  mu, nu = _adam_moments(like.opt_state)
  others = _fill(_others(like), ckpt.other, "state")
  opt_state = optax.tree_utils.tree_set(others.opt_state, mu=_fill(mu, ckpt.m, "mu"), nu=_fill(nu, ckpt.v, "nu"))
  return dataclasses.replace(others, params=_fill(like.params, ckpt.weights, "params"), opt_state=opt_state)


# ---------------------------------------------------------------------------- orbax


class ExcpHandler(ocp.CheckpointHandler):
  """Writes one codec file per step; orbax commits the step directory atomically around it."""

  def save(self, directory: epath.Path, args: ExcpSave) -> None:
    (directory / FILE).write_bytes(args.blob)

  def restore(self, directory: epath.Path, args: ExcpRestore | None = None) -> bytes:
    return (directory / FILE).read_bytes()

  def metadata(self, directory: epath.Path) -> dict[str, Any]:
    """The file's header, read from its first bytes."""
    with open(os.fspath(directory / FILE), "rb") as f:
      prefix = f.read(excp.PREFIX_BYTES)
      return excp.read_header(prefix + f.read(excp.header_end(prefix) - len(prefix)))


@ocp.args.register_with_handler(ExcpHandler, for_save=True)
@dataclasses.dataclass
class ExcpSave(ocp.args.CheckpointArgs):
  blob: bytes


@ocp.args.register_with_handler(ExcpHandler, for_restore=True)
@dataclasses.dataclass
class ExcpRestore(ocp.args.CheckpointArgs):
  pass


@dataclasses.dataclass
class KeepChains:
  """Orbax preservation policy: the newest n steps (all if n is None) and every step their chains need.

  A step whose parent is unknown keeps every older step.
  """

  n: int | None
  parents: dict[int, int | None]  # step -> the step its residual is against (None: a keyframe)

  def should_preserve(self, checkpoints: Sequence[Any], *, context: Any) -> Sequence[bool]:
    steps = [c.step for c in checkpoints]
    keep = set(steps if self.n is None else steps[-self.n :])
    todo = list(keep)
    while todo:
      step = todo.pop()
      if step not in self.parents:
        keep.update(s for s in steps if s < step)
        continue
      parent = self.parents[step]
      if parent is not None and parent not in keep:
        keep.add(parent)
        todo.append(parent)
    return [s in keep for s in steps]


class SaveInfo(NamedTuple):
  step: int
  parent: int | None  # None: a keyframe
  nbytes: int  # the compressed file
  dense_nbytes: int  # the same state's arrays uncompressed


class ExcpCheckpointManager:
  """Saves and restores `TrainState`s as a chain of ExCP files in orbax step directories."""

  def __init__(
    self,
    directory: str | os.PathLike,
    config: excp.ExcpConfig | None = None,
    *,
    max_to_keep: int | None = None,
    keyframe_every: int = 0,
  ):
    if not isinstance(directory, (str, os.PathLike)):
      raise TypeError(f"directory: expected a path (str or os.PathLike), got {directory!r}")
    path = os.path.abspath(os.fspath(directory))
    if os.path.exists(path) and not os.path.isdir(path):
      raise NotADirectoryError(f"directory: expected a directory (or a path to create one at), got the file {path}")
    if not (config is None or isinstance(config, excp.ExcpConfig)):
      raise TypeError(f"config: expected an excp.ExcpConfig or None, got {config!r}")
    if max_to_keep is not None and not checks.is_int(max_to_keep):
      raise TypeError(f"max_to_keep: expected an int >= 1 or None, got {max_to_keep!r}")
    if not checks.is_int(keyframe_every):
      raise TypeError(f"keyframe_every: expected an int >= 0 (0: only the first save), got {keyframe_every!r}")
    if max_to_keep is not None and max_to_keep < 1:
      raise ValueError(f"max_to_keep: expected >= 1 or None, got {max_to_keep}")
    if keyframe_every < 0:
      raise ValueError(f"keyframe_every: expected >= 0 (0: only the first save), got {keyframe_every}")
    if max_to_keep is not None and keyframe_every == 0:
      raise ValueError(
        f"max_to_keep={max_to_keep}: needs keyframe_every >= 1; without keyframes the newest checkpoint needs "
        "every earlier one, so none could be deleted"
      )
    self.config = config or excp.ExcpConfig()
    self.keyframe_every = keyframe_every
    self._parents: dict[int, int | None] = {}
    self._damaged: dict[int, str] = {}  # step -> what is wrong with its file; read only by a restore through it
    self._name_format = ocp.step.standard_name_format()
    options = ocp.CheckpointManagerOptions(
      create=True,
      enable_async_checkpointing=False,
      preservation_policy=KeepChains(max_to_keep, self._parents),
      step_name_format=self._name_format,
      # Retention renames a step out of the step names in one os.replace, then `_empty_trash` removes it: a kill
      # at any moment leaves every step directory whole. (Ignored on GCS, whose objects are deleted one by one.)
      todelete_subdir=TRASH,
    )
    self._manager = ocp.CheckpointManager(path, options=options, item_handlers=ExcpHandler())
    for step in self._manager.all_steps():
      self._read_parent(step)
    self._cache: tuple[int, excp.Arrays] | None = None  # (step, reconstructed weights) last saved or decoded

  def __enter__(self) -> ExcpCheckpointManager:
    return self

  def __exit__(self, *exc: object) -> None:
    self.close()

  @property
  def directory(self) -> epath.Path:
    return self._manager.directory

  def all_steps(self) -> list[int]:
    return sorted(self._manager.all_steps())

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def path(self, step: int) -> epath.Path:
    """Where step's ExCP file is (or would be)."""
    return ocp.step.build_step_path(self.directory, self._name_format, step) / ITEM / FILE

  def header(self, step: int) -> dict[str, Any]:
    """The header of step's file (`excp.read_header`), read from its first bytes.

    Raises FileNotFoundError for a step that is not saved or whose file is missing, ValueError for an
    unreadable header.
    """
    if step not in self._manager.all_steps():
      raise FileNotFoundError(f"step {step}: no checkpoint in {self.directory} (steps: {self.all_steps()})")
    return ExcpHandler().metadata(self.path(step).parent)

  def parent(self, step: int) -> int | None:
    """The step `step` is coded against (None: a keyframe)."""
    self._check_saved(step)
    return self._parents[step]

  def save(self, state: TrainState) -> SaveInfo:
    """Saves `state` at int(state.step), which must be newer than every saved step.

    The state is a keyframe when the latest step is one, or its chain is damaged (a save never codes against a
    step that cannot be restored).
    """
    if not isinstance(state, TrainState):
      raise TypeError(f"state: expected a TrainState, got {type(state).__name__}")
    step, latest = _step_of(state), self.latest_step()
    if latest is not None and step <= latest:
      raise ValueError(f"state.step: expected > {latest}, the latest saved step, got {step}")
    self._empty_trash()  # what a kill left there (orbax's rename into it would not replace a leftover step)
    chain = None if latest is None else self._chain(latest)
    keyframe = chain is None or (self.keyframe_every > 0 and len(chain) >= self.keyframe_every)
    parent = None if keyframe else latest
    ckpt = split_state(state)
    reference = None if parent is None else self._weights(parent)
    blob, recon = excp.encode(ckpt, reference, self.config, meta={"step": step, "parent": parent})
    self._parents[step] = parent
    try:
      if not self._manager.save(step, args=ExcpSave(blob)):
        raise RuntimeError(f"step {step}: orbax's CheckpointManager declined to save it")
      self._manager.wait_until_finished()
    except BaseException:
      self._manager.reload()
      if step not in self._manager.all_steps():  # failed before the commit
        del self._parents[step]
      raise
    finally:
      for deleted in set(self._parents) - {step, *self._manager.all_steps()}:
        del self._parents[deleted]
      for deleted in set(self._damaged) - set(self._manager.all_steps()):
        del self._damaged[deleted]
    self._empty_trash()
    self._cache = (step, recon.weights)
    return SaveInfo(step, parent, len(blob), ckpt.nbytes)

  def restore(self, like: TrainState, step: int | None = None) -> TrainState:
    """The state at `step` (default the latest), in the structure of `like` (shapes and dtypes must match).

    Raises FileNotFoundError for a step that is not saved, ValueError naming the step and its file when the
    chain to `step` runs through a damaged one.
    """
    if not isinstance(like, TrainState):
      raise TypeError(f"like: expected a TrainState (arrays or abstract), got {type(like).__name__}")
    if not (step is None or checks.is_int(step)):
      raise TypeError(f"step: expected an int or None (the latest), got {step!r}")
    step = self.latest_step() if step is None else int(step)
    if step is None:
      raise FileNotFoundError(f"manager: no checkpoint in {self.directory}")
    return merge_state(self._decode(step), like)

  def close(self) -> None:
    self._manager.close()

  def _read_parent(self, step: int) -> None:
    """Records step's parent from its header, or, when that cannot be read, what is wrong with the file."""
    path = self.path(step)
    try:
      meta = self.header(step).get("meta")
    except FileNotFoundError:
      self._damaged[step] = f"its ExCP file {path} is missing (a deletion cut short leaves a step so)"
      return
    except (OSError, ValueError) as e:
      self._damaged[step] = f"unreadable ExCP header in {path} ({e})"
      return
    meta = meta if isinstance(meta, dict) else {}
    parent = meta.get("parent", -1)
    if not (meta.get("step") == step and (parent is None or (checks.is_int(parent) and 0 <= parent < step))):
      expected = f"{{'step': {step}, 'parent': an earlier step or None}}"
      self._damaged[step] = f"unreadable ExCP header in {path}: expected meta {expected}, got {meta}"
      return
    self._parents[step] = parent

  def _empty_trash(self) -> None:
    """Removes the steps retention renamed into TRASH (a kill can leave some half removed there)."""
    trash = self.directory / TRASH
    if trash.exists():
      shutil.rmtree(os.fspath(trash))

  def _check_saved(self, step: int, restoring: int | None = None) -> None:
    if step in self._damaged:
      context = "" if restoring is None else f" (restoring step {restoring})"
      raise ValueError(f"step {step} in {self.directory}{context}: {self._damaged[step]}")
    if step not in self._parents:
      raise FileNotFoundError(f"step {step}: no checkpoint in {self.directory} (steps: {self.all_steps()})")

  def _chain(self, step: int) -> list[int] | None:
    """step and the steps back to its keyframe, newest first; None when one of them is damaged or missing."""
    chain = [step]
    while chain[-1] in self._parents:
      parent = self._parents[chain[-1]]
      if parent is None:
        return chain
      chain.append(parent)
    return None

  def _decode(self, step: int) -> excp.Checkpoint:
    """Replays the chain to `step`, from the cached reconstruction when it is an ancestor."""
    chain, reference = [step], None
    while True:
      self._check_saved(chain[-1], restoring=step)
      parent = self._parents[chain[-1]]
      if parent is None:
        break
      if self._cache is not None and self._cache[0] == parent:
        reference = self._cache[1]
        break
      chain.append(parent)
    for s in reversed(chain):
      try:
        ckpt = excp.decode(self._manager.restore(s, args=ExcpRestore()), reference)
      except (ValueError, FileNotFoundError) as e:  # damaged since this manager opened
        raise ValueError(f"step {s} in {self.directory} (restoring step {step}): {e} ({self.path(s)})") from e
      reference = ckpt.weights
    self._cache = (step, ckpt.weights)
    return ckpt

  def _weights(self, step: int) -> excp.Arrays:
    if self._cache is not None and self._cache[0] == step:
      return self._cache[1]
    return self._decode(step).weights


def _step_of(state: TrainState) -> int:
  step = np.asarray(state.step)
  if step.ndim != 0 or not np.issubdtype(step.dtype, np.integer):
    got = f"{step.item()!r} ({step.dtype})" if step.ndim == 0 else f"an array {step.dtype}{list(step.shape)}"
    raise TypeError(f"state.step: expected an integer scalar, got {got}")
  if int(step) < 0:
    raise ValueError(f"state.step: expected >= 0, got {int(step)}")
  return int(step)
