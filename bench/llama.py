"""Llama 3 model benchmarks: KV-cache decoding, throughput, cache accounting, training.

  python -m paperjax.bench.llama --scale=small [--only=llama.cache,llama.kv_bytes]

Parts:
- cache: one decode step with the KV cache vs recomputing the whole prefix, side by side
  at several prefix lengths (speed-up ratio; it should grow roughly linearly).
- throughput: prefill tokens/s (our reference GQA vs jax.nn.dot_product_attention in the
  same model) and batched generation tokens/s.
- kv_bytes: KV-cache bytes per token and parameter counts of the 8B/70B/405B shapes,
  GQA vs MHA (the report's H/G): the bytes of the cache `llama.prefill` returns in bfloat16,
  traced with `jax.eval_shape` (nothing allocated), per cached token.
- train: training tokens/s of a small model on the stdlib corpus and its loss curve,
  held-out loss vs the unigram cross-entropy.
- train_speed: one training step of each `Speed.models` config on random tokens, scanned and
  unrolled (`LlamaConfig.unroll`): tokens/s, the backward pass's time over the forward's,
  and MFU against a square float32 GEMM timed in the same run (the machine's matmul peak
  as XLA reaches it). `scripts/torch_train_speed.py` times the same shapes in PyTorch.
- checked: what the value checks cost. The forward under `ops.checks.checked` (checkify's
  id and index checks compiled in) against the same forward under a plain jax.jit, and a
  training step with its host batch check (`lm.check_batch`) against its jitted core alone.

Shapes: B batch, T time, N tokens in a stream, L layers, S cache slots, G kv heads, K head
dim (a KV cache is [L, B, S, G, K]).
"""

from __future__ import annotations

import dataclasses
import functools
import warnings
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
from absl import app

from paperjax.bench import cli
from paperjax.bench.harness import (
  Benchmark,
  ClaimSpec,
  Context,
  Plot,
  Result,
  Rule,
  Series,
  Test,
  progress,
  time_fn,
)
from paperjax.models.data import corpus, tokenizer
from paperjax.models.serving import generate
from paperjax.models.training import lm, train
from paperjax.models.transformer import llama
from paperjax.ops import checks

REPORT = "Llama 3 report (arXiv 2407.21783)"
LLAMA3_SHAPES = ("llama3_8b", "llama3_70b", "llama3_405b")

# Declared before any run (the registry reads CLAIMS); the part named decides each one.
CLAIMS = (
  ClaimSpec(
    name="gqa_kv_cache",
    part="kv_bytes",
    source=f"{REPORT}, Sec. 3.2 (GQA with 8 key-value heads) and Table 3 (the 8B/70B/405B shapes)",
    claim=(
      "grouped query attention with 8 key-value heads reduces the size of key-value caches during decoding: "
      "2 L G K bytes per token, H/G times smaller than multi-head attention (4x, 8x, 16x for 8B, 70B, 405B)"
    ),
    # Exact integer arithmetic on array shapes: equality within float rounding, at every scale.
    rule=Rule(
      tests=(
        Test(statistic="ratio_error", op="|x| <=", bound=1e-9),
        Test(statistic="formula_error", op="|x| <=", bound=1e-9),
      ),
      decided_at="ci",
    ),
  ),
)


@checks.config
class Speed:
  """The train_speed part: models timed at batch x seq_len tokens, and the GEMM side."""

  models: tuple[llama.LlamaConfig, ...]
  batch: int
  seq_len: int
  gemm: int  # the peak: a [gemm, gemm] @ [gemm, gemm] float32 matmul


@checks.config
class Config:
  model: llama.LlamaConfig
  cache_lengths: tuple[int, ...]
  batch: int
  prefill_len: int
  new_tokens: int
  train: train.TrainConfig
  corpus_chars: int
  eval_every: int
  speed: Speed


