"""Parallelism on 8 host CPU devices: each strategy's loss, memory and communication, the
GPipe bubble, Llama 3's layouts, and a 2-process run (Llama 3 report, Sec. 3.3; GPipe).

  python -m paperjax.bench.parallel --scale=small [--only=parallel.strategies,...]

Parts:
- strategies: one training step of the same Llama under dp, fsdp, tp, fsdp_tp, pp and dp_pp
  (`models.parallel`) on 8 devices. Per strategy: the loss and parameters after the step
  against one device; per-device bytes of arguments (params, optimizer state and the batch
  shard) and temporaries from the compiled executable's memory analysis, beside the
  analytic count (each leaf's bytes over the devices its sharding splits it across) and an
  analytic estimate of the saved activations; the bytes of every collective in the
  compiled HLO (all-reduce, all-gather, reduce-scatter, collective-permute, all-to-all; ops
  inside the layer scan counted once per trip), beside the analytic count of the strategy
  (dp: all-reduce of the gradients; fsdp: all-gather of the parameters in the forward and
  again in the backward, reduce-scatter of the gradients; tp: two all-reduces of the
  [b, T, D] activations per layer forward and two backward, plus the vocab-split embedding
  and logits; pp: a [b, T, D] permute per tick forward and backward, and the output's
  all-reduce). Step time against one device is reported but means little: 8 CPU devices
  share 2 cores. Judge by memory and communication.
- pipeline: the bubble of S = 4 stages (x 2 data shards) for M micro-batches of a fixed
  batch (1, 4, 16; 1..16 at `full`), counted from the schedule gpipe ran (stage-ticks
  without a micro-batch), against (S - 1) / (M + S - 1); and the pipelined step's time
  against one device's. On CPU every stage computes in every tick and the 8 devices share
  2 cores, so a compute-bound step (`full`) takes about (M + S - 1) / M times one device's;
  at `small` overheads dominate and the ratio is noise. Also Llama 3's pipelined inference
  (2 stages x 4 data shards, as 405B runs across two nodes): `pipeline.prefill` of the batch's
  prompts and one `pipeline.decode` step after them, in 1 and 2 micro-batches of the same
  batch, timed alternately over rounds: the throughput of 2 over 1.
- layouts: Llama 3 8B / 70B / 405B memory per GPU under tensor x pipeline x data layouts
  (the report's TP 8 x PP 16 x DP 128 for 405B on 16k GPUs), for GPipe (M micro-batches of
  activations held) and 1F1B (S held), and 405B inference in BF16 on one and two 8-GPU
  nodes; whether each fits an 80 GB H100.
- multihost: `models.parallel.multihost`: 2 processes of 4 CPU devices (gloo over loopback)
  against one process of 8, loss by loss.

The measurements need 8 devices: the suite's process has one, so they run in a child
process started with `--xla_force_host_platform_device_count=8`.

Shapes: N micro-batches (ids_N: stream tokens), B rows (of a micro-batch), T time, D model width. (In the
formulas above, b is the rows a device holds, S the stages and M the micro-batches.)
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import subprocess
import sys
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from absl import app

from paperjax.bench import cli
from paperjax.bench.harness import (
  Benchmark,
  ClaimSpec,
  Context,
  Plot,
  Record,
  Result,
  Rule,
  Series,
  Test,
  progress,
  time_fn,
)
from paperjax.models import sharding
from paperjax.models.parallel import multihost, pipeline
from paperjax.models.training import lm
from paperjax.models.training.train import TrainConfig, TrainState
from paperjax.models.transformer import llama
from paperjax.ops import checks

PARTS = ("strategies", "pipeline", "layouts", "multihost")
LLAMA3 = "Llama 3 report (arXiv 2407.21783), Sec. 3.3.2"
GPIPE = "GPipe (Huang et al., 2019): bubble (S-1)/(M+S-1)"
H100_BYTES = 80e9
DEVICES = 8
INFERENCE_MESH = {"data": 4, "pipe": 2}  # Llama 3 405B's inference pipeline: 2 stages (two nodes)
INFERENCE_ROUNDS = 3  # micro-batch 1 and 2 timed alternately; the median of the per-round ratios
COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "collective-permute", "all-to-all")
# strategy -> (its rules in sharding.RULES, the mesh axes it uses and their sizes; the rest are 1)
STRATEGIES: dict[str, tuple[str, dict[str, int]]] = {
  "dp": ("dp", {"data": 8}),
  "fsdp": ("fsdp", {"fsdp": 8}),
  "tp": ("tp", {"tensor": 8}),
  "fsdp_tp": ("fsdp_tp", {"fsdp": 4, "tensor": 2}),
  "pp": ("pp", {"pipe": 8}),
  "dp_pp": ("pp", {"data": 2, "pipe": 4}),
}

# Declared before any run (the registry reads CLAIMS); the part named decides each one.
CLAIMS = (
  ClaimSpec(
    name="pp_inference_microbatching",
    part="pipeline",
    source="Llama 3 report (arXiv 2407.21783), Sec. 6.1 (pipeline parallelism, micro-batching), Fig. 24",
    claim=(
      "micro-batching (2 micro-batches) improves the throughput of pipelined inference at the same local batch "
      "size, in both pre-filling and decoding"
    ),
    # At small the model is tiny and dispatch dominates (noise); full is compute-bound.
    rule=Rule(
      tests=(
        Test(statistic="prefill_speedup", op=">", bound=1.0),
        Test(statistic="decode_speedup", op=">", bound=1.0),
      ),
      decided_at="full",
    ),
  ),
)


@checks.config
class Config:
  model: llama.LlamaConfig
  strategies: tuple[str, ...]  # names in STRATEGIES
  batch: int
  seq_len: int
  n_micro: int  # pp strategies in the strategies part
  bubble_micro: tuple[int, ...]
  multihost_steps: int


_MODEL = llama.LlamaConfig(vocab_size=256, dim=64, n_layers=8, n_heads=8, n_kv_heads=8, ffn_dim=256, max_seq_len=128)
CONFIGS = {
  "ci": Config(
    model=dataclasses.replace(_MODEL, dim=32, ffn_dim=64, vocab_size=64),
    strategies=("fsdp_tp", "dp_pp"),  # one of each code path: sharded jit, pipeline
    batch=16,
    seq_len=8,
    n_micro=2,
    bubble_micro=(2,),
    multihost_steps=2,
  ),
  "small": Config(
    model=_MODEL,
    strategies=tuple(STRATEGIES),
    batch=32,
    seq_len=64,
    n_micro=4,
    bubble_micro=(1, 4, 16),
    multihost_steps=3,
  ),
}
CONFIGS["full"] = dataclasses.replace(
  CONFIGS["small"],
  model=dataclasses.replace(_MODEL, dim=256, ffn_dim=1024, vocab_size=1024),
  seq_len=128,
  bubble_micro=(1, 2, 4, 8, 16),
)
CONFIGS["paper"] = CONFIGS["full"]


# ----------------------------------------------------------------------------- HLO accounting


def _result_bytes(result_type: str) -> int:
  """Bytes of an HLO result type: 'f32[8,32]{1,0}' or a tuple of such."""
  itemsize = {"f32": 4, "s32": 4, "u32": 4, "bf16": 2, "f16": 2, "pred": 1, "s8": 1, "u8": 1, "f64": 8, "s64": 8}
  total = 0
  for dtype, dims in re.findall(r"(\w+)\[([\d,]*)\]", result_type):
    total += itemsize.get(dtype, 4) * math.prod(int(d) for d in dims.split(",") if d)
  return total


def collective_bytes(hlo: str) -> dict[str, int]:
  """Bytes of each collective kind's results in an HLO module, per device and per run: an op
  inside a while loop's body counts once per trip (XLA's known_trip_count)."""
  computations: list[tuple[str, list[str]]] = []
  for line in hlo.splitlines():
    if line and not line.startswith(" ") and line.rstrip().endswith("{"):
      name = line.split()[1] if line.startswith("ENTRY") else line.split()[0]
      computations.append((name.lstrip("%"), []))
    elif computations and line.startswith(" "):
      computations[-1][1].append(line)
  entry = next(name for name, _ in computations if hlo.count(f"ENTRY %{name}") or hlo.count(f"ENTRY {name}"))
  mult: dict[str, int] = {entry: 1}
  for name, lines in reversed(computations):  # callers are printed after their callees
    for line in lines:
      body = re.search(r"body=%?([\w.\-]+)", line)
      if body:
        trips = re.search(r'"known_trip_count":\{"n":"(\d+)"', line)
        if trips is None:
          raise ValueError(f"HLO: a while loop without a known trip count: {line[:120]}")
        mult[body[1]] = mult.get(body[1], 0) + mult.get(name, 0) * int(trips[1])
      for called in re.findall(r"(?:calls|to_apply)=%?([\w.\-]+)", line):
        mult[called] = mult.get(called, 0) + mult.get(name, 0)
  found = dict.fromkeys(COLLECTIVES, 0)
  pattern = re.compile(r"=\s*(.+?)\s+(" + "|".join(COLLECTIVES) + r")(?:-start)?\(")
  for name, lines in computations:
    for line in lines:
      match = pattern.search(line)
      if match and _group_size(line) > 1:
        found[match[2]] += _result_bytes(match[1]) * mult.get(name, 0)
  return found


def _group_size(line: str) -> int:
  """Devices per replica group of a collective (a group of 1 moves nothing); permutes: 2."""
  mesh = re.search(r"replica_groups=mesh\[([^\]]*)\]\s*\{([^}]*)\}", line)
  if mesh:
    sizes = {k.strip("'"): int(v) for k, v in re.findall(r"('[\w]+')=(\d+)", mesh[1])}
    return math.prod(sizes[a.strip().strip("'")] for a in mesh[2].split(",") if a.strip())
  iota = re.search(r"replica_groups=\[\d+,(\d+)\]<=", line)
  if iota:
    return int(iota[1])
  listed = re.search(r"replica_groups=\{\{([\d,]*)\}", line)
  if listed:
    return len(listed[1].split(","))
  return 2


def _leaf_bytes_per_device(x: Any) -> int:
  shard = x.sharding.shard_shape(x.shape)
  return math.prod(shard) * np.dtype(x.dtype).itemsize


def analytic_collectives(strategy: str, cfg: Config, sizes: dict[str, int], n_params: int, n_layer_params: int) -> dict:
  """The strategy's textbook communication per step, f32 bytes of each collective's result."""
  m = cfg.model
  data, fsdp, tensor, pipe = (sizes.get(a, 1) for a in ("data", "fsdp", "tensor", "pipe"))
  rows = cfg.batch // (data * fsdp)  # per device
  act = rows * cfg.seq_len * m.dim * 4  # one [b, T, D] activation
  params = 4 * n_params
  out = dict.fromkeys(COLLECTIVES, 0)
  if strategy == "dp":
    out["all-reduce"] = params
  if strategy in ("fsdp", "fsdp_tp"):
    out["all-gather"] = 2 * params // tensor  # forward, then again in the backward
    out["reduce-scatter"] = params // tensor
  if strategy in ("tp", "fsdp_tp"):
    out["all-reduce"] += (4 * m.n_layers + 2) * act  # 2 per layer each way; embedding and logits
  if strategy in ("pp", "dp_pp"):
    M = cfg.n_micro
    out["collective-permute"] = 2 * (M + pipe - 1) * act // M  # a micro-batch per tick, each way
    out["all-reduce"] = 2 * act  # the last stage's outputs to every stage; the inputs' cotangents to stage 0
    if data > 1:
      out["all-reduce"] += 4 * (n_params - n_layer_params + n_layer_params // pipe)
  return out


def saved_activations(cfg: Config, sizes: dict[str, int]) -> int:
  """Analytic f32 bytes the backward keeps per device: per layer and token the residual,
  the two norms' outputs and the residual mid (4 D), q, k, v and the attention output
  (H K + 2 G K + H K over the tensor split), the softmax (H T), gate, up and their product
  (3 E); plus the logits and their softmax (2 V). Stages hold L / S layers and all M
  micro-batches (GPipe), and keep the residuals of bubble ticks too: (M + S - 1) / M."""
  m = cfg.model
  data, fsdp, tensor, pipe = (sizes.get(a, 1) for a in ("data", "fsdp", "tensor", "pipe"))
  rows = cfg.batch // (data * fsdp)
  per_token = 4 * m.dim + (2 * m.n_heads * m.k + 2 * m.n_kv_heads * m.k + m.n_heads * cfg.seq_len) / tensor
  per_token += 3 * m.ffn_dim / tensor
  layers = m.n_layers // pipe * (cfg.n_micro + pipe - 1) / cfg.n_micro if pipe > 1 else m.n_layers
  return int(4 * rows * cfg.seq_len * (layers * per_token + 2 * m.vocab_size / tensor))


# ----------------------------------------------------------------------------- measurements


class Reference(NamedTuple):
  """One device's training step on the part's batch: what every layout is compared with."""

  tcfg: TrainConfig
  batch: lm.Batch
  state0: TrainState
  state1: TrainState
  loss: float
  step: Any  # the jitted step, timed later


def reference(cfg: Config, seed: int) -> Reference:
  # No warm-up: the step runs at the peak rate, so the layouts are compared on parameters that moved.
  tcfg = TrainConfig(batch_size=cfg.batch, seq_len=cfg.seq_len, warmup_steps=0, total_steps=10, seed=seed)
  ids_N = np.random.default_rng(seed).integers(0, cfg.model.vocab_size, 64 * cfg.batch * cfg.seq_len)
  batch = lm.batch_at(ids_N, np.arange(ids_N.size) // 200, 0, tcfg)  # packed documents of 200 tokens
  state0 = lm.init_state(jax.random.key(seed), cfg.model, tcfg)
  step = lm.make_train_step(cfg.model, tcfg)
  state1, metrics = step(state0, batch)
  return Reference(tcfg, batch, state0, state1, float(metrics["loss"]), step)


class Compiled(NamedTuple):
  """A layout's step compiled for its mesh (one compile serves analysis and timing), its
  state and the batch placed on the mesh."""

  step: Any
  state: TrainState
  batch: lm.Batch

  def time(self, repeats: int) -> float:
    return time_fn(self.step, self.state, self.batch, repeats=repeats).median_s


def _compile(run: lm.ShardedTraining, batch: lm.Batch) -> Compiled:
  with jax.set_mesh(run.shardings.mesh):
    step = run.step.jitted.lower(run.state, batch).compile()  # type: ignore[attr-defined]
  return Compiled(step, run.state, sharding.put(batch, run.shardings.batch))


def _layout(cfg: Config, ref: Reference, seed: int, sizes: dict[str, int], rules: str, n_micro: int) -> Compiled:
  data, fsdp, tensor, pipe = (sizes.get(axis, 1) for axis in ("data", "fsdp", "tensor", "pipe"))
  mesh = sharding.make_mesh(data=data, fsdp=fsdp, tensor=tensor, pipe=pipe)
  key, start = jax.random.key(seed), ref.state0.params  # the reference's params: one init compile, not one per layout
  if rules == "pp":
    run = pipeline.training(key, cfg.model, ref.tcfg, mesh, n_micro, params=start)
  else:
    run = lm.sharded_training(key, cfg.model, ref.tcfg, mesh, rules, params=start)
  return _compile(run, ref.batch)


def _max_abs_difference(a: Any, b: Any) -> float:
  return max(
    float(np.max(np.abs(np.asarray(x) - np.asarray(y)))) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))
  )


def compile_strategies(cfg: Config, ref: Reference, seed: int) -> tuple[dict, dict[str, Compiled]]:
  """Each strategy's step: its loss and parameters against the reference, memory and
  collectives (everything but time, so this may run beside other work)."""
  n_params = sum(x.size for x in jax.tree.leaves(ref.state0.params))
  n_layer_params = sum(x.size for x in jax.tree.leaves(ref.state0.params["layers"]))
  step_size = _max_abs_difference(ref.state1.params, ref.state0.params)
  out: dict[str, Any] = {"n_params": n_params, "step_size": step_size, "strategies": {}}
  compiled: dict[str, Compiled] = {}
  for name in progress(list(cfg.strategies), "parallel.strategies"):
    rules, sizes = STRATEGIES[name]
    c = compiled[name] = _layout(cfg, ref, seed, sizes, rules, cfg.n_micro)
    memory = c.step.memory_analysis()
    state, metrics = c.step(c.state, c.batch)
    param_err = _max_abs_difference(state.params, ref.state1.params)
    out["strategies"][name] = {
      "mesh": sizes,
      "loss_error": abs(float(metrics["loss"]) - ref.loss),
      "param_error": param_err,
      "argument_bytes": memory.argument_size_in_bytes,
      "temp_bytes": memory.temp_size_in_bytes,
      "state_bytes": sum(_leaf_bytes_per_device(x) for x in jax.tree.leaves(c.state)),
      "param_bytes": sum(_leaf_bytes_per_device(x) for x in jax.tree.leaves(c.state.params)),
      "batch_bytes": sum(_leaf_bytes_per_device(x) for x in c.batch),
      "saved_activations": saved_activations(cfg, sizes),
      "collectives": collective_bytes(c.step.as_text()),
      "analytic_collectives": analytic_collectives(name, cfg, sizes, n_params, n_layer_params),
    }
  return out, compiled


def compile_pipelines(
  cfg: Config, ref: Reference, seed: int, reuse: dict[int, Compiled]
) -> tuple[dict, dict[int, Compiled]]:
  """The schedule's busy ticks for S = 4 stages (x 2 data shards) and M in bubble_micro,
  and each M's compiled step (`reuse`: steps already compiled on that mesh, by M)."""
  sizes = {"data": 2, "pipe": 4}
  mesh = sharding.make_mesh(data=2, pipe=4)
  stages = mesh.shape["pipe"]
  count_stage = lambda layers, x_BTD, extras, state: (x_BTD + 1, state)  # the schedule alone, cheap to compile
  rows: list[dict] = []
  compiled: dict[int, Compiled] = {}
  for n_micro in progress(list(cfg.bubble_micro), "parallel.pipeline"):
    compiled[n_micro] = reuse.get(n_micro) or _layout(cfg, ref, seed, sizes, "pp", n_micro)
    with jax.set_mesh(mesh):
      busy = pipeline.gpipe(count_stage, np.zeros((stages, 1)), jnp.zeros((n_micro, 2, 1, 1)), mesh)[2]
    rows.append({"M": n_micro, "counted": 1 - int(np.sum(busy)) / (stages * (n_micro + stages - 1))})
  return {"stages": stages, "rows": rows}, compiled


