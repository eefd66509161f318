"""bench/parallel's claim: the micro-batching rule on crafted values, its timing and its records."""

import time

import pytest

from paperjax.bench import parallel as bench
from paperjax.bench.harness import Context, Environment

(MICRO,) = bench.CLAIMS


@pytest.mark.parametrize(
  "prefill, decode, scale, expected",
  [
    (1.3, 1.1, "full", ("holds", None)),
    (1.3, 0.85, "full", ("fails", None)),  # decoding slower in 2 micro-batches
    (0.9, 1.2, "paper", ("fails", None)),
    (1.3, 1.1, "small", ("undecided", "budget")),  # a tiny model: dispatch, not compute
  ],
)
def test_micro_batching_rule(prefill, decode, scale, expected):
  values = {"prefill_speedup": [prefill], "decode_speedup": [decode]}
  assert MICRO.rule.decide(values, scale=scale, gpu=False) == expected


def test_time_inference_is_time_of_one_over_time_of_two():
  sleep = lambda s: lambda: time.sleep(s)
  inference = bench.Inference(
    prefill={1: sleep(0.004), 2: sleep(0.002)}, decode={1: sleep(0.001), 2: sleep(0.002)}, batch=8, prompt=3, stages=2
  )
  out = bench.time_inference(inference, repeats=1)
  assert out["prefill"]["speedup"] == pytest.approx(2.0, rel=0.4)
  assert out["decode"]["speedup"] == pytest.approx(0.5, rel=0.4)
  assert set(out["prefill"]["s"]) == {"1", "2"}  # JSON keys: the child process sends this back


def test_inference_records_and_claim():
  ctx = Context("parallel", "full", 0, 1, (), Environment("cpu", "cpu", 1, "0", "3", "full"), parts=bench.PARTS)
  assert ctx.wants("pipeline")
  inf = {
    "batch": 32,
    "prompt": 127,
    "stages": 2,
    "prefill": {"s": {"1": 1.4, "2": 1.0}, "speedup": 1.4},
    "decode": {"s": {"1": 0.16, "2": 0.18}, "speedup": 0.88},
  }
  records = bench._inference_records(ctx, inf)
  (claim,) = ctx.claims
  assert (claim.verdict, claim.values) == ("fails", {"prefill_speedup": (1.4,), "decode_speedup": (0.88,)})
  assert "CPU" in claim.note
  tokens_s = {r.metric: r.value for r in records if r.unit == "tokens/s"}
  assert tokens_s["pipelined prefill tokens/s, M=2 (S=2 x data 4, B=32, 127-token prompts)"] == 32 * 127 / 1.0
  assert tokens_s["pipelined decode tokens/s, M=1 (S=2 x data 4, B=32, one step)"] == 32 / 0.16
