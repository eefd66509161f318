"""Preference data: JSON lines {"prompt", "chosen", "rejected"} (+ "margin" or "rating").

Shapes: B pairs, T padded length.

Each record becomes two rows, prompt + chosen and prompt + rejected, tokenized with the
project tokenizer (BOS before the prompt, EOS after the completion), right-padded to one
width, with completion masks (prompt and padding excluded). A malformed or too-long line
raises an error naming its line number: nothing is dropped silently.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

from paperjax.align.reward import LLAMA2_MARGINS
from paperjax.models.data.tokenizer import Tokenizer


class PreferenceBatch(NamedTuple):
  chosen_BT: np.ndarray  # int32
  chosen_mask_BT: np.ndarray  # bool, completion tokens
  chosen_lengths_B: np.ndarray
  rejected_BT: np.ndarray
  rejected_mask_BT: np.ndarray
  rejected_lengths_B: np.ndarray
  prompt_lengths_B: np.ndarray
  margin_B: np.ndarray  # float32, 0 where none given


def read_jsonl(path: str | os.PathLike) -> list[dict]:
  """Parsed and validated records; errors name the file and line."""
  records = []
  with open(path, encoding="utf-8") as f:
    for lineno, line in enumerate(f, start=1):
      if not line.strip():
        continue
      where = f"{os.fspath(path)}:{lineno}"
      try:
        record = json.loads(line)
      except json.JSONDecodeError as e:
        raise ValueError(f"{where}: not valid JSON ({e.msg})") from None
      if not isinstance(record, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(record).__name__}")
      for field in ("prompt", "chosen", "rejected"):
        if not isinstance(record.get(field), str):
          raise ValueError(f"{where}: field {field!r} must be a string, got {record.get(field)!r}")
      if "margin" in record and not isinstance(record["margin"], (int, float)):
        raise ValueError(f"{where}: 'margin' must be a number, got {record['margin']!r}")
      if "rating" in record and record["rating"] not in LLAMA2_MARGINS:
        raise ValueError(f"{where}: 'rating' must be one of {sorted(LLAMA2_MARGINS)}, got {record['rating']!r}")
      records.append({**record, "_where": where})
  return records


def tokenize(records: Sequence[dict], tok: Tokenizer, *, max_len: int) -> PreferenceBatch:
  """Rows of prompt + completion ids; a row over max_len raises (with its record's line)."""
  prompts, chosen, rejected, margins = [], [], [], []
  for i, record in enumerate(records):
    where = record.get("_where", f"records[{i}]")
    prompt = tok.encode(record["prompt"], bos=tok.bos_id is not None)
    rows = [prompt + tok.encode(record[k], eos=tok.eos_id is not None) for k in ("chosen", "rejected")]
    for name, row in zip(("chosen", "rejected"), rows):
      if len(row) > max_len:
        raise ValueError(f"{where}: prompt + {name} is {len(row)} tokens, over max_len={max_len}")
    prompts.append(len(prompt))
    chosen.append(rows[0])
    rejected.append(rows[1])
    margins.append(float(record.get("margin", LLAMA2_MARGINS.get(str(record.get("rating")), 0.0))))
  prompt_lengths = np.asarray(prompts, np.int32)
  chosen_BT, chosen_lengths = _pad(chosen, tok.pad_id)
  rejected_BT, rejected_lengths = _pad(rejected, tok.pad_id)
  return PreferenceBatch(
    chosen_BT,
    _completion_mask(chosen_BT.shape, prompt_lengths, chosen_lengths),
    chosen_lengths,
    rejected_BT,
    _completion_mask(rejected_BT.shape, prompt_lengths, rejected_lengths),
    rejected_lengths,
    prompt_lengths,
    np.asarray(margins, np.float32),
  )


def load(path: str | os.PathLike, tok: Tokenizer, *, max_len: int) -> PreferenceBatch:
  return tokenize(read_jsonl(path), tok, max_len=max_len)


def from_token_arrays(prompts: np.ndarray, chosen: np.ndarray, rejected: np.ndarray) -> PreferenceBatch:
  """A batch from already-tokenized, equal-width prompts and completions (synthetic tasks)."""
  if not (prompts.shape[0] == chosen.shape[0] == rejected.shape[0]) or chosen.shape != rejected.shape:
    raise ValueError(
      f"prompts, chosen, rejected: expected [B, prompt length], [B, completion length] twice, "
      f"got {prompts.shape}, {chosen.shape}, {rejected.shape}"
    )
  batch, width = prompts.shape[0], prompts.shape[1] + chosen.shape[1]
  prompt_lengths = np.full((batch,), prompts.shape[1], np.int32)
  lengths = np.full((batch,), width, np.int32)
  mask = _completion_mask((batch, width), prompt_lengths, lengths)
  return PreferenceBatch(
    np.concatenate([prompts, chosen], 1).astype(np.int32),
    mask,
    lengths,
    np.concatenate([prompts, rejected], 1).astype(np.int32),
    mask,
    lengths,
    prompt_lengths,
    np.zeros((batch,), np.float32),
  )


def _pad(rows: list[list[int]], pad_id: int) -> tuple[np.ndarray, np.ndarray]:
  lengths = np.asarray([len(r) for r in rows], np.int32)
  out = np.full((len(rows), int(lengths.max(initial=0))), pad_id, np.int32)
  for i, row in enumerate(rows):
    out[i, : len(row)] = row
  return out, lengths


def _completion_mask(shape, prompt_lengths, lengths) -> np.ndarray:
  t = np.arange(shape[1])[None, :]
  return (t >= prompt_lengths[:, None]) & (t < lengths[:, None])