class Inference(NamedTuple):
  """Pipelined prefill and one decode step after it, compiled for each micro-batch count."""

  prefill: dict[int, Any]  # M -> a call of no arguments
  decode: dict[int, Any]
  batch: int
  prompt: int
  stages: int


def compile_inference(cfg: Config, params: dict, seed: int) -> Inference:
  """`pipeline.prefill` of [batch, seq_len - 1] prompts into a cache of seq_len slots, and one
  `pipeline.decode` step after it, on INFERENCE_MESH with the batch in 1 and 2 micro-batches;
  each compiled (called once), and 2 micro-batches' logits checked equal to 1's (the same work;
  tests/models/parallel/test_pipeline.py checks the pipeline against the model itself)."""
  model, mesh = cfg.model, sharding.make_mesh(data=INFERENCE_MESH["data"], pipe=INFERENCE_MESH["pipe"])
  staged = jax.device_put(params, pipeline.param_shardings(model, mesh))
  prompt = cfg.seq_len - 1
  tokens_BT = jax.random.randint(jax.random.key(seed + 1), (cfg.batch, prompt), 0, model.vocab_size)
  prefills: dict[int, Any] = {}
  decodes: dict[int, Any] = {}
  outputs: dict[int, tuple[jax.Array, jax.Array]] = {}
  for n_micro in (1, 2):
    # Jitted: eagerly, the ops check ids and lengths on the host each call; under jit the timing is the pipeline's.
    prefill = jax.jit(lambda p, t, m=n_micro: pipeline.prefill(p, t, model, mesh, m, capacity=cfg.seq_len))
    decode = jax.jit(lambda p, t, c, m=n_micro: pipeline.decode(p, t, c, model, mesh, m))
    logits, cache = prefill(staged, tokens_BT)
    token_B = jnp.argmax(outputs[1][0] if n_micro == 2 else logits, -1).astype(jnp.int32)
    outputs[n_micro] = (logits, decode(staged, token_B, cache)[0])
    prefills[n_micro] = lambda f=prefill: f(staged, tokens_BT)
    decodes[n_micro] = lambda f=decode, t=token_B, c=cache: f(staged, t, c)
  for name, one, two in zip(("prefill", "decode"), outputs[1], outputs[2]):
    error = float(jnp.max(jnp.abs(one - two)))
    if error > 1e-4:
      raise AssertionError(f"pipelined {name}: 2 micro-batches' logits are off 1's by {error:.3g}")
  return Inference(prefills, decodes, cfg.batch, prompt, INFERENCE_MESH["pipe"])


