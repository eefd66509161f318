"""Quantization of the stdlib Llama: Llama 3's FP8 policy beside INT8 alternatives.

  python -m paperjax.bench.quant --scale=small [--only=quant.quality,quant.bound,...]

The model is bench/llama's (its config, with `n_layers` from this benchmark's, and its stdlib
data), trained here. Compute is bf16 for
every variant but the float32 reference; quantized layers follow `llama_quant.POLICIES`.

Parts:
- quality: held-out perplexity and teacher-forced top-1 agreement with the float32 model
  (every held-out position) for bf16, Llama 3's FP8 (FFN of layers 1..L-2, activation
  scales bounded at 1200), FP8 without the first/last-layer exemption, FP8 without the
  bound, INT8 weight-only per tensor and per row, and W8A8; weight memory of each.
- bound: what the activation-scale bound protects against. A real FFN input row (layer 1,
  after its RMSNorm) with one outlier channel is quantized to FP8, row-wise, and
  multiplied by layer 1's float W1: relative error of the other channels' contribution
  and the fraction of them that flush to zero, bounded vs unbounded, as the outlier grows.
- distribution: Llama 3's check. Generations (T = 1) from held-out prompts by the bf16
  model and by the FP8 policy, each scored by its mean log-prob per token under the
  float32 model; both histograms in one plot, and a two-sample KS test. Decision rule,
  set before the run: FP8 matches bf16 if the KS test does not reject at p < 0.05 and
  the mean scores differ by less than 0.05 nats.
- throughput: prefill tokens/s of the FP8 policy vs bf16 (a freshly initialised model of
  the same shape), side by side, beside the paper's "up to 50% more" (an H100 figure; on a
  CPU, XLA emulates FP8 dots). `python -m paperjax.bench.gpu_check` runs it at
  `--scale=paper` on a GPU.

Shapes: B batch (prompts), T time, D model width, E hidden width of the MLP, N new tokens.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import scipy.stats
from absl import app

from paperjax.align import logprobs
from paperjax.bench import cli
from paperjax.bench import llama as llama_bench
from paperjax.bench.harness import Benchmark, Context, Plot, Result, Series, progress, time_fn
from paperjax.models.serving import generate
from paperjax.models.training import lm
from paperjax.models.transformer import llama, llama_quant
from paperjax.ops import checks, norms, quant

LLAMA3 = "Llama 3 report (arXiv 2407.21783), FP8 inference"
FP8 = llama_quant.POLICIES["llama3_fp8"]
VARIANTS: dict[str, llama_quant.QuantPolicy | None] = {
  "bf16": None,
  "Llama 3 FP8": FP8,
  "FP8, all layers": dataclasses.replace(FP8, skip_first_last=False),
  "FP8, unbounded activation scales": dataclasses.replace(FP8, scale_ub=None),
  "INT8 weight-only, per tensor": llama_quant.POLICIES["int8_weight_tensor"],
  "INT8 weight-only, per row": llama_quant.POLICIES["int8_weight_row"],
  "W8A8 (per channel, per token)": llama_quant.POLICIES["w8a8"],
}


@checks.config
class Config:
  n_layers: int  # bench/llama's model at this scale, with this many layers (Llama 3's policy exempts two)
  train_steps: int
  generations: int
  prompt_len: int
  new_tokens: int
  prefill_batch: int
  prefill_len: int


CONFIGS = {
  "ci": Config(n_layers=4, train_steps=10, generations=16, prompt_len=8, new_tokens=8, prefill_batch=2, prefill_len=64),
  "small": Config(
    n_layers=4, train_steps=120, generations=256, prompt_len=16, new_tokens=32, prefill_batch=4, prefill_len=512
  ),
  "full": Config(
    n_layers=4, train_steps=400, generations=1024, prompt_len=16, new_tokens=32, prefill_batch=4, prefill_len=512
  ),
  "paper": Config(
    n_layers=8, train_steps=1000, generations=4096, prompt_len=64, new_tokens=256, prefill_batch=8, prefill_len=4096
  ),
}


def _trained(ctx: Context, cfg: Config) -> llama_bench.StdlibLM:
  base = llama_bench.CONFIGS[ctx.scale]
  tcfg = dataclasses.replace(base.train, total_steps=cfg.train_steps, warmup_steps=max(1, cfg.train_steps // 10))
  model = dataclasses.replace(base.model, n_layers=cfg.n_layers)
  return llama_bench.train_stdlib_lm(ctx, dataclasses.replace(base, model=model, train=tcfg))


def _variant(params: dict, model: llama.LlamaConfig, policy: llama_quant.QuantPolicy | None):
  """(params, cfg) of a variant as served: the policy's weights quantized from the float32
  ones, every other weight stored in bf16, bf16 compute."""
  model = dataclasses.replace(model, dtype="bfloat16")
  params = params if policy is None else llama_quant.quantize_params(params, model, policy)
  return quant.map_unquantized(lambda w: w.astype(jnp.bfloat16), params), model


def _quality(ctx: Context, trained: llama_bench.StdlibLM):
  batch = trained.test_batch
  mask = np.asarray(batch.mask_BT)
  tokens, positions, segments = (jnp.asarray(x) for x in (batch.tokens_BT, batch.positions_BT, batch.segment_ids_BT))
  top1 = lambda params, model: np.asarray(
    jnp.argmax(llama.forward(params, tokens, model, positions_BT=positions, segment_ids_BT=segments)[0], -1)
  )
  reference = top1(trained.params, trained.model)
  f32_bytes = llama_quant.weight_bytes(trained.params)
  records = [
    ctx.record("held-out perplexity, float32", float(np.exp(lm.eval_loss(trained.params, batch, trained.model))), "ppl")
  ]
  for name, policy in progress(VARIANTS.items(), "quant: quality", total=len(VARIANTS)):
    params, model = _variant(trained.params, trained.model, policy)
    records += [
      ctx.record(f"held-out perplexity, {name}", float(np.exp(lm.eval_loss(params, batch, model))), "ppl"),
      ctx.record(
        f"top-1 agreement with float32, {name}", float((top1(params, model) == reference)[mask].mean()), "fraction"
      ),
      ctx.record(f"weight memory / float32, {name}", llama_quant.weight_bytes(params) / f32_bytes, "ratio"),
    ]
  note = (
    f"Quality on {int(mask.sum())} held-out positions of the {trained.model.n_layers}-layer stdlib Llama "
    f"({trained.model.num_params() / 1e6:.2f}M parameters, {trained.tcfg.total_steps} training steps); weight memory "
    "counts every parameter (embeddings included) as served: quantized values with their float32 scales, bf16 for "
    "the rest."
  )
  return records, note


def _bound(ctx: Context, trained: llama_bench.StdlibLM):
  """An FFN input row with one outlier channel, through layer 1's W1 in FP8."""
  layers, model = trained.params["layers"], trained.model
  w_DE = layers["w1"][1]
  batch = trained.test_batch
  tokens, positions, segments = (
    jnp.asarray(x[:1]) for x in (batch.tokens_BT, batch.positions_BT, batch.segment_ids_BT)
  )
  site = ("blocks.1.hook_resid_mid",)
  _, _, acts = llama.forward_with_sites(
    trained.params, tokens, model, site, positions_BT=positions, segment_ids_BT=segments
  )
  x_D = norms.rms_norm(acts["blocks.1.hook_resid_mid"][0, 5], layers["mlp_norm"][1], model.norm_eps)  # W1's input
  outliers = (1e1, 1e2, 1e3, 1e4, 1e5, 1e6)
  curves: dict[str, list[float]] = {"bounded (1200)": [], "unbounded": []}
  records = []
  for size in outliers:
    x = x_D.at[0].set(size)[None]
    exact = np.asarray(x[:, 1:] @ w_DE[1:])  # the other channels' contribution
    for label, bound in (("bounded (1200)", 1200.0), ("unbounded", None)):
      xq = quant.quantize(x, "fp8", "row", scale_ub=bound)
      x_hat = np.asarray(quant.dequantize(xq))
      approx = x_hat[:, 1:] @ np.asarray(w_DE[1:])
      error = float(np.linalg.norm(approx - exact) / np.linalg.norm(exact))
      flushed = float(np.mean((x_hat[0, 1:] == 0) & (np.asarray(x[0, 1:]) != 0)))
      curves[label].append(error)
      if size in (1e2, 1e4, 1e6):
        records += [
          ctx.record(f"row output error from the other channels, outlier {size:g}, {label}", error, "relative L2"),
          ctx.record(f"other channels flushed to zero, outlier {size:g}, {label}", flushed, "fraction"),
        ]
  plot = Plot(
    "bound",
    "FP8 activations (float W1) with one outlier channel: error of the rest of the row",
    "outlier magnitude",
    "relative error of x[1:] @ W1[1:]",
    tuple(Series(label, outliers, tuple(v)) for label, v in curves.items()),
    xscale="log",
    yscale="log",
  )
  return records, plot


