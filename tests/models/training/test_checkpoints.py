"""Checkpoints of a tiny pytree: save and restore, and bad input never passes silently (issue 31):
each case raises an error naming the argument (or the checkpoint's path), the expectation and the value."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from paperjax.models.training import checkpoints, train


def _state(step: int, value: float = 1.0) -> train.TrainState:
  return train.TrainState(jnp.int32(step), {"w": jnp.full((3,), value)}, ())


def _saved(d, *steps: int):
  manager = checkpoints.checkpoint_manager(d / "ckpt")
  for step in steps:
    checkpoints.save(manager, _state(step, float(step)))
  return manager


def _truncated(d, name: str):
  _saved(d, 1)
  file = d / "ckpt" / "1" / name
  file.write_bytes(file.read_bytes()[: len(file.read_bytes()) // 2])
  return checkpoints.restore(checkpoints.checkpoint_manager(d / "ckpt"), _state(0))


def _file(d):
  (d / "a_file").write_text("not a directory")
  return checkpoints.checkpoint_manager(d / "a_file")


CASES = [
  pytest.param(
    lambda d: checkpoints.save(_saved(d, 2), _state(2, 5.0)),
    ValueError,
    r"state.step: expected > 2, the latest saved step in .*ckpt, got 2",
    id="save-same-step",
  ),
  pytest.param(
    lambda d: checkpoints.save(_saved(d, 3), _state(1)),
    ValueError,
    r"state.step: expected > 3, the latest saved step in .*ckpt, got 1",
    id="save-earlier-step",
  ),
  pytest.param(
    _file,
    NotADirectoryError,
    r"directory: expected a directory for the checkpoints, got the file '.*a_file'",
    id="manager-on-a-file",
  ),
  pytest.param(
    lambda d: _truncated(d, "default/_METADATA"),
    ValueError,
    r"ckpt/1: damaged checkpoint of step 1, a metadata file is not valid JSON",
    id="restore-truncated-metadata",
  ),
  pytest.param(
    lambda d: checkpoints.restore(checkpoints.checkpoint_manager(d / "empty"), _state(0)),
    FileNotFoundError,
    r"manager: no checkpoint in .*empty",
    id="restore-empty",
  ),
]


@pytest.mark.parametrize("call, error, match", CASES)
def test_bad_input(call, error, match, tmp_path):
  with pytest.raises(error, match=match):
    call(tmp_path)


def test_save_and_restore(tmp_path):
  manager = _saved(tmp_path, 1, 2)
  restored = checkpoints.restore(checkpoints.checkpoint_manager(tmp_path / "ckpt"), _state(0))
  assert int(restored.step) == 2
  np.testing.assert_array_equal(restored.params["w"], [2.0, 2.0, 2.0])
  assert int(checkpoints.restore(manager, _state(0), step=1).step) == 1
