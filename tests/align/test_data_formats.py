"""TRL's preference formats: each reads to the batch of its equivalent, Llama 3's formatting
mask drops exactly the headers and <|eot_id|>, malformed records name their line."""

import json
import warnings

import numpy as np
import pytest

from paperjax.align import data
from paperjax.models.data import chat, tokenizer

PROMPT = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Capital of France?"}]
CHOSEN = [{"role": "assistant", "content": "Paris."}]
REJECTED = [{"role": "assistant", "content": "Lyon, I think."}]
FOLLOW_UP = [*CHOSEN, {"role": "user", "content": "Sure?"}, {"role": "assistant", "content": "Yes."}]


@pytest.fixture(scope="module")
def tok():
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", RuntimeWarning)
    return tokenizer.llama3_offline()


def _write(tmp_path, name, records):
  path = tmp_path / name
  path.write_text("".join(json.dumps(r) + "\n" for r in records))
  return path


def _assert_same(a, b):
  for name, x, y in zip(a._fields, a, b):
    np.testing.assert_array_equal(x, y, err_msg=name)


def test_implicit_prompt_reads_as_conversational(tmp_path, tok):
  explicit = [
    {"prompt": PROMPT, "chosen": CHOSEN, "rejected": REJECTED},
    {"prompt": PROMPT, "chosen": FOLLOW_UP, "rejected": REJECTED},
  ]
  implicit = [{"chosen": r["prompt"] + r["chosen"], "rejected": r["prompt"] + r["rejected"]} for r in explicit]
  a = data.load(_write(tmp_path, "explicit.jsonl", explicit), tok, max_len=64)
  b = data.load(_write(tmp_path, "implicit.jsonl", implicit), tok, max_len=64)
  _assert_same(a, b)
  prompt = chat.render(chat.ChatFormat.from_tokenizer(tok), PROMPT, add_generation_prompt=True).ids_T
  assert a.prompt_lengths_B.tolist() == [len(prompt)] * 2
  assert a.chosen_BT[0, : len(prompt)].tolist() == prompt.tolist()


@pytest.mark.parametrize("style", ["standard", "conversational"])
def test_unpaired_rows_equal_the_paired_rows(tmp_path, tok, style):
  if style == "standard":
    pairs = [
      {"prompt": "2+2=", "chosen": "4", "rejected": "five"},
      {"prompt": "Hi", "chosen": "Hello", "rejected": "Go"},
    ]
  else:
    pairs = [
      {"prompt": PROMPT, "chosen": CHOSEN, "rejected": REJECTED},
      {"prompt": PROMPT, "chosen": FOLLOW_UP, "rejected": CHOSEN},
    ]
  unpaired = [
    {"prompt": p["prompt"], "completion": p[k], "label": k == "chosen"} for p in pairs for k in ("chosen", "rejected")
  ]
  paired = data.load(_write(tmp_path, "paired.jsonl", pairs), tok, max_len=64)
  single = data.load_unpaired(_write(tmp_path, "unpaired.jsonl", unpaired), tok, max_len=64)
  assert single.label_B.tolist() == [True, False, True, False]
  for i in range(2):
    for j, (ids, mask, length) in enumerate(
      [(paired.chosen_BT, paired.chosen_mask_BT, paired.chosen_lengths_B),
       (paired.rejected_BT, paired.rejected_mask_BT, paired.rejected_lengths_B)]
    ):  # fmt: skip
      row = 2 * i + j
      n = length[i]
      assert single.lengths_B[row] == n and single.prompt_lengths_B[row] == paired.prompt_lengths_B[i]
      np.testing.assert_array_equal(single.tokens_BT[row, :n], ids[i, :n])
      np.testing.assert_array_equal(single.mask_BT[row, :n], mask[i, :n])


def test_formatting_mask_covers_exactly_headers_and_eot(tmp_path, tok):
  path = _write(tmp_path, "chat.jsonl", [{"prompt": PROMPT, "chosen": FOLLOW_UP, "rejected": REJECTED}])
  masked = data.load(path, tok, max_len=64)
  full = data.load(path, tok, max_len=64, mask_formatting=False)
  fmt = chat.ChatFormat.from_tokenizer(tok)
  rendered = chat.render(fmt, PROMPT + FOLLOW_UP)
  n = len(rendered.ids_T)
  dropped = full.chosen_mask_BT[0, :n] & ~masked.chosen_mask_BT[0, :n]
  np.testing.assert_array_equal(dropped, full.chosen_mask_BT[0, :n] & rendered.format_mask_T)
  kept = rendered.ids_T[masked.chosen_mask_BT[0, :n]].tolist()
  assert kept == tok.encode("Paris.") + tok.encode("Sure?") + tok.encode("Yes.")  # content only
  eot = tok.encoding.encode_single_token("<|eot_id|>")
  assert rendered.ids_T[dropped].tolist().count(eot) == 3 and eot not in kept


