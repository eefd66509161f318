"""Bad input never passes silently (issue 31): each case below is one defect in an otherwise
valid file or call, and must raise the named error whose message names the argument or field
(and, for a file, its name). `test_the_unbroken_inputs_load` checks the builders' files are
valid, so each case fails for its one defect.

Every case takes the test's tmp_path `d` and builds what it needs there: a tiny HF Llama
checkpoint (zero tensors of the config's shapes), a SAELens directory, a JSONL file.
"""

from __future__ import annotations

import base64
import json

import jax
import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import save_file

from paperjax.align import data
from paperjax.interp import sae, sae_io
from paperjax.models.data import chat, corpus, jrt_prompt, synthetic, tokenizer
from paperjax.models.transformer import llama_import

# A tiny Llama: V=16, D=8, L=1, H=2, G=1, K=4, F=16.
HF_CONFIG = {
  "model_type": "llama",
  "vocab_size": 16,
  "hidden_size": 8,
  "intermediate_size": 16,
  "num_hidden_layers": 1,
  "num_attention_heads": 2,
  "num_key_value_heads": 1,
  "rms_norm_eps": 1e-5,
  "rope_theta": 10_000.0,
  "max_position_embeddings": 32,
  "rope_scaling": {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 16,
  },
  "tie_word_embeddings": False,
  "hidden_act": "silu",
  "torch_dtype": "float32",
}
UP = "model.layers.0.mlp.up_proj.weight"


def _hf_tensors() -> dict[str, np.ndarray]:
  shapes = {
    "model.embed_tokens.weight": (16, 8),
    "model.norm.weight": (8,),
    "lm_head.weight": (16, 8),
    "model.layers.0.input_layernorm.weight": (8,),
    "model.layers.0.post_attention_layernorm.weight": (8,),
    "model.layers.0.self_attn.q_proj.weight": (8, 8),
    "model.layers.0.self_attn.k_proj.weight": (4, 8),
    "model.layers.0.self_attn.v_proj.weight": (4, 8),
    "model.layers.0.self_attn.o_proj.weight": (8, 8),
    "model.layers.0.mlp.gate_proj.weight": (16, 8),
    UP: (16, 8),
    "model.layers.0.mlp.down_proj.weight": (8, 16),
  }
  return {name: np.zeros(shape, np.float32) for name, shape in shapes.items()}


def _ckpt(d, config=None, tensors=None, *, config_text=None, shards=1, drop_shard=False, cut=0, index=None):
  """A checkpoint directory: HF_CONFIG | config, the tensors (in `shards` files listed by an
  index), with the last shard's file cut short by `cut` bytes or deleted (`drop_shard`)."""
  ckpt = d / "ckpt"
  ckpt.mkdir()
  text = config_text if config_text is not None else json.dumps(HF_CONFIG | (config or {}))
  (ckpt / "config.json").write_text(text)
  tensors = _hf_tensors() if tensors is None else tensors
  names = sorted(tensors)
  files = [f"model-{s + 1:05d}-of-{shards:05d}.safetensors" for s in range(shards)]
  files = files if shards > 1 else ["model.safetensors"]
  weight_map = {}
  for s, file in enumerate(files):
    part = names[s::shards]
    save_file({n: tensors[n] for n in part}, str(ckpt / file))
    weight_map |= {n: file for n in part}
  if shards > 1:
    index = index if index is not None else {"weight_map": weight_map}
    (ckpt / "model.safetensors.index.json").write_text(json.dumps(index))
  last = ckpt / files[-1]
  if drop_shard:
    last.unlink()
  if cut:
    last.write_bytes(last.read_bytes()[:-cut])
  return ckpt


