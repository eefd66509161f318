"""A real, deterministic text corpus on every machine: the Python standard library.

The `.py` files under `sysconfig`'s stdlib path (tests and site-packages excluded),
read in sorted path order, are English prose (docstrings, comments) mixed with code.
The same Python version gives the same corpus; nothing is downloaded.

Shapes: N tokens in a stream, B windows, T window length, V vocabulary.
"""

from __future__ import annotations

import pathlib
import sysconfig
import zlib
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

from paperjax.models.data.tokenizer import Tokenizer
from paperjax.ops import checks

_SKIP_DIRS = frozenset({"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"})


class Document(NamedTuple):
  name: str  # path relative to the stdlib root, '/'-separated
  text: str


class TokenStream(NamedTuple):
  """Documents tokenized and concatenated, each followed by EOS.

  `segment_ids_N[i]` is the index of the document token i belongs to (its EOS included);
  the document mask of packed training uses it.
  """

  ids_N: np.ndarray  # int32
  segment_ids_N: np.ndarray  # int32


def stdlib_root() -> pathlib.Path:
  return pathlib.Path(sysconfig.get_paths()["stdlib"])


def stdlib_documents(max_chars: int | None = None) -> list[Document]:
  """The stdlib's source files in sorted path order, as documents.

  Files that are not valid UTF-8 are skipped. With `max_chars`, documents are taken in
  order until that many characters; the last one is cut to fit exactly.
  """
  if max_chars is not None and (not checks.is_int(max_chars) or max_chars <= 0):
    raise ValueError(f"max_chars: expected a positive int or None, got {max_chars!r}")
  root = stdlib_root()
  paths = sorted(
    (p for p in root.rglob("*.py") if not _SKIP_DIRS.intersection(p.relative_to(root).parts[:-1])),
    key=lambda p: p.relative_to(root).as_posix(),
  )
  docs, total = [], 0
  for path in paths:
    try:
      text = path.read_text(encoding="utf-8")
    except (UnicodeDecodeError, OSError):
      continue
    if max_chars is not None:
      text = text[: max_chars - total]
    if text:
      docs.append(Document(path.relative_to(root).as_posix(), text))
      total += len(text)
    if max_chars is not None and total >= max_chars:
      break
  if not docs:
    raise RuntimeError(f"no readable .py files under the stdlib path {root}")
  return docs


def split_documents(docs: Sequence[Document], fractions: Sequence[float]) -> tuple[list[Document], ...]:
  """Splits documents into len(fractions) parts by a stable hash of their names.

  A document's part depends only on its name (crc32), so taking more or fewer documents
  never moves one from a held-out part into training.
  """
  if isinstance(docs, (str, Document)):
    raise TypeError(f"docs: expected a sequence of Documents, got {type(docs).__name__}")
  docs = list(docs)
  for i, doc in enumerate(docs):
    if not isinstance(doc, Document):  # a bare string has no .name to hash
      raise TypeError(f"docs[{i}]: expected a Document(name, text), got {type(doc).__name__} {doc!r:.60}")
  shares = np.asarray(fractions, dtype=np.float64)
  if shares.ndim != 1 or (shares < 0).any() or not np.isclose(shares.sum(), 1.0):
    raise ValueError(f"fractions: expected non-negative numbers summing to 1, got {shares.tolist()}")
  edges = np.cumsum(shares)[:-1]
  parts: tuple[list[Document], ...] = tuple([] for _ in shares)
  for doc in docs:
    u = zlib.crc32(doc.name.encode()) / 2**32
    parts[int(np.searchsorted(edges, u, side="right"))].append(doc)
  return parts


