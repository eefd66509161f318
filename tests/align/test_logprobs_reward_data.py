"""Sequence log-probs (the off-by-one), reward loss, preference data, rejection sampling."""

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from paperjax.align import data, logprobs, rejection_sampling, reward
from paperjax.models.data import tokenizer
from paperjax.models.serving import generate
from paperjax.models.transformer import llama

CFG = llama.PRESETS["tiny"]


def test_logits_at_t_score_token_t_plus_1():
  # Row distributions chosen by hand: position t's logits put probability p_t on token t + 1.
  probs = np.full((4, 4), 0.1)
  for t in range(4):
    probs[t, (t + 1) % 4] = 0.7
  logits = jnp.log(jnp.asarray(probs, jnp.float32))[None]
  tokens = jnp.array([[0, 1, 3, 3]])  # token 1 is predicted (0.7), 3 at t=2 is not (0.1), 3 at t=3 is (0.7)
  lp = logprobs.token_logprobs(logits, tokens)
  np.testing.assert_allclose(lp[0], [0, math.log(0.7), math.log(0.1), math.log(0.7)], rtol=1e-6)
  mask = logprobs.completion_mask(tokens, jnp.array([2]), jnp.array([4]))
  np.testing.assert_array_equal(mask, [[False, False, True, True]])
  seq = logprobs.sequence_logprobs(logits, tokens, mask)
  assert float(seq.sum_B[0]) == pytest.approx(math.log(0.1) + math.log(0.7), rel=1e-6)
  assert float(seq.mean_B[0]) == pytest.approx((math.log(0.1) + math.log(0.7)) / 2, rel=1e-6)


def test_completion_mask_excludes_padding_and_format_tokens():
  tokens = jnp.array([[5, 6, 9, 7, 9, 0, 0]])
  mask = logprobs.completion_mask(tokens, jnp.array([2]), jnp.array([5]), exclude_ids=(9,))
  np.testing.assert_array_equal(mask, [[False, False, False, True, False, False, False]])


def test_mask_on_position_zero_is_an_error():
  with pytest.raises(ValueError, match="position 0"):
    logprobs.sequence_logprobs(jnp.zeros((1, 3, 4)), jnp.zeros((1, 3), jnp.int32), jnp.ones((1, 3), bool))


