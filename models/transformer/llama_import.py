"""Load a local Hugging Face Llama checkpoint directory into `models.llama` params.

A directory holds `config.json` and either `model.safetensors` or shards listed by
`model.safetensors.index.json`. No hub access: a local directory only.

Layout conversion (HF -> ours):
- q_proj / k_proj rows: HF permutes each head's rows for its rotate-half RoPE, pairing
  dims (i, i + K/2); we pair (2i, 2i+1) as Meta does, so each head's rows go back from
  [2, K/2] order to [K/2, 2] order. v_proj and o_proj need no permutation.
- Linear weights are [out, in] in HF; ours are einsum-shaped: wq [D, H, K], wo [H, K, D],
  w1/w3 [D, F], w2 [F, D], unembed [D, V].
"""

from __future__ import annotations

import json
import math
import os
import pathlib
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from paperjax.models.transformer import llama
from paperjax.ops import rope

_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)  # buffers some exports include


_DTYPES = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}
_LLAMA3_ROPE = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")


def _rope_from_hf(hf: dict, where: str = "config.json") -> tuple[float, rope.RopeScaling | None]:
  """(theta, Llama 3.1 scaling or None) from either config.json layout.

  transformers >= 5 writes `rope_parameters` {rope_type, rope_theta, scaling fields};
  4.x wrote top-level `rope_theta` and `rope_scaling` {rope_type (or type), fields}. A
  rope type other than default / llama3, an unknown field, or two layouts that disagree
  raise: RoPE changes every logit, so nothing falls back to a default silently.
  """
  params, legacy = hf.get("rope_parameters"), hf.get("rope_scaling")
  key = "rope_parameters" if params is not None else "rope_scaling"
  fields = params if params is not None else legacy
  if fields is None:
    fields = {}
  if not isinstance(fields, dict):
    raise ValueError(f"{where}: {key} must be an object, got {fields!r}")
  fields = dict(fields)
  named = [fields.pop(k) for k in ("rope_type", "type") if k in fields]
  if not all(isinstance(k, str) for k in named):
    raise ValueError(f"{where}: {key}.rope_type: expected a string, got {named}")
  kinds = set(named) or {"default"}
  if len(kinds) > 1:
    raise ValueError(f"{where}: {key} names two rope types {sorted(kinds)}")
  (kind,) = kinds
  theta = _number(fields.pop("rope_theta", None), f"{key}.rope_theta", where)
  top_theta = _number(hf.get("rope_theta"), "rope_theta", where)
  if theta is not None and top_theta is not None and theta != top_theta:
    raise ValueError(f"{where}: rope_theta {top_theta} disagrees with {key}.rope_theta {theta}")
  theta = theta if theta is not None else top_theta if top_theta is not None else 10_000.0
  if params is not None and legacy is not None:
    legacy_kind = legacy.get("rope_type", legacy.get("type", "default")) if isinstance(legacy, dict) else legacy
    if legacy_kind != kind:
      raise ValueError(f"{where}: rope_scaling type {legacy_kind!r} disagrees with rope_parameters type {kind!r}")
  if kind not in ("default", "llama3"):
    raise ValueError(f"{where}: {key} type {kind!r} is not supported (only 'default' and 'llama3')")
  expected = set(_LLAMA3_ROPE) if kind == "llama3" else set()
  if set(fields) != expected:
    unknown, missing = sorted(set(fields) - expected), sorted(expected - set(fields))
    raise ValueError(f"{where}: {key} ({kind}) has unknown fields {unknown} and lacks {missing}")
  if kind == "default":
    return theta, None
  factors = {name: _number(fields[name], f"{key}.{name}", where, required=True) for name in _LLAMA3_ROPE[:3]}
  try:
    scaling = rope.RopeScaling(
      factor=factors["factor"],
      low_freq_factor=factors["low_freq_factor"],
      high_freq_factor=factors["high_freq_factor"],
      original_max_position=_integer(fields, "original_max_position_embeddings", where, prefix=f"{key}."),
    )
  except ValueError as e:  # RopeScaling's own range checks, which do not know the file
    if str(e).startswith(where):
      raise
    raise ValueError(f"{where}: {key}: {e}") from None
  return theta, scaling


_REQUIRED_INTS = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size")
_MISSING: Any = object()


