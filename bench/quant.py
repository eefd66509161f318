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
  model and by the FP8 policy (the same prompts and sampling keys), each scored by its mean
  log-prob per token under the float32 model; both histograms in one plot, and per sampling
  seed a two-sample KS test and the mean score difference. `replicates` sampling seeds of
  `generations` prompts each.
- throughput: prefill tokens/s of the FP8 policy vs bf16 (a freshly initialised model of
  the same shape), side by side, beside the paper's "up to 50% more" (an H100 figure; on a
  CPU, XLA emulates FP8 dots). `python -m paperjax.bench.gpu_check` runs it at
  `--scale=paper` on a GPU.

Claims (`CLAIMS`, rules fixed before the runs that decide them):
- FP8 leaves the score distribution unchanged: the rule written here before the first run
  (KS p >= 0.05 and |mean difference| < 0.05 nats) ported onto Test/Rule: the KS test does
  not reject (p > 0.05) for any sampling seed, and mean ± 2 sd over the seeds of the mean
  score difference lies within ±0.05 nats. Decided at `full`: 4 seeds x 2048 generations.
  bf16 and FP8 sample with the same prompts and keys, so the differences are paired: their
  spread per generation was 0.65 nats at `small` (standard error 0.041 over 256, 0.10
  unpaired), so one seed of 2048 has a standard error near 0.014 and ± 2 sd spans about
  ±0.03, inside the margin. One sample of 256 (the old form, at `small`) could not resolve it.
- FP8 prefill about 1.5x bf16: the speed-up over 1.25 (at least half the claimed gain), on a
  GPU at the paper's shapes (`--scale=paper`); the CPU's ratio is recorded with a note.

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
  replicates: int  # sampling seeds of the distribution check
  generations: int  # per sampling seed
  prompt_len: int
  new_tokens: int
  prefill_batch: int
  prefill_len: int


CONFIGS = {
  "ci": Config(
    n_layers=4, train_steps=10, replicates=2, generations=8, prompt_len=8, new_tokens=8, prefill_batch=2, prefill_len=64
  ),
  "small": Config(
    n_layers=4,
    train_steps=120,
    replicates=2,
    generations=128,
    prompt_len=16,
    new_tokens=32,
    prefill_batch=4,
    prefill_len=512,
  ),
  "full": Config(
    n_layers=4,
    train_steps=400,
    replicates=4,
    generations=2048,
    prompt_len=16,
    new_tokens=32,
    prefill_batch=4,
    prefill_len=512,
  ),
  "paper": Config(
    n_layers=8,
    train_steps=1000,
    replicates=4,
    generations=4096,
    prompt_len=64,
    new_tokens=256,
    prefill_batch=8,
    prefill_len=4096,
  ),
}

