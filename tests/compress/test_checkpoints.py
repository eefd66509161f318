"""ExCP checkpoints through orbax: exact keyframes, chains, retention, failed saves, resume."""

import dataclasses

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
  with pytest.raises(ValueError, match="step 4 in .*unreadable ExCP header"):
    checkpoints.ExcpCheckpointManager(tmp_path)


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
