"""Batched autoregressive generation for any decoding model: prefill, then select -> append.

Shapes: B batch, T padded prompt length, N new tokens, V vocabulary.

Prompts of different lengths are right-padded into one [B, T] array and prefilled in one
call (`model.prefill`); each row then decodes from its own length (`model.decode`). The
model is `models.protocol.model_for(cfg)`: Llama with its KV cache, Based or JRT-RNN with
their constant-size state. The decode loop is a `lax.while_loop` inside one jit: it stops
when every row has emitted a stop token or after `max_new_tokens`.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from paperjax.models import protocol
from paperjax.models.data import chat, tokenizer
from paperjax.models.data.tokenizer import Tokenizer
from paperjax.ops import checks, sampling


def generate(
  key: jax.Array,
  params: dict,
  cfg: Any,
  prompts_BT: jax.typing.ArrayLike,
  prompt_lengths_B: jax.typing.ArrayLike,
  *,
  max_new_tokens: int,
  stop_ids: Sequence[int] = (),
  temperature: float = 0.0,
  top_k: int | None = None,
  top_p: float | None = None,
) -> tuple[jax.Array, jax.Array]:
  """Generates up to `max_new_tokens` per row.

  Args:
    key: PRNG key (step i uses fold_in(key, i)).
    params, cfg: the model (any config `models.protocol.model_for` knows).
    prompts_BT: right-padded integer prompt ids [B, T], each in [0, V).
    prompt_lengths_B: real prompt lengths, integers 1 <= length <= T. A float array is
      refused even when its values are whole (a cast would truncate 2.7 to 2 silently).
    max_new_tokens: N >= 1.
    stop_ids: a row stops after emitting any of these (the stop token is kept).
    temperature, top_k, top_p: selection (`ops.sampling.select`); temperature 0 is greedy.

  Every argument is checked on the host before the jitted loop (`check_args`); under a
  user's `jax.jit` (cfg, max_new_tokens, stop_ids and the selection arguments static) the
  shape and type checks still run, the value checks (ids, lengths) do not.

  Returns:
    (tokens_BN int32, lengths_B int32): row b's output is tokens_BN[b, :lengths_B[b]];
    slots after a row stopped hold stop_ids[0] (or 0).
  """
  prompts = as_prompts(prompts_BT)
  stop_ids, lengths = _check(cfg, prompts, prompt_lengths_B, max_new_tokens, stop_ids, temperature, top_k, top_p)
  # No np.asarray here: under a user's jit or vmap the prompts and lengths are tracers, and a
  # global array may span other hosts' devices.
  prompts = jnp.asarray(prompts)
  top_k, top_p = None if top_k is None else int(top_k), None if top_p is None else float(top_p)
  return _generate(key, params, prompts, lengths, cfg, int(max_new_tokens), stop_ids, float(temperature), top_k, top_p)


@functools.partial(jax.jit, static_argnums=(4, 5, 6, 7, 8, 9))
def _generate(key, params, prompts_BT, prompt_lengths_B, cfg, max_new_tokens, stop_ids, temperature, top_k, top_p):
  capacity = prompts_BT.shape[1] + max_new_tokens
  logits_BV, state = protocol.model_for(cfg).prefill(
    params, prompts_BT, cfg, lengths_B=prompt_lengths_B, capacity=capacity
  )
  return decode(key, params, cfg, state, logits_BV, max_new_tokens, stop_ids, temperature, top_k, top_p)


def decode(key, params, cfg, state, logits_BV, max_new_tokens, stop_ids, temperature, top_k, top_p):
  """The select -> append loop from a prefilled state (arguments as in `generate`)."""
  model = protocol.model_for(cfg)
  batch = logits_BV.shape[0]
  pad = stop_ids[0] if stop_ids else 0
  stops = jnp.asarray(stop_ids or (-1,), jnp.int32)

  def cond(carry):
    i, _, _, _, done_B, _ = carry
    return (i < max_new_tokens) & ~done_B.all()

  def body(carry):
    i, logits_BV, state, tokens_BN, done_B, lengths_B = carry
    token_B = sampling.select(jax.random.fold_in(key, i), logits_BV, temperature, top_k=top_k, top_p=top_p)
    token_B = jnp.where(done_B, pad, token_B)
    tokens_BN = tokens_BN.at[:, i].set(token_B)
    lengths_B = lengths_B + (~done_B).astype(jnp.int32)
    done_B = done_B | (token_B[:, None] == stops).any(axis=1)
    logits_BV, state = model.decode(params, token_B, state, cfg)
    return i + 1, logits_BV, state, tokens_BN, done_B, lengths_B

  carry = (
    jnp.int32(0),
    logits_BV,
    state,
    jnp.full((batch, max_new_tokens), pad, jnp.int32),
    jnp.zeros((batch,), bool),
    jnp.zeros((batch,), jnp.int32),
  )
  _, _, _, tokens_BN, _, lengths_B = jax.lax.while_loop(cond, body, carry)
  return tokens_BN, lengths_B


def as_prompts(prompts_BT: Any) -> Any:
  """A list of prompt rows as a numpy array (a ragged one refused, naming prompts_BT); an
  array as it is (a traced one stays traced)."""
  if not isinstance(prompts_BT, (list, tuple)):
    return prompts_BT
  rows = [len(r) if isinstance(r, (list, tuple, np.ndarray)) else None for r in prompts_BT]
  if len(set(rows)) > 1:
    raise ValueError(
      f"prompts_BT: expected rows of one length (right-pad them and pass prompt_lengths_B), got row lengths {rows}"
    )
  return np.asarray(prompts_BT)


def check_args(
  cfg, prompts_BT, prompt_lengths_B, max_new_tokens, stop_ids, temperature, top_k, top_p
) -> tuple[int, ...]:
  """Validates `generate`'s arguments; returns stop_ids as a tuple of ints."""
  return _check(cfg, as_prompts(prompts_BT), prompt_lengths_B, max_new_tokens, stop_ids, temperature, top_k, top_p)[0]


