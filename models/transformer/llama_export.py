"""Write `models.llama` params as a Hugging Face Llama checkpoint: `llama_import`'s inverse.

Shapes: D model width, H query heads, G key-value heads, K head dim, E MLP width, V vocab.

The directory `save` writes is what transformers' `save_pretrained` writes for
`LlamaForCausalLM`, so transformers, vLLM and `llama_import.load` read it:
  config.json                    transformers 5's format: `rope_parameters` {rope_type,
                                 rope_theta[, llama3 fields]} and `dtype` (4.x wrote
                                 `rope_theta`, `rope_scaling` and `torch_dtype`)
  model.safetensors              the weights, or, above `max_shard_bytes`:
  model-0000i-of-0000n.safetensors + model.safetensors.index.json
                                 {"metadata": {"total_size"}, "weight_map": {tensor: file}}
Tensors carry HF's names and [out, in] layout in the checkpoint's dtype (cfg.param_dtype),
in the order of HF's state dict; safetensors metadata {"format": "pt"}, as transformers
expects. Layout conversion (ours -> HF), the inverse of `llama_import`'s:
- wq [D, H, K], wk [D, G, K] -> q_proj [H*K, D], k_proj [G*K, D] with each head's rows
  from our interleaved RoPE pairs (2i, 2i+1), order [K/2, 2], to HF's rotate-half order
  [2, K/2];
- wv [D, G, K] -> v_proj [G*K, D]; wo [H, K, D] -> o_proj [D, H*K];
- w1, w3 [D, E] -> gate_proj, up_proj [E, D]; w2 [E, D] -> down_proj [D, E];
- embed [V, D] -> embed_tokens; unembed [D, V] -> lm_head [V, D]; tied embeddings write no
  lm_head (transformers drops the shared tensor and ties it on load).
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
from collections.abc import Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from paperjax.models.transformer import llama
from paperjax.ops import checks, files, quant

FORMAT_VERSION = "5.0.0"  # the transformers version whose config.json format this writes
DEFAULT_MAX_SHARD_BYTES = 50 * 10**9  # "50GB": transformers 5's save_pretrained default (4.x: "5GB")
WEIGHT_FILES = ("config.json", "model.safetensors", "model.safetensors.index.json")  # and model-*-of-*.safetensors


def hf_config(
  cfg: llama.LlamaConfig, *, bos_token_id: int | None = None, eos_token_id: int | Sequence[int] | None = None
) -> dict[str, Any]:
  """config.json of `cfg` in transformers 5's format (module docstring).

  The weights' dtype is cfg.param_dtype; cfg.dtype (compute) has no HF field, and
  `llama_import.load` computes in the stored dtype unless given dtype=. Runtime options
  (remat, unroll, attention_impl, axis_rules) are not part of a checkpoint. Token ids are
  written as given; None writes null rather than transformers' defaults (1 and 2), which
  are not Llama 3's.
  """
  if not isinstance(cfg, llama.LlamaConfig):
    raise TypeError(f"cfg: expected a llama.LlamaConfig, got {type(cfg).__name__}")
  if cfg.dim % cfg.n_heads:  # transformers' LlamaConfig refuses such a config on load
    raise ValueError(
      f"cfg: transformers' Llama needs hidden_size divisible by num_attention_heads, got dim={cfg.dim}, "
      f"n_heads={cfg.n_heads} (head_dim={cfg.k})"
    )
  rope_parameters: dict[str, Any] = {"rope_type": "default", "rope_theta": cfg.rope_theta}
  if cfg.rope_scaling is not None:
    s = cfg.rope_scaling
    rope_parameters = {
      "rope_type": "llama3",
      "rope_theta": cfg.rope_theta,
      "factor": s.factor,
      "low_freq_factor": s.low_freq_factor,
      "high_freq_factor": s.high_freq_factor,
      "original_max_position_embeddings": s.original_max_position,
    }
  return {
    "architectures": ["LlamaForCausalLM"],
    "attention_bias": False,
    "attention_dropout": 0.0,
    "bos_token_id": _token_ids("bos_token_id", bos_token_id, cfg),
    "dtype": cfg.param_dtype,
    "eos_token_id": _token_ids("eos_token_id", eos_token_id, cfg),
    "head_dim": cfg.k,
    "hidden_act": "silu",
    "hidden_size": cfg.dim,
    "initializer_range": 0.02,
    "intermediate_size": cfg.ffn_dim,
    "max_position_embeddings": cfg.max_seq_len,
    "mlp_bias": False,
    "model_type": "llama",
    "num_attention_heads": cfg.n_heads,
    "num_hidden_layers": cfg.n_layers,
    "num_key_value_heads": cfg.n_kv_heads,
    "pad_token_id": None,
    "pretraining_tp": 1,
    "rms_norm_eps": cfg.norm_eps,
    "rope_parameters": rope_parameters,
    "tie_word_embeddings": cfg.tie_embeddings,
    "transformers_version": FORMAT_VERSION,
    "use_cache": True,
    "vocab_size": cfg.vocab_size,
  }


def _token_ids(name: str, ids: Any, cfg: llama.LlamaConfig) -> Any:
  if ids is None:
    return None
  many = isinstance(ids, (list, tuple))
  for i in ids if many else [ids]:
    if not checks.is_int(i) or not 0 <= i < cfg.vocab_size:
      raise ValueError(f"{name}: expected a token id in [0, {cfg.vocab_size}) or a list of them, got {ids!r}")
  return [int(i) for i in ids] if many else int(ids)


def to_hf(params: dict, cfg: llama.LlamaConfig, *, dequantize: bool = False) -> dict[str, jax.Array]:
  """HF tensor name -> [out, in] weight in cfg.param_dtype, in HF's state-dict order.

  Segmented layers (`llama_quant.quantize_params`) are joined. Quantized weights raise
  unless `dequantize`, which writes x_hat = q / scale (`quant.dequantize`): HF's Llama has
  no place for our scales, so an exported model is a float model.
  """
  llama.check_params(params, cfg)
  segments = [segment for _, _, segment in llama.layer_segments(params, cfg)]
  is_q = lambda x: isinstance(x, quant.QuantizedTensor)
  quantized = sorted({name for segment in segments for name, w in segment.items() if is_q(w)})
  if quantized and not dequantize:
    raise ValueError(
      f"params: the layer weights {quantized} are quantized, and HF's Llama stores float weights; "
      "pass dequantize=True to write x_hat = q / scale"
    )
  dtype = jnp.dtype(cfg.param_dtype)

  def floats(name: str, w: Any) -> jax.Array:
    w = quant.dequantize(w) if is_q(w) else jnp.asarray(w)
    checks.check_finite(name, np.asarray(w, np.float32))  # NaN weights would load and poison every logit
    return w.astype(dtype)

  stack = lambda name: jnp.concatenate([floats(f"params['layers'][{name!r}]", s[name]) for s in segments])
  layers = {name: stack(name) for name in segments[0]}
  H, G, K, D = cfg.n_heads, cfg.n_kv_heads, cfg.k, cfg.dim
  tensors = {"model.embed_tokens.weight": floats("params['embed']", params["embed"])}
  for i in range(cfg.n_layers):
    layer = {name: w[i] for name, w in layers.items()}
    pre = f"model.layers.{i}."
    tensors |= {
      pre + "self_attn.q_proj.weight": _permute_rope_rows(layer["wq"]),
      pre + "self_attn.k_proj.weight": _permute_rope_rows(layer["wk"]),
      pre + "self_attn.v_proj.weight": layer["wv"].reshape(D, G * K).T,
      pre + "self_attn.o_proj.weight": layer["wo"].reshape(H * K, D).T,
      pre + "mlp.gate_proj.weight": layer["w1"].T,
      pre + "mlp.up_proj.weight": layer["w3"].T,
      pre + "mlp.down_proj.weight": layer["w2"].T,
      pre + "input_layernorm.weight": layer["attn_norm"],
      pre + "post_attention_layernorm.weight": layer["mlp_norm"],
    }
  tensors["model.norm.weight"] = floats("params['final_norm']", params["final_norm"])
  if not cfg.tie_embeddings:
    tensors["lm_head.weight"] = floats("params['unembed']", params["unembed"]).T
  return tensors


def _permute_rope_rows(w_DHK: jax.Array) -> jax.Array:
  """Ours [D, H, K] (or [D, G, K]), pairs (2i, 2i+1) -> HF [H*K, D] with each head's rows in
  rotate-half order: row h*K + j*K/2 + i holds our dim 2i + j (`llama_import`'s inverse)."""
  d, h, k = w_DHK.shape
  return w_DHK.reshape(d, h, k // 2, 2).transpose(1, 3, 2, 0).reshape(h * k, d)


def shards(tensors: dict[str, jax.Array], max_shard_bytes: int) -> list[dict[str, jax.Array]]:
  """Consecutive groups of tensors, each at most `max_shard_bytes` unless one tensor alone is
  larger (it gets a shard of its own), filled in order as huggingface_hub splits a state dict."""
  groups: list[dict[str, jax.Array]] = [{}]
  size = 0
  for name, w in tensors.items():
    if groups[-1] and size + w.nbytes > max_shard_bytes:
      groups.append({})
      size = 0
    groups[-1][name] = w
    size += w.nbytes
  return groups


def save(
  directory: str | os.PathLike,
  params: dict,
  cfg: llama.LlamaConfig,
  *,
  max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
  dequantize: bool = False,
  overwrite: bool = False,
  bos_token_id: int | None = None,
  eos_token_id: int | Sequence[int] | None = None,
) -> pathlib.Path:
  """Writes params as an HF Llama checkpoint directory (module docstring); returns its path.

  Everything is checked before a byte is written (`to_hf`, `hf_config`). The checkpoint is
  written beside `directory` and renamed into place (`ops.files.atomic_directory`). An
  existing `directory` raises FileExistsError unless `overwrite`; then its config and
  weights are replaced and its other files (a tokenizer, generation_config.json, a README)
  are carried into the new directory.
  """
  if not checks.is_int(max_shard_bytes) or max_shard_bytes <= 0:
    raise ValueError(f"max_shard_bytes: expected a positive int, got {max_shard_bytes!r}")
  for name, flag in (("dequantize", dequantize), ("overwrite", overwrite)):
    if not isinstance(flag, bool):
      raise TypeError(f"{name}: expected True or False, got {flag!r}")
  config = hf_config(cfg, bos_token_id=bos_token_id, eos_token_id=eos_token_id)
  tensors = to_hf(params, cfg, dequantize=dequantize)
  target = pathlib.Path(directory)
  if target.exists() and not overwrite:
    raise FileExistsError(f"directory: {str(target)!r} exists; pass overwrite=True to replace its weights and config")
  from safetensors.flax import save_file  # jax arrays: bfloat16 survives, unlike numpy

  with files.atomic_directory(target) as tmp:
    for kept in _carried_over(target):
      src = target / kept
      if src.is_dir():
        shutil.copytree(src, tmp / kept, copy_function=files.link_or_copy, symlinks=True)
      else:
        files.link_or_copy(src, tmp / kept)
    groups = shards(tensors, max_shard_bytes)
    names = ["model.safetensors"] if len(groups) == 1 else [_shard_name(i, len(groups)) for i in range(len(groups))]
    for name, group in zip(names, groups):
      save_file(group, str(tmp / name), metadata={"format": "pt"})
    if len(groups) > 1:
      index = {
        "metadata": {"total_size": sum(w.nbytes for w in tensors.values())},
        "weight_map": {tensor: name for name, group in zip(names, groups) for tensor in group},
      }
      (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
  return target


def _shard_name(i: int, n: int) -> str:
  return f"model-{i + 1:05d}-of-{n:05d}.safetensors"


def _carried_over(target: pathlib.Path) -> Iterator[str]:
  """The entries of an existing checkpoint directory that `save` does not write."""
  if not target.is_dir():
    return
  for entry in sorted(os.listdir(target)):
    ours = entry in WEIGHT_FILES or (entry.startswith("model-") and entry.endswith(".safetensors"))
    if not ours:
      yield entry
