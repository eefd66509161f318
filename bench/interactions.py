"""AND-OR interactions over training: the two-phase dynamics, for an MLP and a Transformer.

  python -m paperjax.bench.interactions --scale=small [--only=interactions.digits,interactions.text]

Parts (data nobody here made, no download):
- digits: scikit-learn's bundled 8x8 digits, split 80/20 with a fixed seed. Input
  variables: a 3x3 grid of image patches (n = 9), masked to the training mean image. An MLP
  trained with Adam, once on clean labels and once with 30% of training labels shuffled
  (over-fitting is then visible).
- text: lines of the Python stdlib's source, classified by the package they come from
  (asyncio, email, tkinter, xml), every line exactly 8 cl100k tokens; the variables are
  the n = 8 tokens, masked to a [MASK] id. A 2-layer Llama (causal) with a mean-pooled
  classification head, trained with Adam on clean labels.

Tracked at checkpoints over epochs, for each run: train/test loss and their gap; the
normalised strength of salient interactions per order (AND + OR, learned decomposition);
the epoch where the mean order is lowest (phase 2 starts after it) vs the epoch where the
loss gap starts to grow; the signed strengths A_k^+ and A_k^- per order at init, at the
phase-2 start and at the end (the papers' Fig. 6); the Jaccard similarity of train vs test
order-k interactions per class (falls with k in the papers); and the closed-form theory
of phase 2 tested, not assumed: sigma^2 fitted to each phase-2 checkpoint's
AND-interaction order distribution (the theory models AND interactions), with the
relative residual of the prediction beside a flat-distribution baseline. The theory's w*
is the final model's AND interactions, so the fit at the end is circular (sigma^2 -> 0
reproduces it by construction) and is reported as such; a fit on the edge of the sigma^2
grid is reported as a bound.

Claims (`CLAIMS`, one set per run, each run a single measurement at one seed; the rules in
`RULES` were written after the README's `small` numbers had been seen, as the papers'
qualitative statements made numeric, and decide every run since): the two phases (spindle at init, the mean
order falling by more than one order in phase 1 and rising by more than a quarter of an order
in phase 2); phase 2 starting within one checkpoint of the loss gap's growth; the fitted
sigma^2 falling at every non-circular phase-2 step; the theory's median residual under half a
flat distribution's. The end-distribution baseline (every checkpoint predicted by the end's own
distribution, which the theory's w* already holds) is recorded beside it, not claimed.

Shapes: B samples, F input features (pixels or tokens), C classes, M = 2^n subsets of the
n variables, D model width, T tokens.
"""

from __future__ import annotations

import collections
import functools
import warnings
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import app

from paperjax.bench import cli
from paperjax.bench.harness import Benchmark, ClaimSpec, Context, Plot, Result, Rule, Series, Test, progress
from paperjax.interp import dynamics
from paperjax.interp import interactions as ia
from paperjax.models.data import corpus, tokenizer
from paperjax.models.transformer import llama
from paperjax.ops import checks

PAPER = "Two-phase dynamics (arXiv 2405.10262)"
THEORY = "Ren et al. (arXiv 2407.19198)"
FAMILIES = ("asyncio", "email", "tkinter", "xml")  # stdlib packages with 460-600 8-token lines each
TEXT_TOKENS = 8
TEXT_VOCAB = 512  # 510 most frequent training tokens, "other", [MASK]

