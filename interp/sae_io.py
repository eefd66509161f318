"""SAEs on disk in SAELens' inference format (SAELens 6.x), so either library reads the other's.

Shapes: D the site's width, F dictionary features.

A directory holds
  cfg.json                  {"architecture", "d_in", "d_sae", "dtype", "device",
                             "apply_b_dec_to_input": true, "normalize_activations": "none",
                             "reshape_activations": "none", ["k", "rescale_acts_by_decoder_norm"
                             for topk], "metadata": {"hook_name", "model_name", ...}}
  sae_weights.safetensors   W_enc [D, F], W_dec [F, D], b_dec [D], and
                             standard / topk: b_enc [F]; jumprelu: b_enc, threshold [F];
                             gated: b_gate, r_mag, b_mag [F]
  sparsity.safetensors      optional: "sparsity" [F] = log10(firing frequency + 1e-10)
all float32. As in SAELens, the activation normalisation is folded into the weights
(`sae.fold_scale`) and a BatchTopK SAE is written as a JumpReLU whose threshold is its
inference threshold for every latent. Our own training config rides in metadata["paperjax"].
The directory is written beside its destination and renamed into place, so a reader never
sees half a save and an earlier save stays whole until the new one is complete (between
the two renames that replace it, the destination is briefly absent and the old save sits
in a hidden directory beside it).
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import re
import shutil
import tempfile
from typing import Any

import jax.numpy as jnp
import numpy as np
from safetensors.numpy import load_file, save_file

from paperjax.interp import sae
from paperjax.models.transformer.llama_import import read_safetensors
from paperjax.ops import checks

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
  target = pathlib.Path(directory)
  target.parent.mkdir(parents=True, exist_ok=True)
  tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
  umask = os.umask(0)
  os.umask(umask)
  os.chmod(tmp, 0o777 & ~umask)  # mkdtemp's 0700 would hide the save from other users
  try:
    (tmp / CFG_FILE).write_text(json.dumps(config, indent=2))
    save_file(tensors, tmp / WEIGHTS_FILE)
    if frequency_F is not None:
      freq_F = np.asarray(frequency_F, np.float32)
      if freq_F.shape != (cfg.d_sae,):
        raise ValueError(f"frequency_F: expected shape ({cfg.d_sae},), got {freq_F.shape}")
      save_file({"sparsity": np.log10(freq_F + 1e-10).astype(np.float32)}, tmp / SPARSITY_FILE)
    if target.exists():  # swap: the old save is removed only after the new one is in place
      old = pathlib.Path(tempfile.mkdtemp(prefix=f".{target.name}.old.", dir=target.parent))
      os.replace(target, old / "sae")
      os.replace(tmp, target)  # between the two renames the old save is whole under `old`
      shutil.rmtree(old)
    else:
      os.replace(tmp, target)
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
  return target


def load(directory: str | os.PathLike) -> tuple[dict, sae.SAEConfig, dict[str, Any]]:
  """(params in the activations' own units, config, cfg.json) of a saved SAE, ours or
  SAELens'. A JumpReLU file loads as jumprelu (log_threshold = log threshold). A missing,
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
  arch = config.get("architecture")
  if arch not in _EXTRA:
    raise ValueError(f"{cfg_path}: architecture must be one of {sorted(_EXTRA)}, got {arch!r}")
  if config.get("normalize_activations", "none") != "none":
    raise ValueError(
      f"{cfg_path}: normalize_activations={config['normalize_activations']!r} is not supported; "
      "expected 'none' (the scale folded into the weights)"
    )
  if not _flag(config, "apply_b_dec_to_input", True, cfg_path):
    raise ValueError(f"{cfg_path}: apply_b_dec_to_input=false is not supported (x - b_dec is encoded)")
  d_in, d_sae = _size(config, "d_in", cfg_path), _size(config, "d_sae", cfg_path)
  metadata = config.get("metadata", {})
  if not isinstance(metadata, dict):
    raise ValueError(f"{cfg_path}: metadata: expected an object, got {metadata!r}")
  ours = metadata.get("paperjax", {})
  ours = ours.get("config", {}) if isinstance(ours, dict) else ours
  if not isinstance(ours, dict):
    raise ValueError(f"{cfg_path}: metadata.paperjax.config: expected an object, got {ours!r}")
  kwargs: dict[str, Any] = {"architecture": arch, "d_in": d_in, "d_sae": d_sae}
  if arch == "topk":
    if _flag(config, "rescale_acts_by_decoder_norm", False, cfg_path):
      raise ValueError(f"{cfg_path}: rescale_acts_by_decoder_norm=true is not supported")
    kwargs["k"] = _size(config, "k", cfg_path)
  tensors = read_safetensors(weights_path, load_file)
  names = {"W_enc", "W_dec", "b_dec", *_EXTRA[arch]}
  if set(tensors) != names:
    raise ValueError(f"{weights_path}: expected tensors {sorted(names)} for {arch}, got {sorted(tensors)}")
  shapes = {"W_enc": (d_in, d_sae), "W_dec": (d_sae, d_in), "b_dec": (d_in,)}
  for name, value in tensors.items():
    if value.shape != shapes.get(name, (d_sae,)):
      raise ValueError(
        f"{weights_path}: {name} has shape {value.shape}, expected {shapes.get(name, (d_sae,))} "
        f"(d_in={d_in}, d_sae={d_sae} in {CFG_FILE})"
      )
    if not jnp.issubdtype(value.dtype, jnp.floating):  # jnp: numpy does not count ml_dtypes' bfloat16
      raise ValueError(f"{weights_path}: {name}: expected a float dtype, got {value.dtype}")
  params = {k: np.asarray(v, np.float32) for k, v in tensors.items()}
  if arch == "jumprelu":  # SAELens' ReLU(pi) 1[pi > t] is ours with theta = max(t, 0); log 0 = -inf
    with np.errstate(divide="ignore"):
      params["log_threshold"] = np.log(np.maximum(params.pop("threshold"), 0.0))
  if ours.get("architecture") == arch:  # our own training settings come back
    kwargs = {**ours, **kwargs}
  try:
    cfg = sae.SAEConfig(**kwargs)
  except (TypeError, ValueError) as e:  # SAEConfig's own checks (k <= d_sae, an unknown field in our metadata)
    raise type(e)(f"{cfg_path}: {e}") from None
  return params, cfg, config


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