@pytest.mark.parametrize(
  "lines, message",
  [
    (['{"prompt": [{"role": "user", "content": "a"}], "chosen": [{"role": "robot", "content": "b"}], '
      '"rejected": [{"role": "assistant", "content": "c"}]}'], r"x.jsonl:1: chosen\[0\]: unknown role 'robot'"),
    (['{"prompt": [{"role": "user", "content": ""}], "chosen": [{"role": "assistant", "content": "b"}], '
      '"rejected": [{"role": "assistant", "content": "c"}]}'], r"x.jsonl:1: prompt\[0\]: content must be a non-empty"),
    (['{"chosen": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}], '
      '"rejected": [{"role": "user", "content": "z"}, {"role": "assistant", "content": "c"}]}'],
     r"x.jsonl:1: chosen and rejected share no leading message"),
    (['{"prompt": "a", "chosen": "b", "rejected": "c"}',
      '{"prompt": [{"role": "user", "content": "a"}], "chosen": [{"role": "assistant", "content": "b"}], '
      '"rejected": [{"role": "assistant", "content": "c"}]}'],
     r"x.jsonl:2: a conversational paired record in a file of standard paired records"),
    (['{"prompt": "a", "chosen": "b", "rejected": "c"}', '{"prompt": "a", "completion": "b", "label": true}'],
     r"x.jsonl:2: a standard unpaired record in a file of standard paired records"),
    (['{"prompt": "a", "completion": "b", "label": 1}'], r"x.jsonl:1: field 'label' must be true or false"),
    (['{"prompt": "a", "chosen": "b", "rejected": "c", "score": 3}'], r"x.jsonl:1: unknown fields \['score'\]"),
    (['{"prompt": [{"role": "user", "content": "a"}], "chosen": [{"role": "user", "content": "b"}], '
      '"rejected": [{"role": "assistant", "content": "c"}]}'], r"x.jsonl:1: chosen must start with an assistant"),
    (['{"prompt": "a", "chosen": [{"role": "assistant", "content": "b"}], "rejected": "c"}'],
     r"x.jsonl:1: fields must be all strings \(standard\) or all message lists"),
  ],
)  # fmt: skip
def test_malformed_records_name_their_line(tmp_path, lines, message):
  path = tmp_path / "x.jsonl"
  path.write_text("\n".join(lines) + "\n")
  with pytest.raises(ValueError, match=message):
    data.read_jsonl(path)


def test_conversational_records_need_a_chat_tokenizer(tmp_path):
  path = _write(tmp_path, "c.jsonl", [{"prompt": PROMPT, "chosen": CHOSEN, "rejected": REJECTED}])
  with pytest.raises(ValueError, match="lacks the chat format's special tokens"):
    data.load(path, tokenizer.from_name("cl100k_base"), max_len=64)
  with pytest.raises(ValueError, match="an unpaired record; read unpaired files with tokenize_unpaired"):
    data.tokenize([{"prompt": "a", "completion": "b", "label": True}], tokenizer.from_name("cl100k_base"), max_len=8)


# ---- listwise files ----

COMPLETIONS = [CHOSEN, REJECTED, [{"role": "assistant", "content": "Marseille."}]]


@pytest.mark.parametrize("style", ["standard", "conversational"])
def test_listwise_rows_equal_the_paired_rows(tmp_path, tok, style):
  if style == "standard":
    lists = [
      {"prompt": "2+2=", "completions": ["4", "five", "22"]},
      {"prompt": "Say hi to everyone, please.", "completions": ["Hello", "Go", "."]},
    ]
  else:
    lists = [
      {"prompt": PROMPT, "completions": COMPLETIONS},
      {"prompt": PROMPT, "completions": [FOLLOW_UP, *COMPLETIONS[1:]]},
    ]
  pairs = [{"prompt": r["prompt"], "chosen": r["completions"][0], "rejected": r["completions"][2]} for r in lists]
  batch = data.load_listwise(_write(tmp_path, "lists.jsonl", lists), tok, max_len=64)
  paired = data.load(_write(tmp_path, "pairs.jsonl", pairs), tok, max_len=64)
  b, y, t = batch.tokens_BYT.shape
  assert (b, y) == (2, 3) and batch.mask_BYT.shape == (b, y, t) and batch.lengths_BY.shape == (b, y)
  assert batch.scores_BY.tolist() == [[2.0, 1.0, 0.0]] * 2  # ranked best first
  np.testing.assert_array_equal(batch.prompt_lengths_B, paired.prompt_lengths_B)
  # Every completion's first kept token follows its own prompt.
  np.testing.assert_array_equal(batch.mask_BYT.argmax(axis=2), np.repeat(batch.prompt_lengths_B[:, None], 3, axis=1))
  for i in range(2):
    for j, (ids, mask, length) in (
      (0, (paired.chosen_BT, paired.chosen_mask_BT, paired.chosen_lengths_B)),
      (2, (paired.rejected_BT, paired.rejected_mask_BT, paired.rejected_lengths_B)),
    ):
      n = length[i]
      assert batch.lengths_BY[i, j] == n
      np.testing.assert_array_equal(batch.tokens_BYT[i, j, :n], ids[i, :n])
      np.testing.assert_array_equal(batch.mask_BYT[i, j, :n], mask[i, :n])
      assert not batch.mask_BYT[i, j, n:].any() and (batch.tokens_BYT[i, j, n:] == tok.pad_id).all()