# The runs (the tag each part gives its run -> its part and its name in the claims).
RUNS = {
  "clean labels": ("digits", "digits MLP, clean labels"),
  "30% label noise": ("digits", "digits MLP, 30% label noise"),
  "Transformer, stdlib lines": ("text", "Transformer, stdlib lines"),
}
# Statistics, one value per run (one seed each: a single measurement, not a spread over seeds).
INIT_OFFSET = "mean order at init - middle order (n+1)/2"
PHASE1_FALL = "phase 1: fall of the mean order from init to its lowest"
PHASE2_RISE = "phase 2: rise of the mean order from its lowest to the end"
LAG = "checkpoints from the phase-2 start to the loss gap's growth"
SIGMA2_FALLS = "share of phase-2 steps where fitted sigma^2 falls, end excluded"
STEPS = "phase-2 steps, end excluded"
VS_FLAT = "theory residual / flat-distribution residual, median over phase 2, end excluded"
CHECKPOINTS = "phase-2 checkpoints, end excluded"
RULES = {
  # Spindle at init (its mean order within one order of the middle), a fall of more than one
  # order in phase 1, and a rise of more than a quarter of an order in phase 2.
  "phases": Rule(
    tests=(
      Test(statistic=INIT_OFFSET, op="|x| <=", bound=1.0),
      Test(statistic=PHASE1_FALL, op=">", bound=1.0),
      Test(statistic=PHASE2_RISE, op=">", bound=0.25),
    )
  ),
  # "About when": within one checkpoint (a factor of about 2 in epochs on these schedules).
  "overfitting": Rule(tests=(Test(statistic=LAG, op="|x| <=", bound=1.0),)),
  "sigma2": Rule(
    tests=(Test(statistic=SIGMA2_FALLS, op=">", bound=0.99),),  # every step: the theory's sigma^2 only decreases
    requires=(Test(statistic=STEPS, op=">", bound=0.0),),
    unmet="nothing to compare",
  ),
  "theory": Rule(
    tests=(Test(statistic=VS_FLAT, op="<", bound=0.5),),  # less than half the flat baseline's error
    requires=(Test(statistic=CHECKPOINTS, op=">", bound=0.0),),
    unmet="nothing to compare",
  ),
}


def _claims(run: str, part: str) -> tuple[ClaimSpec, ...]:
  return (
    ClaimSpec(
      name=f"two phases ({run})",
      part=part,
      source=f"Zhang et al., {PAPER}, abstract",
      claim="at initialisation interactions are mostly of middle order; the first phase mainly penalizes "
      "interactions of medium and high orders, and the second phase mainly learns interactions of gradually "
      "increasing orders",
      rule=RULES["phases"],
    ),
    ClaimSpec(
      name=f"phase 2 starts with over-fitting ({run})",
      part=part,
      source=f"Zhang et al., {PAPER}, title and abstract",
      claim="the two-phase phenomenon is the starting point of a DNN learning over-fitted features: phase 2 starts "
      "about when the gap between test and training loss starts to grow",
      rule=RULES["overfitting"],
    ),
    ClaimSpec(
      name=f"sigma^2 decreases in phase 2 ({run})",
      part=part,
      source=f"{THEORY}, Theorem 3",
      claim="training in phase 2 is the optimum of Theorem 3 under a parameter-noise sigma^2 that decreases over "
      "training; sigma^2 fitted to each epoch's order distribution falls",
      rule=RULES["sigma2"],
    ),
    ClaimSpec(
      name=f"theory predicts phase 2 ({run})",
      part=part,
      source=f"{THEORY}, abstract and Theorem 3",
      claim="the theory well predicts the real learning dynamics: the order distribution of Theorem 3 at the "
      "fitted sigma^2 matches each phase-2 epoch's (here: better than a flat distribution)",
      rule=RULES["theory"],
    ),
  )


CLAIMS = tuple(spec for run, (part, name) in RUNS.items() for spec in _claims(name, part))
CLAIMS_OF = {run: _claims(name, part) for run, (part, name) in RUNS.items()}


@checks.config
class RunConfig:
  epochs: int
  checkpoints: tuple[int, ...]
  width: int  # MLP hidden width / Transformer model width


@checks.config
class Config:
  digits: RunConfig
  text: RunConfig
  samples: int  # training samples whose interactions are tracked
  per_class: int  # train and test samples per class for the Jaccard
  decompose_steps: int


