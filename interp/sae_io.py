"""SAEs on disk in SAELens' inference format (SAELens 6.x), so either library reads the other's.

Shapes: D the site's width, F dictionary features; H heads and K head width (a hook_z site, D = H*K).

`save` writes a directory of
  cfg.json                  {"architecture", "d_in", "d_sae", "dtype", "device",
                             "apply_b_dec_to_input": true, "normalize_activations": "none",
                             "reshape_activations": "none", ["k", "rescale_acts_by_decoder_norm":
                             false for topk], "metadata": {"hook_name", "model_name", ...}}
  sae_weights.safetensors   W_enc [D, F], W_dec [F, D], b_dec [D], and
                             standard / topk: b_enc [F]; jumprelu: b_enc, threshold [F];
                             gated: b_gate, r_mag, b_mag [F]
  sparsity.safetensors      optional: "sparsity" [F] = log10(firing frequency + 1e-10)
all float32. As in SAELens, the activation normalisation is folded into the weights
(`sae.fold_scale`) and a BatchTopK SAE is written as a JumpReLU whose threshold is its
inference threshold for every latent. Our own training config rides in metadata["paperjax"].
The directory is written beside its destination and renamed into place
(`ops.files.atomic_directory`), so a reader never sees half a save and an earlier save
stays whole until the new one is complete.

`load` reads these files and what SAELens 6 writes: `save_inference_model`'s export and
`save_model`'s training checkpoints (float16 / bfloat16 / float64 tensors too), of the
architectures standard, topk, jumprelu, gated, and batchtopk (a checkpoint: b_enc and a
scalar topk_threshold; it loads as the JumpReLU that SAELens exports, threshold =
topk_threshold on every latent). SAELens' encoder options are folded exactly into our
weights, computed in float64 (n_F = ||W_dec[F]||):
  apply_b_dec_to_input=false      SAELens encodes x, we encode x - b_dec:
                                  b_enc += b_dec W_enc (gated: b_gate += b_dec W_enc,
                                  b_mag += b_dec (W_enc * exp(r_mag)))
  rescale_acts_by_decoder_norm    topk / batchtopk: SAELens takes TopK of pi * n_F and decodes
    =true                         f / n_F, so W_enc[:, F] * n_F, b_enc * n_F, W_dec[F] / n_F
                                  (SAELens' own _fold_norm_topk; a row of norm 0 is refused)
  reshape_activations="hook_z"    the same math on hook_z [..., H, K] flattened to d_in = H*K
and every value they cannot hold raises an error naming the field, its value and why:
normalize_activations other than "none" ("expected_average_only_in": the scale is not in
cfg.json; "constant_norm_rescale", "layer_norm": a per-row map), an unknown
reshape_activations, and the pre-6 keys activation_fn / activation_fn_str other than "relu"
or finetuning_scaling_factor=true. dtype, device, metadata and the training-only keys
(l1_coefficient, aux_loss_coefficient, decoder_init_norm, ...) do not change the encoder
and are ignored, as is rescale_acts_by_decoder_norm for the architectures that do not read it.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import re
from typing import Any

import jax.numpy as jnp
import numpy as np
from safetensors.numpy import load_file, save_file

from paperjax.interp import sae
from paperjax.models.transformer.llama_import import read_safetensors
from paperjax.ops import checks, files

CFG_FILE, WEIGHTS_FILE, SPARSITY_FILE = "cfg.json", "sae_weights.safetensors", "sparsity.safetensors"
FORMAT_VERSION = "6.18.0"  # the SAELens version whose inference format this writes (its loaders read it)
# A TransformerLens hook point: "blocks.0.hook_resid_post", "blocks.3.attn.hook_z", "hook_embed",
# "ln_final.hook_normalized". SAELens and our loaders look the site up by this name.
_HOOK_NAME = re.compile(r"(blocks\.\d+\.)?([a-z_0-9]+\.)*hook_[a-z_0-9]+")
_EXTRA = {  # the tensors besides W_enc, W_dec, b_dec
  "standard": ("b_enc",),
  "topk": ("b_enc",),
  "jumprelu": ("b_enc", "threshold"),
  "gated": ("b_gate", "r_mag", "b_mag"),
}
_READ = _EXTRA | {"batchtopk": ("b_enc", "topk_threshold")}  # SAELens' BatchTopK training checkpoint
# rescale_acts_by_decoder_norm's default in SAELens' TopKSAEConfig and BatchTopKTrainingSAEConfig
_RESCALE_DEFAULT = {"topk": False, "batchtopk": True}
_NORMALIZE_WHY = {
  "expected_average_only_in": "the weights expect the activations times a scale that cfg.json does not hold "
  "(SAELens keeps it in activation_scaler.json or pretrained_saes.yaml); fold it in first with SAELens' "
  "fold_activation_norm_scaling_factor, which writes 'none'",
  "constant_norm_rescale": "each row is scaled to norm sqrt(d_in) before encoding and back after decoding, "
  "a per-row factor that no weights hold",
  "layer_norm": "each row is standardised (its mean and std) before encoding and restored after decoding, "
  "a per-row map that no weights hold",
}
# Fields of SAELens < 6 that change the encoder, at the value that leaves it as `load` computes it.
_LEGACY = {"activation_fn": "relu", "activation_fn_str": "relu", "finetuning_scaling_factor": False}


def to_saelens(params: dict, cfg: sae.SAEConfig, scale: float = 1.0) -> tuple[str, dict[str, np.ndarray]]:
  """(SAELens architecture, tensors) of an SAE trained on activations scaled by `scale`."""
  p = {k: np.asarray(v, np.float32) for k, v in sae.fold_scale(params, scale).items()}
  arch = cfg.architecture
  if arch == "jumprelu":
    p["threshold"] = np.exp(p.pop("log_threshold"))
  elif arch == "batchtopk":
    arch, p["threshold"] = "jumprelu", np.full((cfg.d_sae,), p.pop("threshold"), np.float32)
  names = ("W_enc", "W_dec", "b_dec", *_EXTRA[arch])
  if set(p) != set(names):
    raise ValueError(f"params: expected the tensors {sorted(names)} of a {cfg.architecture} SAE, got {sorted(p)}")
  return arch, p


def save(
  directory: str | os.PathLike,
  params: dict,
  cfg: sae.SAEConfig,
  *,
  scale: float = 1.0,
  hook_name: str,
  model_name: str,
  frequency_F: Any | None = None,
  metadata: dict[str, Any] | None = None,
) -> pathlib.Path:
  """Writes the SAE (trained on activations * scale) to `directory` (module docstring);
  returns the path. An existing directory is replaced only once the new one is complete.

  Checked before anything is written: params against cfg (`sae.check_params`, naming the
  leaf), the weights finite, scale a finite positive number, hook_name a TransformerLens
  hook point ("blocks.0.hook_resid_post") and model_name a non-empty string."""
  sae.check_params(params, cfg)
  for name, value in params.items():
    if name == "log_threshold":  # -inf is a threshold of 0 (what `load` makes of a SAELens threshold <= 0)
      bad = lambda v: np.isnan(v) | (v == np.inf)
      checks.check_values(f"params[{name!r}]", np.asarray(value, np.float32), bad, "values finite or -inf")
    else:
      checks.check_finite(f"params[{name!r}]", np.asarray(value, np.float32))
  if isinstance(scale, bool) or not isinstance(scale, (int, float, np.integer, np.floating)) or not 0 < scale < np.inf:
    raise ValueError(f"scale: expected a finite float > 0 (the activations' scale in training), got {scale!r}")
  if not isinstance(hook_name, str) or not _HOOK_NAME.fullmatch(hook_name):
    raise ValueError(
      f"hook_name: expected a TransformerLens hook point such as 'blocks.0.hook_resid_post', got {hook_name!r}"
    )
  if not isinstance(model_name, str) or not model_name:
    raise ValueError(f"model_name: expected a non-empty string, got {model_name!r}")
  arch, tensors = to_saelens(params, cfg, scale)
  config: dict[str, Any] = {
    "architecture": arch,
    "d_in": cfg.d_in,
    "d_sae": cfg.d_sae,
    "dtype": "float32",
    "device": "cpu",
    "apply_b_dec_to_input": True,
    "normalize_activations": "none",
    "reshape_activations": "none",
  }
  if arch == "topk":
    config |= {"k": cfg.k, "rescale_acts_by_decoder_norm": False}
  config["metadata"] = {
    "sae_lens_version": FORMAT_VERSION,
    "sae_lens_training_version": FORMAT_VERSION,
    "hook_name": hook_name,
    "hook_head_index": None,
    "model_name": model_name,
    **(metadata or {}),
    "paperjax": {"config": dataclasses.asdict(cfg), "activation_scale": scale},
  }
  if frequency_F is not None:
    freq_F = np.asarray(frequency_F, np.float32)
    if freq_F.shape != (cfg.d_sae,):
      raise ValueError(f"frequency_F: expected shape ({cfg.d_sae},), got {freq_F.shape}")
  with files.atomic_directory(directory) as tmp:
    (tmp / CFG_FILE).write_text(json.dumps(config, indent=2))
    save_file(tensors, tmp / WEIGHTS_FILE)
    if frequency_F is not None:
      save_file({"sparsity": np.log10(freq_F + 1e-10).astype(np.float32)}, tmp / SPARSITY_FILE)
  return pathlib.Path(directory)


def load(directory: str | os.PathLike) -> tuple[dict, sae.SAEConfig, dict[str, Any]]:
  """(params in the activations' own units, config, cfg.json) of a saved SAE, ours or
  SAELens' (module docstring: the flags folded and refused). A JumpReLU file, and a SAELens
  BatchTopK checkpoint, load as jumprelu (log_threshold = log threshold). A missing,
  damaged or inconsistent file raises an error naming its path and the field or tensor."""
  path = pathlib.Path(directory)
  cfg_path, weights_path = path / CFG_FILE, path / WEIGHTS_FILE
  if not cfg_path.is_file():
    raise FileNotFoundError(f"directory: no {CFG_FILE} in {str(path)!r}")
  try:
    config = json.loads(cfg_path.read_text(encoding="utf-8"))
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise ValueError(f"{cfg_path}: not a valid JSON file ({e})") from None
  if not isinstance(config, dict):
    raise ValueError(f"{cfg_path}: expected a JSON object of config fields, got {type(config).__name__}")
  saelens_arch = config.get("architecture")
  if saelens_arch not in _READ:
    raise ValueError(f"{cfg_path}: architecture must be one of {sorted(_READ)}, got {saelens_arch!r}")
  metadata = config.get("metadata", {})
  if not isinstance(metadata, dict):
    raise ValueError(f"{cfg_path}: metadata: expected an object, got {metadata!r}")
  _check_flags(config, metadata, cfg_path)
  centred = _flag(config, "apply_b_dec_to_input", True, cfg_path)
  rescale = saelens_arch in _RESCALE_DEFAULT and _flag(
    config, "rescale_acts_by_decoder_norm", _RESCALE_DEFAULT[saelens_arch], cfg_path
  )
  d_in, d_sae = _size(config, "d_in", cfg_path), _size(config, "d_sae", cfg_path)
  ours = metadata.get("paperjax", {})
  ours = ours.get("config", {}) if isinstance(ours, dict) else ours
  if not isinstance(ours, dict):
    raise ValueError(f"{cfg_path}: metadata.paperjax.config: expected an object, got {ours!r}")
  arch = "jumprelu" if saelens_arch == "batchtopk" else saelens_arch
  kwargs: dict[str, Any] = {"architecture": arch, "d_in": d_in, "d_sae": d_sae}
  if arch == "topk":
    kwargs["k"] = _size(config, "k", cfg_path)
  tensors = read_safetensors(weights_path, load_file)
  names = {"W_enc", "W_dec", "b_dec", *_READ[saelens_arch]}
  if set(tensors) != names:
    raise ValueError(f"{weights_path}: expected tensors {sorted(names)} for {saelens_arch}, got {sorted(tensors)}")
  shapes = {"W_enc": (d_in, d_sae), "W_dec": (d_sae, d_in), "b_dec": (d_in,), "topk_threshold": ()}
  for name, value in tensors.items():
    if value.shape != shapes.get(name, (d_sae,)):
      raise ValueError(
        f"{weights_path}: {name} has shape {value.shape}, expected {shapes.get(name, (d_sae,))} "
        f"(d_in={d_in}, d_sae={d_sae} in {CFG_FILE})"
      )
    if not jnp.issubdtype(value.dtype, jnp.floating):  # jnp: numpy does not count ml_dtypes' bfloat16
      raise ValueError(f"{weights_path}: {name}: expected a float dtype, got {value.dtype}")
  p = _fold(
    {k: np.asarray(v, np.float64) for k, v in tensors.items()},
    saelens_arch,
    centred=centred,
    rescale=rescale,
    where=weights_path,
  )
  if saelens_arch == "batchtopk":  # SAELens' export: the scalar threshold on every latent, after the fold
    p["threshold"] = np.full((d_sae,), p.pop("topk_threshold"))
  if arch == "jumprelu":  # SAELens' ReLU(pi) 1[pi > t] is ours with theta = max(t, 0); log 0 = -inf
    with np.errstate(divide="ignore"):
      p["log_threshold"] = np.log(np.maximum(p.pop("threshold"), 0.0))
  params = {k: v.astype(np.float32) for k, v in p.items()}
  if ours.get("architecture") == arch:  # our own training settings come back
    kwargs = {**ours, **kwargs}
  try:
    cfg = sae.SAEConfig(**kwargs)
  except (TypeError, ValueError) as e:  # SAEConfig's own checks (k <= d_sae, an unknown field in our metadata)
    raise type(e)(f"{cfg_path}: {e}") from None
  return params, cfg, config


def _check_flags(config: dict, metadata: dict, where: pathlib.Path) -> None:
  """Raises for a cfg.json value whose math the weights cannot hold (module docstring)."""
  norm = config.get("normalize_activations", "none")
  if norm != "none":
    why = _NORMALIZE_WHY.get(norm, f"SAELens' values are {['none', *_NORMALIZE_WHY]}")
    raise ValueError(f"{where}: normalize_activations={norm!r} is not supported: {why}")
  reshape = config.get("reshape_activations", "none")
  if reshape not in ("none", "hook_z"):
    raise ValueError(f"{where}: reshape_activations={reshape!r} is not supported: SAELens' values are 'none', 'hook_z'")
  hook_name = metadata.get("hook_name")
  if reshape == "hook_z" and hook_name is not None and not str(hook_name).endswith("_z"):
    raise ValueError(
      f"{where}: reshape_activations='hook_z' is not supported with metadata.hook_name={hook_name!r}: "
      "SAELens reshapes only a hook_z site's [..., heads, head_dim]"
    )
  for name, default in _LEGACY.items():
    if config.get(name, default) != default:
      raise ValueError(
        f"{where}: {name}={_json(config[name])} is not supported: a SAELens < 6 field that changes the encoder "
        f"(expected {_json(default)} or absent)"
      )


def _fold(p: dict[str, np.ndarray], arch: str, *, centred: bool, rescale: bool, where: pathlib.Path) -> dict:
  """SAELens' apply_b_dec_to_input=false and rescale_acts_by_decoder_norm=true folded into
  the weights (float64 [D, F], [F, D], [F]; module docstring), so that ours encode
  pi = (x - b_dec) W_enc + b_enc and decode f W_dec + b_dec to SAELens' numbers."""
  if not centred:  # SAELens: pi = x W_enc + b_enc = (x - b_dec) W_enc + (b_enc + b_dec W_enc)
    if arch == "gated":
      p["b_gate"] = p["b_gate"] + p["b_dec"] @ p["W_enc"]
      p["b_mag"] = p["b_mag"] + p["b_dec"] @ (p["W_enc"] * np.exp(p["r_mag"]))
    else:
      p["b_enc"] = p["b_enc"] + p["b_dec"] @ p["W_enc"]
  if rescale:  # SAELens: f = TopK(pi * n), x_hat = (f / n) W_dec + b_dec; n > 0 keeps TopK's choice and ReLU
    n_F = np.linalg.norm(p["W_dec"], axis=1)
    if not (n_F > 0).all():  # NaN fails too
      row = int(np.argmin(n_F > 0))
      raise ValueError(
        f"{where}: W_dec row {row} has norm {n_F[row]:g}, and rescale_acts_by_decoder_norm=true divides by "
        "the decoder row norms (expected > 0; SAELens computes NaN)"
      )
    p |= {"W_enc": p["W_enc"] * n_F, "b_enc": p["b_enc"] * n_F, "W_dec": p["W_dec"] / n_F[:, None]}
  return p


def _size(config: dict, name: str, where: pathlib.Path) -> int:
  """config[name] as a positive int: a missing field, true or 16.5 raise rather than truncate."""
  if name not in config:
    raise ValueError(f"{where}: missing field {name!r} (expected a positive integer)")
  value = config[name]
  if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
    raise ValueError(f"{where}: {name}: expected a positive integer, got {value!r} ({type(value).__name__})")
  return value


def _flag(config: dict, name: str, default: bool, where: pathlib.Path) -> bool:
  value = config.get(name, default)
  if not isinstance(value, bool):  # the string "false" would read as true
    raise ValueError(f"{where}: {name}: expected true or false, got {value!r} ({type(value).__name__})")
  return value


def _json(value: Any) -> str:
  """A cfg.json value as an error shows it: true / false as in the file, others as repr."""
  return json.dumps(value) if isinstance(value, bool) else repr(value)
