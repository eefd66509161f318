"""One command that checks the GPU paths on a GPU.

  python -m paperjax.bench.gpu_check   # writes results_gpu/

On a CUDA backend it runs, and writes `results_gpu/` like the suite writes `results/`:
- gpu_maxsim: every Pallas kernel compiled (not interpreted) and run against its jnp
  reference over the shape grid the CPU tests use (odd sizes, ragged and empty documents,
  float32 / bfloat16 / float16, binary codes); the largest error of each case is recorded
  and a case over its tolerance fails the run. Then each kernel is timed against its
  reference at ColBERT shapes, side by side. jax bundles no MaxSim kernel, so the
  reference (XLA) is the only baseline.
- gpu_matmul: XLA's own low-precision dots against bf16 at square shapes, TFLOP/s
  side by side (FP8 E4M3 x E4M3 -> float32, INT8 x INT8 -> int32): the measurement that
  decides whether quantized matmuls need a Pallas kernel (issue 15: only if XLA falls short
  of the roofline, where FP8's dense peak is twice BF16's on H100/H200).
- gpu_paged_attention: the paged decode kernel compiled and checked against its reference
  over the CPU tests' grid plus Llama 3 8B's attention shapes, with NaN in unreadable slots.
- maxsim.throughput, quant.throughput, serving.kernel, serving.trace and jrt.prefill at
  `--scale=paper`: the suite's kernel parts (serving.kernel times the paged kernel against the
  reference and jax's bundled paged attention, and reports its HBM bandwidth; serving.trace
  serves the heavy-tailed trace with the engine, whose decode attention is then the Pallas
  kernel, against static batching, beside the trace's padding bound). Their GPU claims (the rules with
  gpu=True: FP8 prefill, JRT's prefill speed-ups) are decided here, into the same claims
  ledger as the CPU runs (`python -m paperjax.bench.ledger results results_full results_gpu`).
The defaults (`--scale=paper --only=<the above>`) are sized for a few minutes on one H200;
the flags are the suite's. Without a GPU it says so and
exits 0, timing nothing.

Shapes: Q queries, T query tokens, N documents, S document tokens, K embedding dim.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
from absl import app, flags

from paperjax.bench import cli, registry
from paperjax.bench.harness import Benchmark, Context, Result, time_fn
from paperjax.ops import maxsim, paged_attention, quant


class Case(NamedTuple):
  """One kernel call checked against its reference: scores(impl, interpret) -> float32 [Q, N]."""

  name: str
  scores: Callable[[maxsim.Impl, bool], jax.Array]
  tolerance: float  # max |kernel - reference| allowed


def _ragged(key: jax.Array, q: int, t: int, n: int, s: int, k: int):
  """Random embeddings with ragged query masks and document lengths, including 0 and S."""
  kq, kd, km, kl = jax.random.split(key, 4)
  lengths = jax.random.randint(kl, (n,), 1, s + 1).at[:2].set(jnp.array([0, s]))
  return (
    jax.random.normal(kq, (q, t, k)),
    jax.random.normal(kd, (n, s, k)),
    jax.random.uniform(km, (q, t)) > 0.3,
    lengths,
  )


def _float_scores(impl: maxsim.Impl, interpret: bool, *, inputs, **options) -> jax.Array:
  q, d, q_mask, lengths = inputs()
  return maxsim.maxsim(q, d, q_mask_QT=q_mask, d_lengths_N=lengths, impl=impl, interpret=interpret, **options)


def _binary_scores(impl: maxsim.Impl, interpret: bool, *, inputs, dim, **options) -> jax.Array:
  q, d, q_mask, lengths = inputs()
  return maxsim.maxsim_binary(
    q, d, dim, q_mask_QT=q_mask, d_lengths_N=lengths, impl=impl, interpret=interpret, **options
  )


def _cast(drawn, dtype) -> tuple:
  q, d, q_mask, lengths = drawn()
  return q.astype(dtype), d.astype(dtype), q_mask, lengths


def _packed(drawn) -> tuple:
  q, d, q_mask, lengths = drawn()
  return maxsim.pack_bits(q), maxsim.pack_bits(d), q_mask, lengths


def _lazy(fn, *args):
  """`fn(*args)`, computed on the first call and kept: a case's inputs are drawn only when it
  runs (the CPU tests run the small shapes of grids whose GPU shapes take seconds to draw), and
  never inside a timed call after the first."""
  return functools.cache(functools.partial(fn, *args))


def maxsim_cases(key: jax.Array) -> list[Case]:
  """The grid of `tests/ops/test_maxsim.py` (Q=3, T=5, N=19, S=37, K=48) plus ColBERT shapes."""
  out = []
  for shape in ((3, 5, 19, 37, 48), (4, 32, 1000, 128, 128), (2, 32, 300, 512, 128)):
    drawn = _lazy(_ragged, key, *shape)
    label = "Q={},T={},N={},S={},K={}".format(*shape)
    # Per query token: float32 goes through the tensor cores as TF32, which keeps float16's 10
    # mantissa bits, so it gets float16's tolerance.
    for dtype, tol in ((jnp.float32, 0.05), (jnp.bfloat16, 0.5), (jnp.float16, 0.05)):
      scores = functools.partial(_float_scores, inputs=_lazy(_cast, drawn, dtype))
      out.append(Case(f"maxsim {jnp.dtype(dtype).name} {label}", scores, tol * shape[1]))  # errors add over T
    scores = functools.partial(_binary_scores, inputs=_lazy(_packed, drawn), dim=shape[-1])
    out.append(Case(f"maxsim_binary {label}", scores, 0.0))  # integer arithmetic: exact
  return out


def _paged_decode(impl: maxsim.Impl, interpret: bool, *, inputs, **options) -> jax.Array:
  return paged_attention.paged_attention(*inputs(), impl=impl, interpret=interpret, **options).astype(jnp.float32)


def _paged_inputs(key: jax.Array, heads: int, groups: int, head_dim: int, page: int, width: int, batch: int = 4):
  """float32 (q, k_pages, v_pages) and (tables, lengths) of `batch` rows of `width` shuffled
  pages, lengths 0, full and random, NaN in every slot no row may read."""
  num_pages = batch * width + 3
  kq, kk, kv, kt, kl = jax.random.split(key, 5)
  tables = jax.vmap(lambda k: jax.random.permutation(k, num_pages)[:width])(jax.random.split(kt, batch))
  lengths = jax.random.randint(kl, (batch,), 1, width * page + 1).at[:2].set(jnp.array([0, width * page])[:batch])
  slot = jnp.arange(width * page)
  readable = jnp.zeros((num_pages, page), bool)
  for b in range(batch):
    readable = readable.at[tables[b, slot // page], slot % page].max(slot < lengths[b])
  shape = (groups, num_pages, page, head_dim)
  pools = [jnp.where(readable[None, :, :, None], jax.random.normal(k, shape), jnp.nan) for k in (kk, kv)]
  q = jax.random.normal(kq, (batch, heads, head_dim))
  return (q, *pools), (tables.astype(jnp.int32), lengths.astype(jnp.int32))


def _paged_args(drawn, dtype) -> tuple:
  """`paged_attention`'s arguments: the floats of `drawn()` in `dtype`, then the int tables and lengths."""
  floats, ints = drawn()
  return (*(x.astype(dtype) for x in floats), *ints)


