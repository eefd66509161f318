"""bench/maxsim's claims: the rules on crafted values, the FLOP count and the two-stage recall."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from paperjax.bench import maxsim as bench
from paperjax.bench.harness import Context, Environment
from paperjax.ops import maxsim

FLOPS, BINARY = bench.CLAIMS


@pytest.mark.parametrize(
  "ratio, scale, expected",
  [
    (1.4e4, "ci", ("holds", None)),  # the paper's 97T / 7B; a count, decided at every scale
    (4312.0, "small", ("fails", None)),  # 160-token cross-encoder pairs (README's row)
    (9999.0, "full", ("fails", None)),
  ],
)
def test_flops_rule(ratio, scale, expected):
  values = {"flops_ratio_per_query": [ratio], "flops_ratio_per_pair": [2.7e4]}
  assert FLOPS.rule.decide(values, scale=scale, gpu=False) == expected


@pytest.mark.parametrize(
  "missed, scale, expected",
  [
    (4, "small", ("holds", None)),  # 76 of 80 found: exactly 0.95 of float search's, "at least 0.95"
    (0, "full", ("holds", None)),
    (5, "small", ("fails", None)),
    (0, "ci", ("undecided", "budget")),  # at ci the shortlist is the whole (tiny) collection
  ],
)
def test_binary_rerank_rule(missed, scale, expected):
  values = {"recall_lost": [missed / 80], "binary_alone_recall": [0.675], "shortlist": [100.0]}
  assert BINARY.rule.decide(values, scale=scale, gpu=False) == expected


def test_flops_part_decides_on_the_recorded_ratio():
  ctx = Context("maxsim", "small", 0, 1, (), Environment("cpu", "cpu", 1, "0", "3", "small"), parts=bench.PARTS)
  assert ctx.wants("flops")
  records = bench._flops(ctx)
  (claim,) = ctx.claims
  assert claim.spec is FLOPS and claim.verdict == "fails"  # 4312x: our cross-encoder reads 160 tokens, not 512
  assert claim.values["flops_ratio_per_query"] == (records[-1].value,)
  assert claim.values["flops_ratio_per_pair"] == (records[2].value,)


def test_two_stage_misses_between_binary_alone_and_float_search():
  """A shortlist of the whole collection misses nothing; a shortlist of k finds what binary MaxSim
  alone finds (the re-rank only reorders it); shortlists in between miss no more than that."""
  kq, kd = jax.random.split(jax.random.key(0))
  q, d = jax.random.normal(kq, (6, 8, 64)), jax.random.normal(kd, (40, 16, 64))
  k, bits = 5, maxsim.pack_bits(d)
  top_float = np.argsort(-np.asarray(maxsim.maxsim(q, d, normalize=True)), axis=1, kind="stable")[:, :k]
  top_bin = np.argsort(-np.asarray(maxsim.maxsim_binary(maxsim.pack_bits(q), bits, 64)), axis=1, kind="stable")[:, :k]
  binary_misses = top_float.size - sum(len(set(a) & set(b)) for a, b in zip(top_float, top_bin))
  assert binary_misses > 0  # random codes disagree with the floats: the cases below differ
  assert bench.two_stage_misses(q, d, top_float, 40, bits) == 0
  assert bench.two_stage_misses(q, d, top_float, k, bits) == binary_misses
  assert bench.two_stage_misses(q, d, top_float, 20, bits) <= binary_misses
  scaled = d * jnp.linspace(0.1, 10, 40)[:, None, None]  # cosine ignores norms: so must the re-rank
  assert bench.two_stage_misses(q, scaled, top_float, 40, maxsim.pack_bits(scaled)) == 0
