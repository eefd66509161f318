"""Tora: does motion guidance make a small video DiT follow a trajectory, per fuser and length?

  python -m paperjax.bench.tora --scale=small [--only=tora.guidance,tora.frames,tora.throughput,tora.strip]
  python -m paperjax.bench.tora --scale=full    # the decision run

Every model is a `models.diffusion.tora` ST-DiT trained with rectified flow on synthetic
videos of one blob (`models.data.blobs`) at `frames` frames, one model per fuser ("none" is
the DiT without motion guidance) and seed; seed s starts from key s and draws its own
videos. Generated videos are scored by `blobs.trajectory_error`: the per-frame distance in
pixels between the blob's brightness centroid and the requested trajectory (a frame with no
blob scores from the frame's middle).

Parts:
- guidance: each fuser's trajectory error at the training length, against "none".
- frames: the error at each of `eval_frames` frames (trained at `frames`), per fuser; the
  paper reports Tora's error at 128 frames 3-5x below U-Net methods' (MotionCtrl,
  DragNUWA), growing slowly with duration. There is no U-Net here: the nearest comparison
  is the unguided DiT, and the growth of the error with length.
- throughput: training and sampling frames per second, adaptive norm beside "none"
  (the extractor's and fuser's cost), timed side by side.
- strip: a PNG of generated frames, the requested trajectory drawn over them: the training
  data's rendering, the adaptive-norm model's sample and the unguided model's sample.

Shapes: B batch (videos), T frames, S caption tokens.
"""

from __future__ import annotations

import functools
import statistics
from collections.abc import Sequence
from typing import Any, cast

import jax
import jax.numpy as jnp
import numpy as np
from absl import app

from paperjax.bench import cli
from paperjax.bench.harness import (
  Benchmark,
  ClaimSpec,
  Context,
  Image,
  Plot,
  Record,
  Result,
  Rule,
  Series,
  Test,
  progress,
  time_fn,
)
from paperjax.models.data import blobs
from paperjax.models.diffusion import tora
from paperjax.models.training import train
from paperjax.ops import checks

TORA = "Tora (arXiv 2407.21705)"
EVAL_SEED = 10**7  # held-out videos: seeds EVAL_SEED + frames never occur in training (seeds 10**6 s + step)
# The claims and their rules, fixed before the run (harness.Rule decides them). Over the seeds,
# e_s(f, T) is fuser f's mean trajectory error (pixels) at T frames for seed s.
MARGIN_PX = 1.0  # guidance must gain more than a pixel
TIE_PX = 0.1  # fusers closer than this are tied
GROWTH_X = 2.0  # "grows slowly": the longest videos' error under twice the training length's
GUIDED = tora.FUSERS[1:]  # "none" is the DiT without motion guidance


def _gain(fuser: str) -> str:
  return f"e(none) - e({fuser}) at the training length (px)"


BEST = "min over the other fusers f of e(f) - e(adanorm) at the training length (px)"
GROWTH = "e(adanorm) at the longest length / at the training length"
CLAIMS = (
  *(
    ClaimSpec(
      name=f"guidance lowers the error ({f})",
      part="guidance",
      source=f"{TORA}, abstract (motion fidelity against the foundational DiT); each fuser design of the MGF",
      claim="Tora achieves high motion fidelity compared to the foundational DiT model",
      rule=Rule(tests=(Test(statistic=_gain(f), op=">", bound=MARGIN_PX, over="each seed"),), decided_at="full"),
    )
    for f in GUIDED
  ),
  ClaimSpec(
    name="adaptive norm is the best fuser",
    part="guidance",
    source=f"{TORA}, the Motion-guidance Fuser's designs (channel concatenation, cross-attention, adaptive norm)",
    claim="of the three fuser designs, adaptive normalisation follows the trajectory best",
    rule=Rule(tests=(Test(statistic=BEST, op=">", bound=TIE_PX, over="each seed"),), decided_at="full"),
  ),
  ClaimSpec(
    name="error grows slowly with duration",
    part="frames",
    source=f"{TORA}, trajectory error at 16 to 128 frames against MotionCtrl and DragNUWA",
    claim="Tora's trajectory error grows only slowly with the video's duration",
    rule=Rule(tests=(Test(statistic=GROWTH, op="<", bound=GROWTH_X, over="each seed"),), decided_at="full"),
  ),
)


