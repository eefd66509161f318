"""ExCP checkpoints through orbax: exact keyframes, chains, retention, failed saves, kills, resume."""

import dataclasses
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
import traceback

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from paperjax.compress import checkpoints, excp
from paperjax.models.training import lm, train
from paperjax.models.transformer import llama

CFG = llama.LlamaConfig(vocab_size=64, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=64, max_seq_len=32)
TCFG = train.TrainConfig(batch_size=4, seq_len=16, total_steps=40, warmup_steps=2)


@pytest.fixture(scope="module")
def run():
  """A state after each of 12 training steps, and the step function and data to go on."""
  ids = np.random.default_rng(0).integers(0, CFG.vocab_size, 4000).astype(np.int32)
  segments = np.zeros_like(ids)
  step = lm.make_train_step(CFG, TCFG)
  states = [lm.init_state(jax.random.key(0), CFG, TCFG)]
  for i in range(12):
    states.append(step(states[-1], lm.batch_at(ids, segments, i, TCFG))[0])
  return states, step, lambda i: lm.batch_at(ids, segments, i, TCFG)


def _max_abs_diff(a, b):
  return max(float(jnp.abs(x - y).max()) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True))


def test_a_keyframe_restores_the_state_exactly(run, tmp_path):
  states, _, _ = run
  with checkpoints.ExcpCheckpointManager(tmp_path) as manager:
    info = manager.save(states[3])
    assert info.parent is None and info.step == 3 and info.dense_nbytes > 0
    restored = manager.restore(states[0])
  chex.assert_trees_all_equal(restored, states[3])  # params, mu, nu, every count and the step
  assert jax.tree.structure(restored) == jax.tree.structure(states[3])


def test_retention_keeps_every_step_a_kept_chain_needs(run, tmp_path):
  states, _, _ = run
  manager = checkpoints.ExcpCheckpointManager(tmp_path, max_to_keep=2, keyframe_every=3)
  kept, parents = [], []
  for s in (2, 4, 6, 8, 10, 12):
    parents.append(manager.save(states[s]).parent)
    kept.append(manager.all_steps())
  assert parents == [None, 2, 4, None, 8, 10]
  # The newest two, plus what they need: 6 needs 4 needs 2 until the keyframe 8 has a child.
  assert kept == [[2], [2, 4], [2, 4, 6], [2, 4, 6, 8], [8, 10], [8, 10, 12]]
  restored = {s: manager.restore(states[0], step=s) for s in (8, 10, 12)}
  manager.close()
  reopened = checkpoints.ExcpCheckpointManager(tmp_path, max_to_keep=2, keyframe_every=3)
  assert [reopened.parent(s) for s in reopened.all_steps()] == [None, 8, 10]
  for s, state in restored.items():
    chex.assert_trees_all_equal(reopened.restore(states[0], step=s), state)  # the same replay from disk
    assert int(state.step) == s
    # Two training steps move the params 5.5e-3..6e-3 (max abs); the lossy chain is off by at most 2.5e-3,
    # a restore one chain link behind by 5.5e-3..6.9e-3: a bound at 0.6x the two-step move tells them apart.
    bound = 0.6 * _max_abs_diff(states[s].params, states[s - 2].params)
    chex.assert_trees_all_close(state.params, states[s].params, rtol=0.0, atol=bound)
  assert reopened.save(states[12].replace(step=jnp.int32(14))).parent is None  # the third save after 8
  assert reopened.all_steps() == [8, 10, 12, 14]