SMALL = Config(
  digits=RunConfig(epochs=120, checkpoints=(0, 1, 2, 4, 8, 16, 32, 64, 120), width=256),
  text=RunConfig(epochs=60, checkpoints=(0, 1, 2, 4, 8, 16, 32, 60), width=64),
  samples=24,
  per_class=8,
  decompose_steps=3000,
)
CONFIGS = {
  "ci": Config(
    digits=RunConfig(epochs=4, checkpoints=(0, 1, 4), width=64),
    text=RunConfig(epochs=2, checkpoints=(0, 1, 2), width=32),
    samples=4,
    per_class=2,
    decompose_steps=100,
  ),
  "small": SMALL,
  "full": SMALL,  # small already runs the whole study
  "paper": Config(
    digits=RunConfig(epochs=300, checkpoints=(0, 1, 2, 4, 8, 16, 32, 64, 128, 200, 300), width=512),
    text=RunConfig(epochs=200, checkpoints=(0, 1, 2, 4, 8, 16, 32, 64, 128, 200), width=128),
    samples=64,
    per_class=20,
    decompose_steps=5000,
  ),
}


class Task(NamedTuple):
  """A classifier and its data, as the interaction analysis needs them."""

  model_fn: Callable[[Any, jax.Array], jax.Array]  # (params, x_BF) -> logits_BC; one object (a static jit argument)
  init: Callable[[jax.Array], Any]  # key -> params
  data: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]  # x_train, y_train, x_test, y_test
  baseline_F: np.ndarray  # what a masked feature becomes
  variable_of_F: np.ndarray  # int: the variable of each feature
  n: int
  batch: int
  learning_rate: float


def patch_variables() -> np.ndarray:
  """int [64]: pixel -> variable of a 3x3 grid of patches over the 8x8 image (rows/cols 3, 3, 2)."""
  band = np.array([0, 0, 0, 1, 1, 1, 2, 2])
  return (band[:, None] * 3 + band[None, :]).reshape(-1)


def mlp_init(key: jax.Array, hidden: int) -> dict:
  k1, k2, k3 = jax.random.split(key, 3)
  init = jax.nn.initializers.he_normal()
  return {
    "w1": init(k1, (64, hidden)),
    "b1": jnp.zeros(hidden),
    "w2": init(k2, (hidden, hidden)),
    "b2": jnp.zeros(hidden),
    "w3": init(k3, (hidden, 10)) * 0.1,
    "b3": jnp.zeros(10),
  }


def mlp(params: dict, x_BF: jax.Array) -> jax.Array:
  h = jax.nn.relu(x_BF @ params["w1"] + params["b1"])
  h = jax.nn.relu(h @ params["w2"] + params["b2"])
  return h @ params["w3"] + params["b3"]


def load_digits(seed: int):
  from sklearn.datasets import load_digits as sk_digits  # bundled with scikit-learn: no download

  data = sk_digits()
  x = (data.data / 16.0).astype(np.float32)
  y = data.target.astype(np.int32)
  order = np.random.default_rng(seed).permutation(len(x))
  cut = int(0.8 * len(x))
  return x[order[:cut]], y[order[:cut]], x[order[cut:]], y[order[cut:]]


def digits_task(seed: int, rc: RunConfig) -> Task:
  data = load_digits(seed)
  return Task(mlp, lambda key: mlp_init(key, rc.width), data, data[0].mean(axis=0), patch_variables(), 9, 64, 1e-3)


