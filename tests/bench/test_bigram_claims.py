"""bench/bigram's claims: the rules on crafted values, and the table-growth measurement."""

import numpy as np
import pytest

from paperjax.bench import bigram as bench
from paperjax.bench.harness import Context, Environment

BEATS, GROWS = bench.CLAIMS
EXACT = {bench.EXPONENT[1]: [0.0], bench.EXPONENT[2]: [0.0]}


@pytest.mark.parametrize(
  "ratio, scale, expected",
  [(0.14, "small", ("holds", None)), (1.02, "small", ("fails", None)), (0.14, "ci", ("undecided", "budget"))],
)
def test_bigram_beats_unigram_rule(ratio, scale, expected):
  assert BEATS.rule.decide({bench.RATIO: [ratio]}, scale=scale, gpu=False) == expected


def test_table_growth_rule():
  assert GROWS.rule.decide(EXACT, scale="small", gpu=False) == ("holds", None)
  sparse = {**EXACT, bench.EXPONENT[2]: [-1.0]}  # a table that stored only seen contexts would grow slower
  assert GROWS.rule.decide(sparse, scale="small", gpu=False) == ("fails", None)


def test_table_growth_measures_the_tables_the_code_builds(monkeypatch):
  monkeypatch.setattr(bench, "TABLE_VOCABS", {1: (64, 128, 256), 2: (16, 32)})
  ctx = Context("bigram", "small", 0, 1, (), Environment("cpu", "cpu", 1, "0", "3", "small"), parts=bench.PARTS)
  assert ctx.wants("perplexity")
  tokens = np.random.default_rng(0).integers(0, 1000, 5_000)
  records = bench._table_growth(ctx, tokens)
  (claim,) = ctx.claims
  assert claim.spec is GROWS and (claim.verdict, claim.reason) == ("holds", None)
  assert all(abs(v[0]) < 1e-9 for v in claim.values.values())  # dense float32 tables: exactly V^(k+1) x 4 bytes
  assert any(r.metric == "order-1 table bytes at V=256" and r.value == 256**2 * 4 for r in records)


def test_claims_are_declared_for_the_perplexity_part():
  assert len({c.name for c in bench.CLAIMS}) == len(bench.CLAIMS)
  assert all(c.part == "perplexity" and c.part in bench.PARTS for c in bench.CLAIMS)
