"""bench/serving's claims: the rules on crafted values, and the counts they are decided on."""

import pytest

from paperjax.bench import serving as bench
from paperjax.bench.harness import Context, Environment
from paperjax.models.serving import engine

WASTE, SHARING, THROUGHPUT = bench.CLAIMS


@pytest.mark.parametrize(
  "waste, scale, expected",
  [
    (0.03, "small", ("holds", None)),
    (0.0578, "small", ("fails", None)),  # README's small row: ~100-token contexts in pages of 16
    (0.03, "ci", ("undecided", "budget")),
  ],
)
def test_paged_waste_rule(waste, scale, expected):
  values = {"paged_waste": [waste], "mean_context": [100.0], "block_size": [16.0]}
  assert WASTE.rule.decide(values, scale=scale, gpu=False) == expected


@pytest.mark.parametrize(
  "savings, scale, expected",
  [
    ([0.46, 0.5, 0.44], "small", ("holds", None)),
    ([0.0, 0.02, 0.05], "small", ("fails", None)),  # forking that copied the prompt's pages would save nothing
    ([0.3, 0.01, 0.4], "small", ("undecided", "margin")),  # some traces save enough, one does not
    ([0.46, 0.5, 0.44], "ci", ("undecided", "budget")),
  ],
)
def test_sharing_rule(savings, scale, expected):
  values = {"min_saving_over_k": savings, "max_saving_over_k": [0.6] * 3, "prompt_share": [0.7] * 3}
  assert SHARING.rule.decide(values, scale=scale, gpu=False) == expected


@pytest.mark.parametrize(
  "speedup, bound, scale, expected",
  [
    (2.5, 3.0, "small", ("holds", None)),
    (1.5, 3.0, "small", ("fails", None)),
    (1.049, 1.654, "small", ("undecided", "margin")),  # README's small row: the trace cannot show 2x
    (2.5, 3.0, "ci", ("undecided", "budget")),
  ],
)
def test_throughput_rule(speedup, bound, scale, expected):
  values = {"speedup": [speedup], "padding_bound": [bound]}
  assert THROUGHPUT.rule.decide(values, scale=scale, gpu=False) == expected


def _request(i, prompt, new):
  return engine.Request(id=i, prompt=(1,) * prompt, max_new_tokens=new)


def test_padding_bound_counts_static_batches():
  requests = [_request(0, 3, 4), _request(1, 1, 2), _request(2, 2, 6), _request(3, 2, 6)]
  bound = bench.padding_bound(requests, batch=2)
  assert bound == {"prefill": (2 * 3 + 2 * 2) / 8, "decode": (2 * 4 + 2 * 6) / 18}
  assert bench.padding_bound(requests, batch=1) == {"prefill": 1.0, "decode": 1.0}  # one row: no padding


def test_sharing_savings_count_shared_prompt_pages():
  full = [_request(0, 32, 16), _request(1, 64, 16)]  # prompts of whole pages of 16: no copy-on-write
  one, four = bench.sharing_savings(full, (1, 4), 16)
  assert one == 0.0  # one sample shares with nobody
  assert four == pytest.approx(1 - (2 + 4 + 4 * (1 + 1)) / (4 * (3 + 5)))  # prompt pages once, not 4 times
  ragged = [_request(0, 20, 16)]  # a partly filled last page: each sample copies it
  assert bench.sharing_savings(ragged, (4,), 16) == [pytest.approx(1 - (1 + 4 * 2) / (4 * 3))]


def test_sharing_part_decides_over_seeded_traces():
  cfg = bench.CONFIGS["ci"]
  ctx = Context("serving", "small", 3, 1, (), Environment("cpu", "cpu", 1, "0", "3", "small"), parts=bench.PARTS)
  assert ctx.wants("sharing")
  requests = bench.trace(cfg, 3, 256)
  records, _ = bench._sharing(ctx, cfg, requests, 256)
  (claim,) = ctx.claims
  assert claim.spec is SHARING and claim.seeds == tuple(range(3, 3 + bench.SHARING_SEEDS))
  assert claim.values["min_saving_over_k"][0] == min(r.value for r in records)  # the run's own trace first
  assert all(lo <= hi for lo, hi in zip(claim.values["min_saving_over_k"], claim.values["max_saving_over_k"]))
  assert claim.verdict == "holds"
