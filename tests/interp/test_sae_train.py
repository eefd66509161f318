"""SAE training: the activation stream, a step's constraints, resampling, checkpoint resume."""

import dataclasses

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from paperjax.interp import sae, sae_train
from paperjax.models.transformer import llama

MODEL = llama.LlamaConfig(vocab_size=64, dim=16, n_layers=2, n_heads=2, n_kv_heads=1, ffn_dim=32, max_seq_len=32)
SITE = "blocks.0.hook_resid_post"


@pytest.fixture(scope="module")
def model_params():
  return llama.init(jax.random.key(0), MODEL)


def _windows(n: int, seed: int = 0):
  rng = np.random.default_rng(seed)
  return [rng.integers(0, MODEL.vocab_size, (4, 8)) for _ in range(n)]


def test_collect_and_stream_serve_every_activation_once(model_params):
  windows = _windows(6)
  acts = np.concatenate([sae_train.collect(model_params, MODEL, SITE, w) for w in windows])
  _, _, sites = llama.forward_with_sites(model_params, jnp.asarray(windows[0]), MODEL, (SITE,))
  np.testing.assert_allclose(acts[:32], np.asarray(sites[SITE]).reshape(32, -1), rtol=1e-6)
  stream = sae_train.ActivationStream(model_params, MODEL, SITE, iter(windows), batch_size=16, refill_windows=2)
  served = np.concatenate(list(stream))
  assert stream.tokens_read == 6 * 32 and served.shape == (6 * 32, 16)
  order = lambda a: a[np.lexsort(a.T[::-1])]
  np.testing.assert_allclose(order(served), order(acts), rtol=1e-6)
  assert not np.allclose(served, acts)  # shuffled, across windows
  # a batch larger than one refill keeps reading windows; a short remainder ends the stream
  big = sae_train.ActivationStream(model_params, MODEL, SITE, iter(windows), batch_size=80, refill_windows=1)
  assert [len(b) for b in big] == [80, 80] and big.tokens_read == 192
  assert next(big, None) is None
  with pytest.raises(ValueError, match="site: 'blocks.5.hook_resid_post' is not a site of this model; expected one"):
    sae_train.ActivationStream(model_params, MODEL, "blocks.5.hook_resid_post", iter(windows), batch_size=4)
  bad = sae_train.ActivationStream(model_params, MODEL, SITE, iter([np.full((2, 4), 99)]), batch_size=4)
  with pytest.raises(ValueError, match=r"tokens_BT: expected ids in \[0, 64\)"):
    next(bad)


def test_step_keeps_unit_decoder_rows_tracks_dead_latents_and_threshold():
  cfg = sae.SAEConfig(architecture="batchtopk", d_in=16, d_sae=64, k=2, dead_tokens=64)
  tcfg = sae_train.TrainConfig(steps=10, batch_size=32, lr=1e-2)
  state = sae_train.start_state(sae.init(jax.random.key(0), cfg), cfg, tcfg)
  step = sae_train.make_step(cfg, tcfg)
  rng = np.random.default_rng(0)
  fired_ever = np.zeros(64, bool)
  for _ in range(4):
    before = np.asarray(state.since_fired_F)
    x = jnp.asarray(rng.normal(size=(32, 16)), jnp.float32)
    f = np.asarray(sae.loss(state.params, x, cfg)[1]["f_BF"])
    state, metrics = step(state, x)
    fired = (f != 0).any(0)
    fired_ever |= fired
    np.testing.assert_array_equal(state.since_fired_F, np.where(fired, 0, before + 32))
    np.testing.assert_allclose(np.linalg.norm(state.params["W_dec"], axis=1), 1.0, rtol=1e-5)
  assert float(metrics["dead"]) == pytest.approx(np.mean(before >= 64))
  assert float(state.params["threshold"]) > 0


