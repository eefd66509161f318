"""HF round trips. Import: a random model exported to HF layout by hand (a loop over rows)
imports to the same logits, and HF's rotate-half RoPE on HF weights gives the scores ours gives
on imported weights. Export: `llama_export.save` writes what the hand export writes, in
transformers 5's config format, sharded, atomically, and re-imports to identical params."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import save_file

from paperjax.models.transformer import llama, llama_export, llama_import, llama_quant
from paperjax.ops import files, quant, rope

CFG = dataclasses.replace(
  llama.PRESETS["tiny"], rope_scaling=rope.RopeScaling(original_max_position=64), rope_theta=10_000.0
)


def _hf_rows(w_DNK):
  """Ours [D, N, K] (pairs (2i, 2i+1)) -> HF [N*K, D] with each head's rows in rotate-half order."""
  d, n, k = w_DNK.shape
  rows = np.zeros((n * k, d), np.float32)
  for head in range(n):
    for i in range(k // 2):
      rows[head * k + i] = w_DNK[:, head, 2 * i]  # first half: even dims
      rows[head * k + k // 2 + i] = w_DNK[:, head, 2 * i + 1]  # second half: odd dims
  return rows


def _export(params, cfg):
  p = jax.tree.map(np.asarray, params)
  tensors = {
    "model.embed_tokens.weight": p["embed"],
    "model.norm.weight": p["final_norm"],
    "lm_head.weight": p["unembed"].T,
  }
  for i in range(cfg.n_layers):
    layer = {k: v[i] for k, v in p["layers"].items()}
    pre = f"model.layers.{i}."
    tensors |= {
      pre + "input_layernorm.weight": layer["attn_norm"],
      pre + "post_attention_layernorm.weight": layer["mlp_norm"],
      pre + "self_attn.q_proj.weight": _hf_rows(layer["wq"]),
      pre + "self_attn.k_proj.weight": _hf_rows(layer["wk"]),
      pre + "self_attn.v_proj.weight": layer["wv"].reshape(cfg.dim, -1).T,
      pre + "self_attn.o_proj.weight": layer["wo"].reshape(-1, cfg.dim).T,
      pre + "mlp.gate_proj.weight": layer["w1"].T,
      pre + "mlp.up_proj.weight": layer["w3"].T,
      pre + "mlp.down_proj.weight": layer["w2"].T,
    }
  return {k: np.ascontiguousarray(v, np.float32) for k, v in tensors.items()}


def _hf_config(cfg, **extra):
  return {
    "model_type": "llama",
    "architectures": ["LlamaForCausalLM"],
    "vocab_size": cfg.vocab_size,
    "hidden_size": cfg.dim,
    "intermediate_size": cfg.ffn_dim,
    "num_hidden_layers": cfg.n_layers,
    "num_attention_heads": cfg.n_heads,
    "num_key_value_heads": cfg.n_kv_heads,
    "rms_norm_eps": cfg.norm_eps,
    "rope_theta": cfg.rope_theta,
    "max_position_embeddings": cfg.max_seq_len,
    "rope_scaling": {
      "rope_type": "llama3",
      "factor": 8.0,
      "low_freq_factor": 1.0,
      "high_freq_factor": 4.0,
      "original_max_position_embeddings": 64,
    },
    "tie_word_embeddings": False,
    "hidden_act": "silu",
    "torch_dtype": "float32",
    **extra,
  }


@pytest.fixture(scope="module")
def model():
  return llama.init(jax.random.key(3), CFG)


def _write(directory, tensors, config, shards=1):
  directory.mkdir(exist_ok=True)
  (directory / "config.json").write_text(json.dumps(config))
  if shards == 1:
    save_file(tensors, str(directory / "model.safetensors"))
    return
  names = sorted(tensors)
  weight_map = {}
  for s in range(shards):
    file = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
    part = names[s::shards]
    save_file({n: tensors[n] for n in part}, str(directory / file))
    weight_map |= {n: file for n in part}
  (directory / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))


def _hf5_config(cfg, **extra):
  """transformers >= 5's layout: rope_theta and rope_scaling folded into rope_parameters,
  torch_dtype renamed dtype."""
  hf = _hf_config(cfg)
  hf["rope_parameters"] = {"rope_theta": hf.pop("rope_theta"), **hf.pop("rope_scaling")}
  hf["dtype"] = hf.pop("torch_dtype")
  return {**hf, **extra}


@pytest.mark.parametrize("shards", [1, 3])
@pytest.mark.parametrize("layout", [_hf_config, _hf5_config], ids=["transformers4", "transformers5"])
def test_round_trip_gives_the_same_logits(tmp_path, model, shards, layout, jitted):
  _write(tmp_path / "ckpt", _export(model, CFG), layout(CFG), shards)
  params, cfg = llama_import.load(tmp_path / "ckpt")
  assert cfg == CFG
  tokens = jax.random.randint(jax.random.key(0), (2, 12), 0, CFG.vocab_size)
  np.testing.assert_allclose(
    jitted(llama.forward, cfg)(params, tokens)[0], jitted(llama.forward, CFG)(model, tokens)[0], rtol=1e-5, atol=1e-5
  )


def test_hf_rotate_half_scores_equal_ours(model, np_rng):
  """HF: q = W_q x per head, rotated with rotate_half and cos/sin of cat(freqs, freqs)."""
  tensors = _export(model, CFG)
  params = llama_import._to_params(tensors, CFG)
  x = np_rng.normal(size=(CFG.dim,)).astype(np.float32)
  inv_freq = rope.inv_frequencies(CFG.k, CFG.rope_theta, CFG.rope_scaling).astype(np.float64)
  K = CFG.k

  def hf_rotate(v, pos):
    angle = np.concatenate([pos * inv_freq, pos * inv_freq])
    rotated_half = np.concatenate([-v[K // 2 :], v[: K // 2]])
    return v * np.cos(angle) + rotated_half * np.sin(angle)

  q_hf = tensors["model.layers.0.self_attn.q_proj.weight"][:K] @ x  # head 0
  k_hf = tensors["model.layers.0.self_attn.k_proj.weight"][:K] @ x  # kv head 0
  hf_score = hf_rotate(q_hf, 9) @ hf_rotate(k_hf, 4)
  q = jnp.einsum("d,dhk->hk", x, params["layers"]["wq"][0])[None, None]
  k = jnp.einsum("d,dgk->gk", x, params["layers"]["wk"][0])[None, None]
  inv = jnp.asarray(inv_freq, jnp.float32)
  ours = jnp.sum(
    rope.apply_rope(q, jnp.array([[9]]), inv)[0, 0, 0] * rope.apply_rope(k, jnp.array([[4]]), inv)[0, 0, 0]
  )
  assert float(ours) == pytest.approx(hf_score, rel=1e-4)


def test_bf16_checkpoint_and_tied_embeddings(tmp_path, model):
  tied_cfg = dataclasses.replace(CFG, tie_embeddings=True)
  tensors = _export(model, CFG)
  del tensors["lm_head.weight"]
  _write(tmp_path / "ckpt", tensors, _hf_config(CFG, tie_word_embeddings=True, torch_dtype="bfloat16"))
  params, cfg = llama_import.load(tmp_path / "ckpt")
  assert cfg == dataclasses.replace(tied_cfg, param_dtype="bfloat16", dtype="bfloat16") and "unembed" not in params
  assert params["embed"].dtype == jnp.bfloat16
  params32, _ = llama_import.load(tmp_path / "ckpt", dtype="float32")
  assert params32["embed"].dtype == jnp.float32


def test_errors(tmp_path, model):
  tensors = _export(model, CFG)
  with pytest.raises(FileNotFoundError, match="no config.json"):
    llama_import.load(tmp_path)
  bad = _hf_config(CFG)
  bad["rope_scaling"] = {"rope_type": "yarn", "factor": 4.0}
  _write(tmp_path / "a", tensors, bad)
  with pytest.raises(ValueError, match="rope_scaling type 'yarn'"):
    llama_import.load(tmp_path / "a")
  _write(tmp_path / "b", tensors, _hf_config(CFG, attention_bias=True))
  with pytest.raises(ValueError, match="attention_bias"):
    llama_import.load(tmp_path / "b")
  missing = dict(tensors)
  del missing["model.layers.1.mlp.up_proj.weight"]
  _write(tmp_path / "c", missing, _hf_config(CFG))
  with pytest.raises(ValueError, match="'model.layers.1.mlp.up_proj.weight' is missing"):
    llama_import.load(tmp_path / "c")
  _write(tmp_path / "d", tensors, _hf_config(CFG, num_key_value_heads=4))
  with pytest.raises(ValueError, match="k_proj.weight' has shape"):
    llama_import.load(tmp_path / "d")
  _write(tmp_path / "e", tensors | {"model.extra.weight": np.zeros(2, np.float32)}, _hf_config(CFG))
  with pytest.raises(ValueError, match="unexpected tensors"):
    llama_import.load(tmp_path / "e")
  (tmp_path / "f").mkdir()
  (tmp_path / "f" / "config.json").write_text(json.dumps(_hf_config(CFG)))
  with pytest.raises(FileNotFoundError, match="no model.safetensors"):
    llama_import.load(tmp_path / "f")


def test_both_config_layouts_read_the_same_and_default_rope_has_no_scaling():
  assert llama_import.config_from_hf(_hf5_config(CFG)) == llama_import.config_from_hf(_hf_config(CFG)) == CFG
  plain = _hf5_config(CFG, rope_parameters={"rope_type": "default", "rope_theta": 10_000.0}, dtype="bfloat16")
  cfg = llama_import.config_from_hf(plain)
  assert cfg.rope_scaling is None and cfg.rope_theta == 10_000.0 and cfg.param_dtype == cfg.dtype == "bfloat16"


@pytest.mark.parametrize(
  "changes, message",
  [
    ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0}}, "rope_parameters type 'yarn'"),
    ({"rope_parameters": {"rope_type": "linear", "rope_theta": 1e4, "factor": 2.0}}, "rope_parameters type 'linear'"),
    ({"rope_parameters": {"rope_type": "dynamic", "rope_theta": 1e4, "factor": 2.0}}, "rope_parameters type 'dynamic'"),
    ({"rope_parameters": {"rope_type": "default", "rope_theta": 1e4, "factor": 2.0}}, r"unknown fields \['factor'\]"),
    ({"rope_parameters": {"rope_type": "llama3", "rope_theta": 1e4, "factor": 8.0}}, "lacks"),
    ({"rope_theta": 20_000.0}, "rope_theta 20000.0 disagrees"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "rope_scaling type 'yarn' disagrees"),
    ({"torch_dtype": "bfloat16"}, "dtype and torch_dtype disagree"),
    ({"dtype": "int8"}, "dtype 'int8' is not one of"),
  ],
)
def test_transformers5_config_errors(changes, message):
  with pytest.raises(ValueError, match=message):
    llama_import.config_from_hf(_hf5_config(CFG, **changes))


def test_transformers4_rope_fields_are_checked_too():
  legacy = _hf_config(CFG)
  legacy["rope_scaling"] = {**legacy["rope_scaling"], "attention_factor": 1.0}
  with pytest.raises(ValueError, match=r"rope_scaling \(llama3\) has unknown fields \['attention_factor'\]"):
    llama_import.config_from_hf(legacy)


# Export: one shape family each (GQA with llama3 RoPE scaling is CFG).
FAMILIES = {
  "gqa_llama3_rope": CFG,
  "mha_default_rope": dataclasses.replace(CFG, n_kv_heads=CFG.n_heads, rope_scaling=None, rope_theta=500_000.0),
  "tied_embeddings": dataclasses.replace(CFG, tie_embeddings=True),
  "bfloat16": dataclasses.replace(CFG, param_dtype="bfloat16", dtype="bfloat16"),
}


@pytest.mark.parametrize("family", FAMILIES)
def test_export_then_import_gives_identical_params(tmp_path, family):
  cfg = FAMILIES[family]
  params = llama.init(jax.random.key(5), cfg)
  path = llama_export.save(tmp_path / "hf", params, cfg)
  loaded, loaded_cfg = llama_import.load(path)
  assert loaded_cfg == cfg
  assert jax.tree.structure(loaded) == jax.tree.structure(params)
  for (where, a), b in zip(jax.tree.leaves_with_path(loaded), jax.tree.leaves(params)):
    assert a.dtype == b.dtype == jnp.dtype(cfg.param_dtype), where
    np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32), err_msg=str(where))