def test_a_save_that_fails_midway_leaves_the_earlier_checkpoints(run, tmp_path, monkeypatch):
  states, _, _ = run
  manager = checkpoints.ExcpCheckpointManager(tmp_path)
  manager.save(states[2])
  manager.save(states[4])
  before = manager.restore(states[0], step=4)

  def failing_save(self, directory, args):
    (directory / checkpoints.FILE).write_bytes(args.blob[: len(args.blob) // 2])
    raise OSError("disk full")

  with monkeypatch.context() as patch:
    patch.setattr(checkpoints.ExcpHandler, "save", failing_save)
    with pytest.raises(OSError, match="disk full"):
      manager.save(states[6])
  assert manager.all_steps() == [2, 4]
  reopened = checkpoints.ExcpCheckpointManager(tmp_path)
  assert reopened.all_steps() == [2, 4]
  chex.assert_trees_all_equal(reopened.restore(states[0]), before)
  assert manager.save(states[6]).parent == 4  # the same manager goes on
  again = checkpoints.ExcpCheckpointManager(tmp_path)
  assert again.save(states[8]).parent == 6  # and so does a reopened one
  chex.assert_trees_all_equal(checkpoints.ExcpCheckpointManager(tmp_path).restore(states[0]), again.restore(states[0]))


def test_each_residual_is_coded_against_the_previous_reconstruction(run, tmp_path):
  states, _, _ = run
  manager = checkpoints.ExcpCheckpointManager(tmp_path)
  for s in (2, 4, 6, 8):
    manager.save(states[s])
  for s in (4, 6, 8):  # three residuals in a row: 6 and 8 have lossy references
    previous = checkpoints.split_state(manager.restore(states[0], step=s - 2))
    _, expected = excp.encode(checkpoints.split_state(states[s]), previous.weights, manager.config)
    chex.assert_trees_all_equal(manager.restore(states[0], step=s), checkpoints.merge_state(expected, states[0]))


def test_a_corrupt_step_file_raises_naming_the_step(run, tmp_path):
  states, _, _ = run
  manager = checkpoints.ExcpCheckpointManager(tmp_path)
  for s in (2, 4, 6):
    manager.save(states[s])
  (path,) = tmp_path.glob("4/*/" + checkpoints.FILE)
  blob = bytearray(path.read_bytes())
  blob[-100] ^= 1
  path.write_bytes(bytes(blob))
  reopened = checkpoints.ExcpCheckpointManager(tmp_path)
  chex.assert_trees_all_equal(reopened.restore(states[0], step=2), states[2])
  for step in (4, 6):  # 6's chain runs through 4
    with pytest.raises(ValueError, match=f"step 4 in .* \\(restoring step {step}\\): blob: checksum"):
      reopened.restore(states[0], step=step)
  path.write_bytes(bytes(blob[:20]))  # truncated inside the header
  reopened = checkpoints.ExcpCheckpointManager(tmp_path)  # opens: only a restore through step 4 reads it
  assert reopened.all_steps() == [2, 4, 6]
  chex.assert_trees_all_equal(reopened.restore(states[0], step=2), states[2])
  with pytest.raises(
    ValueError, match=rf"step 4 in .* \(restoring step 6\): unreadable ExCP header in {re.escape(str(path))}"
  ):
    reopened.restore(states[0])
  with pytest.raises(ValueError, match="step 4 in .*: unreadable ExCP header .*blob: truncated"):
    reopened.parent(4)
  assert reopened.save(states[8]).parent is None  # 6's chain is damaged: a keyframe, not a residual against it
  chex.assert_trees_all_equal(reopened.restore(states[0]), states[8])


def test_training_resumes_from_a_compressed_checkpoint(run, tmp_path):
  states, step, batch = run
  manager = checkpoints.ExcpCheckpointManager(tmp_path)
  for s in (4, 8):
    manager.save(states[s])
  resumed, original = manager.restore(states[0]), states[8]
  losses = {"resumed": [], "original": []}
  for i in range(8, 12):
    resumed, metrics_r = step(resumed, batch(i))
    original, metrics_o = step(original, batch(i))
    losses["resumed"].append(float(metrics_r["loss"]))
    losses["original"].append(float(metrics_o["loss"]))
  assert int(resumed.step) == 12
  # The first step shows which state was restored: measured gap 2e-4 relative; from states[4] it is 1e-2.
  np.testing.assert_allclose(losses["resumed"][0], losses["original"][0], rtol=1e-3)
  older = float(step(states[4], batch(8))[1]["loss"])
  assert abs(older - losses["original"][0]) > 10 * abs(losses["resumed"][0] - losses["original"][0])
  np.testing.assert_allclose(losses["resumed"], losses["original"], rtol=1e-2)  # the gap grows to 4e-3 by step 11


def test_bad_use_raises_clear_errors(run, tmp_path):
  states, _, _ = run
  with pytest.raises(ValueError, match="max_to_keep=2: needs keyframe_every"):
    checkpoints.ExcpCheckpointManager(tmp_path / "a", max_to_keep=2)
  with pytest.raises(ValueError, match="keyframe_every"):
    checkpoints.ExcpCheckpointManager(tmp_path / "a", keyframe_every=-1)
  manager = checkpoints.ExcpCheckpointManager(tmp_path / "b", excp.ExcpConfig(coder="zstd"))
  with pytest.raises(FileNotFoundError, match="no checkpoint"):
    manager.restore(states[0])
  manager.save(states[4])
  with pytest.raises(ValueError, match="state.step: expected > 4"):
    manager.save(states[4])
  other = lm.init_state(jax.random.key(0), dataclasses.replace(CFG, ffn_dim=96), TCFG)
  with pytest.raises(ValueError, match=r"\['layers'\]\['w1'\]: expected float32\[2, 32, 96\]"):
    manager.restore(other)
  sgd = train.TrainState(jnp.int32(1), states[0].params, optax.sgd(0.1).init(states[0].params))
  with pytest.raises(ValueError, match="opt_state: expected an Adam state"):
    manager.save(dataclasses.replace(sgd, step=jnp.int32(9)))


# ---------------------------------------------------------------------------- kills

KILL_CFG = excp.ExcpConfig(coder="zstd", level=1)  # lzma's preset 9 takes ~0.1 s a save even on 64 weights
W = 64


def _moved(step):
  return (5 * step + 16 * np.arange(4)) % W


def _state(step):
  """The state the kill tests' children save at `step`, regenerated from the number alone.

  Each step moves 4 of the 64 weights by a multiple of 1/4 and has m and v nonzero at those 4 only, so the codec
  stores a residual against step - 1 exactly: median |dW| = 0 keeps the moved weights and no other, |m| > beta *
  mean |m| keeps their moments, and 4 <= 2^bits - 1 kept values are stored raw (`test_the_kill_tests_states_...`).
  """
  w, m, v = (np.zeros(W, np.float32) for _ in range(3))
  for t in range(1, step + 1):
    w[_moved(t)] += 0.25 * (1 + t % 3)
  if step > 0:
    m[_moved(step)] = 2.0**-10 * np.arange(1, 5)
    v[_moved(step)] = 2.0**-20 * np.arange(1, 5)
  adam = optax.ScaleByAdamState(count=np.int32(step), mu={"w": m}, nu={"w": v})
  return train.TrainState(np.int32(step), {"w": w}, (adam, optax.EmptyState()))


def _kill_manager(directory):
  return checkpoints.ExcpCheckpointManager(directory, KILL_CFG, max_to_keep=1, keyframe_every=2)


def _child(mode, directory):
  """Saves _state(latest + 1), _state(latest + 2), ... in `directory` until killed (2000 saves at most; 10 when it
  is to kill itself).

  "file-removed" and "folder-emptied" SIGKILL the process inside the first removal of a step's directory: right
  after its ExCP file is unlinked, or just before the emptied directory itself goes. Whichever code removes it
  (orbax's shutil.rmtree, its parallel per-file deleter, the manager's trash) calls os.unlink and os.rmdir.
  """
  if mode == "file-removed":
    unlink = os.unlink

    def unlink_then_die(path, *args, **kwargs):
      unlink(path, *args, **kwargs)
      if os.path.basename(os.fsdecode(path)) == checkpoints.FILE:
        os.kill(os.getpid(), signal.SIGKILL)

    os.unlink = os.remove = unlink_then_die
  elif mode == "folder-emptied":
    rmdir = os.rmdir

    def die_then_rmdir(path, *args, **kwargs):
      if os.path.basename(os.fsdecode(path)).isdigit():  # a step's directory, emptied
        os.kill(os.getpid(), signal.SIGKILL)
      rmdir(path, *args, **kwargs)

    os.rmdir = die_then_rmdir
  manager = _kill_manager(directory)
  print("ready", flush=True)
  start = (manager.latest_step() or 0) + 1
  for step in range(start, start + (2000 if mode == "loop" else 10)):
    manager.save(_state(step))


def _zygote():
  """For each line "MODE DIRECTORY" on stdin, forks a `_child`, prints "pid PID" and, when it ends, "exit CODE".

  jax and orbax are imported once (4 s on 2 cores) for every kill. The fork is safe: this process runs one thread
  (the imports start none) and the children touch no jax device.
  """
  for line in sys.stdin:
    mode, directory = line.split()
    assert threading.active_count() == 1, f"forking with threads: {threading.enumerate()}"
    pid = os.fork()
    if pid == 0:
      code = 1
      try:
        _child(mode, directory)
        code = 0
      except BaseException:
        traceback.print_exc()
      finally:
        sys.stdout.flush()
        os._exit(code)
    print(f"pid {pid}", flush=True)
    print(f"exit {os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])}", flush=True)


class Zygote:
  """The test side of `_zygote`: a subprocess that loads this file and forks the children."""

  def __init__(self):
    load = (
      "import importlib.util, sys; spec = importlib.util.spec_from_file_location('kill_children', sys.argv[1]); "
      "module = importlib.util.module_from_spec(spec); spec.loader.exec_module(module); module._zygote()"
    )
    self.proc = subprocess.Popen(
      [sys.executable, "-c", load, __file__], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    self.lines = queue.Queue()
    self.running = None  # the child started and not yet reported ended
    threading.Thread(target=lambda: [self.lines.put(line) for line in self.proc.stdout], daemon=True).start()

  def _line(self):
    try:
      return self.lines.get(timeout=60).split()
    except queue.Empty:
      raise AssertionError("the kill test's child process said nothing for 60 s") from None

  def start(self, mode, directory):
    """The pid of a child saving in `directory`, once it has opened its manager."""
    self.proc.stdin.write(f"{mode} {directory}\n")
    self.proc.stdin.flush()
    pid, ready = None, False
    while pid is None or not ready:
      line = self._line()
      assert line[0] in ("pid", "ready"), f"the child ended before it was ready: {line}"
      pid, ready = (int(line[1]), ready) if line[0] == "pid" else (pid, True)
    self.running = pid
    return pid

  def wait(self):
    """The exit code of the child (-9: SIGKILL)."""
    while (line := self._line())[0] != "exit":
      pass
    self.running = None
    return int(line[1])

  def close(self):
    if self.running is not None:  # a test failed before its child ended
      os.kill(self.running, signal.SIGKILL)
    self.proc.stdin.close()
    self.proc.wait(timeout=60)


@pytest.fixture(scope="module")
def zygote():
  z = Zygote()
  yield z
  z.close()


def _assert_whole(directory):
  """Every step directory holds its ExCP file: nothing half deleted that a manager would have to read past."""
  for step_dir in directory.iterdir():
    if step_dir.name.isdigit():
      assert (step_dir / checkpoints.ITEM / checkpoints.FILE).is_file(), f"step {step_dir.name} is half deleted"


def test_the_kill_tests_states_round_trip_exactly(tmp_path):
  manager = checkpoints.ExcpCheckpointManager(tmp_path, KILL_CFG, keyframe_every=3)
  assert [manager.save(_state(s)).parent for s in range(1, 7)] == [None, 1, 2, None, 4, 5]
  assert not np.array_equal(_state(2).params["w"], _state(3).params["w"])  # each step moves the weights
  for s in range(1, 7):
    chex.assert_trees_all_equal(manager.restore(_state(0), step=s), _state(s))


@pytest.mark.parametrize("mode", ["file-removed", "folder-emptied"])
def test_a_kill_inside_a_deletion_leaves_a_manager_that_resumes(zygote, tmp_path, mode):
  zygote.start(mode, tmp_path)
  # Saves 1 (a keyframe), 2 (-> 1), 3 (a keyframe: 1 and 2 go), and dies inside that first deletion.
  assert zygote.wait() == -signal.SIGKILL
  _assert_whole(tmp_path)
  manager = _kill_manager(tmp_path)
  assert manager.all_steps() == [3]
  chex.assert_trees_all_equal(manager.restore(_state(0)), _state(3))
  for s in (4, 5, 6):  # and goes on: 5 is a keyframe, 3 and 4 go
    manager.save(_state(s))
  assert manager.all_steps() == [5, 6]
  assert sorted(p.name for p in tmp_path.iterdir()) == ["5", "6"]  # the half-removed steps in the trash are gone
  chex.assert_trees_all_equal(_kill_manager(tmp_path).restore(_state(0)), _state(6))


def test_kills_at_random_moments_leave_a_manager_that_resumes(zygote, tmp_path):
  latest = 0
  for delay in np.random.default_rng(0).uniform(0.0, 0.5, 6):
    pid = zygote.start("loop", tmp_path)  # each child resumes after the latest step on disk
    time.sleep(delay)
    os.kill(pid, signal.SIGKILL)
    assert zygote.wait() == -signal.SIGKILL
    _assert_whole(tmp_path)
    with _kill_manager(tmp_path) as manager:
      assert (manager.latest_step() or 0) >= latest
      latest = manager.latest_step() or 0
      if latest:
        chex.assert_trees_all_equal(manager.restore(_state(0)), _state(latest))
  assert latest >= 10  # the children saved (and so deleted) between the kills


@pytest.mark.parametrize("damage", ["file-removed", "folder-emptied"])
def test_a_half_deleted_step_no_kept_chain_needs_is_never_read(tmp_path, damage):
  """A directory left as orbax's in-place deletion leaves it when killed (before the manager renamed steps away)."""
  with checkpoints.ExcpCheckpointManager(tmp_path, KILL_CFG, keyframe_every=2) as manager:
    for s in (1, 2, 3):  # 1 (a keyframe), 2 (-> 1), 3 (a keyframe)
      manager.save(_state(s))
  step_dir = tmp_path / "1"
  if damage == "file-removed":
    (step_dir / checkpoints.ITEM / checkpoints.FILE).unlink()
  else:
    for p in sorted(step_dir.rglob("*"), key=lambda p: -len(p.parts)):
      p.rmdir() if p.is_dir() else p.unlink()
    assert step_dir.is_dir() and not any(step_dir.iterdir())
  manager = _kill_manager(tmp_path)
  assert manager.all_steps() == [1, 2, 3]
  chex.assert_trees_all_equal(manager.restore(_state(0)), _state(3))
  file = tmp_path / "1" / checkpoints.ITEM / checkpoints.FILE
  with pytest.raises(
    ValueError, match=rf"step 1 in .* \(restoring step 2\): its ExCP file {re.escape(str(file))} is missing"
  ):
    manager.restore(_state(0), step=2)
  with pytest.raises(FileNotFoundError, match=re.escape(str(file))):
    manager.header(1)
  assert manager.save(_state(4)).parent == 3
  assert manager.all_steps() == [3, 4]  # retention deleted 1 and 2, which no kept chain needs
  assert sorted(p.name for p in tmp_path.iterdir()) == ["3", "4"]


def test_a_damaged_latest_step_raises_when_restored_and_the_next_save_is_a_keyframe(tmp_path):
  with _kill_manager(tmp_path) as manager:
    for s in (1, 2):
      manager.save(_state(s))
  file = tmp_path / "2" / checkpoints.ITEM / checkpoints.FILE
  file.write_bytes(b"PJEXCP")  # truncated in the magic
  manager = _kill_manager(tmp_path)
  message = (
    rf"step 2 in {re.escape(str(tmp_path))} \(restoring step 2\): unreadable ExCP header in {re.escape(str(file))}"
  )
  with pytest.raises(ValueError, match=message + r" \(blob: expected an ExCP file"):
    manager.restore(_state(0))
  chex.assert_trees_all_equal(manager.restore(_state(0), step=1), _state(1))
  assert manager.save(_state(3)).parent is None
  assert manager.all_steps() == [3]
  chex.assert_trees_all_equal(manager.restore(_state(0)), _state(3))
