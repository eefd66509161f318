"""bench/serving's claims: the rules on crafted values, and the counts they are decided on."""

import dataclasses
import math

import jax
import numpy as np
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


def test_padding_bound_takes_real_output_lengths():
  requests = [_request(0, 2, 9), _request(1, 2, 9), _request(2, 4, 9)]  # a cap of 9; the outputs stop earlier
  bound = bench.padding_bound(requests, batch=2, outputs={0: 1, 1: 5, 2: 3})
  assert bound == {"prefill": (2 * 2 + 1 * 4) / 8, "decode": (2 * 5 + 1 * 3) / 9}
  assert bench.padding_bound(requests, batch=2)["decode"] == 1.0  # by max_new_tokens: no decode padding


def test_ladder_caps_the_batch_sizes_at_the_request_count():
  assert bench.ladder((1, 2, 4, 8, 16, 32), 24) == (1, 2, 4, 8, 16, 24)  # one batch of everything is timed too
  assert bench.ladder((1, 2, 4), 4) == (1, 2, 4)
  assert bench.ladder((1, 4), 6) == (1, 4)  # the ladder stops below the count: nothing added
  assert bench.ladder((8, 16), 3) == (3,)


def test_lognormal_lengths_have_the_stated_median_and_spread():
  rng = np.random.default_rng(0)
  x = bench.lognormal_lengths(rng, 20_000, median=64, sigma=0.8, clip=(1, 10**6))
  assert x.dtype == np.int64 and x.min() >= 1
  assert abs(np.median(x) - 64) < 2
  assert np.std(np.log(x)) == pytest.approx(0.8, rel=0.03)
  assert np.mean(x) == pytest.approx(64 * np.exp(0.8**2 / 2), rel=0.03)  # a lognormal's mean: the tail
  clipped = bench.lognormal_lengths(np.random.default_rng(0), 20_000, median=64, sigma=0.8, clip=(2, 512))
  assert clipped.min() >= 2 and clipped.max() == 512  # the 99.5th percentile is 64 e^(2.58 * 0.8) = 505
  assert np.mean(clipped == 512) == pytest.approx(1 - stats_normal_cdf(np.log(511.5 / 64) / 0.8), abs=0.002)
  with pytest.raises(ValueError, match="median, sigma, clip"):
    bench.lognormal_lengths(rng, 3, median=64, sigma=0.8, clip=(8, 4))


def stats_normal_cdf(z: float) -> float:
  return 0.5 * (1 + math.erf(z / math.sqrt(2)))


def test_poisson_arrivals_have_exponential_gaps():
  times = bench.poisson_arrivals(np.random.default_rng(1), 20_000, rate=4.0)
  gaps = np.diff(np.concatenate([[0.0], times]))
  assert (gaps > 0).all()
  assert gaps.mean() == pytest.approx(0.25, rel=0.03)
  assert np.mean(gaps > 0.25) == pytest.approx(np.exp(-1), abs=0.01)  # P(gap > 1 / rate) = e^-1
  per_second = np.bincount(times.astype(int))[:-1]  # arrivals in each whole second: Poisson(4)
  assert per_second.var() == pytest.approx(per_second.mean(), rel=0.1)
  with pytest.raises(ValueError, match="rate"):
    bench.poisson_arrivals(np.random.default_rng(1), 3, rate=0.0)


def test_percentile_interpolates_between_order_statistics():
  assert bench.percentile(list(range(101)), 99) == 99
  assert bench.percentile([4, 1, 3, 2], 50) == 2.5
  assert bench.percentile([1, 3], 99) == pytest.approx(1 + 0.99 * 2)
  with pytest.raises(ValueError, match="q"):
    bench.percentile([1.0], 101)


def test_latency_from_event_times():
  arrivals = {"a": 0.0, "b": 1.0}
  times = {"a": [0.5, 1.0, 2.0], "b": [1.25]}
  lat = bench.latency(arrivals, times)
  assert lat["ttft_mean"] == pytest.approx((0.5 + 0.25) / 2)
  assert lat["ttft_p99"] == pytest.approx(0.25 + 0.99 * 0.25)
  assert lat["itl_mean"] == pytest.approx((0.5 + 1.0) / 2)  # b's one token has no gap
  assert lat["itl_p99"] == pytest.approx(0.5 + 0.99 * 0.5)
  with pytest.raises(ValueError, match="before its request arrived"):
    bench.latency({"a": 1.0}, {"a": [0.5]})
  with pytest.raises(ValueError, match="mismatch"):
    bench.latency(arrivals, {"a": [0.5]})


def test_static_token_times_spread_a_call_evenly():
  assert bench.static_token_times(10.0, 14.0, 2, 4) == [11.0, 12.0]  # a row that stopped after 2 of 4 steps
  assert bench.static_token_times(0.0, 3.0, 3, 3) == [1.0, 2.0, 3.0]
  with pytest.raises(ValueError, match="length"):
    bench.static_token_times(0.0, 1.0, 5, 4)


def test_stop_workload_stops_at_the_first_stop_id():
  requests = [_request(0, 2, 3), _request(1, 2, 3), _request(2, 2, 1)]
  greedy = {0: [5, 6, 7, 8], 1: [9, 7, 4], 2: [3, 3]}
  changed, real = bench.stop_workload(requests, greedy, cap=16)
  assert changed[0].stop_ids == (3, 4, 7) and all(r.stop_ids == (3, 4, 7) for r in changed)
  assert all(r.max_new_tokens == 16 and r.prompt == q.prompt for r, q in zip(changed, requests))
  assert real == {0: 3, 1: 2, 2: 1}  # request 1 meets request 0's stop id (7) before its own (4)
  with pytest.raises(ValueError, match="cap"):
    bench.stop_workload(requests, greedy, cap=2)


def test_heavy_tailed_trace_is_seeded_and_clipped():
  cfg = dataclasses.replace(bench.CONFIGS["small"], trace_requests=200)
  a, b = bench.heavy_tailed_trace(cfg, 3, 4096), bench.heavy_tailed_trace(cfg, 3, 4096)
  assert a == b and a != bench.heavy_tailed_trace(cfg, 4, 4096)
  lo, hi = cfg.trace_clip
  assert all(lo <= len(r.prompt) <= hi and lo <= r.max_new_tokens <= hi for r in a)
  assert 40 < np.median([r.max_new_tokens for r in a]) < 100 and max(r.max_new_tokens for r in a) > 200


def test_compile_counter_counts_new_signatures_only():
  f = jax.jit(lambda x: x * 3 + 1)
  with bench._CompileCounter() as first:
    f(np.ones(5, np.float32)).block_until_ready()
  with bench._CompileCounter() as again:
    f(np.ones(5, np.float32)).block_until_ready()  # cached: no lowering
  assert first.lowerings == 1 and again.lowerings == 0