def _check(
  cfg, prompts_BT, prompt_lengths_B, max_new_tokens, stop_ids, temperature, top_k, top_p
) -> tuple[tuple[int, ...], jax.Array]:
  """`check_args`, also returning the lengths as the int32 array `checks.check_lengths` gives."""
  if not hasattr(cfg, "vocab_size"):
    raise TypeError(f"cfg: expected a model config (LlamaConfig, BasedConfig, ...), got {type(cfg).__name__}")
  batch, time = checks.check_tokens(prompts_BT, cfg.vocab_size, name="prompts_BT")
  lengths_B = checks.check_lengths(prompt_lengths_B, batch, time, name="prompt_lengths_B")
  if not checks.is_int(max_new_tokens) or max_new_tokens < 1:
    raise ValueError(f"max_new_tokens: expected an int >= 1, got {max_new_tokens!r}")
  max_seq_len = getattr(cfg, "max_seq_len", None)  # recurrent models have no limit
  if max_seq_len is not None and prompts_BT.shape[1] + max_new_tokens > max_seq_len:
    raise ValueError(
      f"max_new_tokens: prompt width {prompts_BT.shape[1]} + {max_new_tokens} new tokens exceed "
      f"max_seq_len={cfg.max_seq_len}"
    )
  if isinstance(stop_ids, (str, bytes)) or not isinstance(stop_ids, (Sequence, np.ndarray)):
    raise TypeError(f"stop_ids: expected a sequence of token ids, got {type(stop_ids).__name__} {stop_ids!r}")
  if any(not checks.is_int(s) or not 0 <= s < cfg.vocab_size for s in stop_ids):
    raise ValueError(f"stop_ids: expected int ids in [0, {cfg.vocab_size}), got {tuple(stop_ids)}")
  if top_k is not None and not checks.is_int(top_k):  # a static jit argument: 2.5 is a type error, not a range one
    raise TypeError(f"top_k: expected an int in [1, {cfg.vocab_size}] or None, got {type(top_k).__name__} {top_k!r}")
  sampling.check_args(cfg.vocab_size, temperature, top_k, top_p)  # types and ranges of the selection
  return tuple(int(s) for s in stop_ids), lengths_B