def test_export_writes_what_the_hand_export_writes_in_transformers5_format(tmp_path, model):
  from safetensors import safe_open

  path = llama_export.save(tmp_path / "hf", model, CFG, bos_token_id=1, eos_token_id=[2, 3])
  with safe_open(str(path / "model.safetensors"), "np") as f:
    assert f.metadata() == {"format": "pt"}  # transformers refuses other formats
    names = list(f.keys())
    written = {name: f.get_tensor(name) for name in names}
  expected = _export(model, CFG)
  assert sorted(names) == sorted(expected)
  for name, w in expected.items():
    np.testing.assert_array_equal(written[name], w, err_msg=name)
  config = json.loads((path / "config.json").read_text())
  assert config == {**_hf5_config(CFG), **config}  # every field the hand-written transformers 5 config has
  assert config["rope_parameters"] == _hf5_config(CFG)["rope_parameters"]
  assert not {"rope_theta", "rope_scaling", "torch_dtype"} & set(config)  # 4.x's fields
  assert (config["bos_token_id"], config["eos_token_id"], config["head_dim"]) == (1, [2, 3], CFG.k)
  assert sorted(p.name for p in path.iterdir()) == ["config.json", "model.safetensors"]
  assert [p.name for p in tmp_path.iterdir()] == ["hf"]  # no temporary directory left behind


