"""ExCP checkpoint compression: ratio, restored quality, resume, speed and a threshold sweep.

  python -m paperjax.bench.excp --scale=small [--only=excp.ratio,excp.sweep]

A Llama is trained on the stdlib corpus (bench/llama's setup) and its state (weights and
both Adam moments) is saved every `save_every` steps, through `ExcpCheckpointManager` and,
side by side, through orbax's own PyTree checkpointer with and without its zstd option.

Parts:
- ratio: bytes on disk per checkpoint and in total, against the dense float32 state (the
  paper's measure) and against orbax's checkpoints; coded bytes per component.
- restore: held-out loss of every restored checkpoint against the original's.
- resume: training resumed from a compressed mid-run checkpoint vs the original run.
- speed: encode and decode MB/s of the dense state, LZMA vs zstd.
- sweep: alpha, beta and bits one at a time: compression ratio vs held-out loss. It decides
  the claim (`CLAIMS`): per seed, the highest ratio over the alpha grid (beta 2, 4 bits) whose
  held-out loss stays within 1% of the uncompressed checkpoint's; `Config.seeds` models, the
  first the one every part studies, the others trained for the claim alone.
"""

from __future__ import annotations

import collections
import dataclasses
import os
import pathlib
import tempfile

import jax
import numpy as np
import orbax.checkpoint as ocp
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
from paperjax.compress import checkpoints, excp
from paperjax.models.training import lm, train
from paperjax.models.transformer import llama
from paperjax.ops import checks

PAPER = "ExCP (arXiv 2406.11257)"


@checks.config
class Config:
  lm: bench_llama.Config
  save_every: int
  resume_from: int  # the index of the saved checkpoint that training resumes from
  alphas: tuple[float, ...]
  betas: tuple[float, ...]
  bits: tuple[int, ...]
  seeds: checks.PositiveInt = 1  # models the claim is decided over: ctx.seed, ctx.seed + 1, ...

  def __post_init__(self):
    saves = self.lm.train.total_steps // self.save_every if self.save_every >= 1 else 0
    if saves < 3:
      raise ValueError(
        f"save_every: expected at most total_steps / 3 (a keyframe and 2 residuals), got {self.save_every}"
      )
    if not 1 <= self.resume_from < saves - 1:
      raise ValueError(f"resume_from: expected a checkpoint index in 1..{saves - 2}, got {self.resume_from}")


def _lm(model: llama.LlamaConfig, tcfg: train.TrainConfig, corpus_chars: int) -> bench_llama.Config:
  return dataclasses.replace(bench_llama.SMALL, model=model, train=tcfg, corpus_chars=corpus_chars)


FULL_ALPHAS = (5e-5, 1.5e-4, 5e-4, 1.5e-3, 5e-3, 1.5e-2, 5e-2)
SMALL = Config(
  lm=_lm(
    llama.LlamaConfig(vocab_size=2048, dim=128, n_layers=2, n_heads=8, n_kv_heads=2, ffn_dim=384, max_seq_len=256),
    train.TrainConfig(batch_size=8, seq_len=64, total_steps=80, warmup_steps=8),
    400_000,
  ),
  save_every=20,
  resume_from=2,
  alphas=(5e-5, 5e-4, 5e-3),
  betas=(0.5, 2.0, 8.0),
  bits=(2, 4, 6),
)
CONFIGS = {
  "ci": Config(
    lm=_lm(
      llama.LlamaConfig(vocab_size=256, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=64, max_seq_len=64),
      train.TrainConfig(batch_size=4, seq_len=32, total_steps=12, warmup_steps=2),
      100_000,
    ),
    save_every=4,
    resume_from=1,
    alphas=(5e-5,),
    betas=(2.0,),
    bits=(4,),
    seeds=2,  # the claim's other-seed path runs in the smoke test too (a few seconds)
  ),
  "small": SMALL,
  # full: the claim's decision, a half-decade alpha grid up to past the threshold factor's 2.5 cap, over 3 models.
  "full": dataclasses.replace(
    SMALL, lm=bench_llama.CONFIGS["full"], save_every=40, resume_from=5, alphas=FULL_ALPHAS, seeds=3
  ),
  # paper: a 0.13B-parameter model, 4 checkpoints of 1.5 GB held in host memory; the numpy codec takes minutes
  # each, so one model.
  "paper": dataclasses.replace(
    SMALL, lm=bench_llama.CONFIGS["paper"], save_every=250, resume_from=2, alphas=FULL_ALPHAS
  ),
}
PARTS = ("ratio", "restore", "resume", "speed", "sweep")  # --only=excp.<part>

