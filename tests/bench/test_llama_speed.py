"""bench.llama's train_speed part: the FLOP count its MFU divides by, against XLA's own count."""

import dataclasses

import jax
import numpy as np

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