def paged_cases(key: jax.Array) -> list[Case]:
  """The grid of `tests/ops/test_paged_attention.py` (H=8, K=16, GQA 1/4/8, pages 8/16/32) plus
  Llama 3 8B's attention (H=32, G=8, K=128) over 2048-token rows (`_paged_inputs`)."""
  out = []
  shapes = [*((8, g, 16, s, 5) for g in (8, 2, 1) for s in (8, 16, 32)), (32, 8, 128, 16, 128)]
  for i, (heads, groups, head_dim, page, width) in enumerate(shapes):
    drawn = _lazy(_paged_inputs, jax.random.fold_in(key, i), heads, groups, head_dim, page, width)
    for dtype, tol in ((jnp.float32, 1e-2), (jnp.bfloat16, 3e-2)):  # float32 dots run as TF32
      label = f"paged decode {jnp.dtype(dtype).name} H={heads},G={groups},K={head_dim},page={page},pages={width}"
      out.append(Case(label, functools.partial(_paged_decode, inputs=_lazy(_paged_args, drawn, dtype)), tol))
  return out


def check(case_list: Sequence[Case], *, interpret: bool) -> dict[str, float]:
  """Max |kernel - reference| of each case; raises AssertionError naming every case over its tolerance."""
  errors = {
    c.name: float(jnp.max(jnp.abs(c.scores("pallas", interpret) - c.scores("reference", False)))) for c in case_list
  }
  bad = [f"{c.name}: {errors[c.name]:.3g} > {c.tolerance:.3g}" for c in case_list if not errors[c.name] <= c.tolerance]
  if bad:
    raise AssertionError("Pallas kernel differs from its reference: " + "; ".join(bad))
  return errors