def tokenize(tokenizer: Tokenizer, docs: Sequence[Document]) -> TokenStream:
  """Tokenizes documents (tiktoken's threaded batch encoder) into one EOS-separated stream."""
  if not isinstance(tokenizer, Tokenizer):
    raise TypeError(f"tokenizer: expected a tokenizer.Tokenizer, got {type(tokenizer).__name__}")
  if isinstance(docs, (str, Document)) or not len(docs):
    raise ValueError(f"docs: expected a non-empty sequence of Documents, got {docs!r:.80}")
  for i, doc in enumerate(docs):
    if not isinstance(doc, Document):  # a bare string would fail deep in tiktoken, or tokenize its name
      raise TypeError(f"docs[{i}]: expected a Document(name, text), got {type(doc).__name__} {doc!r:.60}")
  if tokenizer.eos_id is None:
    raise ValueError(f"tokenizer: encoding {tokenizer.name!r} has no EOS to separate documents")
  rows = tokenizer.encoding.encode_ordinary_batch([d.text for d in docs])
  lengths = np.array([len(r) + 1 for r in rows], dtype=np.int64)
  ids_N = np.fromiter((t for r in rows for t in (*r, tokenizer.eos_id)), np.int32, int(lengths.sum()))
  segment_ids_N = np.repeat(np.arange(len(rows), dtype=np.int32), lengths)
  return TokenStream(ids_N, segment_ids_N)


def windows(x_N: np.ndarray, length: int, *, stride: int | None = None) -> np.ndarray:
  """Cuts a 1-D stream into [W, length] windows starting every `stride` (default `length`).

  For next-token training ask for length T + 1: inputs w[:, :-1], targets w[:, 1:].
  The tail that does not fill a window is dropped. Works for ids and segment ids alike.
  """
  x_N = np.asarray(x_N)
  stride = length if stride is None else stride
  if x_N.ndim != 1:
    raise ValueError(f"x_N: expected a 1-D stream, got shape {x_N.shape}")
  if not (checks.is_int(length) and checks.is_int(stride)) or length <= 0 or stride <= 0:
    raise ValueError(f"length, stride: expected positive ints, got {length!r}, {stride!r}")
  if x_N.shape[0] < length:
    raise ValueError(f"x_N: stream of {x_N.shape[0]} tokens is shorter than one window ({length})")
  return np.lib.stride_tricks.sliding_window_view(x_N, length)[::stride].copy()


def compact_vocab(ids: np.ndarray, size: int) -> np.ndarray:
  """The `size - 1` most frequent ids of `ids`, most frequent first (ties: smaller id).

  Count tables need V^(k+1) cells, so table models on a 100k vocabulary work on a
  compact one: these ids plus one "other" id for the rest (see `to_compact`).
  """
  if not checks.is_int(size) or size < 2:
    raise ValueError(f"size: expected an int >= 2 (one kept token plus 'other'), got {size!r}")
  ids = _token_ids(ids, "ids")
  if not ids.size:
    raise ValueError("ids: expected at least one id to count, got none")
  values, counts = np.unique(ids, return_counts=True)
  return values[np.lexsort((values, -counts))][: size - 1].astype(np.int32)


def to_compact(ids: np.ndarray, kept: np.ndarray) -> np.ndarray:
  """Maps ids to their index in `kept`; ids not kept map to len(kept), the "other" id.

  Ids are token ids, ints in [0, 2^31); `kept` holds distinct ones (`compact_vocab`'s output).
  """
  ids, kept = _token_ids(ids, "ids"), _token_ids(kept, "kept")
  if kept.ndim != 1 or not kept.size:
    raise ValueError(f"kept: expected a non-empty 1-D array of ids, got shape {kept.shape}")
  order = np.argsort(kept, kind="stable")
  sorted_kept = kept[order]
  repeated = sorted_kept[1:][sorted_kept[1:] == sorted_kept[:-1]]
  if repeated.size:  # two compact ids for one token: the later would win silently
    raise ValueError(f"kept: expected distinct ids, got repeats {np.unique(repeated)[:5].tolist()}")
  at = np.minimum(np.searchsorted(sorted_kept, ids), kept.size - 1)
  return np.where(sorted_kept[at] == ids, order[at], kept.size).astype(np.int32)


def _token_ids(x, arg: str) -> np.ndarray:
  """`x` as an integer array of token ids in [0, 2^31); a float, bool or negative id raises."""
  x = np.asarray(x)
  if x.size and not np.issubdtype(x.dtype, np.integer):  # bool is no integer dtype: it would index as a mask
    raise TypeError(f"{arg}: expected integer token ids, got dtype {x.dtype}")
  if x.size and (x.min() < 0 or x.max() >= 2**31):
    bad = x[(x < 0) | (x >= 2**31)]
    raise ValueError(f"{arg}: expected token ids in [0, 2^31), got {np.unique(bad)[:5].tolist()}")
  return x.astype(np.int64)