KS_P = "KS p-value, FP8 vs bf16 scores"
DIFFERENCE = "mean score FP8 - bf16 (nats/token)"
SPEED_UP = "prefill speed-up, FP8 / bf16"
MARGIN = 0.05  # nats/token: the largest mean score difference that counts as "unchanged"
CLAIMS = (
  ClaimSpec(
    name="FP8 leaves the score distribution unchanged",
    part="distribution",
    source="Llama 3 report (arXiv 2407.21783), Sec. 6.2, Fig. 26",
    claim="the reward-score distribution of 100,000 responses is the same with FP8 and BF16 inference: our FP8 "
    "quantization approach has negligible impact on the model's responses (scored here by the float32 model's "
    "log-prob, not a reward model)",
    rule=Rule(
      tests=(
        Test(statistic=KS_P, op=">", bound=0.05),
        Test(statistic=DIFFERENCE, op="|x| <=", bound=MARGIN, over="mean ± k sd"),
      ),
      decided_at="full",
    ),
  ),
  ClaimSpec(
    name="FP8 prefill about 1.5x bf16",
    part="throughput",
    source="Llama 3 report (arXiv 2407.21783), Sec. 6.2, Fig. 27",
    claim="FP8 inference leads to throughput improvements of up to 50% during the pre-fill stage (Llama 3 405B, "
    "4,096 input tokens, H100)",
    rule=Rule(tests=(Test(statistic=SPEED_UP, op=">", bound=1.25, over="mean"),), decided_at="paper", gpu=True),
  ),
)


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
  seeds = [ctx.seed + r for r in range(cfg.replicates)]
  scores: dict[str, list[np.ndarray]] = {"bf16": [], "fp8": []}
  for seed in progress(seeds, "quant: generations per sampling seed"):
    starts = np.random.default_rng(seed).integers(0, trained.test_ids.size - cfg.prompt_len, cfg.generations)
    prompts = np.stack([trained.test_ids[s : s + cfg.prompt_len] for s in starts]).astype(np.int32)
    key = jax.random.key(seed)
    scores["bf16"].append(_scores(trained, cfg, None, prompts, key))  # the same sampling keys for both
    scores["fp8"].append(_scores(trained, cfg, FP8, prompts, key))
  ks = [scipy.stats.ks_2samp(b, f) for b, f in zip(scores["bf16"], scores["fp8"])]
  differences = [float(f.mean() - b.mean()) for b, f in zip(scores["bf16"], scores["fp8"])]
  bf16, fp8 = np.concatenate(scores["bf16"]), np.concatenate(scores["fp8"])
  paired = fp8 - bf16  # the same prompt and key: one difference per generation
  bins = np.histogram_bin_edges(np.concatenate([bf16, fp8]), bins=30)
  centres = tuple(float(c) for c in (bins[:-1] + bins[1:]) / 2)
  density = lambda s: tuple(float(x) for x in np.histogram(s, bins=bins, density=True)[0])
  n = bf16.size
  records = [
    ctx.record("mean score of generations, bf16", float(bf16.mean()), "nats/token"),
    ctx.record("mean score of generations, Llama 3 FP8", float(fp8.mean()), "nats/token"),
    ctx.record(
      f"mean score FP8 - bf16 ({n} generations)", float(paired.mean()), "nats/token", "no visible change", LLAMA3
    ),
    ctx.record(
      "standard error of that difference, unpaired", float(np.sqrt(bf16.var() / n + fp8.var() / n)), "nats/token"
    ),
    ctx.record(
      "standard error of that difference, paired (same prompt and key)",
      float(paired.std(ddof=1) / np.sqrt(n)) if n > 1 else float("nan"),
      "nats/token",
    ),
    ctx.record(
      "KS statistic, FP8 vs bf16 score distributions, all generations",
      float(scipy.stats.ks_2samp(bf16, fp8).statistic),
      "D",
    ),
  ]
  for seed, test, difference in zip(seeds, ks, differences):
    records += [
      ctx.record(f"KS p-value, FP8 vs bf16, sampling seed {seed}", float(test.pvalue), "p", "> 0.05: same", LLAMA3),
      ctx.record(f"mean score FP8 - bf16, sampling seed {seed}", difference, "nats/token"),
    ]
  ctx.claim(
    CLAIMS[0],
    {KS_P: [float(t.pvalue) for t in ks], DIFFERENCE: differences},
    seeds=seeds,
    note=f"{cfg.replicates} sampling seeds x {cfg.generations} generations of {cfg.new_tokens} tokens at T = 1 "
    f"(the same prompts and keys for bf16 and FP8), margin {MARGIN} nats/token on the mean score difference; the "
    f"score is the float32 model's mean log-prob per generated token, where the paper used a reward model on "
    f"100,000 responses.",
  )
  plot = Plot(
    "distribution",
    f"Score of {n} generations under the float32 model: bf16 vs FP8",
    "mean log-prob per generated token (nats)",
    "density",
    (Series("bf16", centres, density(bf16)), Series("Llama 3 FP8", centres, density(fp8))),
  )
  note = (
    f"Distribution check: {cfg.replicates} sampling seeds x {cfg.generations} prompts of {cfg.prompt_len} held-out "
    f"tokens, {cfg.new_tokens} new tokens at T = 1 with the same keys for both; mean score difference per seed "
    f"{[round(d, 4) for d in differences]}, KS p per seed {[float(f'{t.pvalue:.3g}') for t in ks]}."
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
  on_gpu = ctx.environment.backend == "gpu"
  ctx.claim(
    CLAIMS[1],
    {SPEED_UP: rates["Llama 3 FP8"] / rates["bf16"]},
    note=f"One timing (median of {ctx.repeats} calls each, side by side), {model.n_layers}-layer model, {shape} on "
    f"{ctx.environment.device_kind}"
    + ("" if on_gpu else "; on a CPU, XLA emulates FP8 dots, so this ratio says nothing about the claim")
    + "; the paper's 1.5x is Llama 3 405B on H100, FP8 on one node against BF16 on two.",
  )
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
  app.run(cli.main_for({"quant": Benchmark(run, PARTS, claims=CLAIMS)}))