def _scores(trained: llama_bench.StdlibLM, cfg: Config, policy, prompts_BT: np.ndarray, key: jax.Array):
  """Mean log-prob per generated token under the float32 model, one per generation [N]."""
  params, model = _variant(trained.params, trained.model, policy)
  lengths = jnp.full((prompts_BT.shape[0],), prompts_BT.shape[1], jnp.int32)
  new_BN, _ = generate.generate(
    key, params, model, jnp.asarray(prompts_BT), lengths, max_new_tokens=cfg.new_tokens, temperature=1.0
  )
  tokens = jnp.concatenate([jnp.asarray(prompts_BT), new_BN], axis=1)
  mask = jnp.arange(tokens.shape[1])[None] >= prompts_BT.shape[1]
  seq = logprobs.model_logprobs(trained.params, trained.model, tokens, jnp.broadcast_to(mask, tokens.shape))
  return np.asarray(seq.mean_B)


def _distribution(ctx: Context, cfg: Config, trained: llama_bench.StdlibLM):
  starts = np.random.default_rng(ctx.seed).integers(0, trained.test_ids.size - cfg.prompt_len, cfg.generations)
  prompts = np.stack([trained.test_ids[s : s + cfg.prompt_len] for s in starts]).astype(np.int32)
  key = jax.random.key(ctx.seed)
  bf16 = _scores(trained, cfg, None, prompts, key)  # the same sampling keys for both
  fp8 = _scores(trained, cfg, FP8, prompts, key)
  ks = scipy.stats.ks_2samp(bf16, fp8)
  bins = np.histogram_bin_edges(np.concatenate([bf16, fp8]), bins=30)
  centres = tuple(float(c) for c in (bins[:-1] + bins[1:]) / 2)
  density = lambda s: tuple(float(x) for x in np.histogram(s, bins=bins, density=True)[0])
  same = ks.pvalue >= 0.05 and abs(fp8.mean() - bf16.mean()) < 0.05
  records = [
    ctx.record("mean score of generations, bf16", float(bf16.mean()), "nats/token"),
    ctx.record("mean score of generations, Llama 3 FP8", float(fp8.mean()), "nats/token"),
    ctx.record("mean score FP8 - bf16", float(fp8.mean() - bf16.mean()), "nats/token", "no visible change", LLAMA3),
    ctx.record(
      "standard error of that difference", float(np.sqrt(bf16.var() / bf16.size + fp8.var() / fp8.size)), "nats/token"
    ),
    ctx.record("KS statistic, FP8 vs bf16 score distributions", float(ks.statistic), "D"),
    ctx.record("KS p-value, FP8 vs bf16 score distributions", float(ks.pvalue), "p", ">= 0.05: same", LLAMA3),
  ]
  plot = Plot(
    "distribution",
    f"Score of {cfg.generations} generations under the float32 model: bf16 vs FP8",
    "mean log-prob per generated token (nats)",
    "density",
    (Series("bf16", centres, density(bf16)), Series("Llama 3 FP8", centres, density(fp8))),
  )
  note = (
    f"Distribution check: {cfg.generations} prompts of {cfg.prompt_len} held-out tokens, {cfg.new_tokens} new tokens "
    f"at T = 1 with the same keys; decision rule (set before the run): the same if KS p >= 0.05 and |mean difference| "
    f"< 0.05 nats. Result: {'the same' if same else 'different'} (p = {ks.pvalue:.3g}, "
    f"difference {fp8.mean() - bf16.mean():+.4f})."
  )
  return records, plot, note