def test_resampling_reinitialises_only_dead_latents():
  cfg = sae.SAEConfig(architecture="standard", d_in=16, d_sae=64, coefficient=1.0, dead_tokens=10)
  tcfg = sae_train.TrainConfig(steps=10, batch_size=32)
  state = sae_train.start_state(sae.init(jax.random.key(0), cfg), cfg, tcfg)
  x = jnp.asarray(np.random.default_rng(0).normal(size=(32, 16)), jnp.float32)
  state, _ = sae_train.make_step(cfg, tcfg)(state, x)
  dead = np.zeros(64, bool)
  dead[[3, 7, 40]] = True
  state = state.replace(since_fired_F=jnp.where(jnp.asarray(dead), 100, 0))
  new = sae_train.resample_dead(state, x, cfg, jax.random.key(1))
  for name in ("W_dec", "b_enc"):
    np.testing.assert_array_equal(np.asarray(new.params[name])[~dead], np.asarray(state.params[name])[~dead])
  np.testing.assert_array_equal(np.asarray(new.params["W_enc"])[:, ~dead], np.asarray(state.params["W_enc"])[:, ~dead])
  np.testing.assert_allclose(np.linalg.norm(new.params["W_dec"][dead], axis=1), 1.0, rtol=1e-5)
  # each new decoder row is the direction of some input minus b_dec
  dirs = np.array(x - state.params["b_dec"])
  dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
  assert np.all(np.isclose(np.asarray(new.params["W_dec"])[dead] @ dirs.T, 1.0, atol=1e-5).any(1))
  for name in ("mu", "nu"):
    moment = optax.tree_utils.tree_get(new.opt_state, name)
    assert not np.any(np.asarray(moment["W_dec"])[dead]) and np.any(np.asarray(moment["W_dec"])[~dead])
  np.testing.assert_array_equal(new.since_fired_F, 0)


def test_training_lowers_the_loss_and_resumes_from_a_checkpoint(tmp_path):
  cfg = sae.SAEConfig(architecture="topk", d_in=16, d_sae=32, k=3)
  tcfg = sae_train.TrainConfig(steps=30, batch_size=32, lr=1e-2, lr_warmup_steps=2)
  rng = np.random.default_rng(0)
  atoms = rng.normal(size=(24, 16))  # data that is sparse in a dictionary: 2 atoms per row
  codes = [rng.exponential(size=(32, 24)) * (rng.random((32, 24)) < 2 / 24) for _ in range(32)]
  data = [(c @ atoms * 5).astype(np.float32) for c in codes]
  whole = sae_train.train(jax.random.key(0), cfg, tcfg, iter(data))
  assert whole.history["mse"][-10:].mean() < 0.75 * whole.history["mse"][:5].mean()
  assert whole.scale == pytest.approx(sae.normalization_scale(data[0]))
  stream = iter(data)
  half = dataclasses.replace(tcfg, steps=20)
  sae_train.train(jax.random.key(0), cfg, half, stream, checkpoint_dir=tmp_path, checkpoint_every=8)
  resumed = sae_train.train(jax.random.key(9), cfg, tcfg, stream, checkpoint_dir=tmp_path)
  assert int(resumed.state.step) == 30 and len(resumed.history["loss"]) == 10
  chex.assert_trees_all_close(resumed.params, whole.params, rtol=1e-5, atol=1e-6)
  with pytest.raises(ValueError, match="checkpoint_dir: .* holds a run of different SAE or training configs"):
    sae_train.train(jax.random.key(0), dataclasses.replace(cfg, k=4), tcfg, iter(data), checkpoint_dir=tmp_path)
  with pytest.raises(ValueError, match="scale: the checkpoint"):
    sae_train.train(jax.random.key(0), cfg, tcfg, iter(data), scale=2.0, checkpoint_dir=tmp_path)
  with pytest.raises(ValueError, match=r"batches: expected arrays \[batch_size=32, d_in=16\]"):
    sae_train.train(jax.random.key(0), cfg, tcfg, iter([np.zeros((32, 8))]))
