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
  if max_chars is not None and max_chars <= 0:
    raise ValueError(f"max_chars: expected a positive count or None, got {max_chars}")
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
  if length <= 0 or stride <= 0:
    raise ValueError(f"length, stride: expected positive ints, got {length}, {stride}")
  if x_N.shape[0] < length:
    raise ValueError(f"x_N: stream of {x_N.shape[0]} tokens is shorter than one window ({length})")
  return np.lib.stride_tricks.sliding_window_view(x_N, length)[::stride].copy()


def compact_vocab(ids: np.ndarray, size: int) -> np.ndarray:
  """The `size - 1` most frequent ids of `ids`, most frequent first (ties: smaller id).

  Count tables need V^(k+1) cells, so table models on a 100k vocabulary work on a
  compact one: these ids plus one "other" id for the rest (see `to_compact`).
  """
  if size < 2:
    raise ValueError(f"size: expected >= 2 (one kept token plus 'other'), got {size}")
  values, counts = np.unique(np.asarray(ids), return_counts=True)
  return values[np.lexsort((values, -counts))][: size - 1].astype(np.int32)


def to_compact(ids: np.ndarray, kept: np.ndarray) -> np.ndarray:
  """Maps ids to their index in `kept`; ids not kept map to len(kept), the "other" id."""
  ids, kept = np.asarray(ids), np.asarray(kept)
  lookup = np.full(int(max(ids.max(initial=0), kept.max(initial=0))) + 1, kept.size, np.int32)
  lookup[kept] = np.arange(kept.size, dtype=np.int32)
  return lookup[ids]