# The claim and its rule, fixed before the run that decides it. The paper's bound stays: its
# ~70x is for Pythia-410M saved every 1000 steps; at full ours is a 1.3M-parameter Llama saved
# every 40 steps, and the note says so.
LOSS_TOLERANCE = 0.01  # the restored checkpoint's held-out loss may exceed the original's by 1%
EXCP_70X = ClaimSpec(
  name="about 70x at under 1% loss increase",
  part="sweep",
  source="ExCP (arXiv 2406.11257), abstract and Table 2: Pythia-410M 4.53 GB -> 0.06 GB, average of 6 tasks "
  "42.93 vs 43.11",
  claim="we achieve approximately 70x compression for the Pythia-410M model, with the final performance being as "
  "accurate as the original model on various downstream tasks",
  rule=Rule(
    tests=(Test(statistic="highest alpha-sweep ratio within 1% held-out loss", op=">", bound=70.0),),
    # a model that did not train leaves residuals of nothing, which compress without limit
    requires=(Test(statistic="held-out loss drop, first to last checkpoint", op=">", bound=0.0),),
    decided_at="full",
  ),
)
CLAIMS = (EXCP_70X,)


def _disk_bytes(path: os.PathLike) -> int:
  return sum(f.stat().st_size for f in pathlib.Path(os.fspath(path)).rglob("*") if f.is_file())


def run(ctx: Context) -> Result:
  cfg = CONFIGS[ctx.scale]
  saved: list[train.TrainState] = []
  every = cfg.save_every

  def keep(state: train.TrainState) -> None:
    if int(state.step) % every == 0:
      saved.append(jax.device_get(state))

  trained = bench_llama.train_stdlib_lm(ctx, cfg.lm, on_step=keep)
  loss_of = lambda params: float(lm.eval_loss(params, trained.test_batch, trained.model))
  original = [loss_of(s.params) for s in saved]
  parts = []
  if any(ctx.wants(p) for p in ("ratio", "restore", "resume")):
    with tempfile.TemporaryDirectory() as tmp, checkpoints.ExcpCheckpointManager(pathlib.Path(tmp) / "excp") as manager:
      infos = [manager.save(state) for state in progress(saved, "excp: saving")]
      if ctx.wants("ratio"):
        parts.append(_ratio(ctx, pathlib.Path(tmp), manager, saved, infos))
      if ctx.wants("restore"):
        parts.append(_restore(ctx, manager, saved, original, loss_of))
      if ctx.wants("resume"):
        parts.append(_resume(ctx, cfg, manager, saved, trained, loss_of))
  # speed and sweep code the last checkpoint against the previous one's true weights
  ckpt, previous = checkpoints.split_state(saved[-1]), checkpoints.split_state(saved[-2]).weights
  if ctx.wants("speed"):
    parts.append(_speed(ctx, ckpt, previous))
  if ctx.wants("sweep"):
    parts.append(_sweep(ctx, cfg, ckpt, previous, saved[-1], original, loss_of))
  note = (
    f"A {trained.model.num_params() / 1e6:.2f}M-parameter Llama trained {trained.tcfg.total_steps} steps on the "
    f"stdlib corpus; its state (weights, Adam m and v, counts) saved every {every} steps ({len(saved)} checkpoints), "
    "the first a keyframe stored exactly. Default codec: alpha 5e-5, beta 2, 4 bits, LZMA preset 9."
  )
  records = tuple(r for part_records, _ in parts for r in part_records)
  return Result(ctx.benchmark, records, tuple(plot for _, plot in parts if plot is not None), (note,))