def test_listwise_scores_are_read_as_given(tmp_path, tok):
  lists = [
    {"prompt": "a", "completions": ["x", "y", "z"], "scores": [0.5, 2, 0.5]},
    {"prompt": "b", "completions": ["x", "y", "z"], "scores": [-1, -1, -1]},
  ]
  batch = data.load_listwise(_write(tmp_path, "scored.jsonl", lists), tok, max_len=16)
  assert batch.scores_BY.dtype == np.float32 and batch.scores_BY.tolist() == [[0.5, 2.0, 0.5], [-1.0, -1.0, -1.0]]
  # The same records built by hand (no "_where") read alike.
  again = data.tokenize_listwise(lists, tok, max_len=16)
  _assert_same(batch, again)


def test_listwise_from_token_arrays_rows():
  batch = data.listwise_from_token_arrays(np.array([[1, 5, 2]]), np.array([[[4, 3], [6, 3], [7, 3]]]))
  assert batch.tokens_BYT.tolist() == [[[1, 5, 2, 4, 3], [1, 5, 2, 6, 3], [1, 5, 2, 7, 3]]]
  assert batch.mask_BYT[0, 0].tolist() == [False, False, False, True, True]
  assert batch.lengths_BY.tolist() == [[5, 5, 5]] and batch.prompt_lengths_B.tolist() == [3]
  assert batch.scores_BY.tolist() == [[2.0, 1.0, 0.0]]


@pytest.mark.parametrize(
  "lines, message",
  [
    (['{"prompt": "a", "completions": ["b"]}'], r"x.jsonl:1: field 'completions' must be a list of at least 2"),
    (['{"prompt": "a", "completions": "b"}'], r"x.jsonl:1: field 'completions' must be a list of at least 2"),
    (['{"prompt": "a", "completions": ["b", "c"], "scores": [1]}'],
     r"x.jsonl:1: field 'scores' must be a list of 2 numbers \(one per completion\), got 1 scores"),
    (['{"prompt": "a", "completions": ["b", "c"], "scores": [1, NaN]}'],
     r"x.jsonl:1: field 'scores' must hold finite numbers, got nan at index 1"),
    (['{"prompt": "a", "completions": ["b", "c"], "scores": [true, 0]}'],
     r"x.jsonl:1: field 'scores' must hold finite numbers, got True at index 0"),
    (['{"prompt": "a", "completions": ["b", "c"], "margin": 1}'], r"x.jsonl:1: unknown fields \['margin'\]"),
    (['{"prompt": "a", "completions": ["b", [{"role": "assistant", "content": "c"}]]}'],
     r"x.jsonl:1: a standard \(text\) prompt needs text completions, got list at completions\[1\]"),
    (['{"prompt": [{"role": "user", "content": "a"}], "completions": [[{"role": "assistant", "content": "b"}], '
      '[{"role": "user", "content": "c"}]]}'], r"x.jsonl:1: completions\[1\] must start with an assistant message"),
    (['{"prompt": "a", "completions": ["b", "c"]}', '{"prompt": "a", "chosen": "b", "rejected": "c"}'],
     r"x.jsonl:2: a standard paired record in a file of standard listwise records"),
  ],
)  # fmt: skip
def test_malformed_listwise_records_name_their_line(tmp_path, lines, message):
  path = tmp_path / "x.jsonl"
  path.write_text("\n".join(lines) + "\n")
  with pytest.raises(ValueError, match=message):
    data.read_jsonl(path)


def test_listwise_batches_refuse_what_they_cannot_hold(tmp_path, tok):
  path = _write(
    tmp_path, "y.jsonl", [{"prompt": "a", "completions": ["b", "c"]}, {"prompt": "a", "completions": ["b", "c", "d"]}]
  )
  with pytest.raises(ValueError, match=r"y.jsonl:2: 3 completions, but .*y.jsonl:1 has 2"):
    data.load_listwise(path, tok, max_len=16)
  long = _write(tmp_path, "long.jsonl", [{"prompt": "a", "completions": ["b", "c " * 40]}])
  with pytest.raises(ValueError, match=r"long.jsonl:1: prompt \+ completions\[1\] is \d+ tokens, over max_len=16"):
    data.load_listwise(long, tok, max_len=16)
  lists = _write(tmp_path, "lists.jsonl", [{"prompt": "a", "completions": ["b", "c"]}])
  with pytest.raises(ValueError, match=r"lists.jsonl:1: a listwise record; read listwise files with tokenize_listwise"):
    data.load(lists, tok, max_len=16)
  with pytest.raises(ValueError, match=r"a listwise record; read listwise files with tokenize_listwise"):
    data.load_unpaired(lists, tok, max_len=16)
  with pytest.raises(ValueError, match=r"records\[0\]: a paired record; read those files with tokenize"):
    data.tokenize_listwise([{"prompt": "a", "chosen": "b", "rejected": "c"}], tok, max_len=16)
