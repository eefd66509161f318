"""Generation loop: greedy equals step-by-step argmax of the full forward; stop rules."""

import base64

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from paperjax.models.data import tokenizer
from paperjax.models.serving import generate
from paperjax.models.transformer import llama

CFG = llama.PRESETS["tiny"]


@pytest.fixture(scope="module")
def params():
  return llama.init(jax.random.key(0), CFG)


PROMPTS = jnp.array([[5, 6, 7, 8, 9], [10, 11, 0, 0, 0], [12, 13, 14, 0, 0]])
LENGTHS = jnp.array([5, 2, 3])


def _greedy_reference(params, prompt, steps):
  seq = list(prompt)
  forward = jax.jit(llama.forward, static_argnums=2)
  for _ in range(steps):
    logits, _ = forward(params, jnp.array([seq]), CFG)
    seq.append(int(jnp.argmax(logits[0, -1])))
  return seq[len(prompt) :]


def test_greedy_matches_full_forward_argmax(params, key):
  tokens, lengths = generate.generate(key, params, CFG, PROMPTS, LENGTHS, max_new_tokens=6)
  np.testing.assert_array_equal(lengths, [6, 6, 6])
  for b in range(3):
    expected = _greedy_reference(params, PROMPTS[b, : LENGTHS[b]].tolist(), 6)
    assert tokens[b].tolist() == expected


def test_stop_tokens_end_each_row_at_its_first_stop(params, key):
  free, _ = generate.generate(key, params, CFG, PROMPTS, LENGTHS, max_new_tokens=6)
  stop = int(free[0, 2])  # row 0 emits it at step 2; other rows maybe later or never
  tokens, lengths = generate.generate(key, params, CFG, PROMPTS, LENGTHS, max_new_tokens=6, stop_ids=(stop,))
  for b in range(3):
    row = free[b].tolist()
    n = row.index(stop) + 1 if stop in row else 6
    assert int(lengths[b]) == n
    assert tokens[b, :n].tolist() == row[:n]
    assert (tokens[b, n:] == stop).all()


def test_all_rows_stopping_ends_the_loop(params, key):
  zero_logits = {**params, "final_norm": jnp.zeros_like(params["final_norm"])}  # argmax is token 0
  _, lengths = generate.generate(key, zero_logits, CFG, PROMPTS, LENGTHS, max_new_tokens=5, stop_ids=(0,))
  np.testing.assert_array_equal(lengths, [1, 1, 1])
  _, lengths = generate.generate(key, zero_logits, CFG, PROMPTS, LENGTHS, max_new_tokens=5, stop_ids=(3,))
  np.testing.assert_array_equal(lengths, [5, 5, 5])


def test_sampling_is_seeded(params):
  run = lambda seed: generate.generate(
    jax.random.key(seed), params, CFG, PROMPTS, LENGTHS, max_new_tokens=8, temperature=1.0, top_k=20, top_p=0.9
  )[0]
  np.testing.assert_array_equal(run(1), run(1))
  assert not np.array_equal(run(1), run(2))


def test_generate_text_round_trip(tmp_path, key):
  tokens = [bytes([b]) for b in range(256)]
  path = tmp_path / "bytes.tiktoken"
  path.write_bytes(b"".join(base64.b64encode(t) + b" %d\n" % i for i, t in enumerate(tokens)))
  tok = tokenizer.from_file(path)  # 256 byte tokens + Llama 3 specials = 512 ids
  cfg = llama.LlamaConfig(vocab_size=512, dim=32, n_layers=1, n_heads=2, n_kv_heads=1, ffn_dim=64, max_seq_len=64)
  params = llama.init(key, cfg)
  texts = generate.generate_text(key, params, cfg, tok, ["ab", "hello"], max_new_tokens=4, stop_ids=())
  batch = tok.encode_batch(["ab", "hello"], bos=True)
  ids, _ = generate.generate(key, params, cfg, batch.ids_BT, batch.lengths_B, max_new_tokens=4)
  assert texts == [tok.decode(row) for row in np.asarray(ids)]


def test_errors(params, key):
  with pytest.raises(ValueError, match="prompt_lengths_B"):
    generate.generate(key, params, CFG, PROMPTS, jnp.array([5, 0, 3]), max_new_tokens=2)
  with pytest.raises(ValueError, match="max_seq_len=256"):
    generate.generate(key, params, CFG, PROMPTS, LENGTHS, max_new_tokens=252)
  with pytest.raises(ValueError, match="top_p"):
    generate.generate(key, params, CFG, PROMPTS, LENGTHS, max_new_tokens=2, temperature=1.0, top_p=1.5)
  with pytest.raises(ValueError, match="stop_ids"):
    generate.generate(key, params, CFG, PROMPTS, LENGTHS, max_new_tokens=2, stop_ids=(999,))