HOPPER = "H100/H200 datasheet: dense FP8 / INT8 peak = 2x BF16"
MATMUL_SIZES = (4096, 8192)


def _matmul(ctx: Context) -> Result:
  """TFLOP/s of XLA's bf16, FP8 and INT8 dots at square shapes, and the low-precision / bf16 ratios."""
  records = []
  dot = jax.jit(quant.dot)
  for size in MATMUL_SIZES:
    a = jax.random.normal(jax.random.key(ctx.seed), (size, size))
    tflops = {}
    for name, dtype in (("bf16", jnp.bfloat16), ("fp8", jnp.float8_e4m3fn), ("int8", jnp.int8)):
      x = jnp.clip(a * 16, -127, 127).astype(dtype)
      tflops[name] = 2 * size**3 / time_fn(dot, x, x.T, repeats=ctx.repeats).median_s / 1e12
      records.append(ctx.record(f"XLA dot TFLOP/s, {name}, {size}^3", tflops[name], "TFLOP/s"))
    for name in ("fp8", "int8"):
      records.append(
        ctx.record(
          f"XLA dot speed-up, {name} vs bf16, {size}^3 (same run)", tflops[name] / tflops["bf16"], "x", 2.0, HOPPER
        )
      )
  return Result(ctx.benchmark, tuple(records))


def _maxsim_kernels(ctx: Context) -> Result:
  records = []
  case_list = maxsim_cases(jax.random.key(ctx.seed))
  for name, error in check(case_list, interpret=False).items():
    records.append(ctx.record(f"max |Pallas - reference|, {name}", error, "abs"))
  for c in case_list:
    if "T=32" not in c.name:  # time the ColBERT shapes only
      continue
    ref = time_fn(c.scores, "reference", False, repeats=ctx.repeats).median_s
    ours = time_fn(c.scores, "pallas", False, repeats=ctx.repeats).median_s
    records.append(ctx.record(f"speed-up Pallas vs XLA reference, {c.name} (same run)", ref / ours, "x"))
    records += _sweep(ctx, c, MAXSIM_SWEEP["binary" if "binary" in c.name else "float"], ref)
  note = (
    f"{len(case_list)} kernel cases compiled for {jax.devices()[0].device_kind} and checked against the jnp "
    "reference; jax bundles no MaxSim kernel, so the XLA reference is the only baseline."
  )
  return Result(ctx.benchmark, tuple(records), notes=(note,))


# Tilings timed beside the defaults, so the defaults can follow the measurements.
MAXSIM_SWEEP = {
  "float": ({"block_q": 1}, {"block_q": 2}, {"block_q": 4, "num_warps": 8}, {"block_q": 8, "num_warps": 8}),
  "binary": ({"block_q": 2}, {"block_q": 4}),
}
PAGED_SWEEP = ({"step_pages": 1}, {"step_pages": 4}, {"num_splits": 1}, {"num_warps": 8})


