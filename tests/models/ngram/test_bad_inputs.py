"""Bad input never passes silently (issue 31): the n-gram tables' public functions raise an
error naming the argument, the expectation and the value, before any jitted work."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import checkify

from paperjax.models.ngram import bigram
from paperjax.ops import checks

V = 16
KEY = jax.random.key(0)


@functools.cache
def _table(order: int = 1) -> bigram.NgramTable:
  """A uniform table over V = 16 (no counting: nothing to compile)."""
  return bigram.NgramTable(jnp.full((V**order, V), 1.0 / V, jnp.float32), order)


def _hand_table(first: float) -> bigram.NgramTable:
  """The uniform table with probs_CV[0, 0] set to `first` (row 0 no longer a distribution)."""
  return bigram.NgramTable(_table().probs_CV.at[0, 0].set(first), 1)


def _generate(prompt_BO=((1,),), **kwargs):
  return bigram.generate(KEY, _table(), prompt_BO, **{"max_new_tokens": 2, **kwargs})


OK_TOKENS = np.array([[0, 1, 2, 3]])
CASES = [
  # The user's cases: an id past V was read as V - 1, a float id truncated, a negative id wrapped.
  pytest.param(
    lambda: _generate([[99]]), ValueError, r"prompt_BO: expected ids in \[0, 16\), got \[99\]", id="prompt-99"
  ),
  pytest.param(lambda: _generate([[3.7]]), TypeError, r"prompt_BO: expected integers .*got float", id="prompt-3.7"),
  pytest.param(
    lambda: bigram.next_token_probs(_table(), jnp.array([[-1]])),
    ValueError,
    r"context_BO: expected ids in \[0, 16\), got \[-1\]",
    id="context-negative",
  ),
  pytest.param(
    lambda: _generate(np.array([[1, 99, 2]])),
    ValueError,
    r"prompt_BO: .* got \[99\] at index \[\(0, 1\)\]",
    id="prompt-early-id",
  ),
  pytest.param(
    lambda: bigram.next_token_probs(_table(), jnp.array([0.5])),
    TypeError,
    "context_BO: expected integer",
    id="context-float-1d",
  ),
  pytest.param(
    lambda: bigram.next_token_probs(_table(), np.array([3, 4])),
    ValueError,
    r"context_BO: expected \[B, T\], got int.* of shape \(2,\)",
    id="context-rank",
  ),
  pytest.param(
    lambda: bigram.next_token_probs(np.ones((V, V)), jnp.array([[1]])),
    TypeError,
    "table: expected an NgramTable",
    id="table-array",
  ),
  pytest.param(
    lambda: _generate(np.zeros((2, 1), np.int32)[:, :0]),
    ValueError,
    "prompt_BO: expected shape \\[B, O\\] with O >= order=1",
    id="prompt-empty",
  ),
  pytest.param(lambda: _generate("ab"), TypeError, "prompt_BO: expected an array", id="prompt-str"),
  pytest.param(
    lambda: _generate(max_new_tokens=0), ValueError, "max_new_tokens: expected an int >= 1, got 0", id="new-0"
  ),
  pytest.param(
    lambda: _generate(max_new_tokens=-3), ValueError, "max_new_tokens: expected an int >= 1, got -3", id="new-negative"
  ),
  pytest.param(lambda: _generate(max_new_tokens=2.0), ValueError, "max_new_tokens: expected an int", id="new-float"),
  pytest.param(lambda: _generate(max_new_tokens=True), ValueError, "max_new_tokens: expected an int", id="new-bool"),
  pytest.param(
    lambda: _generate(temperature=float("nan")),
    ValueError,
    "temperature: expected a finite number >= 0, got nan",
    id="temperature-nan",
  ),
  pytest.param(
    lambda: _generate(temperature=float("inf")),
    ValueError,
    "temperature: expected a finite number",
    id="temperature-inf",
  ),
  pytest.param(
    lambda: _generate(temperature=-0.5),
    ValueError,
    "temperature: expected a finite number >= 0, got -0.5",
    id="temperature-negative",
  ),
  pytest.param(
    lambda: _generate(temperature="hot"), TypeError, "temperature: expected a real number", id="temperature-str"
  ),
  pytest.param(lambda: _generate(eos_id=V), ValueError, r"eos_id: expected an int id in \[0, 16\)", id="eos-16"),
  pytest.param(lambda: _generate(eos_id=2.5), ValueError, "eos_id: expected an int id", id="eos-float"),
  pytest.param(
    lambda: bigram.count(OK_TOKENS, vocab_size="16"),
    ValueError,
    "vocab_size: expected an int >= 2, got '16'",
    id="vocab-str",
  ),
  pytest.param(
    lambda: bigram.count(OK_TOKENS, vocab_size=1), ValueError, "vocab_size: expected an int >= 2", id="vocab-1"
  ),
  pytest.param(
    lambda: bigram.count(OK_TOKENS, vocab_size=V, order=True),
    ValueError,
    "order: expected an int >= 0",
    id="order-bool",
  ),
  pytest.param(
    lambda: bigram.count(OK_TOKENS, vocab_size=V, order=1.0),
    ValueError,
    "order: expected an int >= 0",
    id="order-float",
  ),
  pytest.param(
    lambda: bigram.count(np.array([[0, 16]]), vocab_size=V),
    ValueError,
    r"tokens_BT: id 16 outside the vocabulary \[0, 16\)",
    id="count-16",
  ),
  pytest.param(
    lambda: bigram.count(np.array([[-1, 3]]), vocab_size=V), ValueError, "tokens_BT: id -1 outside", id="count-negative"
  ),
  pytest.param(
    lambda: bigram.count(np.array([[1.5, 3]]), vocab_size=V),
    TypeError,
    "tokens_BT: expected integer",
    id="count-float",
  ),
  pytest.param(
    lambda: bigram.count(np.zeros((1, 2, 3), int), vocab_size=V),
    ValueError,
    "tokens_BT: expected shape",
    id="count-rank",
  ),
  pytest.param(
    lambda: bigram.count(OK_TOKENS, vocab_size=V, mask_BT=np.ones((1, 4), int)),
    ValueError,
    "mask_BT: expected bool",
    id="mask-int",
  ),
  pytest.param(
    lambda: bigram.probabilities(np.full((V, V), np.nan)),
    ValueError,
    "counts_CV: expected finite values",
    id="counts-nan",
  ),
  pytest.param(
    lambda: bigram.probabilities(-np.ones((V, V))),
    ValueError,
    r"counts_CV: expected counts in \[0, inf\]",
    id="counts-negative",
  ),
  pytest.param(
    lambda: bigram.probabilities(np.ones(V)), ValueError, r"counts_CV: expected \[V\^k, V\]", id="counts-1d"
  ),
  pytest.param(
    lambda: bigram.probabilities([[1, 2], [3, 4]]), TypeError, "counts_CV: expected an array", id="counts-list"
  ),
  pytest.param(
    lambda: bigram.probabilities(np.ones((V, V)), alpha=float("nan")),
    ValueError,
    "alpha: expected a finite number >= 0, got nan",
    id="alpha-nan",
  ),
  pytest.param(
    lambda: bigram.probabilities(np.ones((V, V)), alpha=float("inf")),
    ValueError,
    "alpha: expected a finite",
    id="alpha-inf",
  ),
  pytest.param(
    lambda: bigram.probabilities(np.ones((V, V)), alpha="1"),
    TypeError,
    "alpha: expected a real number, got str",
    id="alpha-str",
  ),
  pytest.param(
    lambda: bigram.perplexity(_table(), OK_TOKENS, start=0),
    ValueError,
    "start: expected an int >= order=1, got 0",
    id="start-below-order",
  ),
  pytest.param(
    lambda: bigram.perplexity(_table(), OK_TOKENS, start=1.5), ValueError, "start: expected an int", id="start-float"
  ),
  pytest.param(
    lambda: bigram.log_probs(_table(), np.array([[1, 99]])), ValueError, "tokens_BT: id 99 outside", id="log-probs-99"
  ),
  # Hand-built tables: each row must be a distribution
  pytest.param(
    lambda: bigram.perplexity(_hand_table(-0.1), OK_TOKENS),
    ValueError,
    r"table\.probs_CV: expected probabilities >= 0, got \[-0\.1",
    id="table-negative",
  ),
  pytest.param(
    lambda: bigram.log_probs(_hand_table(0.5), OK_TOKENS),
    ValueError,
    r"table\.probs_CV: expected rows summing to 1 \(within 1e-4\), got \[1\.4",
    id="table-unnormalised",
  ),
  pytest.param(
    lambda: bigram.next_token_probs(_hand_table(np.nan), jnp.array([[0]])),
    ValueError,
    r"table\.probs_CV: expected finite values, got \[nan\]",
    id="table-nan",
  ),
  pytest.param(
    lambda: bigram.perplexity({"probs_CV": _table().probs_CV, "order": 1}, OK_TOKENS),
    TypeError,
    r"table: expected an NgramTable",
    id="perplexity-dict",
  ),
  pytest.param(
    lambda: bigram.next_token_probs(bigram.NgramTable(jnp.full((4, 16), 1 / 16), 1), jnp.array([[0]])),
    ValueError,
    r"table\.probs_CV: expected \[V\^order, V\] = \[16, 16\] for order=1, got \(4, 16\)",
    id="table-rows",
  ),
]


@pytest.mark.parametrize("call, error, match", CASES)
def test_bad_input(call, error, match):
  with pytest.raises(error, match=match):
    call()


def test_checked_next_token_probs_raises_inside_jit_for_an_id_out_of_range():
  """Under a plain jit the ids are tracers (the lookup would clamp); under checks.checked the
  same check compiles in and raises naming the argument."""
  probs = checks.checked(bigram.next_token_probs)
  np.testing.assert_allclose(probs(_table(), jnp.array([[3]])), np.full((1, V), 1 / V))
  with pytest.raises(checkify.JaxRuntimeError, match=r"context_BO: expected ids in \[0, 16\), got 99"):
    probs(_table(), jnp.array([[99]]))


def test_bfloat16_temperature_and_table_are_accepted():
  tokens, _ = bigram.generate(KEY, _table(), [[1]], max_new_tokens=2, temperature=jnp.bfloat16(0.5))
  assert tokens.shape == (1, 2)
  bf16 = bigram.NgramTable(_table().probs_CV.astype(jnp.bfloat16), 1)
  assert bigram.next_token_probs(bf16, jnp.array([[0]])).shape == (1, 16)


def test_checked_log_probs_refuses_an_unnormalised_table():
  fn = checks.checked(lambda table, tokens: bigram.next_token_probs(table, tokens))
  with pytest.raises(checkify.JaxRuntimeError, match="table.probs_CV: expected rows summing to 1"):
    fn(_hand_table(0.5), jnp.array([[0]]))