SMALL = Config(
  model=llama.LlamaConfig(vocab_size=2048, dim=128, n_layers=4, n_heads=8, n_kv_heads=2, ffn_dim=384, max_seq_len=2048),
  cache_lengths=(128, 256, 512, 1024),
  batch=4,
  prefill_len=512,
  new_tokens=64,
  train=train.TrainConfig(batch_size=16, seq_len=128, total_steps=120, warmup_steps=12),
  corpus_chars=4_000_000,
  eval_every=40,
  speed=Speed(models=(llama.PRESETS["small"],), batch=8, seq_len=128, gemm=2048),  # 5.1M parameters, ~25 s
)
_22M = llama.LlamaConfig(vocab_size=4096, dim=512, n_layers=6, n_heads=8, n_kv_heads=2, ffn_dim=1536, max_seq_len=1024)
# small trains 120 steps (the default suite's budget, ~0.4 s a step on 2 cores); full trains 400
# and times a 22M-parameter model's training step beside the 5M one.
CONFIGS = {
  "ci": Config(
    model=llama.LlamaConfig(vocab_size=512, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=128, max_seq_len=256),
    cache_lengths=(32, 64),
    batch=2,
    prefill_len=64,
    new_tokens=8,
    train=train.TrainConfig(batch_size=8, seq_len=32, total_steps=20, warmup_steps=4),
    corpus_chars=300_000,
    eval_every=10,
    speed=Speed(models=(llama.PRESETS["tiny"],), batch=2, seq_len=32, gemm=256),
  ),
  "small": SMALL,
  "full": dataclasses.replace(
    SMALL,
    train=dataclasses.replace(SMALL.train, total_steps=400, warmup_steps=40),
    speed=dataclasses.replace(SMALL.speed, models=(*SMALL.speed.models, _22M)),  # + 22M parameters, ~50 s more
  ),
  "paper": Config(
    model=llama.LlamaConfig(
      vocab_size=8192, dim=1024, n_layers=8, n_heads=16, n_kv_heads=4, ffn_dim=3584, max_seq_len=8192
    ),
    cache_lengths=(512, 1024, 2048, 4096),
    batch=8,
    prefill_len=2048,
    new_tokens=128,
    train=train.TrainConfig(batch_size=32, seq_len=512, total_steps=1000, warmup_steps=100),
    corpus_chars=12_000_000,
    eval_every=100,
    speed=Speed(models=(llama.PRESETS["small"], _22M), batch=32, seq_len=512, gemm=8192),
  ),
}


PARTS = ("cache", "throughput", "kv_bytes", "train", "train_speed", "checked")  # --only=llama.<part>


def run(ctx: Context) -> Result:
  cfg = CONFIGS[ctx.scale]
  params = llama.init(jax.random.key(ctx.seed), cfg.model)
  records, plots, notes = [], [], []
  if ctx.wants("cache"):
    part = _cache_vs_recompute(ctx, cfg, params)
    records += part[0]
    plots.append(part[1])
  if ctx.wants("throughput"):
    records += _throughput(ctx, cfg, params)
  if ctx.wants("kv_bytes"):
    records += _kv_bytes(ctx)
  if ctx.wants("train"):
    part = _train(ctx, cfg)
    records += part[0]
    plots.append(part[1])
    notes += part[2]
  if ctx.wants("train_speed"):
    part = _train_speed(ctx, cfg.speed)
    records += part[0]
    notes += part[1]
  if ctx.wants("checked"):
    records += _checked(ctx, cfg, params)
  return Result(ctx.benchmark, tuple(records), tuple(plots), tuple(notes))


def _cache_vs_recompute(ctx: Context, cfg: Config, params):
  model = cfg.model
  forward = jax.jit(llama.forward, static_argnums=2)
  speedups = []
  records = []
  for length in progress(cfg.cache_lengths, "llama: cache vs recompute"):
    tokens = jax.random.randint(jax.random.key(1), (cfg.batch, length + 1), 0, model.vocab_size)
    _, cache = forward(params, tokens[:, :length], model, state=llama.init_state(model, cfg.batch, length + 1))
    cached = time_fn(forward, params, tokens[:, length:], model, state=cache, repeats=ctx.repeats)
    full = time_fn(forward, params, tokens, model, repeats=ctx.repeats)
    speedups.append(full.median_s / cached.median_s)
    records.append(ctx.record(f"decode step speed-up, KV cache vs recompute, prefix {length}", speedups[-1], "x"))
  plot = Plot(
    "cache_speedup",
    "One decode step: recompute time / KV-cache time",
    "prefix length",
    "speed-up (x)",
    (Series(f"batch {cfg.batch}", cfg.cache_lengths, tuple(speedups)),),
    xscale="log",
  )
  return records, plot