@checks.config
class Config:
  width: int
  heads: int
  blocks: int
  patch: int = 4
  size: int = 32  # frames are size x size pixels
  radius: float = 4.0
  frames: int = 16  # the training length
  eval_frames: tuple[int, ...] = (8, 16, 32, 64)
  batch: int
  steps: int
  lr: float = 1e-3
  seeds: tuple[int, ...]
  eval_batch: int
  sample_steps: int  # Euler steps per generated video
  fusers: tuple[str, ...] = tora.FUSERS  # "none" and "adanorm" always: the baseline and the paper's choice

  def model(self, fuser: str) -> tora.ToraConfig:
    return tora.ToraConfig(
      patch=self.patch,
      width=self.width,
      heads=self.heads,
      mlp_hidden=2 * self.width,
      blocks=self.blocks,
      fuser=cast(tora.Fuser, fuser),
    )

  def data(self, frames: int) -> blobs.BlobConfig:
    return blobs.BlobConfig(frames=frames, height=self.size, width=self.size, radius=self.radius)


FULL = Config(width=48, heads=4, blocks=2, batch=8, steps=500, seeds=(0, 1, 2), eval_batch=16, sample_steps=20)
CONFIGS = {
  # ci: seconds, every part (the other fusers' paths are unit-tested); small: a pipeline check
  # (its errors decide nothing).
  "ci": Config(
    width=16,
    heads=2,
    blocks=1,
    size=16,
    radius=2.0,
    frames=4,
    eval_frames=(4,),
    batch=2,
    steps=3,
    seeds=(0,),
    eval_batch=2,
    sample_steps=2,
    fusers=("none", "adanorm"),
  ),
  "small": Config(
    width=32,
    heads=2,
    blocks=1,
    eval_frames=(16,),
    batch=4,
    steps=30,
    seeds=(0,),
    eval_batch=4,
    sample_steps=4,
    fusers=("none", "adanorm"),
  ),
  "full": FULL,
  "paper": FULL,  # the paper's 144p-720p at 128 frames is a GPU cluster's; full is the largest CPU run
}


