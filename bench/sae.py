"""Sparse autoencoders on our Llama's residual stream: five architectures, judged by splicing.

  python -m paperjax.bench.sae --scale=small [--only=sae.frontier,sae.features]
  python -m paperjax.bench.sae --scale=full --only=sae.frontier   # 3 seeds x 4 sparsities

A Llama is trained on the stdlib corpus (bench/llama's setup); the residual stream at
`site` over `windows` training windows is collected once, and every SAE trains on shuffled
epochs of the same activations (scaled to E||x||^2 = D). Held-out windows give the metrics.

Parts:
- frontier: each architecture (standard ReLU+L1, TopK+AuxK, BatchTopK, Gated, JumpReLU) at
  several sparsities and seeds: L0, explained variance, CE loss recovered by splicing x_hat
  into the forward pass (against zero ablation and the clean model), KL of spliced vs clean,
  dead and dense fractions; plots of L0 vs loss recovered and L0 vs explained variance;
  training throughput (tokens/s) per architecture timed side by side, as a ratio to standard.
- features: for one TopK SAE, the feature-density histogram, the top-activating held-out
  contexts of a few features, and steering: x + scale * W_dec[f] at the site raises the
  probability of the tokens the feature promotes (chosen on half the held-out windows,
  measured on the other half), and a greedy continuation with and without it.

Claims (`CLAIMS`, decided by the frontier part): TopK, BatchTopK, Gated and JumpReLU each beat
the standard SAE on both frontiers. A point beats the standard frontier when its metric
exceeds the standard points' metric interpolated linearly in log L0 at its L0 (sparser than
every standard point: the sparsest standard point's metric; denser than every standard point:
not comparable). Points are seed means. An architecture's claim holds when every comparable
point lies above the standard frontier on both metrics, fails when any point does not, and
is undecided when none of its points is comparable. This is the rule written here before
the first runs, on Test/Rule; the old rule called a frontier with some points above and some
below "mixed", which now fails the claim.

Shapes: B batch rows (windows), T time, N tokens (rows of activations), D the site's width,
F dictionary features.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Iterator, Sequence

import jax
import numpy as np
from absl import app

from paperjax.bench import cli
from paperjax.bench import llama as bench_llama
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
from paperjax.interp import sae, sae_eval, sae_train
from paperjax.models import protocol
from paperjax.models.data import tokenizer
from paperjax.ops import checks

SOURCES = {
  "steering": "Anthropic, Scaling Monosemanticity (2024): adding a feature's decoder direction steers the output",
}
# The two frontiers: (name, index of the metric in a point (L0, explained variance, loss recovered)).
FRONTIERS = (("loss recovered", 2), ("explained variance", 1))
COMPARABLE = "comparable points"  # points no denser than the densest standard point


def above(metric: str) -> str:
  """The statistic: the share of an architecture's comparable points above the standard frontier."""
  return f"share of comparable points above the standard {metric} frontier"


# Every comparable point above on both frontiers (shares here are k/n with n <= 4: > 0.99 means all);
# nothing to compare when every point is denser than the densest standard point.
BEATS_STANDARD = Rule(
  tests=tuple(Test(statistic=above(metric), op=">", bound=0.99, over="mean") for metric, _ in FRONTIERS),
  requires=(Test(statistic=COMPARABLE, op=">", bound=0.0, over="mean"),),
  unmet="nothing to compare",
)
CLAIMS = (
  ClaimSpec(
    name="TopK beats ReLU+L1",
    part="frontier",
    source="Gao et al., Scaling and evaluating sparse autoencoders (arXiv 2406.04093), abstract",
    claim="using k-sparse autoencoders to directly control sparsity, simplifying tuning and improving the "
    "reconstruction-sparsity frontier (over ReLU autoencoders with an L1 penalty)",
    rule=BEATS_STANDARD,
  ),
  ClaimSpec(
    name="BatchTopK beats ReLU+L1",
    part="frontier",
    source="Bussmann et al., BatchTopK Sparse Autoencoders (arXiv 2412.06410), Sec. 4, Figs. 1-2",
    claim="BatchTopK SAEs consistently outperform TopK SAEs in reconstructing activations (tested here against "
    "ReLU+L1, which TopK beats; the paper compares with TopK and JumpReLU only)",
    rule=BEATS_STANDARD,
  ),
  ClaimSpec(
    name="Gated beats ReLU+L1",
    part="frontier",
    source="Rajamanoharan et al., Improving Dictionary Learning with Gated SAEs (arXiv 2404.16014), Fig. 1, Sec. 4.1",
    claim="Gated SAEs are a Pareto improvement over baseline SAEs holding training compute fixed: they yield "
    "sparser decompositions at any desired level of reconstruction fidelity",
    rule=BEATS_STANDARD,
  ),
  ClaimSpec(
    name="JumpReLU beats ReLU+L1",
    part="frontier",
    source="Rajamanoharan et al., Jumping Ahead: JumpReLU SAEs (arXiv 2407.14435), Sec. 5, Fig. 2",
    claim="at any given level of sparsity, JumpReLU SAEs consistently provide more faithful reconstructions than "
    "Gated SAEs (tested here against ReLU+L1, which Gated beats; the paper compares with Gated and TopK)",
    rule=BEATS_STANDARD,
  ),
)
CLAIM_OF = {"topk": CLAIMS[0], "batchtopk": CLAIMS[1], "gated": CLAIMS[2], "jumprelu": CLAIMS[3]}
PARTS = ("frontier", "features")  # --only=sae.<part>