def test_export_shards_above_the_size_limit(tmp_path, model):
  tensors = llama_export.to_hf(model, CFG)
  limit = 3 * tensors["model.layers.0.self_attn.q_proj.weight"].nbytes  # the embedding table alone is larger
  path = llama_export.save(tmp_path / "hf", model, CFG, max_shard_bytes=limit)
  index = json.loads((path / "model.safetensors.index.json").read_text())
  files = sorted({*index["weight_map"].values()})
  n = len(files)
  assert n > 3 and files == [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
  assert index["weight_map"].keys() == tensors.keys()
  assert index["metadata"]["total_size"] == sum(w.nbytes for w in tensors.values())
  for file in files:
    held = [t for t, f in index["weight_map"].items() if f == file]
    size = sum(tensors[t].nbytes for t in held)
    assert size <= limit or len(held) == 1, (file, held, size)
  assert index["weight_map"]["model.embed_tokens.weight"] == files[0]
  assert not (path / "model.safetensors").exists()
  loaded, _ = llama_import.load(path)
  jax.tree.map(np.testing.assert_array_equal, loaded, model)


def test_export_refuses_quantized_weights_unless_asked_to_dequantize(tmp_path, jitted):
  cfg = dataclasses.replace(CFG, n_layers=3)
  float_params = llama.init(jax.random.key(6), cfg)
  params = llama_quant.quantize_params(float_params, cfg, llama_quant.POLICIES["int8_weight_row"])
  with pytest.raises(ValueError, match=r"\['w1', 'w2', 'w3'\] are quantized.*dequantize=True"):
    llama_export.save(tmp_path / "hf", params, cfg)
  assert not (tmp_path / "hf").exists()
  loaded, _ = llama_import.load(llama_export.save(tmp_path / "hf", params, cfg, dequantize=True))
  middle = params["layers"][1]["w1"]
  np.testing.assert_array_equal(loaded["layers"]["w1"][1:2], quant.dequantize(middle))
  np.testing.assert_array_equal(loaded["layers"]["w1"][0], float_params["layers"]["w1"][0])  # exempt: as it was
  assert not np.array_equal(loaded["layers"]["w1"][1], float_params["layers"]["w1"][1])
  tokens = jax.random.randint(jax.random.key(0), (2, 12), 0, cfg.vocab_size)  # weight-only: the same matmuls
  np.testing.assert_allclose(
    jitted(llama.forward, cfg)(loaded, tokens)[0], jitted(llama.forward, cfg)(params, tokens)[0], rtol=1e-5, atol=1e-5
  )


def test_export_is_atomic_and_overwrites_only_when_asked(tmp_path, model, monkeypatch):
  import safetensors.flax

  path = llama_export.save(tmp_path / "hf", model, CFG, max_shard_bytes=10**5)
  old_files = sorted(p.name for p in path.iterdir())
  assert "model.safetensors.index.json" in old_files
  (path / "tokenizer.json").write_text("{}")
  (path / "original").mkdir()
  (path / "original" / "params.json").write_text("{}")
  with pytest.raises(FileExistsError, match="overwrite=True"):
    llama_export.save(path, model, CFG)
  calls = []

  def failing(tensors, filename, metadata=None):
    calls.append(filename)
    if len(calls) == 2:
      raise OSError("disk full")
    return save_file_(tensors, filename, metadata)

  save_file_ = safetensors.flax.save_file
  monkeypatch.setattr(safetensors.flax, "save_file", failing)
  with pytest.raises(OSError, match="disk full"):
    llama_export.save(path, model, CFG, max_shard_bytes=10**5, overwrite=True)
  monkeypatch.undo()
  assert sorted(p.name for p in path.iterdir()) == sorted([*old_files, "original", "tokenizer.json"])
  assert [p.name for p in tmp_path.iterdir()] == ["hf"]  # the failed save's directory is gone
  renames = []

  def failing_rename(src, dst):  # the swap's second rename, the new directory into place
    renames.append(src)
    if len(renames) == 2:
      raise OSError("rename failed")
    return os_replace(src, dst)

  os_replace = files.os.replace
  monkeypatch.setattr(files.os, "replace", failing_rename)
  with pytest.raises(OSError, match="rename failed"):
    llama_export.save(path, model, CFG, overwrite=True)
  monkeypatch.undo()
  assert sorted(p.name for p in path.iterdir()) == sorted([*old_files, "original", "tokenizer.json"])  # put back
  assert [p.name for p in tmp_path.iterdir()] == ["hf"]
  other = llama.init(jax.random.key(9), CFG)
  llama_export.save(path, other, CFG, overwrite=True)  # one file now: the old shards and index go
  assert sorted(p.name for p in path.iterdir()) == ["config.json", "model.safetensors", "original", "tokenizer.json"]
  assert (path / "original" / "params.json").read_text() == "{}"
  loaded, _ = llama_import.load(path)
  jax.tree.map(np.testing.assert_array_equal, loaded, other)
  assert [p.name for p in tmp_path.iterdir()] == ["hf"]


@pytest.mark.parametrize(
  "change, kwargs, error, message",
  [
    ({}, {"eos_token_id": CFG.vocab_size}, ValueError, r"eos_token_id: expected a token id in \[0, 256\)"),
    ({}, {"bos_token_id": True}, ValueError, "bos_token_id"),
    ({}, {"max_shard_bytes": 0}, ValueError, "max_shard_bytes: expected a positive int, got 0"),
    ({}, {"dequantize": "yes"}, TypeError, "dequantize: expected True or False"),
    ({"nan": True}, {}, ValueError, r"params\['layers'\]\['wk'\].*finite"),
    ({"head_dim": 16}, {}, ValueError, "hidden_size divisible by num_attention_heads"),
  ],
)
def test_export_bad_inputs(tmp_path, model, change, kwargs, error, message):
  cfg, params = CFG, model
  if change.get("nan"):
    params = {**model, "layers": {**model["layers"], "wk": model["layers"]["wk"].at[1, 0, 0, 0].set(jnp.nan)}}
  if "head_dim" in change:
    cfg = dataclasses.replace(CFG, dim=70, head_dim=16)
    params = llama.init(jax.random.key(0), cfg)
  with pytest.raises(error, match=message):
    llama_export.save(tmp_path / "hf", params, cfg, **kwargs)
  assert not (tmp_path / "hf").exists()