def _sae(d, config=None, tensors=None, *, config_text=None, cut=0, drop=()):
  """A SAELens directory of a standard SAE with D=4, F=8: cfg.json (| config) and its weights."""
  path = d / "sae"
  path.mkdir()
  cfg = {
    "architecture": "standard",
    "d_in": 4,
    "d_sae": 8,
    "dtype": "float32",
    "device": "cpu",
    "apply_b_dec_to_input": True,
    "normalize_activations": "none",
    "reshape_activations": "none",
    "metadata": {"hook_name": "blocks.0.hook_resid_post", "model_name": "tiny"},
  }
  cfg = {k: v for k, v in {**cfg, **(config or {})}.items() if k not in drop}
  (path / "cfg.json").write_text(config_text if config_text is not None else json.dumps(cfg))
  weights = {"W_enc": np.zeros((4, 8)), "W_dec": np.zeros((8, 4)), "b_dec": np.zeros(4), "b_enc": np.zeros(8)}
  weights = {k: v.astype(np.float32) for k, v in weights.items()} | (tensors or {})
  save_file(weights, path / "sae_weights.safetensors")
  if cut:
    file = path / "sae_weights.safetensors"
    file.write_bytes(file.read_bytes()[:-cut])
  return path


SAE_CFG = sae.SAEConfig(architecture="standard", d_in=4, d_sae=8)


def _sae_save(d, *, params_cfg=SAE_CFG, nan=None, **kwargs):
  """sae_io.save of a D=4, F=8 SAE (params from params_cfg, entry 0 of `nan` set to NaN) to d / "out"."""
  params = {k: np.array(v) for k, v in sae.init(jax.random.key(0), params_cfg).items()}
  if nan:
    params[nan].flat[0] = np.nan
  kwargs = {"hook_name": "blocks.0.hook_resid_post", "model_name": "tiny", **kwargs}
  return sae_io.save(d / "out", params, SAE_CFG, **kwargs)


PAIR = {"prompt": "2+2=", "chosen": "4", "rejected": "5"}


def _jsonl(d, *lines) -> str:
  """x.jsonl of these lines (records as JSON, strings as written)."""
  path = d / "x.jsonl"
  path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
  return str(path)


def _fmt() -> chat.ChatFormat:
  """A chat format over a stand-in encoder: the record checks come before any encoding."""
  return chat.ChatFormat(
    encode=lambda text: [ord(c) % 7 + 10 for c in text], bos_id=0, start_header_id=1, end_header_id=2, eot_id=3
  )


def _tok(d) -> tokenizer.Tokenizer:
  """A byte-level BPE file (256 one-byte tokens, Llama 3's specials after them)."""
  path = d / "bytes.tiktoken"
  path.write_text("".join(f"{base64.b64encode(bytes([i])).decode()} {i}\n" for i in range(256)))
  return tokenizer.from_file(path)


CONVERSATION = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]