def _throughput(ctx: Context, cfg: Config, params):
  model = cfg.model
  tokens = jax.random.randint(jax.random.key(2), (cfg.batch, cfg.prefill_len), 0, model.vocab_size)
  times = {}
  for impl in ("reference", "xla"):
    variant = dataclasses.replace(model, attention_impl=impl)
    prefill = jax.jit(lambda p, t, c=variant: llama.forward(p, t, c)[0])
    times[impl] = time_fn(prefill, params, tokens, repeats=ctx.repeats).median_s
  prompts = tokens[:, :16]
  lengths = jnp.full((cfg.batch,), 16, jnp.int32)
  gen = time_fn(
    lambda: generate.generate(jax.random.key(0), params, model, prompts, lengths, max_new_tokens=cfg.new_tokens),
    repeats=ctx.repeats,
  )
  n_prefill = cfg.batch * cfg.prefill_len
  return [
    ctx.record(
      f"prefill tokens/s (B={cfg.batch}, T={cfg.prefill_len}), reference GQA",
      n_prefill / times["reference"],
      "tokens/s",
    ),
    ctx.record(
      f"prefill tokens/s (B={cfg.batch}, T={cfg.prefill_len}), jax.nn.dot_product_attention",
      n_prefill / times["xla"],
      "tokens/s",
    ),
    ctx.record(
      "prefill speed-up, reference GQA vs dot_product_attention (same run)", times["xla"] / times["reference"], "x"
    ),
    ctx.record(
      f"greedy generation tokens/s (B={cfg.batch}, 16-token prompts, {cfg.new_tokens} new)",
      cfg.batch * cfg.new_tokens / gen.median_s,
      "tokens/s",
    ),
  ]