def _ratio(ctx: Context, root: pathlib.Path, manager, saved, infos):
  orbax_bytes = {}
  for compression in (True, False):
    checkpointer = ocp.Checkpointer(ocp.PyTreeCheckpointHandler(use_compression=compression))
    sizes = []
    for state in saved:
      path = root / f"orbax_{compression}" / str(int(state.step))
      checkpointer.save(path, args=ocp.args.PyTreeSave(state))
      sizes.append(_disk_bytes(path))
    orbax_bytes[compression] = np.array(sizes)
  excp_bytes = np.array([_disk_bytes(manager.directory / str(i.step)) for i in infos])
  dense = np.array([i.dense_nbytes for i in infos])
  residual = slice(1, None)  # every checkpoint after the keyframe
  coded = dict.fromkeys(excp.COMPONENTS, 0)
  kept = np.zeros(3)  # entries, kept weight residuals, kept moments
  for info in infos[1:]:
    header = manager.header(info.step)
    for component, stream in header["streams"].items():
      coded[component] += stream["coded"]
    for record in header["records"]:
      if record["kind"] == "residual":
        kept += [np.prod(record["shape"]), *record["kept"]]
  n_res = len(infos) - 1
  records = [
    ctx.record(
      "residual checkpoint: dense float32 state / ExCP on disk (median)",
      float(np.median(dense[residual] / excp_bytes[residual])),
      "x",
      4.53 / 0.06,
      f"{PAPER}, Pythia-410M 4.53 GB -> 0.06 GB",
    ),
    ctx.record(
      "residual checkpoint: orbax (zstd) / ExCP on disk (median)",
      float(np.median(orbax_bytes[True][residual] / excp_bytes[residual])),
      "x",
    ),
    ctx.record(
      "residual checkpoint: orbax uncompressed / ExCP on disk (median)",
      float(np.median(orbax_bytes[False][residual] / excp_bytes[residual])),
      "x",
    ),
    ctx.record(
      "orbax uncompressed / orbax zstd on disk (median)", float(np.median(orbax_bytes[False] / orbax_bytes[True])), "x"
    ),
    ctx.record(
      f"all {len(infos)} checkpoints incl. the keyframe: orbax (zstd) / ExCP on disk",
      float(orbax_bytes[True].sum() / excp_bytes.sum()),
      "x",
    ),
  ]
  records += [
    ctx.record(f"residual checkpoint: coded {component} per checkpoint (mean)", coded[component] / n_res / 1024, "KiB")
    for component in ("weights", "m", "v", "masks")
  ]
  records += [
    ctx.record("residual checkpoints: weight residual entries kept", kept[1] / kept[0], "fraction"),
    ctx.record("residual checkpoints: moment entries kept", kept[2] / kept[0], "fraction"),
  ]
  steps = tuple(float(i.step) for i in infos)
  plot = Plot(
    "sizes",
    "Bytes on disk per checkpoint",
    "step",
    "KiB",
    (
      Series("dense float32 state", steps, tuple(dense / 1024)),
      Series("orbax uncompressed", steps, tuple(orbax_bytes[False] / 1024)),
      Series("orbax zstd", steps, tuple(orbax_bytes[True] / 1024)),
      Series("ExCP (LZMA)", steps, tuple(excp_bytes / 1024)),
    ),
    yscale="log",
  )
  return records, plot


def _restore(ctx: Context, manager, saved, original, loss_of):
  like = saved[0]
  restored = [loss_of(manager.restore(like, step=int(s.step)).params) for s in saved]
  deltas = np.array(restored) - np.array(original)
  records = [
    ctx.record(
      "held-out loss, restored - original, worst checkpoint",
      float(np.max(np.abs(deltas))),
      "nats/token",
      "~0 (avg accuracy 42.93 vs 43.11)",
      f"{PAPER}, Table 2",
    ),
    ctx.record("held-out loss, restored - original, last checkpoint", float(deltas[-1]), "nats/token"),
  ]
  steps = tuple(float(s.step) for s in saved)
  plot = Plot(
    "restored_loss",
    "Held-out loss of each checkpoint",
    "step",
    "loss (nats/token)",
    (Series("original", steps, tuple(original)), Series("restored from ExCP", steps, tuple(restored))),
  )
  return records, plot