CASES = [
  # HF Llama import: config.json
  pytest.param(
    lambda d: llama_import.load(
      _ckpt(d, config_text=json.dumps({k: v for k, v in HF_CONFIG.items() if k != "hidden_size"}))
    ),
    ValueError,
    r"ckpt/config\.json: missing field hidden_size",
    id="llama-config-missing-field",
  ),
  pytest.param(
    lambda d: llama_import.load(_ckpt(d, config_text='{"model_type": "llama",')),
    ValueError,
    r"ckpt/config\.json: not a valid JSON",
    id="llama-config-not-json",
  ),
  pytest.param(
    lambda d: llama_import.load(_ckpt(d, config_text="[1, 2]")),
    ValueError,
    r"config\.json: expected a JSON object",
    id="llama-config-not-object",
  ),
  pytest.param(
    lambda d: llama_import.load(_ckpt(d, {"vocab_size": "16"})),
    ValueError,
    r"config\.json: vocab_size: expected a positive integer, got '16' \(str\)",
    id="llama-vocab-size-str",
  ),
  pytest.param(
    lambda d: llama_import.load(_ckpt(d, {"tie_word_embeddings": "false"})),
    ValueError,
    r"config\.json: tie_word_embeddings: expected true or false",
    id="llama-tie-str",
  ),
  pytest.param(
    lambda d: llama_import.load(_ckpt(d, {"rms_norm_eps": float("nan")})),
    ValueError,
    r"config\.json: rms_norm_eps: expected a positive finite number, got nan",
    id="llama-eps-nan",
  ),
  pytest.param(
    lambda d: llama_import.load(_ckpt(d, {"rope_scaling": {**HF_CONFIG["rope_scaling"], "factor": "8"}})),
    ValueError,
    r"config\.json: rope_scaling\.factor: expected a positive finite number, got '8'",
    id="llama-rope-factor-str",
  ),
  pytest.param(
    lambda d: llama_import.load(_ckpt(d, {"num_key_value_heads": 3})),
    ValueError,
    r"config\.json: n_heads, n_kv_heads",
    id="llama-heads-not-multiple",
  ),
  # HF Llama import: the weights
  pytest.param(
    lambda d: llama_import.load(_ckpt(d, cut=100)),
    ValueError,
    r"model\.safetensors: not a readable safetensors file.*truncated.*tensors cut off",
    id="llama-truncated",
  ),
  pytest.param(
    lambda d: llama_import.load(_ckpt(d, shards=2, drop_shard=True)),
    FileNotFoundError,
    r"model\.safetensors\.index\.json: weight_map: shard 'model-00002-of-00002\.safetensors' is missing",
    id="llama-missing-shard",
  ),
  pytest.param(
    lambda d: llama_import.load(_ckpt(d, shards=2, index={"weights": {}})),
    ValueError,
    r"model\.safetensors\.index\.json: weight_map: expected an object",
    id="llama-index-no-weight-map",
  ),
  pytest.param(
    lambda d: llama_import.load(_ckpt(d, tensors=_hf_tensors() | {UP: np.zeros((16, 4), np.float32)})),
    ValueError,
    r"model\.safetensors: tensor '.*mlp\.up_proj\.weight' has shape \(16, 4\), config\.json implies \(16, 8\)",
    id="llama-wrong-shape",
  ),
  pytest.param(
    lambda d: llama_import.load(_ckpt(d, tensors=_hf_tensors() | {UP: np.zeros((16, 8), np.int8)})),
    ValueError,
    r"model\.safetensors: tensor 'model\.layers\.0\.mlp\.up_proj\.weight': expected a float dtype, got int8",
    id="llama-int-tensor",
  ),
  # SAELens files
  pytest.param(
    lambda d: sae_io.load(_sae(d, drop=("d_in",))),
    ValueError,
    r"sae/cfg\.json: missing field 'd_in'",
    id="sae-missing-d-in",
  ),
  pytest.param(
    lambda d: sae_io.load(_sae(d, config_text="d_in: 4")),
    ValueError,
    r"sae/cfg\.json: not a valid JSON",
    id="sae-cfg-not-json",
  ),
  pytest.param(
    lambda d: sae_io.load(_sae(d, {"d_in": "4"})),
    ValueError,
    r"cfg\.json: d_in: expected a positive integer, got '4' \(str\)",
    id="sae-d-in-str",
  ),
  pytest.param(
    lambda d: sae_io.load(_sae(d, {"apply_b_dec_to_input": "false"})),
    ValueError,
    r"cfg\.json: apply_b_dec_to_input: expected true or false",
    id="sae-flag-str",
  ),
  pytest.param(
    lambda d: sae_io.load(_sae(d, {"architecture": "topk"})),
    ValueError,
    r"cfg\.json: missing field 'k'",
    id="sae-topk-no-k",
  ),
  pytest.param(
    lambda d: sae_io.load(_sae(d, {"architecture": "topk", "k": 9})),
    ValueError,
    r"cfg\.json: k: expected 1 <= k <= d_sae=8",
    id="sae-k-over-d-sae",
  ),
  pytest.param(
    lambda d: sae_io.load(_sae(d, cut=8)),
    ValueError,
    r"sae_weights\.safetensors: not a readable safetensors file.*truncated",
    id="sae-truncated",
  ),
  pytest.param(
    lambda d: sae_io.load(_sae(d, {"d_in": 5})),
    ValueError,
    r"sae_weights\.safetensors: W_dec has shape \(8, 4\), expected \(8, 5\)",
    id="sae-shape-vs-cfg",
  ),
  pytest.param(
    lambda d: sae_io.load(d / "nowhere"),
    FileNotFoundError,
    r"directory: no cfg\.json in .*nowhere",
    id="sae-no-directory",
  ),
  pytest.param(
    lambda d: _sae_save(d, params_cfg=sae.SAEConfig(architecture="standard", d_in=4, d_sae=16)),
    ValueError,
    r"params\['W_dec'\]: expected shape \(8, 4\) for this config, got \(16, 4\)",
    id="sae-save-params-vs-cfg",
  ),
  pytest.param(
    lambda d: _sae_save(d, hook_name="resid"),
    ValueError,
    r"hook_name: expected a TransformerLens hook point such as 'blocks\.0\.hook_resid_post', got 'resid'",
    id="sae-save-hook-name",
  ),
  pytest.param(
    lambda d: _sae_save(d, nan="b_dec"),
    ValueError,
    r"params\['b_dec'\]: expected finite values, got \[nan\] at index \[0\]",
    id="sae-save-nan-weight",
  ),
  pytest.param(
    lambda d: _sae_save(d, scale=0.0),
    ValueError,
    r"scale: expected a finite float > 0",
    id="sae-save-scale-0",
  ),
  # TRL preference files
  pytest.param(
    lambda d: data.read_jsonl(_jsonl(d, PAIR, PAIR | {"margin": float("nan")})),
    ValueError,
    r"x\.jsonl:2: field 'margin' must be a finite number, got nan",
    id="jsonl-margin-nan",
  ),
  pytest.param(
    lambda d: data.read_jsonl(_jsonl(d, PAIR | {"margin": True})),
    ValueError,
    r"x\.jsonl:1: field 'margin' must be a finite number, got True",
    id="jsonl-margin-bool",
  ),
  pytest.param(
    lambda d: data.read_jsonl(_jsonl(d, PAIR | {"margin": 1.0, "rating": "better"})),
    ValueError,
    r"x\.jsonl:1: fields 'margin' and 'rating'",
    id="jsonl-margin-and-rating",
  ),
  pytest.param(
    lambda d: data.read_jsonl(_jsonl(d, {"prompt": "a", "rejected": "b"})),
    ValueError,
    r"x\.jsonl:1: missing fields \['chosen'\]",
    id="jsonl-missing-chosen",
  ),
  pytest.param(
    lambda d: data.read_jsonl(_jsonl(d, PAIR | {"prompt": 7})),
    ValueError,
    r"x\.jsonl:1: field 'prompt' must be a string",
    id="jsonl-prompt-int",
  ),
  pytest.param(
    lambda d: data.read_jsonl(_jsonl(d, PAIR, "", PAIR)),
    ValueError,
    r"x\.jsonl:2: blank line between records",
    id="jsonl-blank-line",
  ),
  pytest.param(
    lambda d: data.read_jsonl(_jsonl(d, PAIR, '{"prompt": "a",')),
    ValueError,
    r"x\.jsonl:2: not valid JSON",
    id="jsonl-not-json",
  ),
  pytest.param(
    lambda d: data.read_jsonl(_jsonl(d, "", " ")),
    ValueError,
    r"path: .*x\.jsonl' holds no records",
    id="jsonl-no-records",
  ),
  pytest.param(
    lambda d: data.tokenize([PAIR | {"margin": float("nan")}], _fmt(), max_len=8),
    ValueError,
    r"records\[0\]: field 'margin' must be a finite number",
    id="tokenize-record-margin-nan",
  ),
  pytest.param(
    lambda d: data.tokenize([PAIR], _fmt(), max_len=0),
    ValueError,
    r"max_len: expected a positive int, got 0",
    id="tokenize-max-len-zero",
  ),
  # Tokenizer
  pytest.param(
    lambda d: tokenizer.pad_rows([[1, 2], [3]], 0, pad_side="middle"),
    ValueError,
    r"pad_side: expected 'right' or 'left', got 'middle'",
    id="pad-side-middle",
  ),
  pytest.param(
    lambda d: tokenizer.pad_rows([[1, 2.5]], 0),
    TypeError,
    r"rows\[0\]: expected a 1-D sequence of int ids, .*float64",
    id="pad-rows-float-id",
  ),
  pytest.param(
    lambda d: tokenizer.pad_rows([[1, 2]], -1),
    ValueError,
    r"pad_id: expected an int in \[0, 2\^31\), got -1",
    id="pad-id-negative",
  ),
  pytest.param(lambda d: _tok(d).encode(b"bytes"), TypeError, r"text: expected str, got bytes", id="encode-bytes"),
  pytest.param(
    lambda d: _tok(d).encode("hi", bos="no"), TypeError, r"bos: expected a bool, got 'no'", id="encode-bos-str"
  ),
  # Chat format
  pytest.param(
    lambda d: chat.render(_fmt(), [{"role": "bot", "content": "hi"}]),
    ValueError,
    r"messages\[0\]: unknown role 'bot'",
    id="chat-unknown-role",
  ),
  pytest.param(
    lambda d: chat.render(_fmt(), [{"role": "user", "content": ["hi"]}]),
    ValueError,
    r"messages\[0\]: content must be a non-empty string",
    id="chat-content-list",
  ),
  pytest.param(lambda d: chat.render(_fmt(), []), ValueError, r"messages: expected a non-empty list", id="chat-empty"),
  pytest.param(
    lambda d: chat.render(_fmt(), "Hi!"), TypeError, r"messages: expected a list of .* got str", id="chat-messages-str"
  ),
  # Corpus
  pytest.param(
    lambda d: corpus.to_compact(np.array([3, -1, 5]), np.array([5, 3])),
    ValueError,
    r"ids: expected token ids in \[0, 2\^31\), got \[-1\]",
    id="compact-negative-id",
  ),
  pytest.param(
    lambda d: corpus.to_compact(np.array([True, False]), np.array([5, 3])),
    TypeError,
    r"ids: expected integer token ids, got dtype bool",
    id="compact-bool-ids",
  ),
  pytest.param(
    lambda d: corpus.to_compact(np.array([3]), np.array([5, 3, 5])),
    ValueError,
    r"kept: expected distinct ids, got repeats \[5\]",
    id="compact-repeated-kept",
  ),
  pytest.param(
    lambda d: corpus.tokenize(_tok(d), ["some text"]),
    TypeError,
    r"docs\[0\]: expected a Document",
    id="corpus-docs-str",
  ),
  pytest.param(
    lambda d: corpus.split_documents(["a", "b"], [0.5, 0.5]),
    TypeError,
    r"docs\[0\]: expected a Document",
    id="split-documents-str",
  ),
  # Tokenizer: a BPE file without every single byte would panic in Rust on encode
  pytest.param(
    lambda d: tokenizer.from_file(_write(d / "t.tiktoken", "YQ== 0\nYg== 1\nYWI= 2\n")),
    ValueError,
    r"path: .*t\.tiktoken.*: expected all 256 single bytes .* 254 are missing",
    id="bpe-missing-bytes",
  ),
  # Synthetic recall data and JRT prompts
  pytest.param(
    lambda d: synthetic.recall_loss(np.zeros((2, 4, 8), np.float32), _recall(mask=np.ones((2, 1), bool))),
    ValueError,
    r"batch\.target_mask_BT: expected shape \(2, 4\)",
    id="recall-loss-mask-shape",
  ),
  pytest.param(
    lambda d: synthetic.recall_loss(np.zeros((2, 4, 8), np.float32), _recall(mask=np.ones((2, 4), np.int32))),
    TypeError,
    r"batch\.target_mask_BT: expected a bool mask",
    id="recall-loss-int-mask",
  ),
  pytest.param(
    lambda d: synthetic.recall_loss(np.zeros((2, 4, 8), np.float32), _recall(targets=np.zeros((2, 1), np.int32))),
    ValueError,
    r"batch\.targets_BT: expected shape \(2, 4\)",
    id="recall-loss-targets-shape",
  ),
  pytest.param(
    lambda d: synthetic.recall_loss(np.zeros((2, 4, 8), np.int32), _recall()),
    TypeError,
    r"logits_BTV: expected float logits",
    id="recall-loss-int-logits",
  ),
  pytest.param(
    lambda d: jrt_prompt.repeat_rows(np.ones((1, 3), np.float32), np.array([3])),
    TypeError,
    r"tokens_BT: expected int ids \[B, T\], got dtype float32",
    id="repeat-rows-float-tokens",
  ),
]