def cache_bytes_per_token(cfg: llama.LlamaConfig, batch: int = 2, capacity: int = 8) -> float:
  """Bytes of the KV cache `llama.prefill` returns, per cached token (batch x capacity slots),
  from its traced shapes: nothing is allocated, so the 405B shape costs nothing."""
  tokens_BT = jnp.ones((batch, capacity // 2), jnp.int32)
  _, cache = jax.eval_shape(lambda p: llama.prefill(p, tokens_BT, cfg, capacity=capacity), llama.param_shapes(cfg))
  return sum(x.size * x.dtype.itemsize for x in (cache.k_LBSGK, cache.v_LBSGK)) / (batch * capacity)


def _kv_bytes(ctx: Context):
  records, ratio_errors, formula_errors = [], [], []
  for name, published in zip(LLAMA3_SHAPES, (8.0, 70.0, 405.0)):
    gqa = dataclasses.replace(llama.PRESETS[name], dtype="bfloat16")
    mha = dataclasses.replace(gqa, n_kv_heads=gqa.n_heads)
    gqa_bytes, mha_bytes = cache_bytes_per_token(gqa), cache_bytes_per_token(mha)
    formula = 2 * gqa.n_layers * gqa.n_kv_heads * gqa.k * 2  # K and V, bfloat16
    ratio_errors.append(abs(mha_bytes / gqa_bytes - gqa.n_heads / gqa.n_kv_heads))
    formula_errors.append(abs(gqa_bytes - formula) / formula)
    size = name.split("_")[1].upper()
    records += [
      ctx.record(f"{size} parameters", gqa.num_params() / 1e9, "billion", published, f"{REPORT}, model name"),
      ctx.record(f"{size} KV cache per token, GQA G=8, bf16", gqa_bytes / 1024, "KiB"),
      ctx.record(
        f"{size} KV cache MHA / GQA",
        mha_bytes / gqa_bytes,
        "x",
        gqa.n_heads / gqa.n_kv_heads,
        f"{REPORT}, H/G from Table 3 shapes",
      ),
    ]
  ctx.claim(
    CLAIMS[0],
    {"ratio_error": max(ratio_errors), "formula_error": max(formula_errors)},
    note=(
      "A deterministic count, the same at every scale and seed: the bytes of the cache llama.prefill returns "
      "(bfloat16, traced with jax.eval_shape) for the 8B, 70B and 405B shapes and their MHA twins (G = H). "
      "ratio_error is the largest |MHA bytes / GQA bytes - H/G| over the three shapes, formula_error the largest "
      "relative difference of the GQA bytes from 2 L G K x 2 bytes."
    ),
  )
  return records


class StdlibLM(NamedTuple):
  """A Llama trained on the stdlib corpus, with its held-out data (what other benchmarks reuse)."""

  model: llama.LlamaConfig
  tcfg: train.TrainConfig
  params: dict
  test_ids: np.ndarray  # compact held-out token stream
  test_batch: lm.Batch  # 64 held-out windows of tcfg.seq_len tokens
  unigram_ce: float
  losses: list[float]
  evals: list[tuple[int, float]]  # (step, held-out loss)
  step_time_s: float
  train_tokens: int
  train_batch: Callable[[int], lm.Batch]  # the batch of training step i
  train_step: Callable[..., tuple[train.TrainState, dict]]  # the jitted step that trained it
  kept_ids: np.ndarray  # compact id i is cl100k id kept_ids[i]; id len(kept_ids) is "other"

  def decode(self, tok: tokenizer.Tokenizer, ids: np.ndarray) -> str:
    """Text of compact ids (each "other" id shown as <other>)."""
    ids = np.asarray(ids).ravel()
    pieces, run = [], []
    for i in ids:
      if i < len(self.kept_ids):
        run.append(int(self.kept_ids[i]))
        continue
      pieces += [tok.decode(run), "<other>"]
      run = []
    return "".join([*pieces, tok.decode(run)])


def train_stdlib_lm(
  ctx: Context,
  cfg: Config,
  on_step: Callable[[train.TrainState], None] | None = None,
) -> StdlibLM:
  """Trains cfg.model on the stdlib corpus (AdamW, cfg.train) and keeps its held-out data.

  `on_step` sees the state after every step (for checkpointing benchmarks). Without it, the
  result is shared within the process per (cfg, seed, repeats): the suite trains the model
  that llama's train part, quant and sae study once (training is deterministic per seed).
  """
  if on_step is None:
    return _shared_lm(cfg, ctx.seed, ctx.repeats)
  return _train_lm(cfg, ctx.seed, ctx.repeats, on_step)


@functools.lru_cache(maxsize=2)
def _shared_lm(cfg: Config, seed: int, repeats: int) -> StdlibLM:
  return _train_lm(cfg, seed, repeats, None)


def _train_lm(cfg: Config, seed: int, repeats: int, on_step: Callable[[train.TrainState], None] | None) -> StdlibLM:
  model, tcfg = cfg.model, dataclasses.replace(cfg.train, seed=seed)
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", RuntimeWarning)
    tok = tokenizer.from_name("cl100k_base")
  train_docs, test_docs = corpus.split_documents(corpus.stdlib_documents(cfg.corpus_chars), (0.9, 0.1))
  train_stream, test_stream = corpus.tokenize(tok, train_docs), corpus.tokenize(tok, test_docs)
  kept = corpus.compact_vocab(train_stream.ids_N, model.vocab_size)
  train_ids, test_ids = (corpus.to_compact(s.ids_N, kept) for s in (train_stream, test_stream))
  freq = np.bincount(train_ids, minlength=model.vocab_size) / train_ids.size
  test_freq = np.bincount(test_ids, minlength=model.vocab_size) / test_ids.size
  unigram_ce = float(-np.sum(test_freq * np.log(np.maximum(freq, 1e-12))))
  eval_cfg = dataclasses.replace(tcfg, batch_size=64, seed=seed + 1)
  test_batch = lm.batch_at(test_ids, test_stream.segment_ids_N, 0, eval_cfg)

  state = lm.init_state(jax.random.key(seed), model, tcfg)
  step = lm.make_train_step(model, tcfg)
  batch = lambda i: lm.batch_at(train_ids, train_stream.segment_ids_N, i, tcfg)
  step_time = time_fn(step, state, batch(0), repeats=repeats).median_s  # the state is not advanced
  losses, evals = [], []
  for i in progress(range(tcfg.total_steps), "stdlib LM: training"):
    state, metrics = step(state, batch(i))
    losses.append(float(metrics["loss"]))
    if on_step is not None:
      on_step(state)
    if (i + 1) % cfg.eval_every == 0 or i == tcfg.total_steps - 1:
      evals.append((i + 1, float(lm.eval_loss(state.params, test_batch, model))))
  return StdlibLM(
    model,
    tcfg,
    state.params,
    test_ids,
    test_batch,
    unigram_ce,
    losses,
    evals,
    step_time,
    train_ids.size,
    batch,
    step,
    kept,
  )


def _train(ctx: Context, cfg: Config):
  trained = train_stdlib_lm(ctx, cfg)
  model, tcfg, evals, unigram_ce = trained.model, trained.tcfg, trained.evals, trained.unigram_ce
  losses, step_time = trained.losses, trained.step_time_s
  tokens_per_s = tcfg.batch_size * tcfg.seq_len / step_time
  final = evals[-1][1]
  records = [
    ctx.record(
      f"training tokens/s ({model.num_params() / 1e6:.2f}M params, B={tcfg.batch_size}, T={tcfg.seq_len})",
      tokens_per_s,
      "tokens/s",
    ),
    ctx.record("held-out loss after training", final, "nats/token"),
    ctx.record("unigram cross-entropy (baseline)", unigram_ce, "nats/token"),
    ctx.record("held-out loss / unigram cross-entropy", final / unigram_ce, "ratio", "< 1", "any LM that uses context"),
  ]
  plot = Plot(
    "train_loss",
    "Training on the stdlib corpus",
    "step",
    "loss (nats/token)",
    (
      Series("train", tuple(range(1, tcfg.total_steps + 1)), tuple(losses)),
      Series("held-out", tuple(s for s, _ in evals), tuple(l for _, l in evals)),
      Series("unigram", (1, tcfg.total_steps), (unigram_ce, unigram_ce)),
    ),
  )
  notes = [
    f"Training data: {trained.train_tokens:,} train / {trained.test_ids.size:,} held-out tokens, vocabulary of the "
    f"{model.vocab_size - 1} most frequent cl100k training tokens + other; AdamW, warm-up {tcfg.warmup_steps} "
    f"steps, cosine to {tcfg.final_lr_ratio:g} x peak {tcfg.peak_lr:g}, {tcfg.total_steps} steps."
  ]
  return records, plot, notes


def train_flops_per_token(model: llama.LlamaConfig, seq_len: int) -> float:
  """Training FLOPs per token (forward and backward): 6 N + 12 L T H K, where N counts the
  matmul weights (the embedding lookup is free) and the second term is attention's scores
  and weighted sum, counted over the whole T x T square as PaLM's appendix B counts them."""
  d, h, g, k, e, layers = model.dim, model.n_heads, model.n_kv_heads, model.k, model.ffn_dim, model.n_layers
  n_matmul = layers * (2 * d * h * k + 2 * d * g * k + 3 * d * e) + d * model.vocab_size
  return 6 * n_matmul + 12 * layers * seq_len * h * k


def training_programs(model: llama.LlamaConfig, batch_size: int, seq_len: int, seed: int) -> dict[str, Callable]:
  """Jitted calls of no arguments on random tokens of one [batch_size, seq_len] batch:
  "forward" (the loss), "grad" (jax.grad of the loss), "step" (`lm.make_train_step`: the
  host batch check, then the gradient, the global-norm clip and AdamW) and "step_core" (the
  step's jitted program alone). The step does not advance its state, so each call does the
  same work."""
  tcfg = train.TrainConfig(batch_size=batch_size, seq_len=seq_len, total_steps=100, warmup_steps=10)
  windows = np.random.default_rng(seed).integers(0, model.vocab_size, (batch_size, seq_len + 1), np.int32)
  batch = lm.packed_batch(windows, np.zeros_like(windows))  # one document per row
  state = lm.init_state(jax.random.key(seed), model, tcfg)
  loss, step = functools.partial(lm.loss_fn, cfg=model), lm.make_train_step(model, tcfg)
  forward, grad = jax.jit(loss), jax.jit(jax.grad(loss))
  return {
    "forward": lambda: forward(state.params, batch),
    "grad": lambda: grad(state.params, batch),
    "step": lambda: step(state, batch),
    "step_core": lambda: step.jitted(state, batch),  # type: ignore[attr-defined]
  }


Gemm = tuple[tuple[int, ...], tuple[int, ...], tuple]  # lhs shape, rhs shape, lax dimension_numbers


def traced_gemms(fn: Callable, *args) -> dict[Gemm, int]:
  """Every dot_general in the jaxpr of fn(*args) (arrays or jax.ShapeDtypeStruct), with how
  many times it runs (a scan body's GEMMs times the scan's length): the matmuls a program
  does, to time on their own with `time_gemms`. Raises on a while loop or a cond with GEMMs
  inside, whose counts depend on values; a shard_map body counts once, not once per shard."""
  counts: dict[Gemm, int] = {}

  def subjaxprs(eqn):
    for param in eqn.params.values():
      for sub in param if isinstance(param, tuple) else (param,):
        if isinstance(sub, jax.extend.core.ClosedJaxpr):
          yield sub.jaxpr
        elif isinstance(sub, jax.extend.core.Jaxpr):
          yield sub

  def walk(jaxpr, times: int) -> None:
    for eqn in jaxpr.eqns:
      if eqn.primitive.name == "dot_general":
        lhs, rhs = (tuple(v.aval.shape) for v in eqn.invars)
        key = (lhs, rhs, eqn.params["dimension_numbers"])
        counts[key] = counts.get(key, 0) + times
      inner = times * (eqn.params["length"] if eqn.primitive.name == "scan" else 1)
      for sub in subjaxprs(eqn):
        before = sum(counts.values())
        walk(sub, inner)
        if eqn.primitive.name in ("while", "cond") and sum(counts.values()) > before:
          raise ValueError(f"fn: a {eqn.primitive.name} runs its GEMMs a number of times known only at run time")

  walk(jax.make_jaxpr(fn)(*args).jaxpr, 1)
  return counts


def jitted_dot(**jit_options) -> Callable:
  """jax.lax.dot_general jitted with its dimension numbers static (`time_gemms`'s `dot`);
  `jit_options` go to jax.jit (e.g. compiler_options=)."""
  return jax.jit(jax.lax.dot_general, static_argnames=("dimension_numbers", "precision"), **jit_options)


def time_gemms(gemms: dict[Gemm, int], repeats: int, dot: Callable | None = None) -> float:
  """Seconds to run each GEMM of `gemms` as many times as it counts: every distinct one alone
  through `dot` (default `jitted_dot()`; pass one to reuse its compiled programs), float32
  operands, its median over `repeats` calls times its count."""
  dot = jitted_dot() if dot is None else dot
  total = 0.0
  for (lhs, rhs, dims), count in gemms.items():
    operands = jnp.ones(lhs, jnp.float32), jnp.ones(rhs, jnp.float32)
    total += count * time_fn(dot, *operands, dimension_numbers=dims, repeats=repeats).median_s
  return total


def training_gemms(model: llama.LlamaConfig, batch_size: int, seq_len: int) -> dict[Gemm, int]:
  """The GEMMs of one gradient of the loss (the training step's only matmuls; AdamW has none),
  traced on shapes alone."""
  params = jax.eval_shape(lambda: llama.init(jax.random.key(0), model))
  windows = np.zeros((batch_size, seq_len + 1), np.int32)
  return traced_gemms(jax.grad(functools.partial(lm.loss_fn, cfg=model)), params, lm.packed_batch(windows, windows))


def _train_speed(ctx: Context, speed: Speed):
  """One AdamW step of each model, scanned and unrolled, against a GEMM timed in the same run."""
  a = jnp.ones((speed.gemm, speed.gemm), jnp.float32)
  gemm_s = time_fn(jax.jit(lambda a: a @ a), a, repeats=ctx.repeats).median_s
  peak = 2 * speed.gemm**3 / gemm_s
  records = [ctx.record(f"float32 GEMM {speed.gemm}^3 (the MFU peak)", peak / 1e9, "GFLOP/s")]
  for base in speed.models:
    label = f"{base.num_params() / 1e6:.1f}M params, B={speed.batch}, T={speed.seq_len}"
    gemms_s = time_gemms(training_gemms(base, speed.batch, speed.seq_len), ctx.repeats)  # the same for both layouts
    for unroll in (False, True):
      model = dataclasses.replace(base, unroll=unroll)
      programs = training_programs(model, speed.batch, speed.seq_len, ctx.seed)
      times = {name: time_fn(fn, repeats=ctx.repeats).median_s for name, fn in programs.items()}
      tokens_per_s = speed.batch * speed.seq_len / times["step"]
      layout = "unrolled" if unroll else "scanned"
      records += [
        ctx.record(f"the step's GEMMs alone / the step ({label}), {layout}", gemms_s / times["step"], "fraction"),
        ctx.record(f"training tokens/s ({label}), {layout}", tokens_per_s, "tokens/s"),
        ctx.record(
          f"backward / forward time ({label}), {layout}",
          (times["grad"] - times["forward"]) / times["forward"],
          "x",
          "~2",
          "a backward pass costs about twice the forward's FLOPs",
        ),
        ctx.record(
          f"MFU vs the GEMM ({label}), {layout}",
          train_flops_per_token(model, speed.seq_len) * tokens_per_s / peak,
          "fraction",
        ),
      ]
  notes = [
    "train_speed: a training step is the loss's forward and backward, the global-norm clip and AdamW; "
    "backward / forward is (time of jax.grad of the loss - time of the loss) / time of the loss. "
    "PyTorch on the same shapes, side by side: scripts/train_speed_vs_torch.py (README, 'Training speed')."
  ]
  return records, notes


def _checked(ctx: Context, cfg: Config, params: dict):
  """Time with the value checks over time without: the median of per-round ratios, the two
  sides alternating within each round (the machine's speed drifts between minutes)."""
  model, batch, time = cfg.model, cfg.batch, cfg.prefill_len
  tokens_BT = jax.random.randint(jax.random.key(ctx.seed), (batch, time), 0, model.vocab_size)
  plain = jax.jit(llama.forward, static_argnames="cfg")
  checked = checks.checked(llama.forward, static_argnames="cfg")
  speed = cfg.speed
  step = training_programs(speed.models[0], speed.batch, speed.seq_len, ctx.seed)

  def ratio(with_checks: Callable, without: Callable) -> float:
    rounds = [
      time_fn(with_checks, repeats=ctx.repeats).median_s / time_fn(without, repeats=ctx.repeats).median_s
      for _ in range(5)
    ]
    return float(np.median(rounds))

  forward = ratio(lambda: checked(params, tokens_BT, cfg=model), lambda: plain(params, tokens_BT, cfg=model))
  label = f"{speed.models[0].num_params() / 1e6:.1f}M params, B={speed.batch}, T={speed.seq_len}"
  return [
    ctx.record(
      f"forward under checks.checked / plain jit ({model.num_params() / 1e6:.1f}M params, B={batch}, T={time})",
      forward,
      "x",
    ),
    ctx.record(
      f"train step with its host batch check / jitted step alone ({label})", ratio(step["step"], step["step_core"]), "x"
    ),
  ]


if __name__ == "__main__":
  app.run(cli.main_for({"llama": Benchmark(run, PARTS, claims=CLAIMS)}))