def _resume(ctx: Context, cfg: Config, manager, saved, trained, loss_of):
  start = int(saved[cfg.resume_from].step)
  state = manager.restore(saved[0], step=start)
  losses = []
  for i in progress(range(start, trained.tcfg.total_steps), "excp: resuming"):
    state, metrics = trained.train_step(state, trained.train_batch(i))
    losses.append(float(metrics["loss"]))
  original = trained.losses[start:]
  final, final_original = loss_of(state.params), trained.evals[-1][1]
  records = [
    ctx.record(
      f"resumed at step {start}: final held-out loss - uninterrupted run's", final - final_original, "nats/token"
    ),
    ctx.record(
      f"resumed at step {start}: mean |training loss - uninterrupted run's|",
      float(np.mean(np.abs(np.array(losses) - np.array(original)))),
      "nats/token",
    ),
  ]
  steps = tuple(float(s) for s in range(start + 1, trained.tcfg.total_steps + 1))
  plot = Plot(
    "resume",
    f"Training loss after step {start}",
    "step",
    "loss (nats/token)",
    (Series("uninterrupted", steps, tuple(original)), Series("resumed from ExCP", steps, tuple(losses))),
  )
  return records, plot


def _speed(ctx: Context, ckpt: excp.Checkpoint, previous: excp.Arrays):
  dense_mb = ckpt.nbytes / 1e6
  records = []
  for coder in ("lzma", "zstd"):
    cfg = excp.ExcpConfig(coder=coder)
    blob, _ = excp.encode(ckpt, previous, cfg)
    # numpy, nothing to compile: the untimed encode above is the warm-up
    enc = time_fn(excp.encode, ckpt, previous, cfg, repeats=ctx.repeats, warmup=0).median_s
    dec = time_fn(excp.decode, blob, previous, repeats=ctx.repeats, warmup=0).median_s
    records += [
      ctx.record(f"encode MB/s of the dense state, {coder}", dense_mb / enc, "MB/s"),
      ctx.record(f"decode MB/s of the dense state, {coder}", dense_mb / dec, "MB/s"),
      ctx.record(f"residual checkpoint: dense / file bytes, {coder}", dense_mb * 1e6 / len(blob), "x"),
    ]
  return records, None


def _code(config: excp.ExcpConfig, ckpt: excp.Checkpoint, previous: excp.Arrays, like, loss_of):
  """(dense / file bytes, held-out loss of the decoded state, share of weight entries it changed)."""
  blob, recon = excp.encode(ckpt, previous, config)
  changed = sum(int(np.count_nonzero(recon.weights[k] != previous[k])) for k in previous)
  size = sum(int(np.size(previous[k])) for k in previous)
  return ckpt.nbytes / len(blob), loss_of(checkpoints.merge_state(recon, like).params), changed / size


def _sweep(ctx: Context, cfg: Config, ckpt: excp.Checkpoint, previous: excp.Arrays, like, original, loss_of):
  """One residual (the last checkpoint against the previous one's weights) per setting."""
  original_loss = original[-1]
  base = excp.ExcpConfig()
  grids = {
    "alpha": [dataclasses.replace(base, alpha=a) for a in cfg.alphas],
    "beta": [dataclasses.replace(base, beta=b) for b in cfg.betas],
    "bits": [dataclasses.replace(base, bits=b) for b in cfg.bits],
  }
  records, series, measured = [], [], {}
  for name, configs in grids.items():
    points = []
    for config in configs:
      if config not in measured:  # the default is in every grid
        measured[config] = _code(config, ckpt, previous, like, loss_of)
      ratio, loss, _ = measured[config]
      delta = loss - original_loss
      value = getattr(config, name)
      records += [
        ctx.record(f"sweep {name}={value:g}: dense / file bytes", ratio, "x"),
        ctx.record(f"sweep {name}={value:g}: held-out loss - original", delta, "nats/token"),
      ]
      points.append((ratio, delta))
    series.append(Series(f"{name} {[getattr(c, name) for c in configs]}", *map(tuple, zip(*points, strict=True))))
  plot = Plot(
    "sweep",
    "One residual checkpoint per setting",
    "compression ratio (x)",
    "held-out loss increase",
    tuple(series),
    xscale="log",
  )
  alpha_points = [(r, loss / original_loss - 1, kept) for r, loss, kept in (measured[c] for c in grids["alpha"])]
  _decide_claim(ctx, cfg, {ctx.seed: (alpha_points, original[0] - original_loss)})
  return records, plot


