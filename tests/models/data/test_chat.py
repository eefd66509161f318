"""Llama 3 chat format: spelled-out renderings (3.0, and 3.1's tool calls from Meta's prompt-format
document), the masks, errors, generation stopping at <|eot_id|> / <|eom_id|>."""

import warnings

import jax.numpy as jnp
import numpy as np
import pytest

from paperjax.models.data import chat, tokenizer
from paperjax.models.serving import generate
from paperjax.models.transformer import llama

BOS, START, END, EOT = 128000, 128006, 128007, 128009  # Llama 3's special ids
EOM, PYTHON_TAG = 128008, 128010  # Llama 3.1's
SYSTEM, USER, ASSISTANT, BLANK = 9125, 882, 78191, 271  # "system", "user", "assistant", "\n\n"
CONVERSATION = [
  {"role": "system", "content": "You are terse."},
  {"role": "user", "content": "Hi!"},
  {"role": "assistant", "content": " Hello.\n"},  # content is stripped
]


def _llama3(version):
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", RuntimeWarning)
    return tokenizer.llama3_offline(version=version)


@pytest.fixture(scope="module", params=["3", "3.1"])
def fmt(request):
  """Both layouts: a conversation without tools renders the same in each."""
  return chat.ChatFormat.from_tokenizer(_llama3(request.param))


@pytest.fixture(scope="module")
def fmt3():
  return chat.ChatFormat.from_tokenizer(_llama3("3"))


@pytest.fixture(scope="module")
def fmt31():
  return chat.ChatFormat.from_tokenizer(_llama3("3.1"))


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


# Meta's llama-models, models/llama3_1/prompt_format.md, "Built-in tools full interaction"
# (the wolfram_alpha output cut to its result; the document's system prompt ends in "\n",
# which the renderer strips, as it strips all content).
TOOL_CONVERSATION = [
  {"role": "system", "content": "Environment: ipython\nTools: brave_search, wolfram_alpha\n"},
  {"role": "user", "content": "What is the 100th decimal of pi?"},
  {"role": "assistant", "tool_call": 'wolfram_alpha.call(query="100th decimal of pi")'},
  {"role": "ipython", "content": '{"queryresult": {"success": true, "pods": [{"title": "Result", "plaintext": "7"}]}}'},
  {"role": "assistant", "content": "The 100th decimal of pi is 7."},
]
TOOL_PROMPT = (  # the document's input prompt, up to the model's final answer
  "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n"
  "Environment: ipython\nTools: brave_search, wolfram_alpha<|eot_id|>"
  "<|start_header_id|>user<|end_header_id|>\n\n"
  "What is the 100th decimal of pi?<|eot_id|>"
  "<|start_header_id|>assistant<|end_header_id|>\n\n"
  '<|python_tag|>wolfram_alpha.call(query="100th decimal of pi")<|eom_id|>'
  "<|start_header_id|>ipython<|end_header_id|>\n\n"
  '{"queryresult": {"success": true, "pods": [{"title": "Result", "plaintext": "7"}]}}<|eot_id|>'
  "<|start_header_id|>assistant<|end_header_id|>\n\n"
)
TOOL_ANSWER = "The 100th decimal of pi is 7.<|eot_id|>"  # the document's model response


def test_render_llama31_tool_call_spelled_out(fmt31):
  tok = _llama3("3.1")
  prompt = chat.render(fmt31, TOOL_CONVERSATION[:4], add_generation_prompt=True)
  assert prompt.ids_T.tolist() == tok.encoding.encode(TOOL_PROMPT, allowed_special="all")
  out = chat.render(fmt31, TOOL_CONVERSATION)
  assert out.ids_T.tolist() == tok.encoding.encode(TOOL_PROMPT + TOOL_ANSWER, allowed_special="all")
  ids = out.ids_T
  assert (ids == PYTHON_TAG).sum() == 1 and (ids == EOM).sum() == 1 and (ids == EOT).sum() == 4
  # What the model writes: the tag, the call and <|eom_id|>; then the answer and <|eot_id|>.
  assert tok.decode(ids[out.assistant_mask_T]) == (
    '<|python_tag|>wolfram_alpha.call(query="100th decimal of pi")<|eom_id|>The 100th decimal of pi is 7.<|eot_id|>'
  )
  # Formatting: BOS, every header, every end token; <|python_tag|> is not one.
  assert tok.decode(ids[out.format_mask_T]) == (
    "<|begin_of_text|>"
    "<|start_header_id|>system<|end_header_id|>\n\n<|eot_id|>"
    "<|start_header_id|>user<|end_header_id|>\n\n<|eot_id|>"
    "<|start_header_id|>assistant<|end_header_id|>\n\n<|eom_id|>"
    "<|start_header_id|>ipython<|end_header_id|>\n\n<|eot_id|>"
    "<|start_header_id|>assistant<|end_header_id|>\n\n<|eot_id|>"
  )