def _sweep(ctx: Context, case: Case, options_list, reference_s: float) -> list:
  """Speed-up over the reference of the kernel at other tilings (a failure is recorded, not raised)."""
  records = []
  expected = case.scores("reference", False)  # once, not per tiling
  for options in options_list:
    label = ",".join(f"{k}={v}" for k, v in options.items())
    scores = functools.partial(case.scores, **options)
    try:
      error = float(jnp.max(jnp.abs(scores("pallas", False) - expected)))
      seconds = time_fn(scores, "pallas", False, repeats=ctx.repeats).median_s
    except Exception as e:  # a tiling that does not compile is a measurement too
      print(f"gpu_check: {case.name} with {label} failed: {e!r:.300}")
      records.append(ctx.record(f"tiling {label} failed, {case.name}", 1.0, "failed"))
      continue
    records.append(
      ctx.record(f"speed-up Pallas ({label}) vs reference, {case.name} (same run)", reference_s / seconds, "x")
    )
    records.append(ctx.record(f"max |Pallas ({label}) - reference|, {case.name}", error, "abs"))
  return records


def _paged_kernels(ctx: Context) -> Result:
  case_list = paged_cases(jax.random.key(ctx.seed))
  records = [
    ctx.record(f"max |Pallas - reference|, {name}", e, "abs") for name, e in check(case_list, interpret=False).items()
  ]
  for batch in (1, 8, 32, 128):  # Llama 3 8B decode at 4096 tokens, bfloat16: default tiling, then the sweep
    drawn = _lazy(_paged_inputs, jax.random.key(batch), 32, 8, 128, 16, 256, batch)
    name = f"paged decode bfloat16 B={batch},H=32,G=8,K=128,pages=256x16"
    case = Case(name, functools.partial(_paged_decode, inputs=_lazy(_paged_args, drawn, jnp.bfloat16)), 3e-2)
    ref = time_fn(case.scores, "reference", False, repeats=ctx.repeats).median_s
    ours = time_fn(case.scores, "pallas", False, repeats=ctx.repeats).median_s
    records.append(ctx.record(f"speed-up Pallas vs reference, {case.name} (same run)", ref / ours, "x"))
    records += _sweep(ctx, case, PAGED_SWEEP, ref)
  note = (
    f"{len(case_list)} paged-attention cases compiled for {jax.devices()[0].device_kind} against the jnp reference, "
    "with NaN in every slot no row may read; latency and bandwidth are serving.kernel's."
  )
  return Result(ctx.benchmark, tuple(records), notes=(note,))


def _on_gpu(run: Callable[[Context], Result]) -> Callable[[Context], Result]:
  @functools.wraps(run)
  def checked(ctx: Context) -> Result:
    if jax.default_backend() != "gpu":
      raise RuntimeError(f"gpu_check needs a GPU backend, got {jax.default_backend()!r}")
    return run(ctx)

  return checked


# Separate benchmarks, so that a kernel over its tolerance (which raises) loses no other measurement.
RUNS = {
  "gpu_matmul": Benchmark(_on_gpu(_matmul)),
  "gpu_maxsim": Benchmark(_on_gpu(_maxsim_kernels)),
  "gpu_paged_attention": Benchmark(_on_gpu(_paged_kernels)),
}
SUITE = ("maxsim", "quant", "serving", "jrt")
# The suite's kernel parts at --scale=paper; their GPU claims (gpu=True rules) are decided here,
# into results_gpu/results.json, which `python -m paperjax.bench.ledger` merges with the CPU runs.
SUITE_PARTS = ("maxsim.throughput", "quant.throughput", "serving.kernel", "serving.trace", "jrt.prefill")


def main(argv: Sequence[str]) -> int:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  runs = {**RUNS, **{name: registry.load(name) for name in SUITE}}
  cli.check_flags(runs)  # a bad flag is an error with or without a GPU
  if jax.default_backend() != "gpu":
    print(f"gpu_check: no GPU backend here (jax.default_backend() = {jax.default_backend()!r}); nothing was timed.")
    return 0
  return cli.run_benchmarks(runs)


if __name__ == "__main__":
  flags.FLAGS.set_default("scale", "paper")
  flags.FLAGS.set_default("out", "results_gpu")  # beside, not over, the CPU suite's results/
  flags.FLAGS.set_default("only", [*RUNS, *SUITE_PARTS])
  app.run(main)