def _other_seed(ctx: Context, cfg: Config, seed: int):
  """A model trained for the claim alone: its alpha points and held-out loss drop, as `_sweep`'s."""
  first: list[train.TrainState] = []
  last: collections.deque[train.TrainState] = collections.deque(maxlen=2)

  def keep(state: train.TrainState) -> None:
    if int(state.step) % cfg.save_every == 0:
      last.append(jax.device_get(state))
      if not first:
        first.append(last[-1])

  trained = bench_llama.train_stdlib_lm(dataclasses.replace(ctx, seed=seed), cfg.lm, on_step=keep)
  loss_of = lambda params: float(lm.eval_loss(params, trained.test_batch, trained.model))
  ckpt, previous = checkpoints.split_state(last[-1]), checkpoints.split_state(last[-2]).weights
  original = loss_of(last[-1].params)
  points = []
  for alpha in progress(cfg.alphas, f"excp: alpha sweep, seed {seed}"):
    ratio, loss, kept = _code(dataclasses.replace(excp.ExcpConfig(), alpha=alpha), ckpt, previous, last[-1], loss_of)
    points.append((ratio, loss / original - 1, kept))
  return points, loss_of(first[0].params) - original


def best_ratio(points, tolerance: float = LOSS_TOLERANCE) -> float:
  """The highest ratio among (ratio, relative held-out loss increase, ...) points whose increase
  is at most `tolerance`; 1 (the dense state itself) when none is."""
  return max([1.0] + [float(p[0]) for p in points if p[1] <= tolerance])


def _decide_claim(ctx: Context, cfg: Config, by_seed: dict) -> None:
  """The 70x claim over `cfg.seeds` models; `by_seed` holds the first's (alpha points, loss drop)."""
  seeds = [ctx.seed + i for i in range(cfg.seeds)]
  for seed in seeds[1:]:
    by_seed[seed] = _other_seed(ctx, cfg, seed)
  best = {s: best_ratio(points) for s, (points, _) in by_seed.items()}
  rows = "; ".join(
    f"seed {s}: "
    + ", ".join(
      f"{a:g} {r:.1f}x {100 * rel:+.2f}% ({100 * kept:.0f}% kept)"
      for a, (r, rel, kept) in zip(cfg.alphas, points, strict=True)
    )
    for s, (points, _) in by_seed.items()
  )
  ctx.claim(
    EXCP_70X,
    {
      "highest alpha-sweep ratio within 1% held-out loss": [best[s] for s in seeds],
      "held-out loss drop, first to last checkpoint": [by_seed[s][1] for s in seeds],
    },
    seeds=seeds,
    note=(
      "Ratio: the dense float32 state (weights, Adam m and v) over the coded file of one residual checkpoint (the "
      "last against the previous one's weights), beta 2, 4 bits, LZMA; loss: held-out loss of the decoded state "
      "relative to the original's. Per alpha: ratio, loss change, weight-residual entries kept: "
      f"{rows}. The weight threshold min(2.5, alpha / sqrt(mean v)) x median |dW| stops pruning more at the 2.5 "
      "cap, which bounds what alpha can reach. The paper's ~70x is for Pythia-410M saved every 1000 steps; here a "
      f"{cfg.lm.model.num_params() / 1e6:.2f}M-parameter Llama trained {cfg.lm.train.total_steps} steps and saved "
      f"every {cfg.save_every}."
    ),
  )


if __name__ == "__main__":
  app.run(cli.main_for({"excp": Benchmark(run, PARTS, claims=CLAIMS)}))