def _integer(hf: dict, name: str, where: str, *, default: Any = _MISSING, prefix: str = "") -> Any:
  """hf[name] as a positive int; absent or null gives `default` (an error when there is none).
  JSON's true and 64.0 are not integers: a config that holds them was not written by transformers."""
  value = hf.get(name)
  if value is None:
    if default is _MISSING:
      raise ValueError(f"{where}: missing field {prefix}{name} (expected a positive integer)")
    return default
  if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
    raise ValueError(f"{where}: {prefix}{name}: expected a positive integer, got {value!r} ({type(value).__name__})")
  return value


def _number(value: Any, name: str, where: str, *, required: bool = False) -> Any:
  """A positive finite JSON number as a float; None stays None unless `required`."""
  if value is None and not required:
    return None
  if isinstance(value, bool) or not isinstance(value, (int, float)) or not (math.isfinite(value) and value > 0):
    raise ValueError(f"{where}: {name}: expected a positive finite number, got {value!r} ({type(value).__name__})")
  return float(value)


def _flag(hf: dict, name: str, where: str, default: bool) -> bool:
  value = hf.get(name)
  if value is None:
    return default
  if not isinstance(value, bool):
    raise ValueError(f"{where}: {name}: expected true or false, got {value!r} ({type(value).__name__})")
  return value


def config_from_hf(hf: dict, **overrides) -> llama.LlamaConfig:
  """LlamaConfig from a parsed config.json; a missing, mistyped or unsupported setting raises
  ValueError naming the field."""
  return _config_from_hf(hf, "config.json", overrides)


def _config_from_hf(hf: Any, where: str, overrides: dict) -> llama.LlamaConfig:
  if not isinstance(hf, dict):
    raise ValueError(f"{where}: expected a JSON object of config fields, got {type(hf).__name__}")
  if hf.get("model_type") != "llama":
    raise ValueError(f"{where}: model_type must be 'llama', got {hf.get('model_type')!r}")
  for flag in ("attention_bias", "mlp_bias"):
    if _flag(hf, flag, where, False):
      raise ValueError(f"{where}: {flag}=true is not supported (Llama has no biases)")
  if hf.get("hidden_act", "silu") != "silu":
    raise ValueError(f"{where}: hidden_act must be 'silu', got {hf['hidden_act']!r}")
  ints = {name: _integer(hf, name, where) for name in _REQUIRED_INTS}
  head_dim = _integer(hf, "head_dim", where, default=None)
  if head_dim == ints["hidden_size"] // ints["num_attention_heads"]:  # transformers 5 writes the default out
    head_dim = None
  theta, scaling = _rope_from_hf(hf, where)
  eps = _number(hf.get("rms_norm_eps"), "rms_norm_eps", where)
  fields = dict(
    vocab_size=ints["vocab_size"],
    dim=ints["hidden_size"],
    n_layers=ints["num_hidden_layers"],
    n_heads=ints["num_attention_heads"],
    n_kv_heads=_integer(hf, "num_key_value_heads", where, default=ints["num_attention_heads"]),
    ffn_dim=ints["intermediate_size"],
    head_dim=head_dim,
    rope_theta=theta,
    rope_scaling=scaling,
    norm_eps=1e-5 if eps is None else eps,
    max_seq_len=_integer(hf, "max_position_embeddings", where, default=8192),
    tie_embeddings=_flag(hf, "tie_word_embeddings", where, False),
  )
  stored = _stored_dtype(hf, where)
  fields.update(param_dtype=stored, dtype=stored)  # computes in the checkpoint's dtype unless overridden
  if "dtype" in overrides and "param_dtype" not in overrides:
    overrides = {**overrides, "param_dtype": overrides["dtype"]}  # dtype= alone casts the weights too
  try:
    return llama.LlamaConfig(**{**fields, **overrides})
  except (TypeError, ValueError) as e:  # LlamaConfig's checks across fields (heads, head dim) name the file too
    also = f" with overrides {sorted(overrides)}" if overrides else ""
    raise type(e)(f"{where}{also}: {e}") from None


