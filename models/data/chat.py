"""Llama 3's chat format: conversations rendered with header and end-of-turn tokens.

Shapes: T tokens of one rendered conversation.

  <|begin_of_text|>
  <|start_header_id|>{role}<|end_header_id|>\\n\\n{content}<|eot_id|>      per message
  <|start_header_id|>assistant<|end_header_id|>\\n\\n                       generation prompt

as Meta's llama-models renders a dialog: content is stripped of surrounding whitespace,
the role and the "\\n\\n" are encoded as ordinary text, and the model ends its turn with
<|eot_id|>, which is where generation on a chat prompt stops. Roles are system, user,
assistant and ipython (tool output).

`render` also returns two masks. Formatting tokens are BOS and each header (from
<|start_header_id|> through the "\\n\\n") and each <|eot_id|>: the tokens Llama 3's DPO
masks out of both log-probs. Assistant tokens are the content and <|eot_id|> of each
assistant turn: what the model writes after the header it is given.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import NamedTuple

import numpy as np

from paperjax.models.data.tokenizer import Tokenizer

ROLES = ("system", "user", "assistant", "ipython")
SPECIALS = ("<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")


@dataclasses.dataclass(frozen=True, kw_only=True)
class ChatFormat:
  """The token ids of Llama 3's chat template, the encoder of ordinary text, and the
  padding id of batches."""

  encode: Callable[[str], list[int]]
  bos_id: int
  start_header_id: int
  end_header_id: int
  eot_id: int
  pad_id: int = 0

  def __post_init__(self):
    if not callable(self.encode):
      raise TypeError(f"encode: expected a function str -> list[int], got {type(self.encode).__name__}")
    for name in ("bos_id", "start_header_id", "end_header_id", "eot_id", "pad_id"):
      value = getattr(self, name)
      if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
        raise ValueError(f"{name}: expected a token id (an int >= 0), got {value!r}")

  @classmethod
  def from_tokenizer(cls, tok: Tokenizer) -> ChatFormat:
    """From a tokenizer with Llama 3's special tokens (`tokenizer.llama3_offline()`, or
    `tokenizer.from_file` on Meta's tokenizer.model)."""
    if not isinstance(tok, Tokenizer):
      raise TypeError(f"tok: expected a tokenizer.Tokenizer, got {type(tok).__name__}")
    missing = [s for s in SPECIALS if s not in tok.encoding.special_tokens_set]
    if missing:
      raise ValueError(f"tok: encoding {tok.name!r} lacks the chat format's special tokens {missing}")
    bos, start, end, eot = (tok.encoding.encode_single_token(s) for s in SPECIALS)
    return cls(
      encode=lambda text: tok.encode(text),
      bos_id=bos,
      start_header_id=start,
      end_header_id=end,
      eot_id=eot,
      pad_id=tok.pad_id,
    )


class Rendered(NamedTuple):
  ids_T: np.ndarray  # int32
  format_mask_T: np.ndarray  # bool: BOS, headers, <|eot_id|>
  assistant_mask_T: np.ndarray  # bool: assistant content and its <|eot_id|>


def check_messages(messages: object, *, where: str = "messages") -> list[dict[str, str]]:
  """A list of {"role", "content"} messages with known roles and non-empty string content."""
  if not isinstance(messages, list) or not messages:
    raise ValueError(f"{where}: expected a non-empty list of messages, got {messages!r}")
  for i, message in enumerate(messages):
    if not isinstance(message, Mapping) or set(message) != {"role", "content"}:
      raise ValueError(f"{where}[{i}]: expected exactly the keys 'role' and 'content', got {message!r}")
    if message["role"] not in ROLES:
      raise ValueError(f"{where}[{i}]: unknown role {message['role']!r}; expected one of {ROLES}")
    if not isinstance(message["content"], str) or not message["content"].strip():
      raise ValueError(f"{where}[{i}]: content must be a non-empty string, got {message['content']!r}")
  return [dict(m) for m in messages]


def render(
  fmt: ChatFormat, messages: Sequence[Mapping[str, str]], *, add_generation_prompt: bool = False, bos: bool = True
) -> Rendered:
  """The ids of `messages` in Llama 3's chat format, with the formatting and assistant masks.

  `add_generation_prompt` appends the assistant header, so the model's reply comes next.
  """
  if not isinstance(fmt, ChatFormat):
    raise TypeError(f"fmt: expected a ChatFormat (ChatFormat.from_tokenizer), got {type(fmt).__name__}")
  if isinstance(messages, (str, bytes, Mapping)) or not isinstance(messages, Sequence):
    raise TypeError(f"messages: expected a list of {{'role', 'content'}} messages, got {type(messages).__name__}")
  for name, flag in (("add_generation_prompt", add_generation_prompt), ("bos", bos)):
    if not isinstance(flag, (bool, np.bool_)):  # the string "false" would read as true
      raise TypeError(f"{name}: expected a bool, got {flag!r}")
  pieces: list[tuple[list[int], bool, bool]] = []  # (ids, formatting, assistant)
  if bos:
    pieces.append(([fmt.bos_id], True, False))

  def header(role: str) -> None:
    pieces.append(([fmt.start_header_id, *fmt.encode(role), fmt.end_header_id, *fmt.encode("\n\n")], True, False))

  for message in check_messages(list(messages)):
    header(message["role"])
    assistant = message["role"] == "assistant"
    pieces.append((fmt.encode(message["content"].strip()), False, assistant))
    pieces.append(([fmt.eot_id], True, assistant))
  if add_generation_prompt:
    header("assistant")
  ids = [i for piece, _, _ in pieces for i in piece]
  formatting = [f for piece, f, _ in pieces for _ in piece]
  assistant_mask = [a for piece, _, a in pieces for _ in piece]
  return Rendered(np.asarray(ids, np.int32), np.asarray(formatting, bool), np.asarray(assistant_mask, bool))
