"""Bad inputs to the compress package, as a user in a hurry gets them wrong: each raises naming the argument."""

import dataclasses
import functools
import math
import pathlib

import ml_dtypes
import numpy as np
import optax
import pytest

from paperjax.compress import checkpoints, excp
from paperjax.models.training import train

W = {"w": np.linspace(-1.0, 1.0, 64, dtype=np.float32)}
M = {"w": np.full(64, 1e-3, np.float32)}
V = {"w": np.full(64, 1e-6, np.float32)}
CKPT = excp.Checkpoint(W, M, V, {})
CFG = excp.ExcpConfig(coder="zstd", level=1)


@functools.cache
def _residual() -> bytes:
  """A file coded against W: decoding it needs W."""
  return excp.encode(excp.Checkpoint({"w": W["w"] + np.float32(0.5) * M["w"]}, M, V, {}), W, CFG)[0]


def _state(step=1, params=None) -> train.TrainState:
  params = {"w": np.ones(8, np.float32)} if params is None else params
  adam = optax.ScaleByAdamState(np.int32(step), _zeros(params), _zeros(params))
  return train.TrainState(np.int32(step), params, (adam, optax.EmptyState()))


def _zeros(params):
  return {name: np.zeros_like(x) for name, x in params.items()}


def _manager() -> checkpoints.ExcpCheckpointManager:
  """A manager in the test's directory (the cwd) holding step 1."""
  manager = checkpoints.ExcpCheckpointManager("ckpt", CFG)
  if manager.latest_step() is None:
    manager.save(_state(1))
  return manager


def _a_file() -> str:
  pathlib.Path("notes.txt").write_text("not a directory")
  return "notes.txt"