def _stored_dtype(hf: dict, where: str = "config.json") -> str:
  """The weights' dtype: `dtype` (transformers >= 5) or `torch_dtype` (4.x); float32 if neither."""
  names = {hf[k] for k in ("dtype", "torch_dtype") if hf.get(k) is not None}
  if not all(isinstance(n, str) for n in names):
    raise ValueError(
      f"{where}: dtype, torch_dtype: expected a dtype name such as 'bfloat16', got {sorted(map(repr, names))}"
    )
  if len(names) > 1:
    raise ValueError(f"{where}: dtype and torch_dtype disagree: {sorted(names)}")
  name = names.pop() if names else "float32"
  if name not in _DTYPES:
    raise ValueError(f"{where}: dtype {name!r} is not one of {sorted(_DTYPES)}")
  return _DTYPES[name]


def _read_json(path: pathlib.Path) -> Any:
  try:
    return json.loads(path.read_text(encoding="utf-8"))
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise ValueError(f"{path}: not a valid JSON file ({e})") from None


def load(directory: str | os.PathLike, **config_overrides) -> tuple[dict, llama.LlamaConfig]:
  """Reads config.json and the safetensors weights; returns (params, cfg).

  `config_overrides` replace config fields: dtype="float32" loads and computes in float32
  (it sets param_dtype too unless that is given); param_dtype="float32", dtype="bfloat16"
  keeps float32 weights and computes in bfloat16. A bad file raises an error naming its
  path and the field or tensor.
  """
  directory = pathlib.Path(directory)
  config_path = directory / "config.json"
  if not config_path.is_file():
    raise FileNotFoundError(f"directory: no config.json in {str(directory)!r}")
  cfg = _config_from_hf(_read_json(config_path), str(config_path), config_overrides)
  tensors, sources = _read_tensors(directory)
  return _to_params(tensors, cfg, sources), cfg


def read_safetensors(path: str | os.PathLike, load_file: Callable[[str], dict]) -> dict:
  """`load_file(path)` (a safetensors loader: `safetensors.numpy.load_file`, `.flax`'s ...),
  with errors that name the file: a missing file, and a damaged or truncated one (which
  tensors a short file cuts off)."""
  from safetensors import SafetensorError

  path = os.fspath(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path}: no such safetensors file")
  try:
    return load_file(path)
  except SafetensorError as e:  # its message names neither the file nor the tensor
    raise ValueError(f"{path}: not a readable safetensors file: {e}{_truncation(path)}") from None


def _truncation(path: str) -> str:
  """Which tensors a short file cuts off, read from its header; '' when the header is unreadable."""
  size = os.path.getsize(path)
  try:
    with open(path, "rb") as f:
      head = f.read(8)
      if head.startswith(b"version"):  # `git clone` without git-lfs leaves a small text pointer
        return " (a Git LFS pointer file, not the weights: fetch them with `git lfs pull`)"
      if len(head) < 8:
        return f" (the file has {size} bytes: empty or truncated)"
      header_len = int.from_bytes(head, "little")
      if 8 + header_len > size:
        plausible = header_len < 100_000_000  # a safetensors header is JSON of names and offsets
        return f" (its header ends at byte {8 + header_len}, the file has {size}: truncated)" if plausible else ""
      header = json.loads(f.read(header_len))
    ends = {name: 8 + header_len + info["data_offsets"][1] for name, info in header.items() if name != "__metadata__"}
  except (ValueError, TypeError, KeyError, IndexError, AttributeError):
    return ""
  cut = sorted(name for name, end in ends.items() if end > size)
  if not cut:
    return ""
  return f" (truncated: {size} bytes, {max(ends.values())} expected; tensors cut off: {cut[:5]})"