def stdlib_lines(seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
  """Distinct stripped non-comment lines of the stdlib packages in FAMILIES that are exactly
  TEXT_TOKENS cl100k tokens; a line found in two packages is dropped. Split 80/20 with a
  seeded permutation. Returns (train ids [B, T], train labels, test ids, test labels), the ids
  compact (`corpus.to_compact` over the training lines' most frequent tokens)."""
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", RuntimeWarning)
    tok = tokenizer.from_name("cl100k_base")
  families: dict[str, set[str]] = collections.defaultdict(set)
  for doc in corpus.stdlib_documents():
    family = doc.name.split("/", 1)[0]
    if family in FAMILIES and "/" in doc.name:
      families[family].update(s for s in (line.strip() for line in doc.text.splitlines()) if s and s[0] != "#")
  owners = collections.Counter(line for lines in families.values() for line in lines)
  rows, labels = [], []
  for label, family in enumerate(FAMILIES):
    for line in sorted(families[family]):
      ids = tok.encode(line)
      if owners[line] == 1 and len(ids) == TEXT_TOKENS:
        rows.append(ids)
        labels.append(label)
  x, y = np.asarray(rows, np.int64), np.asarray(labels, np.int32)
  order = np.random.default_rng(seed).permutation(len(x))
  train, test = order[: int(0.8 * len(x))], order[int(0.8 * len(x)) :]
  kept = corpus.compact_vocab(x[train].ravel(), TEXT_VOCAB - 1)
  compact = corpus.to_compact(x, kept).astype(np.int32)
  return compact[train], y[train], compact[test], y[test]


def transformer_classifier(params: dict, tokens_BT: jax.Array, *, cfg: llama.LlamaConfig) -> jax.Array:
  """logits_BC = mean_t h_BTD @ head_DC + bias_C, h the Llama's final-norm hidden states."""
  hidden_BTD, _ = llama.forward_hidden(params["lm"], tokens_BT, cfg)
  return hidden_BTD.mean(axis=1).astype(jnp.float32) @ params["head_DC"] + params["bias_C"]


def text_task(seed: int, rc: RunConfig) -> Task:
  x_tr, y_tr, x_te, y_te = stdlib_lines(seed)
  cfg = llama.LlamaConfig(
    vocab_size=TEXT_VOCAB,
    dim=rc.width,
    n_layers=2,
    n_heads=4,
    n_kv_heads=2,
    ffn_dim=2 * rc.width,
    max_seq_len=TEXT_TOKENS,
  )

  def init(key):
    k_lm, k_head = jax.random.split(key)
    head = jax.random.normal(k_head, (rc.width, len(FAMILIES))) * 0.02
    return {"lm": llama.init(k_lm, cfg), "head_DC": head, "bias_C": jnp.zeros(len(FAMILIES))}

  mask = np.full(TEXT_TOKENS, TEXT_VOCAB - 1, np.int32)
  model_fn = functools.partial(transformer_classifier, cfg=cfg)
  return Task(model_fn, init, (x_tr, y_tr, x_te, y_te), mask, np.arange(TEXT_TOKENS), TEXT_TOKENS, 32, 1e-3)


def _interactions(task: Task, params, x, y, dcfg: ia.DecompositionConfig):
  v = ia.evaluate_subsets(
    task.model_fn, params, x, jnp.asarray(task.baseline_F), jnp.asarray(task.variable_of_F), y, task.n
  )
  return v, ia.decompose(v, dcfg)


def _train(ctx: Context, cfg: Config, rc: RunConfig, task: Task, label_noise: float, desc: str):
  """Trains with Adam, recording losses and interactions of `cfg.samples` tracked training
  samples at each checkpoint epoch."""
  x_tr, y_tr, x_te, y_te = task.data
  rng = np.random.default_rng(ctx.seed)
  y_fit = y_tr.copy()
  flip = rng.random(len(y_fit)) < label_noise
  y_fit[flip] = rng.permutation(y_fit[flip])
  tracked = rng.choice(len(x_tr), cfg.samples, replace=False)
  tx = optax.adam(task.learning_rate)
  params = task.init(jax.random.key(ctx.seed))
  opt_state = tx.init(params)
  x_fit, y_fit_j = jnp.asarray(x_tr), jnp.asarray(y_fit)
  loss = jax.jit(
    lambda params, x, y: optax.softmax_cross_entropy_with_integer_labels(task.model_fn(params, x), y).mean()
  )

  @jax.jit
  def epoch(params, opt_state, perm):
    def step(carry, idx):
      params, opt_state = carry
      grads = jax.grad(loss)(params, x_fit[idx], y_fit_j[idx])
      updates, opt_state = tx.update(grads, opt_state, params)
      return (optax.apply_updates(params, updates), opt_state), None

    (params, opt_state), _ = jax.lax.scan(step, (params, opt_state), perm)
    return params, opt_state

  dcfg = ia.DecompositionConfig(steps=cfg.decompose_steps)
  accuracy = jax.jit(lambda params, x, y: jnp.mean(jnp.argmax(task.model_fn(params, x), -1) == y))
  history = []
  steps_per_epoch = len(x_tr) // task.batch
  for e in progress(range(rc.epochs + 1), f"interactions: training {desc}"):
    if e > 0:
      perm = rng.permutation(len(x_tr))[: steps_per_epoch * task.batch].reshape(steps_per_epoch, task.batch)
      params, opt_state = epoch(params, opt_state, jnp.asarray(perm))
    if e in rc.checkpoints:
      v, dec = _interactions(task, params, x_tr[tracked], y_fit[tracked], dcfg)
      history.append(
        {
          "epoch": e,
          "train_loss": float(loss(params, x_fit, y_fit_j)),
          "test_loss": float(loss(params, jnp.asarray(x_te), jnp.asarray(y_te))),
          "test_acc": float(accuracy(params, jnp.asarray(x_te), jnp.asarray(y_te))),
          "v": np.asarray(v),
          "i_and": np.asarray(dec.i_and_M),
          "i_or": np.asarray(dec.i_or_M),
          "matching_error": float(jnp.max(dec.matching_error)),
        }
      )
  return params, history


def _order_distributions(history):
  """Normalised salient-interaction strength per order at each checkpoint, each with its own
  tau = 0.03 E_x |v(x) - v(x_{})| (a freshly initialised model has tiny outputs)."""
  dists, taus = [], []
  for h in history:
    tau = float(ia.salience_threshold(h["v"][:, -1], h["v"][:, 0]))
    dists.append(np.asarray(ia.normalized_order_strength(jnp.asarray(h["i_and"]), jnp.asarray(h["i_or"]), tau)))
    taus.append(tau)
  return dists, taus


def _mean_order(dist: np.ndarray) -> float:
  k = np.arange(len(dist))
  return float((k * dist).sum() / max(dist.sum(), 1e-12))


def _jaccard_by_order(ctx: Context, cfg: Config, task: Task, params) -> np.ndarray:
  """Mean over classes of Jaccard(train, test) of the class-mean order-k interactions, k = 1 .. n."""
  x_tr, y_tr, x_te, y_te = task.data
  rng = np.random.default_rng(ctx.seed + 1)
  dcfg = ia.DecompositionConfig(steps=cfg.decompose_steps)
  per_class = []
  for c in np.unique(y_tr):
    idx_tr = rng.choice(np.flatnonzero(y_tr == c), cfg.per_class, replace=False)
    idx_te = rng.choice(np.flatnonzero(y_te == c), cfg.per_class, replace=False)
    _, d_tr = _interactions(task, params, x_tr[idx_tr], y_tr[idx_tr], dcfg)
    _, d_te = _interactions(task, params, x_te[idx_te], y_te[idx_te], dcfg)
    per_class.append(
      [
        float(
          ia.jaccard(
            ia.order_vector(d_tr.i_and_M.mean(0), d_tr.i_or_M.mean(0), k),
            ia.order_vector(d_te.i_and_M.mean(0), d_te.i_or_M.mean(0), k),
          )
        )
        for k in range(1, task.n + 1)
      ]
    )
  return np.mean(per_class, axis=0)


def _sigma2_unit(sigma2: float) -> str:
  if sigma2 <= dynamics.SIGMA2_GRID[0]:
    return "sigma^2, upper bound (fit on the grid's lower edge)"
  if sigma2 >= dynamics.SIGMA2_GRID[-1]:
    return "sigma^2, lower bound (fit on the grid's upper edge)"
  return "sigma^2"


def _theory(ctx: Context, tag: str, slug: str, n: int, history, taus, start: int):
  """Phase-2 theory: sigma^2 per checkpoint from the phase-2 start, goodness of fit.

  The theory models AND interactions, so both sides are AND-only order distributions
  (each checkpoint's own tau; the prediction thresholded with the final tau, as w* is)."""
  epochs = [h["epoch"] for h in history]
  orders = tuple(range(1, n + 1))
  measured = np.stack([dynamics.order_distribution(h["i_and"], n, tau) for h, tau in zip(history, taus)][start:])
  sigma2, predicted = dynamics.fit_sigma2(measured, history[-1]["i_and"], n, tau=taus[-1])
  residual = dynamics.relative_residual(measured, predicted)
  flat = dynamics.relative_residual(measured, np.ones_like(measured))  # every order equally strong
  end = dynamics.relative_residual(measured, np.broadcast_to(measured[-1], measured.shape))  # already at the end
  fitted = epochs[start:]
  records = []
  if len(fitted) > 1:  # a phase 2 of one checkpoint has only the circular end point
    records.append(
      ctx.record(
        f"fitted sigma^2 at phase-2 start, epoch {fitted[0]} ({tag})",
        sigma2[0],
        _sigma2_unit(sigma2[0]),
        "decreases over training",
        THEORY,
      )
    )
  records.append(
    ctx.record(
      f"fitted sigma^2 at the end, circular: w* is this checkpoint ({tag})",
      sigma2[-1],
      _sigma2_unit(sigma2[-1]),
      "-> 0 by construction",
      THEORY,
    )
  )
  honest = slice(0, len(fitted) - 1)  # every phase-2 checkpoint but the circular end point
  falls = np.diff(sigma2[honest]) < 0
  ratio = lambda baseline: float(np.median(residual[honest]) / max(np.median(baseline[honest]), 1e-12))
  stats = {  # the claims' statistics (nan where phase 2 is too short to have them)
    SIGMA2_FALLS: float(falls.mean()) if falls.size else float("nan"),
    STEPS: falls.size,
    VS_FLAT: ratio(flat) if len(fitted) > 1 else float("nan"),
    CHECKPOINTS: len(fitted) - 1,
  }
  if len(fitted) > 2:
    records += [
      ctx.record(
        f"fitted sigma^2 at the last non-circular checkpoint, epoch {fitted[-2]} ({tag})",
        sigma2[-2],
        _sigma2_unit(sigma2[-2]),
        "decreases over training",
        THEORY,
      ),
      ctx.record(
        f"phase-2 steps where fitted sigma^2 falls, end excluded ({tag})",
        stats[SIGMA2_FALLS],
        "fraction",
        "1 (sigma^2 decreases)",
        THEORY,
      ),
    ]
  if len(fitted) > 1:
    records += [
      ctx.record(
        f"theory residual, median over phase 2, end excluded ({tag})",
        float(np.median(residual[honest])),
        "relative L2",
      ),
      ctx.record(
        f"theory residual / flat-distribution residual, phase 2, end excluded ({tag})",
        stats[VS_FLAT],
        "ratio",
        "< 1: the theory predicts the shape",
        THEORY,
      ),
      ctx.record(
        f"theory residual / end-distribution residual, phase 2, end excluded ({tag})",
        ratio(end),
        "ratio",
      ),
    ]
  shown = sorted({0, len(fitted) // 3, 2 * len(fitted) // 3, len(fitted) - 1})
  circular = lambda i: " (circular)" if i == len(fitted) - 1 else ""
  plots = [
    Plot(
      f"theory_{slug}",
      f"Phase 2, AND interactions: measured vs theory ({tag})",
      "order",
      "normalised strength",
      tuple(
        series
        for i in shown
        for series in (
          Series(f"epoch {fitted[i]} measured", orders, tuple(float(x) for x in measured[i][1:])),
          Series(
            f"epoch {fitted[i]} theory, sigma^2={sigma2[i]:.3g}{circular(i)}",
            orders,
            tuple(float(x) for x in predicted[i][1:]),
          ),
        )
      ),
    ),
    Plot(
      f"residual_{slug}",
      f"Phase-2 goodness of fit ({tag}); the last point is circular",
      "epoch",
      "||predicted - measured|| / ||measured||",
      (
        Series("closed-form theory, fitted sigma^2", tuple(fitted), tuple(float(r) for r in residual)),
        Series("flat distribution (baseline)", tuple(fitted), tuple(float(r) for r in flat)),
      ),
    ),
  ]
  note = (
    f"{tag}: phase-2 fit at epochs {fitted}: sigma^2 {[float(f'{s:.3g}') for s in sigma2]}, relative residual "
    f"{[round(float(r), 3) for r in residual]} (flat baseline {[round(float(r), 3) for r in flat]}; the end's "
    f"own distribution as the prediction: {[round(float(r), 3) for r in end]}). "
    f"The sigma^2 grid spans {dynamics.SIGMA2_GRID[0]:.0e} .. {dynamics.SIGMA2_GRID[-1]:.0e}; a fit on its edge is a "
    "bound. w* is the final checkpoint's AND interactions, so the end-point fit is circular, and the theory "
    "sees the final interactions at every checkpoint: the end-distribution baseline says what that alone gives."
  )
  return records, plots, note, stats


def _analyse(ctx: Context, cfg: Config, tag: str, slug: str, task: Task, params, history, *, jaccard: bool):
  n = task.n
  orders = tuple(range(1, n + 1))
  dists, taus = _order_distributions(history)
  epochs = [h["epoch"] for h in history]
  gaps = np.array([h["test_loss"] - h["train_loss"] for h in history])
  mean_orders = [_mean_order(d) for d in dists]
  start = 1 + int(np.argmin(mean_orders[1:])) if len(history) > 1 else 0  # lowest mean order: phase 2 starts
  # The gap "starts to grow" at the first checkpoint 20% of its range above the lowest gap so far.
  grown = gaps > np.minimum.accumulate(gaps) + 0.2 * max(np.ptp(gaps), 1e-9)
  overfit_at = int(np.argmax(grown)) if grown.any() else len(epochs) - 1
  overfit = epochs[overfit_at]
  records = [
    ctx.record(f"test accuracy ({tag})", history[-1]["test_acc"], "fraction"),
    ctx.record(f"test - train loss gap at the end ({tag})", float(gaps[-1]), "nats"),
    ctx.record(f"mean interaction order at init ({tag})", mean_orders[0], "order", "spindle: middle orders", PAPER),
    ctx.record(f"lowest mean order, epoch ({tag})", epochs[start], "epoch", "phase 2 starts here", PAPER),
    ctx.record(f"loss gap starts to grow, epoch ({tag})", overfit, "epoch", "about when phase 2 starts", PAPER),
    ctx.record(f"mean interaction order at the end ({tag})", mean_orders[-1], "order", "rises in phase 2", PAPER),
    ctx.record(f"universal matching error, max ({tag})", max(h["matching_error"] for h in history), "log-odds"),
  ]
  plots = [
    Plot(
      f"orders_{slug}",
      f"Salient interaction strength per order ({tag})",
      "order",
      "normalised strength",
      tuple(Series(f"epoch {e}", orders, tuple(float(x) for x in d[1:])) for e, d in zip(epochs, dists)),
    ),
    Plot(
      f"loss_{slug}",
      f"Loss over training ({tag})",
      "epoch",
      "cross-entropy",
      (
        Series("train", tuple(epochs), tuple(h["train_loss"] for h in history)),
        Series("test", tuple(epochs), tuple(h["test_loss"] for h in history)),
      ),
    ),
  ]
  for i in sorted({0, start, len(history) - 1}):  # Fig. 6: A_k^+ up, A_k^- down, mean over tracked samples
    plus, minus = jax.vmap(ia.order_strength, in_axes=(0, 0, None))(
      jnp.asarray(history[i]["i_and"]), jnp.asarray(history[i]["i_or"]), taus[i]
    )
    plots.append(
      Plot(
        f"signed_{slug}_epoch{epochs[i]}",
        f"A_k^+ and A_k^- per order, epoch {epochs[i]} ({tag})",
        "order",
        "summed salient interaction strength",
        (
          Series("A_k^+", orders, tuple(float(x) for x in plus.mean(0)[1:])),
          Series("-A_k^-", orders, tuple(-float(x) for x in minus.mean(0)[1:])),
        ),
        kind="bar",
      )
    )
  theory_records, theory_plots, theory_note, stats = _theory(ctx, tag, slug, n, history, taus, start)
  records += theory_records
  plots += theory_plots
  stats |= {
    INIT_OFFSET: mean_orders[0] - (n + 1) / 2,
    PHASE1_FALL: mean_orders[0] - mean_orders[start],
    PHASE2_RISE: mean_orders[-1] - mean_orders[start],
    LAG: overfit_at - start if grown.any() else float("nan"),  # a gap that never grows: no over-fitting to meet
  }
  for spec in CLAIMS_OF[tag]:
    ctx.claim(
      spec,
      {name: stats[name] for name in spec.rule.statistics},
      seeds=[ctx.seed],
      note=f"One run (seed {ctx.seed}): a single measurement. Checkpoints at epochs {epochs}; mean order "
      f"{[round(m, 2) for m in mean_orders]}; phase 2 starts at epoch {epochs[start]}, the loss gap grows from epoch "
      f"{overfit}; the sigma^2 fits use w* = the final model's AND interactions.",
    )
  if jaccard:
    jac = _jaccard_by_order(ctx, cfg, task, params)
    plots.append(
      Plot(
        f"jaccard_{slug}",
        f"Train vs test interactions per class ({tag})",
        "order",
        "Jaccard similarity",
        (Series("mean over classes", orders, tuple(float(x) for x in jac)),),
      )
    )
    records += [
      ctx.record(f"Jaccard train/test, order 1 ({tag})", float(jac[0]), "similarity"),
      ctx.record(f"Jaccard train/test, order {n - 1} ({tag})", float(jac[-2]), "similarity"),
      ctx.record(
        f"Jaccard order {n - 1} / order 1 ({tag})",
        float(jac[-2] / max(jac[0], 1e-12)),
        "ratio",
        "< 1 (falls with order)",
        PAPER,
      ),
    ]
  notes = [
    f"{tag}: salience threshold tau = {taus[0]:.3g} at init, {taus[-1]:.3g} at the end; checkpoints at epochs "
    f"{epochs}; mean order per checkpoint {[round(m, 2) for m in mean_orders]}.",
    theory_note,
  ]
  return records, plots, notes


PARTS = ("digits", "text")  # --only=interactions.<part>
TIMED = False  # it times nothing: --repeats is a usage error (bench/cli.py)


def run(ctx: Context) -> Result:
  cfg = CONFIGS[ctx.scale]
  records: list = []
  plots: list[Plot] = []
  notes: list[str] = []
  if ctx.wants("digits"):
    task = digits_task(ctx.seed, cfg.digits)
    for noise in (0.0, 0.3):
      tag = "clean labels" if noise == 0 else f"{noise:.0%} label noise"
      params, history = _train(ctx, cfg, cfg.digits, task, noise, f"digits MLP ({tag})")
      part = _analyse(ctx, cfg, tag, f"digits_{int(noise * 100)}", task, params, history, jaccard=noise == 0)
      records, plots, notes = records + part[0], plots + part[1], notes + part[2]
    notes.append(
      f"Digits: {len(task.data[0])} train / {len(task.data[2])} test images; n = 9 patch variables, baseline = the "
      f"mean training image; {cfg.samples} tracked training samples; decomposition: SGD + momentum, "
      f"{cfg.decompose_steps} steps."
    )
  if ctx.wants("text"):
    task = text_task(ctx.seed, cfg.text)
    tag = "Transformer, stdlib lines"
    params, history = _train(ctx, cfg, cfg.text, task, 0.0, tag)
    part = _analyse(ctx, cfg, tag, "text", task, params, history, jaccard=True)
    records, plots, notes = records + part[0], plots + part[1], notes + part[2]
    notes.append(
      f"Text: {len(task.data[0])} train / {len(task.data[2])} test lines of {TEXT_TOKENS} cl100k tokens from the "
      f"stdlib packages {list(FAMILIES)} (label = package); a {TEXT_VOCAB}-id compact vocabulary with a [MASK] "
      f"baseline; a 2-layer Llama of width {cfg.text.width}, mean-pooled, Adam 1e-3, batch 32."
    )
  return Result(ctx.benchmark, tuple(records), tuple(plots), tuple(notes))


if __name__ == "__main__":
  app.run(cli.main_for({"interactions": Benchmark(run, PARTS, TIMED, CLAIMS)}))