def _throughput(ctx: Context, cfg: Config):
  """Prefill of a freshly initialised model (speed does not depend on training)."""
  base = dataclasses.replace(llama_bench.CONFIGS[ctx.scale].model, n_layers=cfg.n_layers)
  init = llama.init(jax.random.key(ctx.seed), base)
  tokens = jax.random.randint(jax.random.key(1), (cfg.prefill_batch, cfg.prefill_len), 0, base.vocab_size)
  lengths = jnp.full((cfg.prefill_batch,), cfg.prefill_len, jnp.int32)
  prefill = jax.jit(lambda p, t, model: llama.prefill(p, t, model, lengths_B=lengths)[0], static_argnums=2)
  rates = {}
  for name in ("bf16", "Llama 3 FP8"):
    params, model = _variant(init, base, VARIANTS[name])
    rates[name] = (
      cfg.prefill_batch * cfg.prefill_len / time_fn(prefill, params, tokens, model, repeats=ctx.repeats).median_s
    )
  shape = f"B={cfg.prefill_batch}, T={cfg.prefill_len}"
  return [
    ctx.record(f"prefill tokens/s, bf16 ({shape})", rates["bf16"], "tokens/s"),
    ctx.record(f"prefill tokens/s, Llama 3 FP8 ({shape})", rates["Llama 3 FP8"], "tokens/s"),
    ctx.record(
      f"prefill speed-up, FP8 vs bf16 ({shape}, same run)",
      rates["Llama 3 FP8"] / rates["bf16"],
      "x",
      1.5,
      f"{LLAMA3}: up to 50% more prefill throughput (H100, 4096 in)",
    ),
  ]


PARTS = ("quality", "bound", "distribution", "throughput")  # --only=quant.<part>


def run(ctx: Context) -> Result:
  cfg = CONFIGS[ctx.scale]
  needs_training = {"quality", "bound", "distribution"} & set(ctx.selected_parts())
  trained = _trained(ctx, cfg) if needs_training else None
  records: list = []
  plots: list[Plot] = []
  notes: list[str] = []
  if ctx.wants("quality") and trained is not None:
    part_records, note = _quality(ctx, trained)
    records += part_records
    notes.append(note)
  if ctx.wants("bound") and trained is not None:
    part_records, plot = _bound(ctx, trained)
    records += part_records
    plots.append(plot)
  if ctx.wants("distribution") and trained is not None:
    part_records, plot, note = _distribution(ctx, cfg, trained)
    records += part_records
    plots.append(plot)
    notes.append(note)
  if ctx.wants("throughput"):
    records += _throughput(ctx, cfg)
  return Result(ctx.benchmark, tuple(records), tuple(plots), tuple(notes))


if __name__ == "__main__":
  app.run(cli.main_for({"quant": Benchmark(run, PARTS)}))