@checks.config
class Config:
  lm: bench_llama.Config
  site: str
  windows: checks.PositiveInt  # training windows of the LM (lm.train batch shape) whose activations are collected
  expansion: checks.PositiveInt  # F = expansion * D
  steps: int
  batch_size: int
  lr: float
  threshold_lr: float  # JumpReLU's log-thresholds (sae_train.TrainConfig)
  init_threshold: float
  dead_tokens: int
  # per architecture: the sparsity settings, lambda (standard, gated, jumprelu) or k (topk, batchtopk)
  grid: tuple[tuple[str, tuple[float, ...]], ...]
  seeds: tuple[int, ...]
  steer_scale: float  # in units of the site's root-mean-square activation norm
  new_tokens: int

  def __post_init__(self):
    archs = [arch for arch, _ in self.grid]
    if len(archs) != len(sae.ARCHITECTURES) or set(archs) != set(sae.ARCHITECTURES):
      raise ValueError(f"grid: expected each of {sae.ARCHITECTURES} once (the claims compare them all), got {archs}")
    protocol.check_site(self.lm.model, self.site)
    if not self.seeds:
      raise ValueError(f"seeds: expected at least one seed, got {self.seeds}")


SMALL = Config(
  lm=bench_llama.SMALL,  # the model llama's train part trains: the suite trains it once
  site="blocks.1.hook_resid_post",  # the middle of its 4 layers
  windows=60,
  expansion=4,
  steps=250,
  batch_size=512,
  lr=1e-3,
  threshold_lr=3e-2,
  init_threshold=0.1,
  dead_tokens=50_000,
  grid=(
    ("standard", (2.0, 5.0)),
    ("topk", (8.0, 32.0)),
    ("batchtopk", (8.0, 32.0)),
    ("gated", (1.0, 3.0)),
    ("jumprelu", (0.1, 1.0)),
  ),
  seeds=(0,),
  steer_scale=1.0,
  new_tokens=16,
)
CONFIGS = {
  "ci": dataclasses.replace(
    SMALL,
    lm=bench_llama.CONFIGS["ci"],
    site="blocks.0.hook_resid_post",
    windows=8,
    expansion=2,
    steps=4,
    batch_size=64,
    grid=(("standard", (2.0,)), ("topk", (8.0,)), ("batchtopk", (8.0,)), ("gated", (1.0,)), ("jumprelu", (0.1,))),
    new_tokens=2,
  ),
  "small": SMALL,
  "full": dataclasses.replace(
    SMALL,
    lm=bench_llama.CONFIGS["full"],
    windows=200,
    steps=1000,
    grid=(
      ("standard", (1.0, 2.0, 5.0, 10.0)),
      ("topk", (4.0, 8.0, 16.0, 32.0)),
      ("batchtopk", (4.0, 8.0, 16.0, 32.0)),
      ("gated", (0.3, 1.0, 3.0, 10.0)),
      ("jumprelu", (0.03, 0.1, 0.3, 1.0)),
    ),
    seeds=(0, 1, 2),
  ),
  "paper": dataclasses.replace(SMALL, lm=bench_llama.CONFIGS["paper"], windows=2000, steps=20_000, seeds=(0, 1, 2)),
}


