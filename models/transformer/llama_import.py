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
import os
import pathlib

import jax
import jax.numpy as jnp
import numpy as np

from paperjax.models.transformer import llama
from paperjax.ops import rope

_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)  # buffers some exports include


_DTYPES = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}
_LLAMA3_ROPE = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")


def _rope_from_hf(hf: dict) -> tuple[float, rope.RopeScaling | None]:
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
    raise ValueError(f"config.json: {key} must be an object, got {fields!r}")
  fields = dict(fields)
  kinds = {fields.pop(k) for k in ("rope_type", "type") if k in fields} or {"default"}
  if len(kinds) > 1:
    raise ValueError(f"config.json: {key} names two rope types {sorted(kinds)}")
  (kind,) = kinds
  theta = fields.pop("rope_theta", None)
  top_theta = hf.get("rope_theta")
  if theta is not None and top_theta is not None and float(theta) != float(top_theta):
    raise ValueError(f"config.json: rope_theta {top_theta} disagrees with {key}.rope_theta {theta}")
  theta = float(theta if theta is not None else top_theta if top_theta is not None else 10_000.0)
  if params is not None and legacy is not None:
    legacy_kind = legacy.get("rope_type", legacy.get("type", "default")) if isinstance(legacy, dict) else legacy
    if legacy_kind != kind:
      raise ValueError(f"config.json: rope_scaling type {legacy_kind!r} disagrees with rope_parameters type {kind!r}")
  if kind not in ("default", "llama3"):
    raise ValueError(f"config.json: {key} type {kind!r} is not supported (only 'default' and 'llama3')")
  expected = set(_LLAMA3_ROPE) if kind == "llama3" else set()
  if set(fields) != expected:
    unknown, missing = sorted(set(fields) - expected), sorted(expected - set(fields))
    raise ValueError(f"config.json: {key} ({kind}) has unknown fields {unknown} and lacks {missing}")
  if kind == "default":
    return theta, None
  scaling = rope.RopeScaling(
    factor=float(fields["factor"]),
    low_freq_factor=float(fields["low_freq_factor"]),
    high_freq_factor=float(fields["high_freq_factor"]),
    original_max_position=int(fields["original_max_position_embeddings"]),
  )
  return theta, scaling


def config_from_hf(hf: dict, **overrides) -> llama.LlamaConfig:
  """LlamaConfig from a parsed config.json; unsupported settings raise ValueError."""
  if hf.get("model_type") != "llama":
    raise ValueError(f"config.json: model_type must be 'llama', got {hf.get('model_type')!r}")
  for flag in ("attention_bias", "mlp_bias"):
    if hf.get(flag):
      raise ValueError(f"config.json: {flag}=true is not supported (Llama has no biases)")
  if hf.get("hidden_act", "silu") != "silu":
    raise ValueError(f"config.json: hidden_act must be 'silu', got {hf['hidden_act']!r}")
  theta, scaling = _rope_from_hf(hf)
  fields = dict(
    vocab_size=hf["vocab_size"],
    dim=hf["hidden_size"],
    n_layers=hf["num_hidden_layers"],
    n_heads=hf["num_attention_heads"],
    n_kv_heads=hf.get("num_key_value_heads", hf["num_attention_heads"]),
    ffn_dim=hf["intermediate_size"],
    head_dim=hf.get("head_dim"),
    rope_theta=theta,
    rope_scaling=scaling,
    norm_eps=float(hf.get("rms_norm_eps", 1e-5)),
    max_seq_len=hf.get("max_position_embeddings", 8192),
    tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
  )
  stored = _stored_dtype(hf)
  fields.update(param_dtype=stored, dtype=stored)  # computes in the checkpoint's dtype unless overridden
  if "dtype" in overrides and "param_dtype" not in overrides:
    overrides = {**overrides, "param_dtype": overrides["dtype"]}  # dtype= alone casts the weights too
  return llama.LlamaConfig(**{**fields, **overrides})


def _stored_dtype(hf: dict) -> str:
  """The weights' dtype: `dtype` (transformers >= 5) or `torch_dtype` (4.x); float32 if neither."""
  names = {hf[k] for k in ("dtype", "torch_dtype") if hf.get(k) is not None}
  if len(names) > 1:
    raise ValueError(f"config.json: dtype and torch_dtype disagree: {sorted(names)}")
  name = names.pop() if names else "float32"
  if name not in _DTYPES:
    raise ValueError(f"config.json: dtype {name!r} is not one of {sorted(_DTYPES)}")
  return _DTYPES[name]


def load(directory: str | os.PathLike, **config_overrides) -> tuple[dict, llama.LlamaConfig]:
  """Reads config.json and the safetensors weights; returns (params, cfg).

  `config_overrides` replace config fields: dtype="float32" loads and computes in float32
  (it sets param_dtype too unless that is given); param_dtype="float32", dtype="bfloat16"
  keeps float32 weights and computes in bfloat16.
  """
  directory = pathlib.Path(directory)
  config_path = directory / "config.json"
  if not config_path.is_file():
    raise FileNotFoundError(f"directory: no config.json in {str(directory)!r}")
  cfg = config_from_hf(json.loads(config_path.read_text()), **config_overrides)
  tensors = _read_tensors(directory)
  return _to_params(tensors, cfg), cfg


def _read_tensors(directory: pathlib.Path) -> dict[str, jax.Array]:
  from safetensors.flax import load_file  # jax arrays: bfloat16 survives, unlike numpy

  index = directory / "model.safetensors.index.json"
  if index.is_file():
    files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
  elif (directory / "model.safetensors").is_file():
    files = ["model.safetensors"]
  else:
    raise FileNotFoundError(f"directory: no model.safetensors or model.safetensors.index.json in {str(directory)!r}")
  tensors = {}
  for name in files:
    path = directory / name
    if not path.is_file():
      raise FileNotFoundError(f"directory: shard {name!r} listed in the index is missing")
    tensors.update(load_file(str(path)))
  return tensors


def _unpermute_rope_rows(w: np.ndarray, n_heads: int, head_dim: int) -> np.ndarray:
  """HF rotate-half row order [heads, 2, K/2] -> Meta interleaved order [heads, K/2, 2]."""
  d_in = w.shape[1]
  return w.reshape(n_heads, 2, head_dim // 2, d_in).transpose(0, 2, 1, 3).reshape(n_heads * head_dim, d_in)


def _to_params(tensors: dict, cfg: llama.LlamaConfig) -> dict:
  H, G, K, D = cfg.n_heads, cfg.n_kv_heads, cfg.k, cfg.dim
  used = set()

  def take(name: str, shape: tuple[int, ...]):
    if name not in tensors:
      raise ValueError(f"checkpoint: tensor {name!r} is missing")
    w = tensors[name]
    if tuple(w.shape) != shape:
      raise ValueError(f"checkpoint: tensor {name!r} has shape {tuple(w.shape)}, config implies {shape}")
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
