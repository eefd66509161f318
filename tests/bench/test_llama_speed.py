"""bench.llama's train_speed part: the FLOP count its MFU divides by, against XLA's own count."""

import dataclasses

import jax
import numpy as np
import pytest

from paperjax.bench import llama as bench_llama
from paperjax.models.training import lm
from paperjax.models.transformer import llama


def test_training_flops_match_xlas_count_of_the_forward():
  """6 N + 12 L T H K per token is three forwards; XLA's cost analysis of one unrolled forward
  (a scan's body is counted once) agrees within the elementwise work the formula leaves out."""
  model, batch, time = dataclasses.replace(llama.PRESETS["tiny"], unroll=True), 2, 32
  windows = np.zeros((batch, time + 1), np.int32)
  data = lm.packed_batch(windows, windows)
  params = jax.eval_shape(lambda: llama.init(jax.random.key(0), model))
  compiled = jax.jit(lambda p: lm.loss_fn(p, data, model)).lower(params).compile()
  forward = bench_llama.train_flops_per_token(model, time) / 3 * batch * time
  assert 1.0 <= compiled.cost_analysis()["flops"] / forward < 1.05


def _gemm_flops(gemms) -> int:
  """2 * (lhs size) * (rhs's free size) for each GEMM, times its count."""
  total = 0
  for (lhs, rhs, ((_, rhs_c), (_, rhs_b))), count in gemms.items():
    free = [n for d, n in enumerate(rhs) if d not in rhs_c and d not in rhs_b]
    total += 2 * int(np.prod(lhs)) * int(np.prod(free)) * count
  return total


def test_traced_gemms_count_scan_bodies_by_length():
  """A scan's GEMM runs once per step; the list is the same whether the layers are scanned or
  unrolled, and its FLOPs are XLA's count of the compiled gradient's dots."""
  w = jax.ShapeDtypeStruct((4, 5), np.float32)

  def fn(x, w):
    y, _ = jax.lax.scan(lambda c, _: (c @ w.T @ w, None), x, None, length=3)
    return y @ w.T

  gemms = bench_llama.traced_gemms(fn, jax.ShapeDtypeStruct((2, 5), np.float32), w)
  assert gemms == {
    ((2, 5), (5, 4), (((1,), (0,)), ((), ()))): 4,  # w.T is a transpose, then a plain product
    ((2, 4), (4, 5), (((1,), (0,)), ((), ()))): 3,
  }
  tiny = llama.PRESETS["tiny"]
  scanned = bench_llama.training_gemms(tiny, 2, 16)
  assert scanned == bench_llama.training_gemms(dataclasses.replace(tiny, unroll=True), 2, 16)
  params = jax.eval_shape(lambda: llama.init(jax.random.key(0), tiny))
  windows = np.zeros((2, 17), np.int32)
  grad = jax.jit(
    jax.grad(lambda p: lm.loss_fn(p, lm.packed_batch(windows, windows), dataclasses.replace(tiny, unroll=True)))
  )
  hlo_flops = grad.lower(params).compile().cost_analysis()["flops"]
  assert 0.9 < _gemm_flops(scanned) / hlo_flops <= 1.0


def test_traced_gemms_refuse_loops_and_branches_of_unknown_count():
  x = np.eye(2, dtype=np.float32)
  with pytest.raises(ValueError, match="a cond runs its GEMMs"):
    bench_llama.traced_gemms(lambda x: jax.lax.cond(x.sum() > 0, lambda: x @ x, lambda: x), x)
  assert bench_llama.traced_gemms(lambda x: jax.lax.cond(x.sum() > 0, lambda: x + 1, lambda: x), x) == {}
  with pytest.raises(ValueError, match="a while runs its GEMMs"):
    bench_llama.traced_gemms(lambda x: jax.lax.while_loop(lambda c: c.sum() < 9, lambda c: c @ c, x), x)