def sae_config(cfg: Config, arch: str, value: float, d_in: int) -> sae.SAEConfig:
  topk = arch in ("topk", "batchtopk")
  return sae.SAEConfig(
    architecture=arch,  # type: ignore[arg-type]
    d_in=d_in,
    d_sae=cfg.expansion * d_in,
    dead_tokens=cfg.dead_tokens,
    k=int(value) if topk else 0,
    coefficient=0.0 if topk else value,
    init_threshold=cfg.init_threshold if arch == "jumprelu" else sae.SAEConfig.init_threshold,
  )


def train_config(cfg: Config, arch: str) -> sae_train.TrainConfig:
  return sae_train.TrainConfig(
    steps=cfg.steps,
    batch_size=cfg.batch_size,
    lr=cfg.lr,
    lr_warmup_steps=cfg.steps // 10,
    penalty_warmup_steps=cfg.steps // 5 if arch in ("standard", "gated", "jumprelu") else 0,
    threshold_lr=cfg.threshold_lr if arch == "jumprelu" else None,
  )


def epochs(acts_ND: np.ndarray, batch_size: int, seed: int) -> Iterator[np.ndarray]:
  """Batches of rows of acts_ND, each epoch in a fresh seeded order."""
  rng = np.random.default_rng(seed)
  while True:
    order = rng.permutation(len(acts_ND))
    for start in range(0, len(order) - batch_size + 1, batch_size):
      yield acts_ND[order[start : start + batch_size]]


def run(ctx: Context) -> Result:
  cfg = CONFIGS[ctx.scale]
  trained = bench_llama.train_stdlib_lm(ctx, cfg.lm)
  model, site = trained.model, cfg.site
  windows = [np.asarray(trained.train_batch(i).tokens_BT) for i in range(cfg.windows)]
  acts_ND = np.concatenate([sae_train.collect(trained.params, model, site, w) for w in windows])
  test_BT = np.asarray(trained.test_batch.tokens_BT)
  test_ND = sae_train.collect(trained.params, model, site, test_BT)
  if len(acts_ND) < cfg.batch_size:
    raise ValueError(f"windows: {len(acts_ND)} activations are fewer than batch_size={cfg.batch_size}")
  notes = [
    f"{model.num_params() / 1e6:.2f}M-parameter Llama ({model.n_layers} layers, D={model.dim}) trained "
    f"{trained.tcfg.total_steps} steps on the stdlib corpus (held-out loss {trained.evals[-1][1]:.2f} nats); SAEs "
    f"on {site}, F={cfg.expansion}x{model.dim}, {cfg.steps} Adam steps of {cfg.batch_size} tokens over "
    f"{len(acts_ND):,} collected training activations, scored on {len(test_ND):,} held-out tokens "
    f"({test_BT.shape[0]} windows of {test_BT.shape[1]}); seeds {list(cfg.seeds)}."
  ]
  records, plots = [], []
  saes: dict[tuple[str, float, int], tuple[sae.SAEConfig, dict]] = {}  # the trained SAEs, folded
  if ctx.wants("frontier"):
    part = _frontier(ctx, cfg, trained, acts_ND, test_ND, test_BT, saes)
    records += part[0]
    plots += part[1]
    notes += part[2]
  if ctx.wants("features"):
    part = _features(ctx, cfg, trained, acts_ND, test_ND, test_BT, saes)
    records += part[0]
    plots += part[1]
    notes += part[2]
  return Result(ctx.benchmark, tuple(records), tuple(plots), tuple(notes))


def _train(ctx, cfg, arch, value, seed, acts_ND, d_in):
  scfg = sae_config(cfg, arch, value, d_in)
  batches = epochs(acts_ND, cfg.batch_size, ctx.seed + seed)
  result = sae_train.train(jax.random.key(ctx.seed + seed), scfg, train_config(cfg, arch), batches)
  return scfg, sae.fold_scale(result.params, result.scale)