def test_per_token_logprobs_take_one_log_softmax(monkeypatch):
  """per_token=True reuses the one [B, T - 1, V] log_softmax for the token log-probs and WPO's
  log sum_v p_v^2 (the V-wide pass is the costly one), with the same values as two passes."""
  rng = np.random.default_rng(0)
  logits = jnp.asarray(rng.normal(0, 2, (2, 5, 7)), jnp.float32)
  tokens = jnp.asarray(rng.integers(0, 7, (2, 5)))
  mask = jnp.asarray(np.arange(5) >= np.array([[1], [2]]))
  calls = []
  log_softmax = jax.nn.log_softmax

  def counted(*args, **kw):
    calls.append(args[0].shape)
    return log_softmax(*args, **kw)

  monkeypatch.setattr(jax.nn, "log_softmax", counted)
  got = logprobs.sequence_logprobs(logits, tokens, mask, per_token=True)
  assert calls == [(2, 4, 7)]
  monkeypatch.undo()
  logp = np.asarray(jax.nn.log_softmax(logits[:, :-1], axis=-1), np.float64)
  token = np.take_along_axis(logp, np.asarray(tokens)[:, 1:, None], axis=-1)[..., 0]
  m = np.asarray(mask, np.float64)[:, 1:]
  np.testing.assert_allclose(got.token_BT[:, 1:], token * m, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(got.sum_B, (token * m).sum(1), rtol=1e-5)
  sq = np.log(np.exp(2 * logp).sum(-1))
  np.testing.assert_allclose(got.log_sum_sq_BT[:, 1:], sq * m, rtol=1e-5, atol=1e-6)
  assert not np.any(np.asarray(got.token_BT[:, 0])) and not np.any(np.asarray(got.log_sum_sq_BT[:, 0]))


@pytest.mark.parametrize(
  "s, message",
  [
    (logprobs.SequenceLogProbs(np.float32([-1.0, 0.5]), np.float32([1, 1])), r"x.sum_B: expected log-probs in"),
    (logprobs.SequenceLogProbs(np.float32([-1.0, math.nan]), np.float32([1, 1])), r"x.sum_B: expected finite"),
    (
      logprobs.SequenceLogProbs(np.float32([-1.0, -1.0]), np.float32([1, -1])),
      r"x.count_B: expected token counts",
    ),
    (
      logprobs.SequenceLogProbs(np.float32([-1.0, -1.0]), np.float32([1, math.nan])),
      r"x.count_B: expected finite",
    ),
    (
      logprobs.SequenceLogProbs(np.float32([-1.0, -1.0]), np.float32([1, math.inf])),
      r"x.count_B: expected finite",
    ),
  ],
)
def test_check_sequence(s, message):
  """The one check of summed log-probs and counts that dpo, train, listwise and dro share."""
  with pytest.raises(ValueError, match=message):
    logprobs.check_sequence("x", s)
  logprobs.check_sequence("x", logprobs.SequenceLogProbs(np.float32([-1.0, 0.0]), np.float32([0, 3])))


def test_model_logprobs_match_a_numpy_loop(key):
  params = llama.init(key, CFG)
  tokens = jax.random.randint(key, (1, 7), 0, CFG.vocab_size)
  mask = logprobs.completion_mask(tokens, jnp.array([3]), jnp.array([7]))
  got = logprobs.model_logprobs(params, CFG, tokens, mask)
  logits = np.asarray(llama.forward(params, tokens, CFG)[0][0], np.float64)
  expected = 0.0
  for t in range(3, 7):  # token t is scored by the logits of position t - 1
    row = logits[t - 1]
    expected += row[int(tokens[0, t])] - (row.max() + np.log(np.exp(row - row.max()).sum()))
  assert float(got.sum_B[0]) == pytest.approx(expected, rel=1e-4)


def test_bradley_terry_with_margin_and_centering():
  rc, rr, m = jnp.array([2.0, 0.5, -1.0]), jnp.array([1.0, 1.0, -3.0]), jnp.array([1.0, 0.0, 1 / 3])
  loss, metrics = reward.bradley_terry_loss(rc, rr, margin_B=m, centering=0.01)
  expected = np.mean(
    [-math.log(1 / (1 + math.exp(-(c - r - mm)))) for c, r, mm in zip(rc.tolist(), rr.tolist(), m.tolist())]
  )
  expected += 0.01 * np.mean((np.asarray(rc) + np.asarray(rr)) ** 2)
  assert float(loss) == pytest.approx(expected, rel=1e-6)
  assert float(metrics["accuracy"]) == pytest.approx(2 / 3)
  assert reward.ranked_pairs(3) == [(0, 1), (0, 2), (1, 2)]
  with pytest.raises(ValueError, match="margin_B"):
    reward.bradley_terry_loss(rc, rr, margin_B=m[:2])


def test_reward_reads_the_last_real_token(key):
  params = reward.init(key, CFG)
  params["head"]["w"] = jax.random.normal(key, (CFG.dim,))
  tokens = jax.random.randint(key, (2, 6), 0, CFG.vocab_size)
  r = reward.rewards(params, tokens, jnp.array([4, 6]), CFG)
  padded_other = tokens.at[0, 4:].set(0)  # what follows the last real token must not matter
  np.testing.assert_allclose(reward.rewards(params, padded_other, jnp.array([4, 6]), CFG), r, rtol=1e-5)
  hidden, _ = llama.forward_hidden(params["model"], tokens[:1, :4], CFG)
  assert float(r[0]) == pytest.approx(float(hidden[0, -1] @ params["head"]["w"]), rel=1e-4)


@pytest.fixture(scope="module")
def tok():
  import warnings

  with warnings.catch_warnings():
    warnings.simplefilter("ignore", RuntimeWarning)
    return tokenizer.from_name("cl100k_base")


def test_preference_data_round_trip(tmp_path, tok):
  path = tmp_path / "prefs.jsonl"
  rows = [
    {"prompt": "2+2=", "chosen": "4", "rejected": "five", "margin": 0.5},
    {"prompt": "Capital of France?", "chosen": " Paris.", "rejected": " Lyon", "rating": "better"},
  ]
  path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
  batch = data.load(path, tok, max_len=32)
  np.testing.assert_allclose(batch.margin_B, [0.5, 2 / 3])
  for i, r in enumerate(rows):
    prompt = tok.encode(r["prompt"], bos=True)
    chosen = prompt + tok.encode(r["chosen"], eos=True)
    assert batch.chosen_BT[i, : batch.chosen_lengths_B[i]].tolist() == chosen
    assert batch.chosen_BT[i][batch.chosen_mask_BT[i]].tolist() == tok.encode(r["chosen"], eos=True)
    assert batch.rejected_BT[i][batch.rejected_mask_BT[i]].tolist() == tok.encode(r["rejected"], eos=True)
    assert batch.prompt_lengths_B[i] == len(prompt)


@pytest.mark.parametrize(
  "line, message",
  [
    ("{not json", r"prefs.jsonl:2: not valid JSON"),
    ('{"prompt": "a", "chosen": "b"}', r"prefs.jsonl:2: missing fields \['rejected'\]"),
    ('{"prompt": "a", "chosen": "b", "rejected": "c", "rating": "meh"}', r"prefs.jsonl:2: field 'rating' must be"),
    ('["a"]', r"prefs.jsonl:2: expected a JSON object"),
  ],
)
def test_malformed_lines_are_reported_with_their_number(tmp_path, tok, line, message):
  path = tmp_path / "prefs.jsonl"
  path.write_text('{"prompt": "a", "chosen": "b", "rejected": "c"}\n' + line + "\n")
  with pytest.raises(ValueError, match=message):
    data.load(path, tok, max_len=32)


def test_too_long_rows_are_errors_not_drops(tmp_path, tok):
  path = tmp_path / "prefs.jsonl"
  path.write_text(json.dumps({"prompt": "word " * 40, "chosen": "x", "rejected": "y"}) + "\n")
  with pytest.raises(ValueError, match=r"prefs.jsonl:1: prompt \+ chosen is \d+ tokens, over max_len=16"):
    data.load(path, tok, max_len=16)


def test_rejection_sampling_keeps_the_argmax_and_shares_the_prefix(key):
  params = llama.init(key, CFG)
  prompts, lengths = jnp.array([[3, 4, 5], [6, 7, 0]]), jnp.array([3, 2])

  def reward_fn(p, pl, completion, cl):  # a checkable reward: sum of completion ids
    return jnp.sum(jnp.where(jnp.arange(completion.shape[1]) < cl[:, None], completion, 0), axis=1).astype(jnp.float32)

  out = rejection_sampling.best_of_k(
    key, params, CFG, prompts, lengths, reward_fn, k=4, max_new_tokens=5, temperature=1.0
  )
  assert out.samples_BYN.shape == (2, 4, 5)
  # No stop ids, so every sample runs all 5 tokens and its reward is its id sum, row by row.
  np.testing.assert_array_equal(out.lengths_BY, 5)
  np.testing.assert_array_equal(out.rewards_BY, np.asarray(out.samples_BYN).sum(axis=-1))
  np.testing.assert_array_equal(out.best_rewards_B, out.rewards_BY.max(axis=1))
  np.testing.assert_array_equal(out.best_BN, out.samples_BYN[jnp.arange(2), out.rewards_BY.argmax(axis=1)])
  # Shared prefill gives exactly what generating from the K-times repeated prompts gives.
  tokens, _ = generate.generate(
    key, params, CFG, jnp.repeat(prompts, 4, 0), jnp.repeat(lengths, 4), max_new_tokens=5, temperature=1.0
  )
  np.testing.assert_array_equal(out.samples_BYN.reshape(8, 5), tokens)
  full, full_len = rejection_sampling.concat(prompts, lengths, out.best_BN, out.best_lengths_B)
  assert full[1, :7].tolist() == [6, 7, *out.best_BN[1].tolist()]
  np.testing.assert_array_equal(full_len, lengths + 5)


def test_rejection_samples_share_the_prompt_pages():
  # Prompts of 20 and 35 tokens in pages of 16, 4 samples of 10 new tokens each.
  pages = rejection_sampling.shared_pages([20, 35], 4, 10, 16)
  tables = pages.sample_tables_BP.reshape(2, 4, -1)
  for b, (full, needed) in enumerate(((1, 2), (2, 3))):  # full prompt pages; pages for prompt + 10
    assert (tables[b, :, :full] == pages.prompt_tables_BP[b, :full]).all()  # one copy, read by all 4
    tails = tables[b, :, full:needed].ravel().tolist()
    assert len(set(tails)) == len(tails)  # the rest: each sample's own pages
  # The partly filled last prompt page is copied for 3 samples; the 4th writes the original.
  assert len(pages.copy_src_N) == 6 and set(pages.copy_src_N) == {
    pages.prompt_tables_BP[0, 1],
    pages.prompt_tables_BP[1, 2],
  }
  unshared = 4 * (-(-30 // 16) + -(-45 // 16))
  used = set(pages.sample_tables_BP[:4, :2].ravel()) | set(pages.sample_tables_BP[4:, :3].ravel())
  assert pages.num_pages == len(used) == (2 + 3) + 4 * (1 + 1) - 2 < unshared  # every page allocated is used
  assert not set(tables[0, :, :2].ravel()) & set(tables[1, :, :3].ravel())  # prompts share nothing
