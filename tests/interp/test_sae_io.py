"""SAELens files (issue 34): our saves round-trip, and every cfg.json flag SAELens 6 writes
either folds exactly into our weights or is refused by name.

Each SAELens file below is built by hand from the fields SAELens 6.18 writes
(`SAEConfig.to_dict` / `TrainingSAEConfig.get_inference_sae_cfg_dict`, sae_lens/saes/sae.py)
with decoder rows far from norm 1, and `_saelens` is SAELens' own inference, transcribed
from its source into numpy and run with the flags applied SAELens' way (unfolded)."""

import json

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from paperjax.interp import sae, sae_io

D = 16  # our saves: D x 32
D_S, F_S = 6, 8  # the hand-built SAELens files
SITE = "blocks.0.hook_resid_post"


CONFIGS = {
  "standard": sae.SAEConfig(architecture="standard", d_in=D, d_sae=32, coefficient=0.5),
  "topk": sae.SAEConfig(architecture="topk", d_in=D, d_sae=32, k=4),
  "batchtopk": sae.SAEConfig(architecture="batchtopk", d_in=D, d_sae=32, k=4),
  "gated": sae.SAEConfig(architecture="gated", d_in=D, d_sae=32, coefficient=0.5),
  "jumprelu": sae.SAEConfig(architecture="jumprelu", d_in=D, d_sae=32, coefficient=0.5),
}


@pytest.mark.parametrize("arch", sae.ARCHITECTURES)
def test_saelens_files_round_trip(arch, tmp_path):
  cfg = CONFIGS[arch]
  rng = np.random.default_rng(0)
  params = sae.init(jax.random.key(0), cfg)
  params = {k: v + 0.05 * rng.normal(size=v.shape).astype(np.float32) for k, v in params.items()}
  scale = 0.37
  x = jnp.asarray(rng.normal(size=(20, D)) * 3, jnp.float32)
  freq = rng.uniform(0, 0.2, 32)
  path = sae_io.save(tmp_path / "sae", params, cfg, scale=scale, hook_name=SITE, model_name="tiny", frequency_F=freq)
  config = json.loads((path / "cfg.json").read_text())
  saved_arch = "jumprelu" if arch == "batchtopk" else arch  # SAELens writes BatchTopK as JumpReLU
  assert config["architecture"] == saved_arch and config["d_in"] == D and config["d_sae"] == 32
  assert config["normalize_activations"] == "none" and config["metadata"]["hook_name"] == SITE
  tensors = load_file(path / "sae_weights.safetensors")
  chex.assert_shape([tensors["W_enc"], tensors["W_dec"]], [(D, 32), (32, D)])
  np.testing.assert_allclose(load_file(path / "sparsity.safetensors")["sparsity"], np.log10(freq + 1e-10), rtol=1e-6)
  loaded, loaded_cfg, _ = sae_io.load(path)
  assert loaded_cfg.architecture == saved_arch
  if arch != "batchtopk":
    assert loaded_cfg == cfg
  # the loaded SAE on raw activations equals the trained one on scaled activations, rescaled
  if arch == "batchtopk":
    params["threshold"] = jnp.float32(0.3)
    sae_io.save(path, params, cfg, scale=scale, hook_name=SITE, model_name="tiny")
    loaded, loaded_cfg, _ = sae_io.load(path)
  expected = sae.reconstruct(params, x * scale, cfg) / scale
  np.testing.assert_allclose(sae.reconstruct(loaded, x, loaded_cfg), expected, rtol=1e-4, atol=1e-5)
  # and SAELens' inference formulas on the file's tensors alone, in numpy
  tensors = load_file(path / "sae_weights.safetensors")
  np.testing.assert_allclose(_saelens(tensors, config, np.asarray(x))[1], expected, rtol=1e-4, atol=1e-4)