def generate_text(
  key: jax.Array,
  params: dict,
  cfg: Any,
  tok: Tokenizer,
  prompts: Sequence[str],
  *,
  max_new_tokens: int,
  bos: bool = True,
  stop_ids: Sequence[int] | None = None,
  **select_kwargs,
) -> list[str]:
  """Text in, text out: the completions (stop token excluded) of each prompt.

  stop_ids default to the tokenizer's EOS. The model's vocabulary must cover the
  tokenizer's ids.
  """
  if isinstance(prompts, str) or not all(isinstance(p, str) for p in prompts):
    raise TypeError(f"prompts: expected a list of strings (wrap one prompt in a list), got {prompts!r:.80}")
  if stop_ids is None:
    stop_ids = () if tok.eos_id is None else (tok.eos_id,)
  rows = [tok.encode(prompt, bos=bos) for prompt in prompts]
  return _complete(key, params, cfg, tok, rows, max_new_tokens, stop_ids, select_kwargs)


def generate_chat(
  key: jax.Array,
  params: dict,
  cfg: Any,
  tok: Tokenizer,
  conversations: Sequence[Sequence[Mapping[str, str]]],
  *,
  max_new_tokens: int,
  **select_kwargs,
) -> list[str]:
  """The assistant's reply to each conversation in Llama 3's chat format (`models.data.chat`).

  Each conversation is rendered with the assistant header appended; a row stops at one of
  the format's stop ids (`ChatFormat.stop_ids`: <|eot_id|>, and with Llama 3.1's layout
  <|eom_id|>, which ends a tool call), which the reply excludes. A tool call's reply starts
  with "<|python_tag|>".
  """
  if isinstance(conversations, (str, Mapping)) or any(
    isinstance(c, (str, Mapping)) or not all(isinstance(m, Mapping) for m in c) for c in conversations
  ):
    raise TypeError(
      "conversations: expected a list of conversations, each a list of {'role', 'content'} messages "
      f"(wrap one conversation in a list), got {conversations!r:.80}"
    )
  fmt = chat.ChatFormat.from_tokenizer(tok)
  rows = [chat.render(fmt, messages, add_generation_prompt=True).ids_T.tolist() for messages in conversations]
  return _complete(key, params, cfg, tok, rows, max_new_tokens, fmt.stop_ids, select_kwargs)


def _complete(key, params, cfg, tok: Tokenizer, rows: list[list[int]], max_new_tokens, stop_ids, select_kwargs):
  """Right-pads prompt rows, generates, and decodes each row's tokens before its stop token."""
  if tok.vocab_size > cfg.vocab_size:
    raise ValueError(f"tok: {tok.vocab_size} ids do not fit the model's vocab_size={cfg.vocab_size}")
  if not rows or any(not row for row in rows):
    raise ValueError(f"prompts: expected at least one non-empty prompt, got lengths {[len(r) for r in rows]}")
  batch = tokenizer.pad_rows(rows, tok.pad_id)
  tokens_BN, lengths_B = generate(
    key, params, cfg, batch.ids_BT, batch.lengths_B, max_new_tokens=max_new_tokens, stop_ids=stop_ids, **select_kwargs
  )
  texts = []
  for row, n in zip(np.asarray(tokens_BN), np.asarray(lengths_B)):
    row = row[:n]
    if n and row[-1] in stop_ids:
      row = row[:-1]
    texts.append(tok.decode(row))
  return texts
