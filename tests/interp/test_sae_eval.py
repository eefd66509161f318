"""SAE evaluation: explained variance, splicing, contexts, steering (SAELens files: test_sae_io.py)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from paperjax.interp import sae, sae_eval
from paperjax.models.data import tokenizer
from paperjax.models.recurrent import based
from paperjax.models.serving import generate
from paperjax.models.transformer import llama

MODEL = llama.LlamaConfig(vocab_size=64, dim=16, n_layers=2, n_heads=2, n_kv_heads=1, ffn_dim=32, max_seq_len=64)
SITE = "blocks.0.hook_resid_post"
D = MODEL.dim


@pytest.fixture(scope="module")
def model_params():
  return llama.init(jax.random.key(0), MODEL)


def _tokens(shape=(4, 12), seed=0):
  return jnp.asarray(np.random.default_rng(seed).integers(0, MODEL.vocab_size, shape), jnp.int32)


def _identity_sae() -> tuple[dict, sae.SAEConfig]:
  """ReLU(x) - ReLU(-x) = x: a standard SAE with W_enc = [I, -I], W_dec = [I; -I] is exact."""
  eye = np.eye(D, dtype=np.float32)
  cfg = sae.SAEConfig(architecture="standard", d_in=D, d_sae=2 * D, coefficient=1.0)
  params = {"W_enc": np.concatenate([eye, -eye], 1), "W_dec": np.concatenate([eye, -eye], 0)}
  params |= {"b_enc": np.zeros(2 * D, np.float32), "b_dec": np.zeros(D, np.float32)}
  return {k: jnp.asarray(v) for k, v in params.items()}, cfg


def test_explained_variance():
  x = jnp.asarray(np.random.default_rng(0).normal(size=(50, 6)) + 3.0, jnp.float32)
  assert float(sae_eval.explained_variance(x, x)) == 1.0
  assert float(sae_eval.explained_variance(x, jnp.broadcast_to(x.mean(0), x.shape))) == pytest.approx(0.0, abs=1e-6)
  x_hat = x + jnp.asarray(np.random.default_rng(1).normal(size=x.shape), jnp.float32) * 0.5
  xs, hs = np.asarray(x, np.float64), np.asarray(x_hat, np.float64)
  # the form: 1 - E||x - x_hat||^2 / (E||x||^2 - ||E x||^2)
  expected = 1 - np.mean(np.sum((xs - hs) ** 2, 1)) / (np.mean(np.sum(xs**2, 1)) - np.sum(xs.mean(0) ** 2))
  assert float(sae_eval.explained_variance(x, x_hat)) == pytest.approx(expected, rel=1e-5)


def test_reconstruction_metrics_and_density_histogram():
  params, cfg = _identity_sae()
  x = np.random.default_rng(0).normal(size=(40, D)).astype(np.float32)
  x[:, 0] = np.abs(x[:, 0])  # latent D (the -x_0 half) never fires; latent 0 fires on every row
  r = sae_eval.reconstruction(params, cfg, x, chunk=16)
  assert r.explained_variance == pytest.approx(1.0) and r.mse == pytest.approx(0.0, abs=1e-10)
  f = np.concatenate([np.maximum(x, 0), np.maximum(-x, 0)], 1)
  assert r.l0 == pytest.approx(np.mean((f != 0).sum(1)))
  assert r.dead == pytest.approx(1 / (2 * D)) and r.frequency_F[0] == 1.0 and r.frequency_F[D] == 0.0
  freq = (f != 0).mean(0)  # from the features written out above, not from the result
  np.testing.assert_allclose(r.frequency_F, freq)
  assert r.dense == pytest.approx(np.mean(freq > 0.1))
  counts, dead = sae_eval.density_histogram(np.array([0.0, 1e-5, 2e-5, 0.3, 1.0]), bins=(-6, -4, -1, 0))
  assert dead == 1 and counts.tolist() == [2, 0, 2]


def test_splicing_identity_recovers_everything_and_zero_nothing(model_params):
  tokens = _tokens()
  params, cfg = _identity_sae()
  result = sae_eval.splice(model_params, MODEL, SITE, params, cfg, tokens)
  assert result.loss_recovered == pytest.approx(1.0, abs=1e-4) and result.kl == pytest.approx(0.0, abs=1e-5)
  zero = params | {"W_dec": jnp.zeros_like(params["W_dec"])}
  result = sae_eval.splice(model_params, MODEL, SITE, zero, cfg, tokens)
  assert result.loss_recovered == pytest.approx(0.0, abs=1e-6) and result.kl > 0
  # the clean CE, from the logits by hand
  logits = np.asarray(llama.forward(model_params, tokens, MODEL)[0], np.float64)
  logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  t = np.asarray(tokens)
  ce = -np.mean([logp[b, i, t[b, i + 1]] for b in range(t.shape[0]) for i in range(t.shape[1] - 1)])
  assert result.ce_clean == pytest.approx(ce, rel=1e-5)
  assert result.ce_zero != pytest.approx(result.ce_clean, rel=1e-3)


def test_top_contexts():
  tok = tokenizer.from_name("cl100k_base")
  ids = tok.encode("one two three four five six seven eight")
  tokens_BT = np.asarray([ids[:4], ids[4:8]])
  f = np.zeros((8, 3), np.float32)
  f[6, 1], f[1, 1], f[3, 1] = 5.0, 2.0, 1.0  # row 1 pos 2 ("seven"), row 0 pos 1 ("two"), row 0 pos 3
  (contexts,) = sae_eval.top_contexts(f, tokens_BT, [1], tok.decode, n=2, before=2)
  assert [(c.row, c.position, c.activation) for c in contexts] == [(1, 2, 5.0), (0, 1, 2.0)]
  assert contexts[0].text == " five six[[ seven]]" and contexts[1].text == "one[[ two]]"
  with pytest.raises(ValueError, match="features: expected ids in"):
    sae_eval.top_contexts(f, tokens_BT, [3], tok.decode)


def test_steering(model_params):
  tokens = _tokens((8, 12))
  direction = model_params["unembed"][:, 5] / jnp.linalg.norm(model_params["unembed"][:, 5])
  edit = sae_eval.steer(direction, 3.0)
  x = jnp.ones((1, 2, D))
  np.testing.assert_allclose(edit(x), x + 3.0 * direction, rtol=1e-6)
  effect = sae_eval.steering_effect(model_params, MODEL, "blocks.1.hook_resid_post", direction, 8.0, tokens, n=3)
  assert effect.p_steered > effect.p_clean and len(effect.promoted) == 3
  # scale 0 is the clean model: greedy decoding equals the serving engine's greedy generate
  prompt = tokens[:2, :5]
  ours = sae_eval.steered_greedy(model_params, MODEL, prompt, 6, SITE, direction, 0.0)
  ref, _ = generate.generate(jax.random.key(0), model_params, MODEL, prompt, jnp.array([5, 5]), max_new_tokens=6)
  np.testing.assert_array_equal(ours, ref)
  steered = sae_eval.steered_greedy(model_params, MODEL, prompt, 6, SITE, direction, 50.0)  # the same compile
  assert np.mean(np.asarray(steered) == 5) > np.mean(np.asarray(ours) == 5)


def test_errors(model_params):
  params, cfg = _identity_sae()
  based_cfg = based.BasedConfig(vocab_size=64, dim=16, n_blocks=2, n_heads=2, feature_dim=4, window=3, ffn_dim=32)
  with pytest.raises(TypeError, match="model_cfg: expected a LlamaConfig"):
    sae_eval.splice(model_params, based_cfg, SITE, params, cfg, _tokens())
  with pytest.raises(ValueError, match="site: 'blocks.9.hook_resid_post' is not a site"):
    sae_eval.splice(model_params, MODEL, "blocks.9.hook_resid_post", params, cfg, _tokens())
  with pytest.raises(ValueError, match=r"x_ND: expected shape \[B, 16\]"):
    sae_eval.reconstruction(params, cfg, np.zeros((4, 3)))
  with pytest.raises(ValueError, match=r"direction_D: expected a vector \[D\], got shape \(\)"):
    sae_eval.steer(1.0, 2.0)
  with pytest.raises(ValueError, match=r"direction_D: expected a vector \[D = 16\], got shape \(3,\)"):
    sae_eval.steering_effect(model_params, MODEL, SITE, jnp.ones(3), 1.0, _tokens())
  with pytest.raises(ValueError, match="max_new_tokens: expected >= 1"):
    sae_eval.steered_greedy(model_params, MODEL, _tokens((1, 4)), 0, SITE, jnp.zeros(D), 1.0)
