"""Time Llama's training step with whatever paperjax is installed: the before/after figures of
README "Training speed", reproducible at any commit since the stdlib-corpus trainer (`lm`).

  .venv/bin/python scripts/train_step_times.py [--unroll]     # this checkout
  git worktree add /tmp/old 656f015 && cd /tmp/old && make venv && \\
    .venv/bin/python /work/main/scripts/train_step_times.py   # an older one

For the `small` preset (5.1M parameters) and the 22M shape of `bench.llama`, at B=8, T=128:
the medians of 7 calls (after 2 warm-up calls) of the loss, its gradient and
`lm.make_train_step`, printed as tokens/s of the step and (grad - forward) / forward. It uses
only APIs older than `bench.llama.training_programs`, which does the same for the benchmark.
"""

import argparse
import dataclasses
import functools
import statistics
import time

import jax
import numpy as np

from paperjax.models.training import lm, train
from paperjax.models.transformer import llama

MODELS = {
  "5.1M": llama.PRESETS["small"],
  "22.3M": llama.LlamaConfig(
    vocab_size=4096, dim=512, n_layers=6, n_heads=8, n_kv_heads=2, ffn_dim=1536, max_seq_len=1024
  ),
}


def _median_s(fn, *args) -> float:
  for _ in range(2):
    jax.block_until_ready(fn(*args))
  times = []
  for _ in range(7):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def main() -> None:
  ap = argparse.ArgumentParser()
  ap.add_argument("--unroll", action="store_true", help="LlamaConfig(unroll=True); needs a tree that has it")
  unroll = ap.parse_args().unroll
  batch_size, seq_len = 8, 128
  tcfg = train.TrainConfig(batch_size=batch_size, seq_len=seq_len, total_steps=100, warmup_steps=10)
  windows = np.random.default_rng(0).integers(0, 4096, (batch_size, seq_len + 1), np.int32)
  batch = lm.packed_batch(windows, np.zeros_like(windows))
  for name, model in MODELS.items():
    model = dataclasses.replace(model, unroll=True) if unroll else model
    state = lm.init_state(jax.random.key(0), model, tcfg)
    loss = functools.partial(lm.loss_fn, cfg=model)
    forward = _median_s(jax.jit(loss), state.params, batch)
    grad = _median_s(jax.jit(jax.grad(loss)), state.params, batch)
    step = _median_s(lm.make_train_step(model, tcfg), state, batch)
    print(
      f"{name}{' unrolled' if unroll else ''}: {batch_size * seq_len / step:.0f} tokens/s, "
      f"backward / forward {(grad - forward) / forward:.2f}",
      flush=True,
    )


if __name__ == "__main__":
  main()
