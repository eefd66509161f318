"""Orbax checkpoints of a `TrainState` (or any pytree): atomic saves, typed restores."""

from __future__ import annotations

import json
import os
from typing import Any, TypeVar

import jax
import orbax.checkpoint as ocp

T = TypeVar("T")


def checkpoint_manager(directory: str | os.PathLike, max_to_keep: int = 3) -> ocp.CheckpointManager:
  """An orbax CheckpointManager (atomic: each step is finalised by a rename). `directory` is
  created if missing; an existing file there is refused now (orbax would fail on the first
  save, in its background thread)."""
  path = os.path.abspath(os.fspath(directory))
  if os.path.exists(path) and not os.path.isdir(path):
    raise NotADirectoryError(f"directory: expected a directory for the checkpoints, got the file {path!r}")
  return ocp.CheckpointManager(path, options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True))


def save(manager: ocp.CheckpointManager, state: Any) -> None:
  """Saves any pytree with an integer `step` field (a `TrainState`, an SAE's state) at that step.

  Raises ValueError for a step at or before the latest saved one (orbax would keep the old
  checkpoint and drop this one silently)."""
  step, latest = int(state.step), manager.latest_step()
  if latest is not None and step <= latest:
    raise ValueError(
      f"state.step: expected > {latest}, the latest saved step in {manager.directory}, got {step} "
      "(delete that checkpoint, or save into another directory, to go back)"
    )
  manager.save(step, args=ocp.args.StandardSave(state))
  manager.wait_until_finished()


def restore(manager: ocp.CheckpointManager, like: T, step: int | None = None) -> T:
  """Restores `step` (default the latest) into the structure and dtypes of `like`: arrays
  or ShapeDtypeStructs, whose shardings say where each leaf goes (a different mesh than
  the one saved from reshards on load). A damaged checkpoint raises ValueError naming its path."""
  step = manager.latest_step() if step is None else step
  if step is None:
    raise FileNotFoundError(f"manager: no checkpoint in {manager.directory}")
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, like)
  try:
    return manager.restore(step, args=ocp.args.StandardRestore(abstract))
  except (json.JSONDecodeError, UnicodeDecodeError) as e:  # a truncated or overwritten metadata file
    path = os.path.join(os.fspath(manager.directory), str(step))
    raise ValueError(f"{path}: damaged checkpoint of step {step}, a metadata file is not valid JSON ({e})") from e
