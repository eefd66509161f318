"""Llama 3's chat format: conversations rendered with header and end-of-message tokens.

Shapes: T tokens of one rendered conversation.

  <|begin_of_text|>
  <|start_header_id|>{role}<|end_header_id|>\\n\\n{content}<|eot_id|>      per message
  <|start_header_id|>assistant<|end_header_id|>\\n\\n                       generation prompt

as Meta's llama-models renders a dialog (`models/llama3/chat_format.py`): content is
stripped of surrounding whitespace, the role and the "\\n\\n" are encoded as ordinary text,
and the model ends its turn with <|eot_id|>. Roles are system, user and assistant.

Llama 3.1 adds tool calls (`models/llama3_1/prompt_format.md`). A system prompt holding
"Environment: ipython" lets the model answer with a call, which it opens with
<|python_tag|> and ends with <|eom_id|> (end of message: it waits for the result); the
result comes back as a message of role ipython, and the model's final answer ends with
<|eot_id|>:

  <|start_header_id|>assistant<|end_header_id|>\\n\\n<|python_tag|>{call}<|eom_id|>
  <|start_header_id|>ipython<|end_header_id|>\\n\\n{tool output}<|eot_id|>

Messages are dicts:
- {"role": "system" | "user" | "ipython", "content": str}; ipython (a tool's output) needs
  a Llama 3.1 layout.
- {"role": "assistant", "content": str}: a reply, ended by <|eot_id|>.
- {"role": "assistant", "tool_call": str}: a call as the model writes it after
  <|python_tag|> (`brave_search.call(query="...")`, python code for the code interpreter, a
  JSON call), ended by <|eom_id|>. Llama 3.1 only.
- An assistant message may set "end": "eot" or "eom" to choose its end token, as Meta's
  `stop_reason` does (end_of_turn, end_of_message); only assistant messages end with
  <|eom_id|>. Calls written as plain text (the `<function=...>` format) are replies.

`render` also returns two masks. Formatting tokens are BOS, each header (from
<|start_header_id|> through the "\\n\\n") and each end token (<|eot_id|>, <|eom_id|>): the
header and termination tokens Llama 3's DPO masks out of both log-probs. <|python_tag|> is
not one of them: whether to call a tool is part of the answer. Assistant tokens are
everything the model writes after the header it is given: the content, or <|python_tag|>
and the call, and the end token.

Generation on a chat prompt stops at any of `ChatFormat.stop_ids`: <|eot_id|>, and in
Llama 3.1 <|eom_id|> too (the caller runs the tool, appends its output and asks again).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import NamedTuple

import numpy as np

from paperjax.models.data.tokenizer import Tokenizer

ROLES = ("system", "user", "assistant", "ipython")
ENDS = ("eot", "eom")
SPECIALS = ("<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")
SPECIALS_31 = ("<|eom_id|>", "<|python_tag|>")  # what Llama 3.1's tool calls add


@dataclasses.dataclass(frozen=True, kw_only=True)
class ChatFormat:
  """The token ids of Llama 3's chat template, the encoder of ordinary text, and the
  padding id of batches.

  `eom_id` and `python_tag_id` (both or neither) make it Llama 3.1's format, with tool
  calls and ipython messages; without them it is Llama 3's, which refuses those.
  """

  encode: Callable[[str], list[int]]
  bos_id: int
  start_header_id: int
  end_header_id: int
  eot_id: int
  eom_id: int | None = None
  python_tag_id: int | None = None
  pad_id: int = 0

  def __post_init__(self):
    if not callable(self.encode):
      raise TypeError(f"encode: expected a function str -> list[int], got {type(self.encode).__name__}")
    for name in ("bos_id", "start_header_id", "end_header_id", "eot_id", "eom_id", "python_tag_id", "pad_id"):
      value = getattr(self, name)
      if value is None and name in ("eom_id", "python_tag_id"):
        continue
      if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
        raise ValueError(f"{name}: expected a token id (an int >= 0), got {value!r}")
    if (self.eom_id is None) != (self.python_tag_id is None):
      raise ValueError(
        f"eom_id, python_tag_id: Llama 3.1's tool calls need both (or neither, for Llama 3), "
        f"got {self.eom_id!r} and {self.python_tag_id!r}"
      )

  @property
  def version(self) -> str:
    """The layout: "3.1" with tool calls (eom_id and python_tag_id), else "3"."""
    return "3" if self.eom_id is None else "3.1"

  @property
  def stop_ids(self) -> tuple[int, ...]:
    """The ids that end the model's message: <|eot_id|>, and <|eom_id|> in Llama 3.1."""
    return (self.eot_id,) if self.eom_id is None else (self.eot_id, self.eom_id)

  @classmethod
  def from_tokenizer(cls, tok: Tokenizer) -> ChatFormat:
    """From a tokenizer with Llama 3's special tokens (`tokenizer.llama3_offline()`, or
    `tokenizer.from_file` on Meta's tokenizer.model); Llama 3.1's format when it has
    <|eom_id|> and <|python_tag|> (`version="3.1"`, their default)."""
    if not isinstance(tok, Tokenizer):
      raise TypeError(f"tok: expected a tokenizer.Tokenizer, got {type(tok).__name__}")
    specials = tok.encoding.special_tokens_set
    missing = [s for s in SPECIALS if s not in specials]
    if missing:
      raise ValueError(f"tok: encoding {tok.name!r} lacks the chat format's special tokens {missing}")
    bos, start, end, eot = (tok.encoding.encode_single_token(s) for s in SPECIALS)
    eom = python_tag = None
    if all(s in specials for s in SPECIALS_31):
      eom, python_tag = (tok.encoding.encode_single_token(s) for s in SPECIALS_31)
    return cls(
      encode=lambda text: tok.encode(text),
      bos_id=bos,
      start_header_id=start,
      end_header_id=end,
      eot_id=eot,
      eom_id=eom,
      python_tag_id=python_tag,
      pad_id=tok.pad_id,
    )