def test_render_llama31_ends(fmt31):
  """An assistant message picks its end token; a tool call ends in <|eom_id|> unless told."""
  tok = _llama3("3.1")
  user = {"role": "user", "content": "Is 7 prime?"}
  cases = [
    ({"role": "assistant", "tool_call": " print(is_prime(7))\n"}, "<|python_tag|>print(is_prime(7))<|eom_id|>"),
    ({"role": "assistant", "tool_call": "print(is_prime(7))", "end": "eot"},
     "<|python_tag|>print(is_prime(7))<|eot_id|>"),
    ({"role": "assistant", "content": "Let me check.", "end": "eom"}, "Let me check.<|eom_id|>"),
    # The document's `<function>` calls are plain replies: no tag, <|eot_id|>.
    ({"role": "assistant", "content": '<function=trending_songs>{"n": 10}</function>'},
     '<function=trending_songs>{"n": 10}</function><|eot_id|>'),
  ]  # fmt: skip
  head = (
    "<|start_header_id|>user<|end_header_id|>\n\nIs 7 prime?<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"
  )
  for message, written in cases:
    out = chat.render(fmt31, [user, message], bos=False)
    assert out.ids_T.tolist() == tok.encoding.encode(head + written, allowed_special="all"), message
    assert tok.decode(out.ids_T[out.assistant_mask_T]) == written
  assert fmt31.version == "3.1" and fmt31.stop_ids == (EOT, EOM)
  assert (fmt31.eom_id, fmt31.python_tag_id) == (EOM, PYTHON_TAG)


def test_llama3_layout_refuses_tool_messages(fmt3):
  assert fmt3.version == "3" and fmt3.stop_ids == (EOT,) and fmt3.eom_id is None is fmt3.python_tag_id
  user = CONVERSATION[1]
  for message, needs in [
    ({"role": "ipython", "content": "7"}, "role 'ipython'"),
    ({"role": "assistant", "tool_call": "print(7)"}, "a 'tool_call'"),
    ({"role": "assistant", "content": "Let me check.", "end": "eom"}, "end 'eom'"),
  ]:
    with pytest.raises(ValueError, match=rf"messages\[1\]: {needs} needs a Llama 3.1 layout \(<\|eom_id\|>"):
      chat.render(fmt3, [user, message])
  out = chat.render(fmt3, [user, {"role": "assistant", "content": "Yes.", "end": "eot"}])
  assert out.ids_T[-1] == EOT


def test_render_tool_message_errors(fmt31):
  user = CONVERSATION[1]
  with pytest.raises(ValueError, match=r"messages\[1\]: expected exactly the keys 'role' and 'content' \(or 'tool_"):
    chat.render(fmt31, [user, {"role": "assistant", "content": "x", "tool_call": "f()"}])
  with pytest.raises(ValueError, match=r"messages\[0\]: expected exactly the keys 'role' and 'content', got"):
    chat.render(fmt31, [{"role": "user", "content": "x", "end": "eom"}])  # only the assistant picks its end
  with pytest.raises(ValueError, match=r"messages\[0\]: expected exactly the keys 'role' and 'content', got"):
    chat.render(fmt31, [{"role": "ipython", "tool_call": "f()"}])
  with pytest.raises(ValueError, match=r"messages\[1\]: tool_call must be a non-empty string, got ' '"):
    chat.render(fmt31, [user, {"role": "assistant", "tool_call": " "}])
  with pytest.raises(ValueError, match=r"messages\[1\]: end must be one of \('eot', 'eom'\), got 'stop'"):
    chat.render(fmt31, [user, {"role": "assistant", "content": "x", "end": "stop"}])
  ids = {"bos_id": 0, "start_header_id": 1, "end_header_id": 2, "eot_id": 3, "eom_id": 4}
  with pytest.raises(ValueError, match="eom_id, python_tag_id: Llama 3.1's tool calls need both"):
    chat.ChatFormat(encode=fmt31.encode, **ids)
  with pytest.raises(ValueError, match="python_tag_id: expected a token id"):
    chat.ChatFormat(encode=fmt31.encode, **ids, python_tag_id=-1)


def test_generation_on_chat_prompts_stops_at_eot_and_eom(key):
  """A model that always prefers <|eot_id|> (then <|eom_id|>) replies with nothing: generation
  stopped there."""
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
  # A Llama 3.1 model calling a tool ends its message with <|eom_id|>: one of the format's stop ids.
  params["unembed"] = jnp.zeros_like(params["unembed"]).at[:, EOM].set(1.0)
  stop_ids = chat.ChatFormat.from_tokenizer(tok).stop_ids
  tokens, lengths = generate.generate(
    key, params, cfg, jnp.array([[BOS, START]]), jnp.array([2]), max_new_tokens=5, stop_ids=stop_ids
  )
  assert stop_ids == (EOT, EOM) and lengths.tolist() == [1] and tokens[0, 0] == EOM
  replies = generate.generate_chat(key, params, cfg, tok, [CONVERSATION[:2]], max_new_tokens=5)
  assert replies == [""]  # generate_chat stops there too