def _frontier(ctx, cfg, trained, acts_ND, test_ND, test_BT, saes):
  model, d_in = trained.model, trained.model.dim
  runs = [(arch, value, seed) for arch, values in cfg.grid for value in values for seed in cfg.seeds]
  rows: dict[tuple[str, float], list[tuple[sae_eval.Reconstruction, sae_eval.Splice]]] = {}
  for arch, value, seed in progress(runs, "sae: training SAEs"):
    scfg, folded = saes[arch, value, seed] = _train(ctx, cfg, arch, value, seed, acts_ND, d_in)
    recon = sae_eval.reconstruction(folded, scfg, test_ND)
    spliced = sae_eval.splice(trained.params, model, cfg.site, folded, scfg, test_BT)
    rows.setdefault((arch, value), []).append((recon, spliced))
  records: list = []
  points: dict[str, list[tuple[float, float, float]]] = {}  # arch -> [(L0, explained variance, loss recovered)]
  for (arch, value), results in rows.items():
    mean = lambda f, results=results: float(np.mean([f(r, s) for r, s in results]))
    spread = lambda f, results=results: float(np.std([f(r, s) for r, s in results]))
    setting = f"k={int(value)}" if arch in ("topk", "batchtopk") else f"lambda={value:g}"
    l0, ev, rec = mean(lambda r, s: r.l0), mean(lambda r, s: r.explained_variance), mean(lambda r, s: s.loss_recovered)
    points.setdefault(arch, []).append((l0, ev, rec))
    pm = f" (+- {spread(lambda r, s: s.loss_recovered):.3f} over {len(results)} seeds)" if len(results) > 1 else ""
    name = f"{arch} {setting}"
    records += [
      ctx.record(f"{name}: L0", l0, "features/token"),
      ctx.record(f"{name}: explained variance", ev, "fraction"),
      ctx.record(f"{name}: CE loss recovered{pm}", rec, "fraction"),
      ctx.record(f"{name}: KL(clean || spliced)", mean(lambda r, s: s.kl), "nats/token"),
      ctx.record(f"{name}: dead latents (never fire on held-out tokens)", mean(lambda r, s: r.dead), "fraction"),
      ctx.record(f"{name}: dense latents (fire on > 10% of tokens)", mean(lambda r, s: r.dense), "fraction"),
    ]
  first = next(iter(rows.values()))[0][1]
  notes = [
    f"Splicing baselines on the held-out windows: clean CE {first.ce_clean:.3f}, zero ablation of {cfg.site} "
    f"{first.ce_zero:.3f} nats/token."
  ]
  for arch, spec in CLAIM_OF.items():
    values: dict[str, Sequence[float] | float] = {}
    for metric, index in FRONTIERS:
      above_n, comparable = points_above_standard(points[arch], points["standard"], index)
      values[above(metric)] = above_n / comparable if comparable else float("nan")
      records.append(
        ctx.record(
          f"{arch} vs standard on L0-{metric}: {above_n} of {comparable} comparable points above the standard "
          f"frontier ({len(points[arch]) - comparable} denser than every standard point)",
          above_n,  # a count: the share is undefined when nothing is comparable
          "comparable points above",
        )
      )
    values[COMPARABLE] = comparable  # the same on both frontiers: it depends on L0 alone
    note = [f"{len(points[arch])} {arch} points against {len(points['standard'])} standard points, each a seed mean"]
    if not comparable:
      note.append("every point is denser than the densest standard point: nothing to compare")
    if arch == "gated":
      note.append("every SAE here has the same F, while the paper gave its baseline 50% more (equal compute)")
    ctx.claim(spec, values, seeds=[ctx.seed + s for s in cfg.seeds], note="; ".join(note))
  plot = lambda name, title, index, label: Plot(
    name,
    title,
    "L0 (features per token)",
    label,
    tuple(
      Series(arch, tuple(p[0] for p in sorted(ps)), tuple(p[index] for p in sorted(ps))) for arch, ps in points.items()
    ),
    xscale="log",
  )
  plots = [
    plot("frontier_loss", "SAE frontier: CE loss recovered vs L0", 2, "CE loss recovered"),
    plot("frontier_ev", "SAE frontier: explained variance vs L0", 1, "explained variance"),
  ]
  records += _throughput(ctx, cfg, acts_ND, d_in)
  return records, plots, notes


def points_above_standard(points, standard, index: int) -> tuple[int, int]:
  """(points above the standard frontier, comparable points), the rule of the module docstring.

  Each point is (L0, explained variance, loss recovered); `index` picks the metric."""
  std = sorted(standard)
  log_l0 = np.log([p[0] for p in std])
  values = np.array([p[index] for p in std])
  n_above = comparable = 0
  for point in points:
    if point[0] > std[-1][0]:
      continue  # denser than every standard point: no standard point to compare with
    reference = float(np.interp(math.log(point[0]), log_l0, values))  # np.interp holds values[0] below the range
    comparable += 1
    n_above += point[index] > reference
  return n_above, comparable