class Trained:
  """Each fuser's model per seed, trained once and shared by the parts."""

  def __init__(self, ctx: Context, cfg: Config):
    self.ctx, self.cfg = ctx, cfg
    self._params: dict[tuple[str, int], Any] = {}
    self._steps: dict[str, Any] = {}
    self.tcfg = train.TrainConfig(
      batch_size=cfg.batch,
      seq_len=cfg.frames,
      peak_lr=cfg.lr,
      total_steps=cfg.steps,
      warmup_steps=min(50, cfg.steps // 10),
      weight_decay=0.0,
    )

  def step(self, fuser: str):
    if fuser not in self._steps:
      mcfg = self.cfg.model(fuser)
      objective = functools.partial(_objective, cfg=mcfg)
      self._steps[fuser] = train.make_step(objective, self.tcfg, check_args=functools.partial(_check_args, cfg=mcfg))
    return self._steps[fuser]

  def params(self, fuser: str, seed: int) -> Any:
    key = (fuser, seed)
    if key not in self._params:
      cfg, step = self.cfg, self.step(fuser)
      state = train.start_state(tora.init(jax.random.key(self.ctx.seed + seed), cfg.model(fuser)), self.tcfg)
      for i in progress(range(cfg.steps), f"tora: train {fuser}, seed {seed}"):
        data = blobs.sample(10**6 * (self.ctx.seed + seed) + i, cfg.batch, cfg.data(cfg.frames))
        state, _ = step(state, *_batch(data, fuser), jax.random.key(10**6 * (self.ctx.seed + seed) + i))
      self._params[key] = state.params
    return self._params[key]

  @functools.cache  # noqa: B019  # one Trained per run
  def generate(self, fuser: str, seed: int, frames: int) -> tuple[np.ndarray, blobs.Blobs]:
    """Generated videos for the held-out blobs at `frames` frames, and those blobs."""
    cfg = self.cfg
    data = blobs.sample(EVAL_SEED + frames, cfg.eval_batch, cfg.data(frames))
    _, caption_BS, tracks = _batch(data, fuser)
    video = tora.sample(
      self.params(fuser, seed),
      jax.random.key(EVAL_SEED + seed),
      caption_BS,
      tracks,
      cfg.model(fuser),
      frames=frames,
      height=cfg.size,
      width=cfg.size,
      steps=cfg.sample_steps,
    )
    return np.asarray(video), data

  def error(self, fuser: str, seed: int, frames: int) -> float:
    video, data = self.generate(fuser, seed, frames)
    return float(blobs.trajectory_error(video, data.tracks).mean())


def _objective(params, video, caption_BS, tracks, key, *, cfg):
  return tora.loss(params, video, caption_BS, tracks, key, cfg)


def _check_args(video, caption_BS, tracks, key, *, cfg) -> None:
  """The loss's value checks, on the host before the jitted step (they do nothing inside it)."""
  tora.check_video(video, cfg)
  tora.check_caption(caption_BS, cfg, batch=video.shape[0])
  tora._check_tracks(tracks, cfg, *video.shape[:4])


def _batch(data: blobs.Blobs, fuser: str) -> tuple[jax.Array, jax.Array, jax.Array | None]:
  """(video, caption, tracks) as a model of this fuser takes them (no tracks without a fuser)."""
  tracks = None if fuser == "none" else jnp.asarray(data.tracks)
  return jnp.asarray(data.video), jnp.asarray(data.caption_BS), tracks


def guidance_values(e: dict[str, np.ndarray]) -> dict[str, dict[str, list[float]]]:
  """The guidance part's claims' statistics from e[fuser] = the per-seed errors (px) at the
  training length of the fusers trained ("none" and "adanorm" always); a fuser not trained
  gives no values."""
  gain = lambda f: (e["none"] - e[f]).tolist() if f in e else []
  others = [e[f] - e["adanorm"] for f in GUIDED if f != "adanorm" and f in e]
  return {
    **{f"guidance lowers the error ({f})": {_gain(f): gain(f)} for f in GUIDED},
    "adaptive norm is the best fuser": {BEST: np.min(others, axis=0).tolist() if others else []},
  }


def _px(x: np.ndarray) -> str:
  return str([round(float(v), 2) for v in x])


def _guidance(ctx: Context, cfg: Config, trained: Trained) -> tuple[list[Record], list[Plot], list[str]]:
  records, notes = [], []
  seeds, fusers = cfg.seeds, cfg.fusers
  errors = {(f, s): {cfg.frames: trained.error(f, s, cfg.frames)} for f in fusers for s in seeds}
  for f in fusers:
    per_seed = [errors[f, s][cfg.frames] for s in seeds]
    records.append(
      ctx.record(
        f"trajectory error, {f}, {cfg.frames} frames (mean over {len(seeds)} seeds)",
        statistics.mean(per_seed),
        "px",
        "lowest of the fusers" if f == "adanorm" else None,
        f"{TORA}: adaptive norm beat channel concatenation and cross-attention" if f == "adanorm" else "",
      )
    )
  e = {f: np.array([errors[f, s][cfg.frames] for s in seeds]) for f in fusers}
  values = guidance_values(e)
  untrained = f"not trained at --scale={ctx.scale} (its fusers: {', '.join(fusers)}); --scale=full trains every fuser"
  claim_notes = {}
  for f in GUIDED:
    note = f"e(none) {_px(e['none'])}, e({f}) {_px(e[f])} per seed" if f in e else f"{f} {untrained}"
    claim_notes[f"guidance lowers the error ({f})"] = note
  others = [f for f in GUIDED if f != "adanorm" and f in e]
  claim_notes["adaptive norm is the best fuser"] = (
    f"e(adanorm) {_px(e['adanorm'])}; " + "; ".join(f"e({f}) {_px(e[f])}" for f in others) + " per seed"
    if others
    else f"no other fuser to compare: {', '.join(f for f in GUIDED if f != 'adanorm')} {untrained}"
  )
  for spec in CLAIMS:
    if spec.part == "guidance":
      claim_values: dict[str, Sequence[float] | float] = dict(values[spec.name])
      ctx.claim(spec, claim_values, seeds=[ctx.seed + s for s in seeds], note=claim_notes[spec.name])
  notes.append(
    f"per-seed errors (px) at {cfg.frames} frames: "
    + "; ".join(f"{f} {[round(errors[f, s][cfg.frames], 2) for s in seeds]}" for f in fusers)
  )
  return records, [], notes


def _frames(ctx: Context, cfg: Config, trained: Trained) -> tuple[list[Record], list[Plot], list[str]]:
  records, series = [], []
  for f in cfg.fusers:
    means = [statistics.mean(trained.error(f, s, t) for s in cfg.seeds) for t in cfg.eval_frames]
    series.append(Series(f, tuple(float(t) for t in cfg.eval_frames), tuple(means)))
    for t, m in zip(cfg.eval_frames, means, strict=True):
      records.append(ctx.record(f"trajectory error, {f}, {t} frames (trained at {cfg.frames})", m, "px"))
  longest = max(cfg.eval_frames)
  errors = {
    (f, s): {t: trained.error(f, s, t) for t in {cfg.frames, *cfg.eval_frames}} for f in cfg.fusers for s in cfg.seeds
  }
  seeds = [ctx.seed + s for s in cfg.seeds]
  spec = next(c for c in CLAIMS if c.name == "error grows slowly with duration")
  if longest > cfg.frames:
    growth = [errors["adanorm", s][longest] / errors["adanorm", s][cfg.frames] for s in cfg.seeds]
    note = (
      f"adaptive norm, trained at {cfg.frames} frames: e({longest}) / e({cfg.frames}) = "
      f"{[round(g, 3) for g in growth]} per seed; the paper's comparison is with U-Net methods at 128 frames"
    )
  else:
    growth, note = [], f"scored only at the training length ({cfg.frames} frames) at --scale={ctx.scale}: no growth"
  ctx.claim(spec, {GROWTH: growth}, seeds=seeds, note=note)
  note = f"error vs frames: {note}"
  guided = statistics.mean(trained.error("adanorm", s, longest) for s in cfg.seeds)
  unguided = statistics.mean(trained.error("none", s, longest) for s in cfg.seeds)
  records.append(
    ctx.record(
      f"unguided / adaptive-norm trajectory error at {longest} frames",
      unguided / guided,
      "x",
      "3-5",
      f"{TORA}: U-Net methods / Tora at 128 frames (a different baseline)",
    )
  )
  plot = Plot("frames", f"Trajectory error vs frames (trained at {cfg.frames})", "frames", "error (px)", tuple(series))
  return records, [plot], [note]


def _throughput(ctx: Context, cfg: Config, trained: Trained) -> tuple[list[Record], list[Plot], list[str]]:
  records, rates = [], {}
  data = blobs.sample(EVAL_SEED, cfg.batch, cfg.data(cfg.frames))
  for f in ("none", "adanorm"):
    mcfg = cfg.model(f)
    state = train.start_state(tora.init(jax.random.key(0), mcfg), trained.tcfg)
    step = trained.step(f)
    train_s = time_fn(step, state, *_batch(data, f), jax.random.key(0), repeats=ctx.repeats).median_s
    _, caption_BS, tracks = _batch(data, f)
    sample = functools.partial(
      tora.sample,
      state.params,
      jax.random.key(0),
      caption_BS,
      tracks,
      mcfg,
      frames=cfg.frames,
      height=cfg.size,
      width=cfg.size,
      steps=cfg.sample_steps,
    )
    sample_s = time_fn(sample, repeats=ctx.repeats).median_s
    rates[f] = (cfg.batch * cfg.frames / train_s, cfg.batch * cfg.frames / sample_s)
    records += [
      ctx.record(f"training throughput, {f}", rates[f][0], "frames/s"),
      ctx.record(f"sampling throughput, {f} ({cfg.sample_steps} Euler steps)", rates[f][1], "frames/s"),
    ]
  records += [
    ctx.record("training throughput, adanorm / none", rates["adanorm"][0] / rates["none"][0], "x"),
    ctx.record("sampling throughput, adanorm / none", rates["adanorm"][1] / rates["none"][1], "x"),
  ]
  note = (
    f"throughput: batches of {cfg.batch} videos of {cfg.frames} frames at {cfg.size}x{cfg.size}, median of "
    f"{ctx.repeats} timed calls after a warm-up, on the device in the report's header"
  )
  return records, [], [note]


def _strip(ctx: Context, cfg: Config, trained: Trained, shown: int = 8) -> tuple[list[Record], Image]:
  """Rows: the data's rendering of the requested trajectory, the adaptive-norm sample, the
  unguided sample (seed 0, held-out video 0); every other frame up to `shown` frames."""
  seed = cfg.seeds[0]
  guided, data = trained.generate("adanorm", seed, cfg.frames)
  unguided, _ = trained.generate("none", seed, cfg.frames)
  picked = np.arange(0, cfg.frames, max(1, cfg.frames // shown))[:shown]
  gap, size = 2, cfg.size
  rows = [data.video[0], guided[0], unguided[0]]
  canvas = np.ones((len(rows) * (size + gap) - gap, len(picked) * (size + gap) - gap, 3))
  lines = []
  path = data.tracks[0, :, 0]  # [T, 2]
  for r, video in enumerate(rows):
    for c, t in enumerate(picked):
      y0, x0 = r * (size + gap), c * (size + gap)
      canvas[y0 : y0 + size, x0 : x0 + size] = np.clip((video[t] + 1) / 2, 0, 1)
      lines.append((tuple(path[: t + 1, 0] + x0), tuple(path[: t + 1, 1] + y0)))
  error = float(blobs.trajectory_error(guided[:1], data.tracks[:1]).mean())
  image = Image(
    "strip",
    f"Rows: data, adaptive norm, no guidance. Frames {picked.tolist()}; line: the requested trajectory",
    canvas,
    tuple(lines),
  )
  return [ctx.record("trajectory error of the strip's adaptive-norm video", error, "px")], image


PARTS = ("guidance", "frames", "throughput", "strip")  # --only=tora.<part>


def run(ctx: Context) -> Result:
  cfg = CONFIGS[ctx.scale]
  trained = Trained(ctx, cfg)
  records: list[Record] = []
  plots: list[Plot] = []
  notes = [
    f"models: width {cfg.width}, {cfg.blocks} ST-DiT blocks, {cfg.heads} heads, patch {cfg.patch}; trained "
    f"{cfg.steps} AdamW steps (lr {cfg.lr}) of {cfg.batch} videos of {cfg.frames} frames at {cfg.size}x{cfg.size}, "
    f"seeds {list(cfg.seeds)}; scored on {cfg.eval_batch} held-out videos per length, {cfg.sample_steps} Euler steps",
  ]
  images = []
  for part, fn in (("guidance", _guidance), ("frames", _frames), ("throughput", _throughput)):
    if ctx.wants(part):
      part_records, part_plots, part_notes = fn(ctx, cfg, trained)
      records += part_records
      plots += part_plots
      notes += part_notes
  if ctx.wants("strip"):
    strip_records, image = _strip(ctx, cfg, trained)
    records += strip_records
    images.append(image)
  return Result(ctx.benchmark, tuple(records), tuple(plots), tuple(notes), images=tuple(images))


if __name__ == "__main__":
  app.run(cli.main_for({"tora": Benchmark(run, PARTS, claims=CLAIMS)}))