def test_save_replaces_atomically_and_load_rejects_bad_files(tmp_path):
  cfg = CONFIGS["topk"]
  params = sae.init(jax.random.key(0), cfg)
  path = sae_io.save(tmp_path / "sae", params, cfg, hook_name=SITE, model_name="tiny")
  before = (path / "sae_weights.safetensors").read_bytes()
  with pytest.raises(ValueError, match=r"frequency_F: expected shape \(32,\)"):
    sae_io.save(path, params, cfg, hook_name=SITE, model_name="tiny", frequency_F=np.zeros(3))
  assert (path / "sae_weights.safetensors").read_bytes() == before  # the failed save left the old one whole
  assert sorted(p.name for p in tmp_path.iterdir()) == ["sae"]  # and no temporary directory behind
  config = json.loads((path / "cfg.json").read_text())
  (path / "cfg.json").write_text(json.dumps(config | {"normalize_activations": "expected_average_only_in"}))
  with pytest.raises(ValueError, match="normalize_activations='expected_average_only_in' is not supported"):
    sae_io.load(path)
  (path / "cfg.json").write_text(json.dumps(config))
  tensors = load_file(path / "sae_weights.safetensors")
  save_file({**tensors, "W_dec": tensors["W_dec"][:, :3].copy()}, path / "sae_weights.safetensors")
  with pytest.raises(ValueError, match=r"W_dec has shape \(32, 3\), expected \(32, 16\)"):
    sae_io.load(path)