def _throughput(ctx, cfg, acts_ND, d_in):
  """Training tokens/s per architecture (its first setting), timed side by side."""
  x_BD = jax.numpy.asarray(acts_ND[: cfg.batch_size])
  rates = {}
  for arch, values in cfg.grid:
    scfg = sae_config(cfg, arch, values[0], d_in)
    tcfg = train_config(cfg, arch)
    state = sae_train.start_state(sae.init(jax.random.key(0), scfg), scfg, tcfg)
    step = sae_train.make_step(scfg, tcfg)
    step(state, x_BD)  # the host checks once; the timing below is the jitted core's
    rates[arch] = cfg.batch_size / time_fn(step.jitted, state, x_BD, repeats=ctx.repeats).median_s  # type: ignore[attr-defined]
  records = [ctx.record("standard: training throughput", rates["standard"], "tokens/s")]
  for arch, rate in rates.items():
    if arch != "standard":
      records.append(ctx.record(f"{arch}: training throughput / standard's", rate / rates["standard"], "ratio"))
  return records


def _features(ctx, cfg, trained, acts_ND, test_ND, test_BT, saes):
  model, d_in = trained.model, trained.model.dim
  k = dict(cfg.grid)["topk"][-1]
  if ("topk", k, cfg.seeds[0]) not in saes:  # the frontier part did not run
    saes["topk", k, cfg.seeds[0]] = _train(ctx, cfg, "topk", k, cfg.seeds[0], acts_ND, d_in)
  scfg, folded = saes["topk", k, cfg.seeds[0]]
  f_NF = np.asarray(sae.encode(folded, jax.numpy.asarray(test_ND), scfg))
  freq_F = sae_eval.firing_frequency(f_NF)
  bins = tuple(range(-5, 1))
  counts, dead = sae_eval.density_histogram(freq_F, bins=bins)
  plot = Plot(
    "density",
    f"Feature density, TopK k={int(k)} (log10 firing frequency on held-out tokens; {dead} never fired)",
    "log10 frequency (bin start)",
    "features",
    (Series("features", tuple(float(b) for b in bins[:-1]), tuple(float(c) for c in counts)),),
    kind="bar",
  )
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", RuntimeWarning)
    tok = tokenizer.from_name("cl100k_base")
  # Features that fire on 0.1%-10% of tokens, the ones with the largest top activation first.
  candidates = np.flatnonzero((freq_F > 1e-3) & (freq_F < 0.1))
  chosen = candidates[np.argsort(-f_NF[:, candidates].max(0), kind="stable")][:3]
  decode = lambda ids: trained.decode(tok, ids)
  contexts = sae_eval.top_contexts(f_NF, test_BT, chosen.tolist(), decode, n=3, before=8)
  notes = [
    f"Feature {c[0].feature} (fires on {freq_F[c[0].feature]:.2%} of tokens), top contexts: "
    + " | ".join(repr(x.text) for x in c)
    for c in contexts
  ]
  records = [
    ctx.record(f"TopK k={int(k)}: features that never fire on held-out tokens", dead / scfg.d_sae, "fraction"),
  ]
  if len(chosen):
    feature = int(chosen[0])
    rms = float(np.sqrt(np.mean(np.sum(test_ND**2, -1))))
    scale = cfg.steer_scale * rms
    direction = folded["W_dec"][feature] / np.linalg.norm(folded["W_dec"][feature])
    effect = sae_eval.steering_effect(trained.params, model, cfg.site, direction, scale, test_BT, n=5)
    records.append(
      ctx.record(
        f"steering feature {feature} (scale {cfg.steer_scale:g} x RMS norm): p(promoted tokens) steered / clean",
        effect.p_steered / effect.p_clean,
        "ratio",
        "> 1",
        SOURCES["steering"],
      )
    )
    prompt = test_BT[:1, :8]
    clean = sae_eval.steered_greedy(trained.params, model, prompt, cfg.new_tokens, cfg.site, direction, 0.0)
    steered = sae_eval.steered_greedy(trained.params, model, prompt, cfg.new_tokens, cfg.site, direction, scale)
    notes += [
      f"Steering feature {feature}: promoted tokens {[decode(np.asarray([t])) for t in effect.promoted]}, "
      f"their probability {effect.p_clean:.4f} -> {effect.p_steered:.4f} on held-out positions.",
      f"Greedy after {decode(prompt[0])!r}: clean {decode(np.asarray(clean[0]))!r}; "
      f"steered {decode(np.asarray(steered[0]))!r}.",
    ]
  return records, [plot], notes


if __name__ == "__main__":
  app.run(cli.main_for({"sae": Benchmark(run, PARTS, claims=CLAIMS)}))
