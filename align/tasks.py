"""A synthetic preference task whose quality a program can check: sorting digits.

Shapes: B batch. Vocabulary: PAD 0, BOS 1, SEP 2, EOS 3, digits 4 .. 4 + num_digits - 1.

  prompt     = BOS d_1 .. d_n SEP          (n random digits)
  completion = c_1 .. c_n EOS
  score      = #{i : c_i = sorted(d)_i}   (0 .. n)

Demonstrations are the sorted digits with each position replaced by a random digit with
probability `noise`, so a model fit to them is good but imperfect, and preferences
between two completions are decided by `score`: win rates are measured, not judged.

In chat form (`chat_format`, `chat_prompts`, `chat_replies`) the digits are a user turn and
the assistant's reply in Llama 3's template (`models.data.chat`) over the task's own ids
plus CHAT_TOKENS: <|eot_id|> ends the reply where EOS did.
"""

from __future__ import annotations

import numpy as np

from paperjax.models.data import chat
from paperjax.ops import checks

PAD, BOS, SEP, EOS = 0, 1, 2, 3
FIRST_DIGIT = 4
# The chat template's ids, numbered after the digits.
CHAT_TOKENS = ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "user", "assistant", "\n\n")


@checks.config
class SortTask:
  """The task's sizes; fields are checked for type and range at construction (`ops.checks.config`)."""

  length: checks.PositiveInt = 6
  num_digits: checks.PositiveInt = 10

  @property
  def vocab_size(self) -> int:
    return FIRST_DIGIT + self.num_digits

  @property
  def chat_vocab_size(self) -> int:
    return self.vocab_size + len(CHAT_TOKENS)

  @property
  def prompt_len(self) -> int:
    return self.length + 2

  @property
  def completion_len(self) -> int:
    return self.length + 1

  def prompts(self, rng: np.random.Generator, n: int) -> np.ndarray:
    """[n, length + 2] prompts."""
    _check_count("n", n, low=0)
    digits = rng.integers(FIRST_DIGIT, self.vocab_size, (n, self.length))
    return np.concatenate([np.full((n, 1), BOS), digits, np.full((n, 1), SEP)], axis=1).astype(np.int32)

  def target(self, prompts: np.ndarray) -> np.ndarray:
    """[n, length] sorted digits of each prompt."""
    prompts = self._check_prompts(prompts)
    return np.sort(prompts[:, 1:-1], axis=1)

  def demonstrations(self, rng: np.random.Generator, prompts: np.ndarray, noise: float | np.ndarray) -> np.ndarray:
    """[n, length + 1] completions: the target with positions replaced w.p. noise, then EOS."""
    target = self.target(prompts)
    noise = np.asarray(noise)
    if not np.issubdtype(noise.dtype, np.number) or np.issubdtype(noise.dtype, np.complexfloating):
      raise TypeError(f"noise: expected a probability or one per prompt, got {noise.dtype}")
    if noise.ndim > 1 or noise.size not in (1, len(target)):
      raise ValueError(f"noise: expected a scalar or shape ({len(target)},), got shape {noise.shape}")
    checks.check_finite("noise", noise.reshape(-1))
    checks.check_in("noise", noise.reshape(-1), 0, 1, what="probabilities")
    noise = np.broadcast_to(noise.astype(np.float64).reshape(-1, 1), target.shape)
    random = rng.integers(FIRST_DIGIT, self.vocab_size, target.shape)
    digits = np.where(rng.random(target.shape) < noise, random, target)
    return np.concatenate([digits, np.full((len(prompts), 1), EOS)], axis=1).astype(np.int32)

  def score(self, prompts: np.ndarray, completions: np.ndarray) -> np.ndarray:
    """[n] number of positions matching the sorted digits (tokens after the first EOS never count)."""
    prompts, completions = self._check_prompts(prompts), np.asarray(completions)
    checks.check_array("completions", completions, 2, integer=True, shape=f"[n, >= {self.length}]")
    if completions.shape[0] != prompts.shape[0] or completions.shape[1] < self.length:
      raise ValueError(
        f"completions: expected [n={prompts.shape[0]}, >= length={self.length}] (one per prompt), "
        f"got shape {completions.shape}"
      )
    completions = completions[:, : self.length]
    before_eos = np.cumsum(completions == EOS, axis=1) == 0
    return ((completions == self.target(prompts)) & before_eos).sum(axis=1)

  def _check_prompts(self, prompts: np.ndarray) -> np.ndarray:
    prompts = np.asarray(prompts)
    checks.check_array("prompts", prompts, 2, integer=True, shape=f"[n, {self.prompt_len}]")
    if prompts.shape[1] != self.prompt_len:
      raise ValueError(
        f"prompts: expected integer ids [n, length + 2 = {self.prompt_len}] (from prompts()), got "
        f"{prompts.dtype} {prompts.shape}"
      )
    checks.check_in("prompts", prompts[:, 1:-1], FIRST_DIGIT, self.vocab_size - 1, what="digit ids")
    return prompts

  def chat_format(self) -> chat.ChatFormat:
    """Llama 3's chat template over the task's ids: digits are written "3 1 4"."""
    ids = {token: self.vocab_size + i for i, token in enumerate(CHAT_TOKENS)}

    def encode(text: str) -> list[int]:
      if text in ids:
        return [ids[text]]
      words = text.split()
      if not words or any(not w.isdigit() or int(w) >= self.num_digits for w in words):
        raise ValueError(f"text: expected digits 0 .. {self.num_digits - 1} separated by spaces, got {text!r}")
      return [FIRST_DIGIT + int(w) for w in words]

    return chat.ChatFormat(
      encode=encode,
      bos_id=BOS,
      start_header_id=ids["<|start_header_id|>"],
      end_header_id=ids["<|end_header_id|>"],
      eot_id=ids["<|eot_id|>"],
      pad_id=PAD,
    )

  def chat_prompts(self, prompts: np.ndarray) -> list[list[dict[str, str]]]:
    """Each prompt's digits as a user turn."""
    return [[{"role": "user", "content": _words(row[1:-1])}] for row in np.asarray(prompts)]

  def chat_replies(self, completions: np.ndarray) -> list[list[dict[str, str]]]:
    """Each completion's digits before its EOS as an assistant turn."""
    replies = []
    for row in np.asarray(completions):
      digits = row[: np.argmax(row == EOS)] if (row == EOS).any() else row
      replies.append([{"role": "assistant", "content": _words(digits)}])
    return replies

  def preference_pairs(self, rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """n (prompt, chosen, rejected) triples of demonstrations at random noise levels, chosen
    strictly better by score (candidate pairs that tie are not preferences and are redrawn)."""
    _check_count("n", n, low=1)
    if self.num_digits < 2:  # one digit: every completion scores the same, so no pair is ever strict
      raise ValueError(f"num_digits: preference pairs need at least 2 digits, got {self.num_digits}")
    prompts_out, chosen_out, rejected_out, have = [], [], [], 0
    while have < n:
      prompts = self.prompts(rng, 2 * n)
      a = self.demonstrations(rng, prompts, rng.uniform(0.1, 0.9, 2 * n))
      b = self.demonstrations(rng, prompts, rng.uniform(0.1, 0.9, 2 * n))
      sa, sb = self.score(prompts, a), self.score(prompts, b)
      keep = sa != sb
      better_a = (sa > sb)[keep, None]
      prompts_out.append(prompts[keep])
      chosen_out.append(np.where(better_a, a[keep], b[keep]))
      rejected_out.append(np.where(better_a, b[keep], a[keep]))
      have += int(keep.sum())
    return np.concatenate(prompts_out)[:n], np.concatenate(chosen_out)[:n], np.concatenate(rejected_out)[:n]


def _check_count(name: str, n: int, *, low: int) -> None:
  if not isinstance(n, (int, np.integer)) or isinstance(n, bool) or n < low:
    raise ValueError(f"{name}: expected an int >= {low}, got {n!r}")


def _words(digit_ids: np.ndarray) -> str:
  return " ".join(str(int(d) - FIRST_DIGIT) for d in digit_ids)
