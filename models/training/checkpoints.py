"""Orbax checkpoints of a `TrainState` (or any pytree): atomic saves, typed restores."""

from __future__ import annotations

import os
from typing import Any, TypeVar

import jax
import orbax.checkpoint as ocp

T = TypeVar("T")


def checkpoint_manager(directory: str | os.PathLike, max_to_keep: int = 3) -> ocp.CheckpointManager:
  """An orbax CheckpointManager (atomic: each step is finalised by a rename)."""
  return ocp.CheckpointManager(
    os.fspath(os.path.abspath(directory)), options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True)
  )


def save(manager: ocp.CheckpointManager, state: Any) -> None:
  """Saves any pytree with an integer `step` field (a `TrainState`, an SAE's state) at that step."""
  manager.save(int(state.step), args=ocp.args.StandardSave(state))
  manager.wait_until_finished()


def restore(manager: ocp.CheckpointManager, like: T, step: int | None = None) -> T:
  """Restores `step` (default the latest) into the structure and dtypes of `like`: arrays
  or ShapeDtypeStructs, whose shardings say where each leaf goes (a different mesh than
  the one saved from reshards on load)."""
  step = manager.latest_step() if step is None else step
  if step is None:
    raise FileNotFoundError(f"manager: no checkpoint in {manager.directory}")
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, like)
  return manager.restore(step, args=ocp.args.StandardRestore(abstract))