def time_inference(inference: Inference, repeats: int) -> dict:
  """Seconds of each call (median over rounds) and the per-round ratios M=1 / M=2, which cancel
  the machine's drift between rounds."""
  seconds: dict[str, dict[int, list[float]]] = {"prefill": {1: [], 2: []}, "decode": {1: [], 2: []}}
  for _ in range(INFERENCE_ROUNDS):
    for name, calls in (("prefill", inference.prefill), ("decode", inference.decode)):
      for n_micro, call in calls.items():
        seconds[name][n_micro].append(time_fn(call, repeats=repeats).median_s)
  out: dict[str, Any] = {"batch": inference.batch, "prompt": inference.prompt, "stages": inference.stages}
  for name, by_m in seconds.items():
    out[name] = {
      "s": {str(m): float(np.median(x)) for m, x in by_m.items()},
      "speedup": float(np.median([a / b for a, b in zip(by_m[1], by_m[2])])),
    }
  return out


def measure(scale: str, seed: int, repeats: int, parts: list[str]) -> dict:
  """Every selected part's raw numbers (run where there are 8 devices). Compiles and the
  2-process job overlap; the timed calls run after both, on a quiet machine."""
  if jax.device_count() < DEVICES:
    raise RuntimeError(f"parallel: needs {DEVICES} devices, found {jax.device_count()}")
  cfg = CONFIGS[scale]
  job = multihost.start(cfg.multihost_steps) if "multihost" in parts else None
  out: dict[str, Any] = {}
  strategies: dict[str, Compiled] = {}
  pipelines: dict[int, Compiled] = {}
  if "strategies" in parts or "pipeline" in parts:
    ref = reference(cfg, seed)
  if "strategies" in parts:
    out["strategies"], strategies = compile_strategies(cfg, ref, seed)
  if "pipeline" in parts:
    dp_pp = {cfg.n_micro: strategies["dp_pp"]} if "dp_pp" in strategies else {}  # the same mesh
    out["pipeline"], pipelines = compile_pipelines(cfg, ref, seed, dp_pp)
    inference = compile_inference(cfg, ref.state0.params, seed)
  if job is not None:
    out["multihost"] = {"job": job.losses(), "one": multihost.train_losses(cfg.multihost_steps)}
  if strategies or pipelines:  # timing, now that nothing else runs
    one_s = time_fn(ref.step, ref.state0, ref.batch, repeats=repeats).median_s
    for name, c in strategies.items():  # noise on CPU devices: one call each
      out["strategies"]["strategies"][name]["step_s"] = c.time(1)
    if strategies:
      out["strategies"]["one_device_s"] = one_s
    if pipelines:
      out["pipeline"]["one_device_s"] = one_s
      for row in out["pipeline"]["rows"]:
        row["step_s"] = pipelines[row["M"]].time(1)
      out["pipeline"]["inference"] = time_inference(inference, repeats)
  return out