def _write(path, text: str):
  path.write_text(text)
  return path


def _recall(targets=None, mask=None) -> synthetic.RecallBatch:
  """A [2, 4] recall batch; `targets` or `mask` replace the well-formed ones."""
  tokens = np.zeros((2, 4), np.int32)
  targets = np.zeros((2, 4), np.int32) if targets is None else targets
  return synthetic.RecallBatch(tokens, targets, np.ones((2, 4), bool) if mask is None else mask)


@pytest.mark.parametrize("call, error, match", CASES)
def test_bad_input(call, error, match, tmp_path):
  with pytest.raises(error, match=match):
    call(tmp_path)


def test_the_unbroken_inputs_load(tmp_path):
  """The builders' files without a defect load, so each case above fails for its one defect."""
  for shards, sub in ((1, "one"), (2, "two")):
    (tmp_path / sub).mkdir()
    params, cfg = llama_import.load(_ckpt(tmp_path / sub, shards=shards))
    assert cfg.n_kv_heads == 1 and cfg.rope_scaling is not None and params["layers"]["w3"].shape == (1, 8, 16)
  _, sae_cfg, _ = sae_io.load(_sae(tmp_path))
  assert (sae_cfg.d_in, sae_cfg.d_sae) == (4, 8)
  (tmp_path / "bf16").mkdir()  # SAELens writes bfloat16 SAEs: ml_dtypes' bfloat16 is no np.floating
  bf16 = {"W_enc": np.ones((4, 8)), "W_dec": np.ones((8, 4)), "b_dec": np.zeros(4), "b_enc": np.zeros(8)}
  sae_params, _, _ = sae_io.load(
    _sae(tmp_path / "bf16", tensors={k: v.astype(ml_dtypes.bfloat16) for k, v in bf16.items()})
  )
  assert sae_params["W_enc"].dtype == np.float32 and sae_params["W_enc"].sum() == 32
  assert sae_io.load(_sae_save(tmp_path))[1] == SAE_CFG
  records = data.read_jsonl(_jsonl(tmp_path, PAIR, PAIR | {"margin": 0.5}, "", ""))  # blank lines may end a file
  assert len(records) == 2
  batch = data.tokenize(
    [{"prompt": CONVERSATION[:1], "chosen": CONVERSATION[1:], "rejected": CONVERSATION[1:]}], _fmt(), max_len=64
  )
  assert batch.chosen_mask_BT.any()
  assert tokenizer.pad_rows([[1, 2], [3]], 0, pad_side="left").ids_BT.tolist() == [[1, 2], [0, 3]]
  assert _tok(tmp_path).encode_batch(["ab", "c"], max_len=np.int64(3)).ids_BT.shape == (2, 3)
  np.testing.assert_array_equal(corpus.to_compact(np.array([[3, 9], [5, 3]]), np.array([5, 3])), [[1, 2], [0, 1]])
  loss, metrics = synthetic.recall_loss(np.zeros((2, 4, 8), np.float32), _recall())
  assert float(metrics["accuracy"]) == 1.0  # argmax of equal logits is 0, the target
  np.testing.assert_allclose(loss, np.log(8), rtol=1e-6)
  assert jrt_prompt.repeat_rows(np.array([[1, 2, 0]]), np.array([2]))[0].tolist() == [[1, 2, 1, 2, 0, 0]]
