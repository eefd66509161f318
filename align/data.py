"""Preference data in TRL's formats, read from JSON lines into padded token batches.

Shapes: B pairs (or unpaired completions, or prompts of a listwise batch), Y completions per
prompt, T padded length.

One format per file, as TRL defines them:
  standard         {"prompt": str, "chosen": str, "rejected": str} (+ "margin" or "rating")
  conversational   the same keys holding lists of {"role", "content"} messages; chosen and
                   rejected are the assistant's turns
  implicit prompt  {"chosen": [...], "rejected": [...]}: whole conversations whose common
                   leading messages are the prompt
  unpaired (KTO)   {"prompt", "completion", "label": bool}, standard or conversational
  listwise (ours)  {"prompt", "completions": [...]} ranked best first, or with "scores": [float, ...]
                   beside the completions (any order, ties allowed; higher is better); standard
                   (strings) or conversational (each completion a list of assistant-first messages)

Standard text is tokenized as prompt (after BOS) + completion (before EOS). Messages are
rendered in Llama 3's chat format (`models.data.chat`): the prompt ends with the assistant
header and each completion ends with <|eot_id|> (or <|eom_id|>). Completion masks keep completion tokens
only (prompt and padding excluded); with `mask_formatting` (Llama 3's DPO) they also drop
the chat's formatting tokens, headers and end tokens, from both log-probs. A malformed
record or a too-long row raises an error naming its file and line: nothing is dropped.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from typing import NamedTuple

import numpy as np

from paperjax.align.reward import LLAMA2_MARGINS
from paperjax.models.data import chat, tokenizer
from paperjax.models.data.tokenizer import Tokenizer

# Record keys of each format; "margin" and "rating" may join the paired ones.
FORMATS = {
  "paired": frozenset({"prompt", "chosen", "rejected"}),
  "implicit": frozenset({"chosen", "rejected"}),
  "unpaired": frozenset({"prompt", "completion", "label"}),
  "listwise": frozenset({"prompt", "completions"}),
}
_PAIR_EXTRAS = frozenset({"margin", "rating"})
_EXTRAS = {"paired": _PAIR_EXTRAS, "listwise": frozenset({"scores"})}


class PreferenceBatch(NamedTuple):
  chosen_BT: np.ndarray  # int32
  chosen_mask_BT: np.ndarray  # bool, completion tokens
  chosen_lengths_B: np.ndarray
  rejected_BT: np.ndarray
  rejected_mask_BT: np.ndarray
  rejected_lengths_B: np.ndarray
  prompt_lengths_B: np.ndarray
  margin_B: np.ndarray  # float32, 0 where none given


class UnpairedBatch(NamedTuple):
  """Unpaired completions with binary feedback (KTO)."""

  tokens_BT: np.ndarray  # int32
  mask_BT: np.ndarray  # bool, completion tokens
  lengths_B: np.ndarray
  prompt_lengths_B: np.ndarray
  label_B: np.ndarray  # bool: desirable


class ListwiseBatch(NamedTuple):
  """Y completions of each of B prompts, each row prompt + completion, right-padded to T.

  A ranked list (best first) has scores Y-1 .. 0; scores read from a file keep their values."""

  tokens_BYT: np.ndarray  # int32
  mask_BYT: np.ndarray  # bool, completion tokens
  lengths_BY: np.ndarray  # int32
  prompt_lengths_B: np.ndarray  # int32
  scores_BY: np.ndarray  # float32, higher is better


def read_jsonl(path: str | os.PathLike) -> list[dict]:
  """Parsed and validated records of one format (TRL's, or listwise); errors name the file and line.

  Implicit-prompt records come back split into prompt, chosen and rejected messages. Blank
  lines may end the file but not sit between records (a gap is a record lost on the way);
  a file without records raises.
  """
  records: list[dict] = []
  first: tuple[str, str] | None = None  # (format, style) of the file's first record
  blank = 0  # the first blank line since the last record
  with open(path, "rb") as f:
    for lineno, raw in enumerate(f, start=1):
      where = f"{os.fspath(path)}:{lineno}"
      try:
        line = raw.decode("utf-8")
      except UnicodeDecodeError as e:
        raise ValueError(f"{where}: not UTF-8 text ({e.reason} at byte {e.start})") from None
      if not line.strip():
        blank = blank or lineno
        continue
      if blank:
        raise ValueError(f"{os.fspath(path)}:{blank}: blank line between records (one JSON record per line)")
      try:
        record = json.loads(line)
      except json.JSONDecodeError as e:
        raise ValueError(f"{where}: not valid JSON ({e.msg})") from None
      if not isinstance(record, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(record).__name__}")
      kind, style, record = _check_record(record, where)
      if first is None:
        first = (kind, style)
      elif (kind, style) != first:
        raise ValueError(f"{where}: a {style} {kind} record in a file of {first[1]} {first[0]} records")
      records.append({**record, "_where": where})
  if not records:
    raise ValueError(f"path: {os.fspath(path)!r} holds no records")
  return records


def _check_record(record: dict, where: str) -> tuple[str, str, dict]:
  keys = set(record)
  if "completions" in keys:
    kind = "listwise"
  else:
    kind = "unpaired" if keys & {"completion", "label"} else "paired" if "prompt" in keys else "implicit"
  required = FORMATS[kind]
  unknown = keys - required - _EXTRAS.get(kind, frozenset())
  if unknown:
    raise ValueError(f"{where}: unknown fields {sorted(unknown)} in a {kind} record (fields: {sorted(required)})")
  missing = sorted(required - keys)
  if missing:
    raise ValueError(f"{where}: missing fields {missing} in a {kind} record (fields: {sorted(required)})")
  if kind == "listwise":
    return _check_listwise(record, where)
  texts = [k for k in ("prompt", "chosen", "rejected", "completion") if k in required]
  for field in texts:
    if not isinstance(record[field], (str, list)):
      raise ValueError(f"{where}: field {field!r} must be a string or a list of messages, got {record[field]!r}")
  if kind == "unpaired" and not isinstance(record["label"], bool):
    raise ValueError(f"{where}: field 'label' must be true or false, got {record['label']!r}")
  if "margin" in record and "rating" in record:
    raise ValueError(f"{where}: fields 'margin' and 'rating' both give the pair's margin; keep one")
  if "margin" in record and not _finite_number(record["margin"]):
    raise ValueError(f"{where}: field 'margin' must be a finite number, got {record['margin']!r}")
  if "rating" in record and (not isinstance(record["rating"], str) or record["rating"] not in LLAMA2_MARGINS):
    raise ValueError(f"{where}: field 'rating' must be one of {sorted(LLAMA2_MARGINS)}, got {record['rating']!r}")
  types = {k: type(record[k]).__name__ for k in texts}
  if kind == "implicit" and not all(isinstance(record[k], list) for k in texts):
    raise ValueError(f"{where}: an implicit-prompt record holds two conversations (message lists), got {types}")
  if all(isinstance(record[k], str) for k in texts):
    return kind, "standard", record
  if not all(isinstance(record[k], list) for k in texts):
    raise ValueError(f"{where}: fields must be all strings (standard) or all message lists, got {types}")
  messages = {k: chat.check_messages(record[k], where=f"{where}: {k}") for k in texts}
  if kind == "implicit":
    chosen, rejected = messages["chosen"], messages["rejected"]
    shared = 0
    while shared < min(len(chosen), len(rejected)) and chosen[shared] == rejected[shared]:
      shared += 1
    if shared == 0:
      raise ValueError(f"{where}: chosen and rejected share no leading message, so there is no prompt")
    messages = {"prompt": chosen[:shared], "chosen": chosen[shared:], "rejected": rejected[shared:]}
    kind = "paired"
  for k in ("chosen", "rejected", "completion"):
    if k in messages and (not messages[k] or messages[k][0]["role"] != "assistant"):
      raise ValueError(f"{where}: {k} must start with an assistant message, got {messages[k][:1]}")
  return kind, "conversational", {**record, **messages}


def _check_listwise(record: dict, where: str) -> tuple[str, str, dict]:
  """A listwise record: at least 2 completions, all strings or all message lists like the
  prompt, and, if given, one finite score per completion."""
  prompt, completions = record["prompt"], record["completions"]
  if not isinstance(completions, list) or len(completions) < 2:
    got = f"{len(completions)} completion(s)" if isinstance(completions, list) else repr(completions)
    raise ValueError(f"{where}: field 'completions' must be a list of at least 2 completions, got {got:.200}")
  if "scores" in record:
    scores = record["scores"]
    if not isinstance(scores, list) or len(scores) != len(completions):
      got = f"{len(scores)} scores" if isinstance(scores, list) else repr(scores)
      raise ValueError(
        f"{where}: field 'scores' must be a list of {len(completions)} numbers (one per completion), got {got}"
      )
    bad = [i for i, v in enumerate(scores) if not _finite_number(v)]
    if bad:
      raise ValueError(f"{where}: field 'scores' must hold finite numbers, got {scores[bad[0]]!r} at index {bad[0]}")
  if isinstance(prompt, str):
    bad = [i for i, c in enumerate(completions) if not isinstance(c, str)]
    if bad:
      raise ValueError(
        f"{where}: a standard (text) prompt needs text completions, got {type(completions[bad[0]]).__name__} "
        f"at completions[{bad[0]}]"
      )
    return "listwise", "standard", record
  if not isinstance(prompt, list):
    raise ValueError(f"{where}: field 'prompt' must be a string or a list of messages, got {prompt!r:.100}")
  messages = chat.check_messages(prompt, where=f"{where}: prompt")
  replies = []
  for i, c in enumerate(completions):
    name = f"completions[{i}]"
    if not isinstance(c, list):
      raise ValueError(
        f"{where}: a conversational prompt needs message-list completions, got {type(c).__name__} at {name}"
      )
    reply = chat.check_messages(c, where=f"{where}: {name}")
    if not reply or reply[0]["role"] != "assistant":
      raise ValueError(f"{where}: {name} must start with an assistant message, got {reply[:1]}")
    replies.append(reply)
  return "listwise", "conversational", {**record, "prompt": messages, "completions": replies}


def _finite_number(value: object) -> bool:
  """An int or float that is finite; JSON's true and false are not numbers here."""
  if isinstance(value, bool) or not isinstance(value, (int, float)):
    return False
  try:
    return math.isfinite(value)
  except OverflowError:  # an int beyond float's range
    return False


def _checked(records: Sequence[dict], tok: object, max_len: object) -> list[tuple[str, dict]]:
  """(where, record) of records from read_jsonl or built by hand, checked as read_jsonl checks a line."""
  if not isinstance(tok, (Tokenizer, chat.ChatFormat)):
    raise TypeError(f"tok: expected a Tokenizer or a chat.ChatFormat, got {type(tok).__name__}")
  if isinstance(max_len, bool) or not isinstance(max_len, (int, np.integer)) or max_len <= 0:
    raise ValueError(f"max_len: expected a positive int, got {max_len!r}")
  if isinstance(records, (str, Mapping)) or not len(records):
    raise ValueError(f"records: expected a non-empty sequence of records, got {records!r:.100}")
  checked = []
  for i, record in enumerate(records):
    if not isinstance(record, Mapping):
      raise TypeError(f"records[{i}]: expected a dict, got {type(record).__name__}")
    where = record.get("_where", f"records[{i}]")
    _, _, fields = _check_record({k: v for k, v in record.items() if k != "_where"}, where)
    checked.append((where, fields))
  return checked


def tokenize(
  records: Sequence[dict], tok: Tokenizer | chat.ChatFormat, *, max_len: int, mask_formatting: bool = True
) -> PreferenceBatch:
  """Rows of prompt + completion ids; a row over max_len raises (with its record's line).

  `tok` is a tokenizer, or a `chat.ChatFormat` for conversational records over another
  vocabulary. `mask_formatting` drops chat headers and end tokens from the completion masks.
  """
  prompts, chosen, rejected, margins = [], [], [], []
  for where, record in _checked(records, tok, max_len):
    if "completion" in record:
      raise ValueError(f"{where}: an unpaired record; read unpaired files with tokenize_unpaired")
    if "completions" in record:
      raise ValueError(f"{where}: a listwise record; read listwise files with tokenize_listwise")
    prompt_len, rows = _rows(record, ("chosen", "rejected"), tok, max_len, where)
    prompts.append(prompt_len)
    chosen.append(rows[0])
    rejected.append(rows[1])
    margins.append(float(record.get("margin", LLAMA2_MARGINS.get(str(record.get("rating")), 0.0))))
  prompt_lengths = np.asarray(prompts, np.int32)
  chosen_BT, chosen_mask, chosen_lengths = _pad_rows(chosen, prompt_lengths, tok.pad_id, mask_formatting)
  rejected_BT, rejected_mask, rejected_lengths = _pad_rows(rejected, prompt_lengths, tok.pad_id, mask_formatting)
  return PreferenceBatch(
    chosen_BT,
    chosen_mask,
    chosen_lengths,
    rejected_BT,
    rejected_mask,
    rejected_lengths,
    prompt_lengths,
    np.asarray(margins, np.float32),
  )


def tokenize_unpaired(
  records: Sequence[dict], tok: Tokenizer | chat.ChatFormat, *, max_len: int, mask_formatting: bool = True
) -> UnpairedBatch:
  """Rows of prompt + completion ids with their labels (unpaired files)."""
  prompts, rows, labels = [], [], []
  for where, record in _checked(records, tok, max_len):
    if "completions" in record:
      raise ValueError(f"{where}: a listwise record; read listwise files with tokenize_listwise")
    if "completion" not in record:
      raise ValueError(f"{where}: a paired record; read paired files with tokenize")
    prompt_len, (row,) = _rows(record, ("completion",), tok, max_len, where)
    prompts.append(prompt_len)
    rows.append(row)
    labels.append(record["label"])
  prompt_lengths = np.asarray(prompts, np.int32)
  tokens_BT, mask_BT, lengths_B = _pad_rows(rows, prompt_lengths, tok.pad_id, mask_formatting)
  return UnpairedBatch(tokens_BT, mask_BT, lengths_B, prompt_lengths, np.asarray(labels, bool))


def load(path: str | os.PathLike, tok: Tokenizer, *, max_len: int, mask_formatting: bool = True) -> PreferenceBatch:
  return tokenize(read_jsonl(path), tok, max_len=max_len, mask_formatting=mask_formatting)


def load_unpaired(
  path: str | os.PathLike, tok: Tokenizer, *, max_len: int, mask_formatting: bool = True
) -> UnpairedBatch:
  return tokenize_unpaired(read_jsonl(path), tok, max_len=max_len, mask_formatting=mask_formatting)


def tokenize_listwise(
  records: Sequence[dict], tok: Tokenizer | chat.ChatFormat, *, max_len: int, mask_formatting: bool = True
) -> ListwiseBatch:
  """Rows of prompt + completion ids, [B, Y, T], with a score per completion.

  Every record holds the same number Y of completions (a batch is a [B, Y] grid; a record of
  another Y raises with its line). Without "scores" the completions are ranked best first and
  score Y-1 .. 0; with them the scores are read as given. A row over max_len raises."""
  prompts, rows, scores = [], [], []
  size: tuple[int, str] | None = None  # (Y, where) of the first record
  for where, record in _checked(records, tok, max_len):
    if "completions" not in record:
      kind = "an unpaired" if "completion" in record else "a paired"
      reader = "tokenize_unpaired" if "completion" in record else "tokenize"
      raise ValueError(f"{where}: {kind} record; read those files with {reader}")
    completions = record["completions"]
    if size is None:
      size = (len(completions), where)
    elif len(completions) != size[0]:
      raise ValueError(
        f"{where}: {len(completions)} completions, but {size[1]} has {size[0]} (a batch holds one Y per prompt)"
      )
    keys = tuple(f"completions[{i}]" for i in range(len(completions)))
    flat = {"prompt": record["prompt"], **dict(zip(keys, completions))}
    prompt_len, record_rows = _rows(flat, keys, tok, max_len, where)
    prompts.append(prompt_len)
    rows.extend(record_rows)
    given = record.get("scores")
    scores.append(given if given is not None else list(range(len(completions) - 1, -1, -1)))
  assert size is not None  # _checked refuses an empty list
  batch, y = len(prompts), size[0]
  prompt_lengths = np.asarray(prompts, np.int32)
  ids, mask, lengths = _pad_rows(rows, np.repeat(prompt_lengths, y), tok.pad_id, mask_formatting)
  return ListwiseBatch(
    ids.reshape(batch, y, -1),
    mask.reshape(batch, y, -1),
    lengths.reshape(batch, y).astype(np.int32),
    prompt_lengths,
    np.asarray(scores, np.float32),
  )


def load_listwise(
  path: str | os.PathLike, tok: Tokenizer, *, max_len: int, mask_formatting: bool = True
) -> ListwiseBatch:
  return tokenize_listwise(read_jsonl(path), tok, max_len=max_len, mask_formatting=mask_formatting)


def _rows(record: dict, keys: tuple[str, ...], tok: Tokenizer | chat.ChatFormat, max_len: int, where: str):
  """(prompt length, [(ids, formatting mask)] per completion key) of one record."""
  rows: list[tuple[list[int], list[bool]]] = []
  if isinstance(record["prompt"], str):  # standard: BOS prompt + completion EOS, no formatting tokens
    if not isinstance(tok, Tokenizer):
      raise ValueError(f"{where}: a standard (text) record needs a Tokenizer, got a {type(tok).__name__}")
    prompt = tok.encode(record["prompt"], bos=tok.bos_id is not None)
    for key in keys:
      ids = prompt + tok.encode(record[key], eos=tok.eos_id is not None)
      rows.append((ids, [False] * len(ids)))
  else:
    fmt = tok if isinstance(tok, chat.ChatFormat) else chat.ChatFormat.from_tokenizer(tok)
    prompt = chat.render(fmt, record["prompt"], add_generation_prompt=True).ids_T.tolist()
    for key in keys:
      full = chat.render(fmt, [*record["prompt"], *record[key]])
      # The completion's first header is the prompt's generation header.
      assert full.ids_T[: len(prompt)].tolist() == prompt, where
      rows.append((full.ids_T.tolist(), full.format_mask_T.tolist()))
  for key, (ids, _) in zip(keys, rows):
    if len(ids) > max_len:
      raise ValueError(f"{where}: prompt + {key} is {len(ids)} tokens, over max_len={max_len}")
  return len(prompt), rows


def _pad_rows(rows: list[tuple[list[int], list[bool]]], prompt_lengths: np.ndarray, pad_id: int, mask_formatting: bool):
  """Right-padded ids, completion masks (formatting tokens dropped if asked) and lengths."""
  ids_BT, lengths = _pad([ids for ids, _ in rows], pad_id)
  formatting_BT, _ = _pad([[int(f) for f in fmt] for _, fmt in rows], 0)
  mask_BT = _completion_mask(ids_BT.shape, prompt_lengths, lengths)
  if mask_formatting:
    mask_BT &= ~formatting_BT.astype(bool)
  return ids_BT, mask_BT, lengths


def from_token_arrays(prompts: np.ndarray, chosen: np.ndarray, rejected: np.ndarray) -> PreferenceBatch:
  """A batch from already-tokenized, equal-width prompts and completions (synthetic tasks)."""
  prompts, chosen, rejected = np.asarray(prompts), np.asarray(chosen), np.asarray(rejected)
  for name, x in (("prompts", prompts), ("chosen", chosen), ("rejected", rejected)):
    if x.ndim != 2 or not np.issubdtype(x.dtype, np.integer):
      raise ValueError(f"{name}: expected a 2-D integer id array, got shape {x.shape} dtype {x.dtype}")
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


def listwise_from_token_arrays(
  prompts: np.ndarray, completions: np.ndarray, scores: np.ndarray | None = None
) -> ListwiseBatch:
  """A listwise batch from already-tokenized, equal-width prompts [B, P] and completions
  [B, Y, C] (synthetic tasks); scores [B, Y] (finite, higher is better) or None for lists
  ranked best first (scores Y-1 .. 0)."""
  prompts, completions = np.asarray(prompts), np.asarray(completions)
  for name, x, ndim in (("prompts", prompts, 2), ("completions", completions, 3)):
    if x.ndim != ndim or not np.issubdtype(x.dtype, np.integer):
      raise ValueError(f"{name}: expected a {ndim}-D integer id array, got shape {x.shape} dtype {x.dtype}")
  batch, y = completions.shape[:2]
  if prompts.shape[0] != batch or y < 2:
    raise ValueError(
      f"prompts, completions: expected [B, prompt length] and [B, Y >= 2, completion length], "
      f"got {prompts.shape}, {completions.shape}"
    )
  if scores is None:
    scores = np.broadcast_to(np.arange(y - 1, -1, -1, dtype=np.float32), (batch, y))
  scores = np.asarray(scores)
  if scores.shape != (batch, y) or not np.issubdtype(scores.dtype, np.number) or scores.dtype == np.bool_:
    raise ValueError(
      f"scores: expected numbers of shape ({batch}, {y}) like completions, got {scores.dtype} {scores.shape}"
    )
  if not np.isfinite(scores).all():
    raise ValueError(f"scores: expected finite values, got {scores[~np.isfinite(scores)][:6].tolist()}")
  width = prompts.shape[1] + completions.shape[2]
  prompt_lengths = np.full((batch,), prompts.shape[1], np.int32)
  lengths = np.full((batch * y,), width, np.int32)
  mask = _completion_mask((batch * y, width), np.repeat(prompt_lengths, y), lengths)
  tokens = np.concatenate([np.broadcast_to(prompts[:, None], (batch, y, prompts.shape[1])), completions], 2)
  return ListwiseBatch(
    tokens.astype(np.int32),
    mask.reshape(batch, y, width),
    lengths.reshape(batch, y),
    prompt_lengths,
    scores.astype(np.float32),
  )


def _pad(rows: list[list[int]], pad_id: int) -> tuple[np.ndarray, np.ndarray]:
  batch = tokenizer.pad_rows(rows, pad_id)
  return batch.ids_BT, batch.lengths_B


def _completion_mask(shape, prompt_lengths, lengths) -> np.ndarray:
  t = np.arange(shape[1])[None, :]
  return (t >= prompt_lengths[:, None]) & (t < lengths[:, None])