def _measure_in_child(scale: str, seed: int, repeats: int, parts: list[str]) -> dict:
  env = multihost.cpu_devices_env(DEVICES)
  code = (
    "import json, sys; from paperjax.bench import parallel as p; print(json.dumps(p.measure(*json.loads(sys.argv[1]))))"
  )
  done = subprocess.run(
    [sys.executable, "-c", code, json.dumps([scale, seed, repeats, parts])],
    env=env,
    stdout=subprocess.PIPE,
    text=True,
    check=False,
  )
  if done.returncode:
    raise RuntimeError(f"parallel: the 8-device child process failed (exit {done.returncode}); its stderr is above")
  return json.loads(done.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------- layouts


@dataclasses.dataclass(frozen=True)
class Layout:
  model: str  # a llama.PRESETS name
  tp: int
  pp: int
  dp: int
  seq_len: int = 8192
  micro_batches: int = 16  # per data-parallel group and step


def layout_bytes(layout: Layout, n_params: int, *, schedule: str) -> dict[str, float]:
  """Bytes per GPU of a training layout (Llama 3's recipe, Sec. 3.3.2-3.3.4): BF16
  weights (2 N / (TP PP)); FP32 gradients and the FP32 master copy with Adam's two moments
  sharded over data parallelism too (4 N + 12 N over TP PP DP, FSDP as the report's);
  activations of one micro-batch of one sequence per layer 34 s D / TP (Korthikanti et al.
  2022: sequence parallelism, selective recompute, no s^2 term with flash attention),
  times L / PP layers, times the micro-batches a stage holds (GPipe: M; 1F1B: min(M, PP);
  without a pipeline, one: micro-batches are then plain gradient accumulation)."""
  m = llama.PRESETS[layout.model]
  shards = layout.tp * layout.pp
  held = layout.micro_batches if schedule == "gpipe" else min(layout.micro_batches, layout.pp)
  held = held if layout.pp > 1 else 1
  parts = {
    "weights": 2 * n_params / shards,
    "grads_and_optimizer": 16 * n_params / (shards * layout.dp),
    "activations": 34 * layout.seq_len * m.dim / layout.tp * (m.n_layers / layout.pp) * held,
  }
  parts["total"] = sum(parts.values())
  return parts


LAYOUTS = (
  Layout("llama3_8b", tp=1, pp=1, dp=1024),
  Layout("llama3_70b", tp=8, pp=1, dp=256),
  Layout("llama3_70b", tp=8, pp=4, dp=64),
  Layout("llama3_405b", tp=8, pp=16, dp=128),
)


def _layout_records(ctx: Context) -> list[Record]:
  records = []
  for layout in LAYOUTS:
    n = llama.PRESETS[layout.model].num_params()
    where = f"{layout.model} TP {layout.tp} x PP {layout.pp} x DP {layout.dp}, seq {layout.seq_len}"
    is_405b = layout.model == "llama3_405b"
    for schedule in ("gpipe", "1f1b") if layout.pp > 1 else ("no pipeline",):
      total = layout_bytes(layout, n, schedule=schedule)["total"]
      fits = "fits" if total <= H100_BYTES else "does not fit"
      records.append(
        ctx.record(
          f"{where}: GB per GPU ({schedule}, M={layout.micro_batches}; {fits} 80 GB)",
          total / 1e9,
          "GB",
          "fits 80 GB" if is_405b else None,
          LLAMA3 + ": the 405B pretraining layout" if is_405b else "",
        )
      )
    records.append(ctx.record(f"{where}: BF16 weights per GPU", 2 * n / (layout.tp * layout.pp) / 1e9, "GB"))
  n405 = llama.PRESETS["llama3_405b"].num_params()
  for gpus, paper in ((8, "does not fit one 8xH100 node"), (16, "16 GPUs on two nodes")):
    records.append(
      ctx.record(
        f"llama3_405b inference: BF16 weights per GPU on {gpus} GPUs",
        2 * n405 / gpus / 1e9,
        "GB",
        paper,
        "Llama 3 report, Sec. 6 (inference)",
      )
    )
  return records


# ----------------------------------------------------------------------------- records


def _strategy_records(ctx: Context, data: dict) -> tuple[list[Record], Plot, str]:
  records = [
    ctx.record(
      "one device: max |params after a step - before| (the scale of the errors below)", data["step_size"], "abs"
    )
  ]
  names = list(data["strategies"])
  for name, s in data["strategies"].items():
    tag = f"{name} ({' x '.join(f'{a} {n}' for a, n in s['mesh'].items())})"
    records.append(ctx.record(f"{tag}: |loss - one device|", s["loss_error"], "nats", 0, "exact arithmetic"))
    records.append(ctx.record(f"{tag}: max |params after a step - one device|", s["param_error"], "abs"))
    analytic_args = s["state_bytes"] + s["batch_bytes"]
    records.append(ctx.record(f"{tag}: argument bytes/device (params, optimizer, batch)", s["argument_bytes"], "bytes"))
    optimizer_bytes = s["state_bytes"] - s["param_bytes"]
    records.append(ctx.record(f"{tag}: of which params (analytic)", s["param_bytes"], "bytes"))
    records.append(ctx.record(f"{tag}: of which optimizer state (analytic)", optimizer_bytes, "bytes"))
    records.append(
      ctx.record(
        f"{tag}: argument bytes measured / analytic",
        s["argument_bytes"] / analytic_args,
        "x",
        1.0,
        "sum of leaf bytes over the devices splitting each leaf",
      )
    )
    records.append(
      ctx.record(f"{tag}: temp bytes/device (activations, gradients, workspace)", s["temp_bytes"], "bytes")
    )
    records.append(
      ctx.record(f"{tag}: temp bytes / analytic saved activations", s["temp_bytes"] / s["saved_activations"], "x")
    )
    measured, analytic = s["collectives"], s["analytic_collectives"]
    for kind in COLLECTIVES:
      if measured[kind] or analytic[kind]:
        records.append(
          ctx.record(
            f"{tag}: {kind} bytes/step", measured[kind], "bytes", analytic[kind] or 0, "analytic count (docstring)"
          )
        )
    records.append(
      ctx.record(
        f"{tag}: collective bytes measured / analytic",
        sum(measured.values()) / max(sum(analytic.values()), 1),
        "x",
        1.0,
        "analytic count (docstring)",
      )
    )
    records.append(
      ctx.record(
        f"{tag}: step time / one device (8 CPU devices on 2 cores: noise)", s["step_s"] / data["one_device_s"], "x"
      )
    )
  mib = lambda key: tuple(data["strategies"][n][key] / 2**20 for n in names)
  xs = tuple(float(i) for i in range(len(names)))
  plot = Plot(
    "memory",
    "Per-device bytes by strategy (0=" + ", ".join(f"{i}={n}" for i, n in enumerate(names))[2:] + ")",
    "strategy",
    "MiB per device",
    (
      Series("arguments (params, optimizer, batch)", xs, mib("argument_bytes")),
      Series("temporaries", xs, mib("temp_bytes")),
    ),
    kind="bar",
  )
  note = (
    f"Strategies: one AdamW step of a {data['n_params']:,}-parameter Llama on 8 host CPU devices; per-device "
    "bytes from `compiled.memory_analysis()`, collectives from the compiled HLO (CPU XLA lowers reduce-scatter "
    "as all-reduce, and reshards the embedding lookup with all-to-all)."
  )
  return records, plot, note


def _pipeline_records(ctx: Context, data: dict) -> tuple[list[Record], Plot, str]:
  S = data["stages"]
  records = []
  ms, counted, formula = [], [], []
  for row in data["rows"]:
    M = row["M"]
    ideal = (S - 1) / (M + S - 1)
    records.append(
      ctx.record(f"bubble, S={S}, M={M}: counted from the schedule", row["counted"], "fraction", round(ideal, 4), GPIPE)
    )
    records.append(
      ctx.record(
        f"pipelined step time, S={S}, M={M} / one device (8 CPU devices on 2 cores: noise)",
        row["step_s"] / data["one_device_s"],
        "x",
      )
    )
    ms.append(float(M))
    counted.append(row["counted"])
    formula.append(ideal)
  plot = Plot(
    "bubble",
    f"GPipe bubble, {S} stages",
    "micro-batches M",
    "idle fraction of stage-ticks",
    (Series("(S-1)/(M+S-1)", tuple(ms), tuple(formula)), Series("counted", tuple(ms), tuple(counted))),
    xscale="log",
  )
  note = (
    f"Pipeline: {S} stages x 2 data shards, a fixed batch in M micro-batches. The bubble is counted from the "
    "schedule gpipe ran (stage-ticks without a micro-batch). On CPU every stage computes in every tick and the "
    "8 devices share 2 cores, so a compute-bound step takes about (M+S-1)/M times one device's (seen at "
    "`full`); a tiny model's step times are dominated by overheads."
  )
  records += _inference_records(ctx, data["inference"])
  return records, plot, note


def _inference_records(ctx: Context, inf: dict) -> list[Record]:
  S, B, T = inf["stages"], inf["batch"], inf["prompt"]
  where = f"S={S} x data {INFERENCE_MESH['data']}, B={B}"
  records = []
  for name, tokens, shape in (("prefill", B * T, f"{where}, {T}-token prompts"), ("decode", B, f"{where}, one step")):
    for m in ("1", "2"):
      records.append(ctx.record(f"pipelined {name} tokens/s, M={m} ({shape})", tokens / inf[name]["s"][m], "tokens/s"))
    records.append(
      ctx.record(
        f"pipelined {name} throughput, 2 micro-batches / 1 ({shape}, same run)",
        inf[name]["speedup"],
        "x",
        "> 1",
        "Llama 3 report, Sec. 6.1, Fig. 24",
      )
    )
  ctx.claim(
    CLAIMS[0],
    {"prefill_speedup": inf["prefill"]["speedup"], "decode_speedup": inf["decode"]["speedup"]},
    note=(
      f"Measured on 8 host CPU devices sharing 2 cores (not GPUs): {S} pipeline stages x {INFERENCE_MESH['data']} "
      f"data shards, B={B}; each statistic is the median over {INFERENCE_ROUNDS} rounds of time(M=1) / time(M=2), "
      f"one seed. Every stage computes in every tick of the GPipe schedule, so if a tick's cost is proportional to "
      f"its rows, M=2 runs {S + 1} ticks of half the rows against M=1's {S} ticks of all of them: a gain of "
      f"{2 * S / (S + 1):.2f}x; where a tick's cost does not shrink with its rows (per-tick costs dominate a small "
      f"model's decode step), M=2 is slower, by up to {(S + 1) / S:.2f}x."
    ),
  )
  return records


def run(ctx: Context) -> Result:
  parts = [p for p in PARTS if ctx.wants(p)]
  measured_parts = [p for p in parts if p != "layouts"]
  data: dict = {}
  if measured_parts:
    args = (ctx.scale, ctx.seed, ctx.repeats, measured_parts)
    data = measure(*args) if jax.device_count() >= DEVICES else _measure_in_child(*args)
  records: list[Record] = []
  plots: list[Plot] = []
  notes: list[str] = []
  for part in parts:
    ctx.wants(part)  # attribute the records to this part
    if part == "strategies":
      part_records, plot, note = _strategy_records(ctx, data["strategies"])
      plots.append(plot)
      notes.append(note)
    elif part == "pipeline":
      part_records, plot, note = _pipeline_records(ctx, data["pipeline"])
      plots.append(plot)
      notes.append(note)
    elif part == "layouts":
      part_records = _layout_records(ctx)
    else:
      job, one = data["multihost"]["job"], data["multihost"]["one"]
      part_records = [
        ctx.record(
          f"2 processes x 4 devices vs 1 x 8: max |loss difference| over {len(job)} steps",
          max(abs(a - b) for a, b in zip(job, one)),
          "nats",
          0,
          "same program, same reductions",
        ),
      ]
    records += part_records
  return Result(ctx.benchmark, tuple(records), tuple(plots), tuple(notes))


if __name__ == "__main__":
  app.run(cli.main_for({"parallel": Benchmark(run, PARTS, claims=CLAIMS)}))
