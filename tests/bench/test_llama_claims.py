"""bench/llama's claim: the GQA rule on crafted values, and the cache bytes it measures."""

import dataclasses

import jax
import jax.numpy as jnp
import pytest

from paperjax.bench import llama as bench
from paperjax.bench.harness import Context, Environment
from paperjax.models.transformer import llama

(GQA,) = bench.CLAIMS


@pytest.mark.parametrize(
  "values, scale, expected",
  [
    ({"ratio_error": [0.0], "formula_error": [0.0]}, "ci", ("holds", None)),  # a count: decided at every scale
    ({"ratio_error": [0.0], "formula_error": [0.0]}, "small", ("holds", None)),
    ({"ratio_error": [3.0], "formula_error": [0.0]}, "small", ("fails", None)),  # a cache of all H heads: 1x, not 4x
    ({"ratio_error": [0.0], "formula_error": [1.0]}, "ci", ("fails", None)),  # twice the bytes 2 L G K x 2 predicts
    ({"ratio_error": [float("nan")], "formula_error": [0.0]}, "ci", ("fails", None)),
  ],
)
def test_gqa_rule(values, scale, expected):
  assert GQA.rule.decide(values, scale=scale, gpu=False) == expected


def test_cache_bytes_are_the_arrays_prefill_returns():
  """A tiny model run for real: the bytes of its cache against the traced count and 2 L G K itemsize."""
  cfg = dataclasses.replace(llama.PRESETS["tiny"], dtype="bfloat16")
  mha = dataclasses.replace(cfg, n_kv_heads=cfg.n_heads)
  params = llama.init(jax.random.key(0), cfg)
  _, cache = llama.prefill(params, jnp.ones((2, 4), jnp.int32), cfg, capacity=8)
  real = (cache.k_LBSGK.nbytes + cache.v_LBSGK.nbytes) / (2 * 8)
  assert bench.cache_bytes_per_token(cfg) == real == 2 * cfg.n_layers * cfg.n_kv_heads * cfg.k * 2
  assert bench.cache_bytes_per_token(mha) / real == cfg.n_heads / cfg.n_kv_heads


def test_kv_bytes_part_decides_the_claim():
  ctx = Context("llama", "ci", 0, 1, (), Environment("cpu", "cpu", 1, "0", "3", "ci"), parts=bench.PARTS)
  assert ctx.wants("kv_bytes")
  records = bench._kv_bytes(ctx)
  (claim,) = ctx.claims
  assert claim.spec is GQA and (claim.verdict, claim.reason) == ("holds", None)
  ratios = {r.metric: r.value for r in records if r.metric.endswith("MHA / GQA")}
  assert ratios == {"8B KV cache MHA / GQA": 4.0, "70B KV cache MHA / GQA": 8.0, "405B KV cache MHA / GQA": 16.0}