def _saelens(t: dict, config: dict, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """(feature_acts [B, F], sae_out like x) of SAELens 6.18's inference SAE, float64:
  process_sae_in (saes/sae.py: reshape_fn_in, then sae_in - b_dec * apply_b_dec_to_input);
  StandardSAE / JumpReLUSAE / GatedSAE.encode; TopKSAE.encode (pre * ||W_dec[f]|| when
  rescale_acts_by_decoder_norm, then torch.topk, then ReLU on the k values) and decode
  (f / ||W_dec[f]||, then @ W_dec + b_dec). A "batchtopk" training checkpoint is read as the
  JumpReLU that save_inference_model exports (batchtopk_sae.py): its topk_threshold on the
  rescaled pre-activations, which _fold_norm_topk turns into the exported encoder's."""
  t = {k: np.asarray(v, np.float64) for k, v in t.items()}
  arch = config["architecture"]
  sae_in = x.astype(np.float64).reshape(x.shape[0], -1)  # hook_z: [B, heads, head_dim] -> [B, heads * head_dim]
  sae_in = sae_in - t["b_dec"] * config.get("apply_b_dec_to_input", True)
  n_F = np.linalg.norm(t["W_dec"], axis=1)
  rescale = arch in ("topk", "batchtopk") and config.get("rescale_acts_by_decoder_norm", arch == "batchtopk")
  if arch == "gated":
    gate = sae_in @ t["W_enc"] + t["b_gate"] > 0
    f = gate * np.maximum(sae_in @ (t["W_enc"] * np.exp(t["r_mag"])) + t["b_mag"], 0)
  else:
    pre = sae_in @ t["W_enc"] + t["b_enc"]
    if rescale:
      pre = pre * n_F
    if arch == "standard":
      f = np.maximum(pre, 0)
    elif arch == "topk":
      idx = np.argsort(-pre, axis=1)[:, : config["k"]]
      f = np.zeros_like(pre)
      np.put_along_axis(f, idx, np.maximum(np.take_along_axis(pre, idx, axis=1), 0), axis=1)
    else:
      threshold = t["threshold"] if arch == "jumprelu" else t["topk_threshold"]
      f = np.maximum(pre, 0) * (pre > threshold)
  x_hat = (f / n_F if rescale else f) @ t["W_dec"] + t["b_dec"]
  return f, x_hat.reshape(x.shape)


METADATA = {  # SAELens 6.18's SAEMetadata of a trained SAE
  "sae_lens_version": "6.18.0",
  "sae_lens_training_version": "6.18.0",
  "model_name": "tiny",
  "hook_name": SITE,
  "hook_head_index": None,
  "context_size": 128,
  "prepend_bos": True,
  "seqpos_slice": [None],
  "model_from_pretrained_kwargs": {},
  "dataset_path": "monology/pile-uncopyrighted",
}
# What save_model adds for a TopK / BatchTopK training checkpoint (TrainingSAEConfig.to_dict).
TRAINING = {"decoder_init_norm": 0.1, "use_sparse_activations": False, "aux_loss_coefficient": 1.0}
EXTRA = {
  "standard": ("b_enc",),
  "topk": ("b_enc",),
  "jumprelu": ("b_enc", "threshold"),
  "gated": ("b_gate", "r_mag", "b_mag"),
  "batchtopk": ("b_enc", "topk_threshold"),
}


def _unit_rows(w):
  return w / np.linalg.norm(w, axis=1, keepdims=True)


def _saelens_dir(path, arch: str, flags: dict | None = None, tensors: dict | None = None):
  """A SAELens directory of a D_S x F_S SAE (random weights, decoder row norms 0.25 ... 3)
  with SAELens' cfg.json fields | flags; returns (path, tensors, config)."""
  rng = np.random.default_rng(0)
  t = {
    "W_enc": rng.normal(size=(D_S, F_S)) / np.sqrt(D_S),
    "W_dec": _unit_rows(rng.normal(size=(F_S, D_S))) * rng.permutation(np.linspace(0.25, 3.0, F_S))[:, None],
    "b_dec": rng.normal(size=D_S) * 0.5,
    "b_enc": rng.normal(size=F_S) * 0.3,
    "b_gate": rng.normal(size=F_S) * 0.3,
    "b_mag": rng.normal(size=F_S) * 0.3,
    "r_mag": rng.normal(size=F_S) * 0.3,
    "threshold": rng.uniform(0.0, 0.3, F_S),
    "topk_threshold": np.array(0.15),  # SAELens' float64 scalar buffer
  }
  t = {
    k: v if k == "topk_threshold" else v.astype(np.float32)
    for k, v in t.items()
    if k in {"W_enc", "W_dec", "b_dec", *EXTRA[arch]}
  }
  t |= tensors or {}
  config = {
    "d_in": D_S,
    "d_sae": F_S,
    "dtype": "float32",
    "device": "cpu",
    "apply_b_dec_to_input": True,
    "normalize_activations": "none",
    "reshape_activations": "none",
    "metadata": METADATA,
    "architecture": arch,
  } | ({"k": 3, "rescale_acts_by_decoder_norm": False} if arch == "topk" else {})
  config |= flags or {}
  path.mkdir()
  (path / "cfg.json").write_text(json.dumps(config))
  save_file(t, path / "sae_weights.safetensors")
  return path, t, config


SAELENS_FILES = [  # (architecture, the cfg.json flags on top of SAELens' defaults)
  pytest.param("standard", {}, id="standard"),
  pytest.param("standard", {"apply_b_dec_to_input": False}, id="standard-x-not-centred"),
  pytest.param("standard", {"rescale_acts_by_decoder_norm": True}, id="standard-rescale-ignored"),
  pytest.param("gated", {}, id="gated"),
  pytest.param("gated", {"apply_b_dec_to_input": False}, id="gated-x-not-centred"),
  pytest.param("jumprelu", {}, id="jumprelu"),
  pytest.param("jumprelu", {"apply_b_dec_to_input": False}, id="jumprelu-x-not-centred"),
  pytest.param("topk", {}, id="topk"),
  pytest.param("topk", {"rescale_acts_by_decoder_norm": True}, id="topk-rescale"),
  pytest.param(
    "topk", {"rescale_acts_by_decoder_norm": True, "apply_b_dec_to_input": False, **TRAINING}, id="topk-checkpoint"
  ),
  pytest.param(
    "batchtopk",
    {"k": 2.5, "rescale_acts_by_decoder_norm": True, "topk_threshold_lr": 0.01, **TRAINING},
    id="batchtopk-checkpoint",
  ),
  pytest.param("batchtopk", {"k": 3, "rescale_acts_by_decoder_norm": False}, id="batchtopk-no-rescale"),
  pytest.param("batchtopk", {"k": 3}, id="batchtopk-rescale-by-default"),  # BatchTopKTrainingSAEConfig's default
  pytest.param(
    "standard",
    {"reshape_activations": "hook_z", "metadata": METADATA | {"hook_name": "blocks.0.attn.hook_z"}},
    id="hook-z",
  ),
]


@pytest.mark.parametrize("arch, flags", SAELENS_FILES)
def test_saelens_files_load_exactly(arch, flags, tmp_path):
  path, t, config = _saelens_dir(tmp_path / "sae", arch, flags)
  x = np.random.default_rng(1).normal(size=(12, D_S)) * 2 + 0.5
  if config["reshape_activations"] == "hook_z":
    x = x.reshape(12, 2, 3)  # hook_z [B, heads, head_dim], which SAELens flattens
  f_ref, x_hat_ref = _saelens(t, config, x)
  params, cfg, _ = sae_io.load(path)
  assert cfg.architecture == ("jumprelu" if arch == "batchtopk" else arch)
  f = sae.encode(params, jnp.asarray(x.reshape(12, D_S), jnp.float32), cfg)
  np.testing.assert_allclose(f, f_ref, rtol=1e-5, atol=2e-6)  # the features themselves are SAELens'
  np.testing.assert_allclose(sae.decode(params, f).reshape(x.shape), x_hat_ref, rtol=1e-5, atol=2e-6)
  assert (f > 0).sum() >= 12  # every row reads something, so the comparison is not vacuous
  rescaled = arch in ("topk", "batchtopk") and config.get("rescale_acts_by_decoder_norm", arch == "batchtopk")
  if rescaled:
    np.testing.assert_allclose(np.linalg.norm(params["W_dec"], axis=1), 1.0, rtol=1e-6)
  plain = config | {"apply_b_dec_to_input": True, "rescale_acts_by_decoder_norm": False}
  differs = np.abs(_saelens(t, plain, x)[1] - x_hat_ref).max() > 1e-2  # the case's flags change SAELens' numbers
  assert differs == (rescaled or not config["apply_b_dec_to_input"])


def test_topk_rescale_folds_into_the_weights(tmp_path):
  """A literal case: with W_dec rows of norms 5 and 2 the rescaled pre-activations
  [1.5, 2] * [5, 2] = [7.5, 4] pick latent 0, where the plain ones would pick latent 1."""
  tensors = {
    "W_enc": np.eye(2, dtype=np.float32),
    "W_dec": np.array([[3.0, 4.0], [0.0, 2.0]], np.float32),
    "b_dec": np.zeros(2, np.float32),
    "b_enc": np.array([0.5, -1.0], np.float32),
  }
  path = tmp_path / "sae"
  path.mkdir()
  config = {"architecture": "topk", "d_in": 2, "d_sae": 2, "k": 1, "rescale_acts_by_decoder_norm": True}
  (path / "cfg.json").write_text(json.dumps(config))
  save_file(tensors, path / "sae_weights.safetensors")
  params, cfg, _ = sae_io.load(path)
  np.testing.assert_allclose(params["W_enc"], [[5.0, 0.0], [0.0, 2.0]])
  np.testing.assert_allclose(params["b_enc"], [2.5, -2.0])
  np.testing.assert_allclose(params["W_dec"], [[0.6, 0.8], [0.0, 1.0]])
  x = jnp.array([[1.0, 3.0]])
  np.testing.assert_allclose(sae.encode(params, x, cfg), [[7.5, 0.0]])
  np.testing.assert_allclose(sae.reconstruct(params, x, cfg), [[4.5, 6.0]], rtol=1e-6)


REFUSED = [  # (architecture, cfg.json flags, tensors, the error)
  pytest.param(
    "topk",
    {"normalize_activations": "expected_average_only_in"},
    None,
    r"normalize_activations='expected_average_only_in' is not supported: .*activation_scaler\.json",
    id="expected-average-only-in",
  ),
  pytest.param(
    "standard",
    {"normalize_activations": "constant_norm_rescale"},
    None,
    r"normalize_activations='constant_norm_rescale' is not supported: .*per-row factor",
    id="constant-norm-rescale",
  ),
  pytest.param(
    "jumprelu",
    {"normalize_activations": "layer_norm"},
    None,
    r"normalize_activations='layer_norm' is not supported: .*per-row map",
    id="layer-norm",
  ),
  pytest.param(
    "standard",
    {"normalize_activations": "rms"},
    None,
    r"normalize_activations='rms' is not supported: SAELens' values are \['none', 'expected_average_only_in'",
    id="normalize-unknown",
  ),
  pytest.param(
    "standard",
    {"reshape_activations": "hook_q"},
    None,
    r"reshape_activations='hook_q' is not supported: SAELens' values are 'none', 'hook_z'",
    id="reshape-unknown",
  ),
  pytest.param(
    "standard",
    {"reshape_activations": "hook_z"},
    None,
    r"reshape_activations='hook_z' is not supported with metadata\.hook_name='blocks\.0\.hook_resid_post'",
    id="hook-z-not-a-hook-z-site",
  ),
  pytest.param(
    "topk",
    {"rescale_acts_by_decoder_norm": "true"},
    None,
    r"rescale_acts_by_decoder_norm: expected true or false, got 'true' \(str\)",
    id="rescale-str",
  ),
  pytest.param(
    "batchtopk",
    {"rescale_acts_by_decoder_norm": 1},
    None,
    r"rescale_acts_by_decoder_norm: expected true or false, got 1 \(int\)",
    id="rescale-int",
  ),
  pytest.param(
    "topk",
    {"rescale_acts_by_decoder_norm": True},
    {"W_dec": np.ones((F_S, D_S), np.float32) * (np.arange(F_S) != 2)[:, None]},
    r"W_dec row 2 has norm 0, and rescale_acts_by_decoder_norm=true divides",
    id="rescale-zero-row",
  ),
  pytest.param(
    "standard",
    {"activation_fn": "topk", "activation_fn_kwargs": {"k": 3}},
    None,
    r"activation_fn='topk' is not supported: a SAELens < 6 field .*\(expected 'relu' or absent\)",
    id="legacy-activation-fn",
  ),
  pytest.param(
    "standard",
    {"finetuning_scaling_factor": True},
    None,
    r"finetuning_scaling_factor=true is not supported: .*\(expected false or absent\)",
    id="legacy-finetuning-scale",
  ),
  pytest.param(
    "batchtopk",
    {},
    {"topk_threshold": np.full(F_S, 0.1)},
    r"topk_threshold has shape \(8,\), expected \(\)",
    id="batchtopk-threshold-not-scalar",
  ),
  pytest.param(
    "batchtopk",
    {"architecture": "matryoshka_batchtopk"},
    None,
    r"architecture must be one of \['batchtopk', 'gated', 'jumprelu', 'standard', 'topk'\], got 'matryoshka",
    id="architecture-unknown",
  ),
]


@pytest.mark.parametrize("arch, flags, tensors, match", REFUSED)
def test_saelens_files_refused_by_name(arch, flags, tensors, match, tmp_path):
  path, _, _ = _saelens_dir(tmp_path / "sae", arch, flags, tensors)
  with pytest.raises(ValueError, match=match):
    sae_io.load(path)