def _read_tensors(directory: pathlib.Path) -> tuple[dict[str, jax.Array], dict[str, str]]:
  """(tensors, the file each came from)."""
  from safetensors.flax import load_file  # jax arrays: bfloat16 survives, unlike numpy

  index = directory / "model.safetensors.index.json"
  expected: dict[str, str] = {}  # tensor -> shard, as the index lists them
  if index.is_file():
    weight_map = _read_json(index)
    weight_map = weight_map.get("weight_map") if isinstance(weight_map, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
      raise ValueError(f"{index}: weight_map: expected an object of tensor name -> shard file, got {weight_map!r:.200}")
    expected = weight_map
    files = sorted(set(weight_map.values()))
    for name in files:
      if not (directory / name).is_file():
        raise FileNotFoundError(f"{index}: weight_map: shard {name!r} is missing from {str(directory)!r}")
  elif (directory / "model.safetensors").is_file():
    files = ["model.safetensors"]
  else:
    raise FileNotFoundError(f"directory: no model.safetensors or model.safetensors.index.json in {str(directory)!r}")
  tensors: dict[str, jax.Array] = {}
  sources: dict[str, str] = {}
  for name in files:
    path = str(directory / name)
    for tensor, value in read_safetensors(path, load_file).items():
      if tensor in sources:
        raise ValueError(f"{path}: tensor {tensor!r} is also in {sources[tensor]}")
      if tensor in expected and expected[tensor] != name:  # one the index omits meets the unexpected-tensor check
        raise ValueError(f"{path}: tensor {tensor!r} is listed in {index} under {expected[tensor]!r}, not {name!r}")
      tensors[tensor], sources[tensor] = value, path
  unlisted = sorted(set(expected) - set(tensors))
  if unlisted:
    raise ValueError(f"{index}: weight_map lists tensors that no shard holds: {unlisted[:5]}")
  return tensors, sources


def _unpermute_rope_rows(w: np.ndarray, n_heads: int, head_dim: int) -> np.ndarray:
  """HF rotate-half row order [heads, 2, K/2] -> Meta interleaved order [heads, K/2, 2]."""
  d_in = w.shape[1]
  return w.reshape(n_heads, 2, head_dim // 2, d_in).transpose(0, 2, 1, 3).reshape(n_heads * head_dim, d_in)


def _to_params(tensors: dict, cfg: llama.LlamaConfig, sources: dict[str, str] | None = None) -> dict:
  H, G, K, D = cfg.n_heads, cfg.n_kv_heads, cfg.k, cfg.dim
  used = set()
  sources = sources or {}

  def take(name: str, shape: tuple[int, ...]):
    if name not in tensors:
      raise ValueError(f"checkpoint: tensor {name!r} is missing")
    w = tensors[name]
    where = sources.get(name, "checkpoint")
    if tuple(w.shape) != shape:
      raise ValueError(f"{where}: tensor {name!r} has shape {tuple(w.shape)}, config.json implies {shape}")
    if not jnp.issubdtype(w.dtype, jnp.floating):  # quantized or integer weights would cast to wrong floats
      raise ValueError(f"{where}: tensor {name!r}: expected a float dtype, got {w.dtype}")
    used.add(name)
    return jnp.asarray(w, jnp.float32)

  def layer(i: int) -> dict:
    pre = f"model.layers.{i}."
    q = _unpermute_rope_rows(take(pre + "self_attn.q_proj.weight", (H * K, D)), H, K)
    k = _unpermute_rope_rows(take(pre + "self_attn.k_proj.weight", (G * K, D)), G, K)
    v = take(pre + "self_attn.v_proj.weight", (G * K, D))
    return {
      "attn_norm": take(pre + "input_layernorm.weight", (D,)),
      "wq": q.reshape(H, K, D).transpose(2, 0, 1),
      "wk": k.reshape(G, K, D).transpose(2, 0, 1),
      "wv": v.reshape(G, K, D).transpose(2, 0, 1),
      "wo": take(pre + "self_attn.o_proj.weight", (D, H * K)).reshape(D, H, K).transpose(1, 2, 0),
      "mlp_norm": take(pre + "post_attention_layernorm.weight", (D,)),
      "w1": take(pre + "mlp.gate_proj.weight", (cfg.ffn_dim, D)).T,
      "w3": take(pre + "mlp.up_proj.weight", (cfg.ffn_dim, D)).T,
      "w2": take(pre + "mlp.down_proj.weight", (D, cfg.ffn_dim)).T,
    }

  layers = [layer(i) for i in range(cfg.n_layers)]
  params = {
    "embed": take("model.embed_tokens.weight", (cfg.vocab_size, D)),
    "layers": {name: jnp.stack([l[name] for l in layers]) for name in layers[0]},
    "final_norm": take("model.norm.weight", (D,)),
  }
  if not cfg.tie_embeddings:
    params["unembed"] = take("lm_head.weight", (cfg.vocab_size, D)).T
  extra = sorted(n for n in tensors if n not in used and not n.endswith(_IGNORED_SUFFIXES))
  if extra:
    raise ValueError(f"checkpoint: unexpected tensors {extra[:5]} (is this a plain Llama checkpoint?)")
  return jax.tree.map(lambda x: x.astype(cfg.param_dtype), params)
