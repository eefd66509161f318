"""Llama 3 chat format: a spelled-out rendering, the masks, errors, generation stopping at <|eot_id|>."""

import warnings

import jax.numpy as jnp
import numpy as np
import pytest

from paperjax.models.data import chat, tokenizer
from paperjax.models.serving import generate
from paperjax.models.transformer import llama

BOS, START, END, EOT = 128000, 128006, 128007, 128009  # Llama 3's special ids
SYSTEM, USER, ASSISTANT, BLANK = 9125, 882, 78191, 271  # "system", "user", "assistant", "\n\n"
CONVERSATION = [
  {"role": "system", "content": "You are terse."},
  {"role": "user", "content": "Hi!"},
  {"role": "assistant", "content": " Hello.\n"},  # content is stripped
]


@pytest.fixture(scope="module")
def fmt():
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", RuntimeWarning)
    return chat.ChatFormat.from_tokenizer(tokenizer.llama3_offline())


def test_render_spelled_out(fmt):
  out = chat.render(fmt, CONVERSATION, add_generation_prompt=True)
  expected = [
    BOS,
    *(START, SYSTEM, END, BLANK), 2675, 527, 51637, 13, EOT,  # "You are terse."
    *(START, USER, END, BLANK), 13347, 0, EOT,  # "Hi!"
    *(START, ASSISTANT, END, BLANK), 9906, 13, EOT,  # "Hello."
    *(START, ASSISTANT, END, BLANK),  # the generation prompt
  ]  # fmt: skip
  assert out.ids_T.tolist() == expected
  formatting = {BOS, START, END, EOT}
  header_text = {SYSTEM, USER, ASSISTANT, BLANK}
  assert out.format_mask_T.tolist() == [i in formatting | header_text for i in expected]
  assistant = np.zeros(len(expected), bool)
  assistant[21:24] = True  # "Hello." and its <|eot_id|>
  np.testing.assert_array_equal(out.assistant_mask_T, assistant)
  without = chat.render(fmt, CONVERSATION, bos=False)
  assert without.ids_T.tolist() == expected[1:-4]


def test_render_errors(fmt):
  with pytest.raises(ValueError, match=r"messages\[1\]: unknown role 'tool'"):
    chat.render(fmt, [CONVERSATION[0], {"role": "tool", "content": "x"}])
  with pytest.raises(ValueError, match=r"messages\[0\]: content must be a non-empty string"):
    chat.render(fmt, [{"role": "user", "content": "  "}])
  with pytest.raises(ValueError, match=r"messages\[0\]: expected exactly the keys"):
    chat.render(fmt, [{"role": "user", "content": "x", "name": "bob"}])
  with pytest.raises(ValueError, match="messages: expected a non-empty list"):
    chat.render(fmt, [])
  with pytest.raises(ValueError, match="lacks the chat format's special tokens"):
    chat.ChatFormat.from_tokenizer(tokenizer.from_name("cl100k_base"))
  with pytest.raises(TypeError, match="tok: expected a tokenizer.Tokenizer, got str"):
    chat.ChatFormat.from_tokenizer("cl100k_base")
  with pytest.raises(TypeError, match="add_generation_prompt: expected a bool, got 'no'"):
    chat.render(fmt, CONVERSATION, add_generation_prompt="no")
  with pytest.raises(ValueError, match="eot_id: expected a token id"):
    chat.ChatFormat(encode=fmt.encode, bos_id=0, start_header_id=1, end_header_id=2, eot_id=-1)


def test_generation_on_chat_prompts_stops_at_eot(key):
  """A model that always prefers <|eot_id|> replies with nothing: generation stopped there."""
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", RuntimeWarning)
    tok = tokenizer.llama3_offline()
  cfg = llama.LlamaConfig(
    vocab_size=tok.vocab_size, dim=16, n_layers=1, n_heads=2, n_kv_heads=1, ffn_dim=32, max_seq_len=64
  )
  params = llama.init(key, cfg)
  # Every token embeds to ones and no layer writes to the residual, so the final hidden
  # state is ones and only <|eot_id|>'s unembedding column scores above 0.
  params["embed"] = jnp.ones_like(params["embed"])
  params["layers"] = {**params["layers"], "wo": jnp.zeros_like(params["layers"]["wo"])}
  params["layers"]["w2"] = jnp.zeros_like(params["layers"]["w2"])
  params["unembed"] = jnp.zeros_like(params["unembed"]).at[:, EOT].set(1.0)
  replies = generate.generate_chat(key, params, cfg, tok, [CONVERSATION[:2], CONVERSATION[1:2]], max_new_tokens=5)
  assert replies == ["", ""]
  tokens, lengths = generate.generate(key, params, cfg, jnp.array([[BOS, START]]), jnp.array([2]), max_new_tokens=5)
  assert lengths.tolist() == [5] and set(tokens[0].tolist()) == {EOT}  # without stop ids it would go on