class Rendered(NamedTuple):
  ids_T: np.ndarray  # int32
  format_mask_T: np.ndarray  # bool: BOS, headers, <|eot_id|> and <|eom_id|>
  assistant_mask_T: np.ndarray  # bool: assistant content (or <|python_tag|> and call) and its end token


def check_messages(messages: object, *, where: str = "messages") -> list[dict[str, str]]:
  """A list of messages (the module docstring's forms) with known roles and non-empty text."""
  if not isinstance(messages, list) or not messages:
    raise ValueError(f"{where}: expected a non-empty list of messages, got {messages!r}")
  for i, message in enumerate(messages):
    at = f"{where}[{i}]"
    if not isinstance(message, Mapping) or "role" not in message:
      raise ValueError(f"{at}: expected exactly the keys 'role' and 'content', got {message!r}")
    role = message["role"]
    if role not in ROLES:
      raise ValueError(f"{at}: unknown role {role!r}; expected one of {ROLES}")
    keys = set(message)
    if role != "assistant" and keys != {"role", "content"}:
      raise ValueError(f"{at}: expected exactly the keys 'role' and 'content', got {message!r}")
    if role == "assistant" and (
      not keys <= {"role", "content", "tool_call", "end"} or len(keys & {"content", "tool_call"}) != 1
    ):
      raise ValueError(
        f"{at}: expected exactly the keys 'role' and 'content' (or 'tool_call' instead of 'content', "
        f"and optionally 'end') in an assistant message, got {message!r}"
      )
    text = "tool_call" if "tool_call" in message else "content"
    if not isinstance(message[text], str) or not message[text].strip():
      raise ValueError(f"{at}: {text} must be a non-empty string, got {message[text]!r}")
    if "end" in message and message["end"] not in ENDS:
      raise ValueError(f"{at}: end must be one of {ENDS}, got {message['end']!r}")
  return [dict(m) for m in messages]


def render(
  fmt: ChatFormat, messages: Sequence[Mapping[str, str]], *, add_generation_prompt: bool = False, bos: bool = True
) -> Rendered:
  """The ids of `messages` in Llama 3's chat format, with the formatting and assistant masks.

  `add_generation_prompt` appends the assistant header, so the model's reply comes next.
  An ipython message, a tool call or an "eom" end needs Llama 3.1's format
  (`fmt.version == "3.1"`).
  """
  if not isinstance(fmt, ChatFormat):
    raise TypeError(f"fmt: expected a ChatFormat (ChatFormat.from_tokenizer), got {type(fmt).__name__}")
  if isinstance(messages, (str, bytes, Mapping)) or not isinstance(messages, Sequence):
    raise TypeError(f"messages: expected a list of {{'role', 'content'}} messages, got {type(messages).__name__}")
  for name, flag in (("add_generation_prompt", add_generation_prompt), ("bos", bos)):
    if not isinstance(flag, (bool, np.bool_)):  # the string "false" would read as true
      raise TypeError(f"{name}: expected a bool, got {flag!r}")
  messages = check_messages(list(messages))
  for i, message in enumerate(messages):
    needs = _needs_llama31(message)
    if needs and fmt.python_tag_id is None:
      raise ValueError(
        f"messages[{i}]: {needs} needs a Llama 3.1 layout (<|eom_id|>, <|python_tag|>), but this ChatFormat has "
        "Llama 3's, without eom_id and python_tag_id (tokenizer.llama3_offline and from_file give 3.1's by default)"
      )
  pieces: list[tuple[list[int], bool, bool]] = []  # (ids, formatting, assistant)
  if bos:
    pieces.append(([fmt.bos_id], True, False))

  def header(role: str) -> None:
    pieces.append(([fmt.start_header_id, *fmt.encode(role), fmt.end_header_id, *fmt.encode("\n\n")], True, False))

  for message in messages:
    header(message["role"])
    assistant = message["role"] == "assistant"
    call = "tool_call" in message
    tag_id, eom_id = fmt.python_tag_id, fmt.eom_id
    if call:
      assert tag_id is not None  # a tool call over Llama 3's layout was refused above
      pieces.append(([tag_id, *fmt.encode(message["tool_call"].strip())], False, True))
    else:
      pieces.append((fmt.encode(message["content"].strip()), False, assistant))
    end_id = eom_id if message.get("end", "eom" if call else "eot") == "eom" else fmt.eot_id
    assert end_id is not None  # as is an eom end
    pieces.append(([end_id], True, assistant))
  if add_generation_prompt:
    header("assistant")
  ids = [i for piece, _, _ in pieces for i in piece]
  formatting = [f for piece, f, _ in pieces for _ in piece]
  assistant_mask = [a for piece, _, a in pieces for _ in piece]
  return Rendered(np.asarray(ids, np.int32), np.asarray(formatting, bool), np.asarray(assistant_mask, bool))


def _needs_llama31(message: Mapping[str, str]) -> str | None:
  """What in a checked message needs Llama 3.1's tokens, or None."""
  if message["role"] == "ipython":
    return "role 'ipython'"
  if "tool_call" in message:
    return "a 'tool_call'"
  if message.get("end") == "eom":
    return "end 'eom'"
  return None