CASES = [
  # ExcpConfig
  pytest.param(lambda: excp.ExcpConfig(alpha=-1e-4), ValueError, "alpha: expected .* >= 0, got -0.0001", id="alpha<0"),
  pytest.param(lambda: excp.ExcpConfig(beta=math.nan), ValueError, "beta: expected a finite .*got nan", id="beta-nan"),
  pytest.param(
    lambda: excp.ExcpConfig(alpha="5e-5"), ValueError, "alpha: expected .*float.*got '5e-5'", id="alpha-str"
  ),
  pytest.param(  # passed, then failed at the first encode: JSON has no numpy float32
    lambda: excp.ExcpConfig(alpha=np.float32(5e-5)), ValueError, "alpha: expected a finite Python float", id="alpha-f32"
  ),
  # Passed: a 1-bit codebook.
  pytest.param(lambda: excp.ExcpConfig(bits=True), ValueError, "bits: expected an int.*got True", id="bits-bool"),
  pytest.param(
    lambda: excp.ExcpConfig(coder="zstd", level=0), ValueError, "level: expected 1..22 for zstd, got 0", id="level"
  ),
  # encode / decode
  pytest.param(
    lambda: excp.encode(CKPT, None, {"bits": 4}), TypeError, "cfg: expected an excp.ExcpConfig", id="cfg-dict"
  ),
  pytest.param(
    lambda: excp.encode(dict(CKPT._asdict()), None, CFG), TypeError, "ckpt: expected an excp.Checkpoint", id="ckpt"
  ),
  pytest.param(
    lambda: excp.encode(excp.Checkpoint({"w": [0.5, 1.0]}, M, V, {}), None, CFG),
    TypeError,
    r"weights\['w'\]: expected an array, got list",
    id="leaf-list",
  ),
  pytest.param(
    lambda: excp.encode(excp.Checkpoint({"w": W["w"] * np.nan}, M, V, {}), None, CFG),
    ValueError,
    r"weights\['w'\]: expected finite values, got 64 non-finite",
    id="weights-nan",
  ),
  pytest.param(
    lambda: excp.encode(CKPT, None, CFG, meta={"step": np.int64(3)}),
    TypeError,
    "meta: expected a mapping of JSON-serialisable values",
    id="meta-json",
  ),
  pytest.param(lambda: excp.decode(_residual().hex(), W), TypeError, "blob: expected bytes.*got str", id="blob-str"),
  pytest.param(
    lambda: excp.decode(_residual(), None), ValueError, "reference: .*fingerprint .*got none", id="no-reference"
  ),
  # ExcpCheckpointManager
  pytest.param(  # opened, then failed at the first save, inside orbax's temporary directory
    lambda: checkpoints.ExcpCheckpointManager(_a_file()),
    NotADirectoryError,
    "directory: expected a directory .*got the file .*notes.txt",
    id="dir-is-file",
  ),
  pytest.param(lambda: checkpoints.ExcpCheckpointManager(None), TypeError, "directory: expected a path", id="dir-none"),
  pytest.param(
    lambda: checkpoints.ExcpCheckpointManager("ckpt", "zstd"),
    TypeError,
    "config: expected an excp.ExcpConfig",
    id="config",
  ),
  pytest.param(
    lambda: checkpoints.ExcpCheckpointManager("ckpt", max_to_keep=0, keyframe_every=2),
    ValueError,
    "max_to_keep: expected >= 1 or None, got 0",
    id="keep=0",
  ),
  pytest.param(  # failed at the first deletion, in orbax: "slice indices must be integers"
    lambda: checkpoints.ExcpCheckpointManager("ckpt", max_to_keep=2.5, keyframe_every=2),
    TypeError,
    "max_to_keep: expected an int >= 1 or None, got 2.5",
    id="keep-float",
  ),
  pytest.param(
    lambda: _manager().save(_state().params), TypeError, "state: expected a TrainState, got dict", id="save-params"
  ),
  # Saved into a folder named -1, which no manager lists: the checkpoint was lost without a word.
  pytest.param(lambda: _manager().save(_state(step=-1)), ValueError, "state.step: expected >= 0, got -1", id="step<0"),
  pytest.param(  # saved as step 2
    lambda: _manager().save(dataclasses.replace(_state(2), step=np.float32(2.5))),
    TypeError,
    r"state.step: expected an integer scalar, got 2.5 \(float32\)",
    id="step-float",
  ),
  pytest.param(
    lambda: _manager().restore(_state(), step=7),
    FileNotFoundError,
    r"step 7: no checkpoint .*\(steps: \[1\]\)",
    id="missing",
  ),
  pytest.param(  # said "step 1: no checkpoint ... (steps: [1])"
    lambda: _manager().restore(_state(), step="1"),
    TypeError,
    r"step: expected an int or None \(the latest\), got '1'",
    id="step-str",
  ),
  pytest.param(
    lambda: _manager().restore(_state().params), TypeError, "like: expected a TrainState.*got dict", id="like-params"
  ),
  pytest.param(
    lambda: _manager().restore(_state(params={"w": np.ones(4, np.float32)})),
    ValueError,
    r"mu\['w'\]: expected float32\[4\] as in like, got float32\[8\]",
    id="like-shape",
  ),
  # ---- the coding primitives ----
  pytest.param(
    lambda: excp.pack_bits(np.array([20, 1]), 4),
    ValueError,
    r"values: expected integers in \[0, 15\], got \[20\] at index \[0\]",
    id="pack-bits-too-large",
  ),
  pytest.param(
    lambda: excp.unpack_bits(b"\x12", 4, 10),
    ValueError,
    r"data: expected 5 bytes for 10 values of 4 bits, got 1",
    id="unpack-bits-short",
  ),
  pytest.param(
    lambda: excp.kmeans_1d(np.array([1.0, np.nan]), 2),
    ValueError,
    r"x: expected finite values, got \[nan\]",
    id="kmeans-nan",
  ),
  pytest.param(
    lambda: excp.masks(W["w"], M["w"], -np.ones(64, np.float32), alpha=5e-5, beta=2.0),
    ValueError,
    r"v: expected second moments >= 0, got \[-1\.0",
    id="masks-negative-v",
  ),
  pytest.param(
    lambda: excp.masks(W["w"], M["w"][:3], V["w"], alpha=5e-5, beta=2.0),
    ValueError,
    r"dw, m, v: expected one shape, got \(64,\), \(3,\), \(64,\)",
    id="masks-shapes",
  ),
]


@pytest.fixture(autouse=True)
def _in_tmp_path(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)  # the cases' managers and files are relative to the cwd


@pytest.mark.parametrize("call, error, match", CASES)
def test_bad_input(call, error, match):
  with pytest.raises(error, match=match):
    call()


def test_pack_bits_round_trips_and_masks_take_bfloat16():
  values = np.array([0, 15, 7, 1, 9], np.uint8)
  np.testing.assert_array_equal(excp.unpack_bits(excp.pack_bits(values, 4), 4, 5), values)
  keep, _ = excp.masks(W["w"].astype(ml_dtypes.bfloat16), M["w"], V["w"], alpha=5e-5, beta=2.0)
  assert keep.shape == (64,)
