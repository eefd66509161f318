"""AND-OR interactions of a digit classifier over training: the two-phase dynamics.

  python -m paperjax.bench.interactions --scale=small [--only=interactions.dynamics]

Data nobody here made: scikit-learn's bundled 8x8 digits, split 80/20 with a fixed seed.
Input variables: a 3x3 grid of image patches (n = 9, 512 masked inputs per sample),
masked to the training mean image. Model: an MLP trained with Adam, once on clean labels
and once with 30% of training labels shuffled (over-fitting is then visible).

Tracked at checkpoints over epochs: train/test loss and their gap, the normalised
strength of salient interactions per order (AND + OR, learned decomposition), the
epoch where the mean order is lowest (phase 2 starts after it) vs the epoch where the
loss gap starts to grow, the Jaccard similarity of train vs test order-k interactions
per class (falls with k in the papers), and sigma^2 of the closed-form theory fitted to
each checkpoint's order distribution (decreasing over training in the theory).

Shapes: B images, F pixels (input features), M = 2^n subsets of the n patch variables.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import app

from paperjax.bench import cli
from paperjax.bench.harness import Benchmark, Context, Plot, Result, Series, progress
from paperjax.interp import dynamics
from paperjax.interp import interactions as ia

PAPER = "Two-phase dynamics (arXiv 2405.10262)"
THEORY = "Ren et al. (arXiv 2407.19198)"
N_VARS = 9


@dataclasses.dataclass(frozen=True, kw_only=True)
class Config:
  epochs: int
  checkpoints: tuple[int, ...]
  samples: int  # training samples whose interactions are tracked
  per_class: int  # train and test samples per class for the Jaccard
  decompose_steps: int
  hidden: int


CONFIGS = {
  "ci": Config(epochs=4, checkpoints=(0, 1, 4), samples=4, per_class=2, decompose_steps=100, hidden=64),
  "small": Config(
    epochs=120,
    checkpoints=(0, 1, 2, 4, 8, 16, 32, 64, 120),
    samples=24,
    per_class=8,
    decompose_steps=3000,
    hidden=256,
  ),
  "paper": Config(
    epochs=300,
    checkpoints=(0, 1, 2, 4, 8, 16, 32, 64, 128, 200, 300),
    samples=64,
    per_class=20,
    decompose_steps=5000,
    hidden=512,
  ),
}


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


def _loss(params, x, y):
  return optax.softmax_cross_entropy_with_integer_labels(mlp(params, x), y).mean()


def load_digits(seed: int):
  from sklearn.datasets import load_digits as sk_digits  # bundled with scikit-learn: no download

  data = sk_digits()
  x = (data.data / 16.0).astype(np.float32)
  y = data.target.astype(np.int32)
  order = np.random.default_rng(seed).permutation(len(x))
  cut = int(0.8 * len(x))
  return x[order[:cut]], y[order[:cut]], x[order[cut:]], y[order[cut:]]


def _interactions(params, x, y, baseline, dcfg: ia.DecompositionConfig):
  v = ia.evaluate_subsets(mlp, params, x, baseline, jnp.asarray(patch_variables()), y, N_VARS)
  dec = ia.decompose(v, dcfg)
  return v, dec


def _run(ctx: Context, cfg: Config, data, label_noise: float):
  x_tr, y_tr, x_te, y_te = data
  rng = np.random.default_rng(ctx.seed)
  y_fit = y_tr.copy()
  flip = rng.random(len(y_fit)) < label_noise
  y_fit[flip] = rng.permutation(y_fit[flip])
  baseline = x_tr.mean(axis=0)
  tracked = rng.choice(len(x_tr), cfg.samples, replace=False)
  tx = optax.adam(1e-3)
  params = mlp_init(jax.random.key(ctx.seed), cfg.hidden)
  opt_state = tx.init(params)

  x_fit, y_fit_j = jnp.asarray(x_tr), jnp.asarray(y_fit)

  @jax.jit
  def epoch(params, opt_state, perm):
    def step(carry, idx):
      params, opt_state = carry
      grads = jax.grad(_loss)(params, x_fit[idx], y_fit_j[idx])
      updates, opt_state = tx.update(grads, opt_state, params)
      return (optax.apply_updates(params, updates), opt_state), None

    (params, opt_state), _ = jax.lax.scan(step, (params, opt_state), perm)
    return params, opt_state

  dcfg = ia.DecompositionConfig(steps=cfg.decompose_steps)
  history = []
  batch = 64
  steps_per_epoch = len(x_tr) // batch
  for e in progress(range(cfg.epochs + 1), f"interactions: training (label noise {label_noise:.0%})"):
    if e > 0:
      perm = rng.permutation(len(x_tr))[: steps_per_epoch * batch].reshape(steps_per_epoch, batch)
      params, opt_state = epoch(params, opt_state, jnp.asarray(perm))
    if e in cfg.checkpoints:
      v, dec = _interactions(params, x_tr[tracked], y_fit[tracked], baseline, dcfg)
      history.append(
        {
          "epoch": e,
          "train_loss": float(_loss(params, x_tr, y_fit)),
          "test_loss": float(_loss(params, x_te, y_te)),
          "test_acc": float(jnp.mean(jnp.argmax(mlp(params, x_te), -1) == y_te)),
          "v": np.asarray(v),
          "i_and": np.asarray(dec.i_and_M),
          "i_or": np.asarray(dec.i_or_M),
          "matching_error": float(jnp.max(dec.matching_error)),
        }
      )
  return params, history, baseline


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


def _jaccard_by_order(ctx, cfg, params, data, baseline):
  x_tr, y_tr, x_te, y_te = data
  rng = np.random.default_rng(ctx.seed + 1)
  dcfg = ia.DecompositionConfig(steps=cfg.decompose_steps)
  per_class = []
  for c in range(10):
    idx_tr = rng.choice(np.flatnonzero(y_tr == c), cfg.per_class, replace=False)
    idx_te = rng.choice(np.flatnonzero(y_te == c), cfg.per_class, replace=False)
    _, d_tr = _interactions(params, x_tr[idx_tr], y_tr[idx_tr], baseline, dcfg)
    _, d_te = _interactions(params, x_te[idx_te], y_te[idx_te], baseline, dcfg)
    per_class.append(
      [
        float(
          ia.jaccard(
            ia.order_vector(d_tr.i_and_M.mean(0), d_tr.i_or_M.mean(0), k),
            ia.order_vector(d_te.i_and_M.mean(0), d_te.i_or_M.mean(0), k),
          )
        )
        for k in range(1, N_VARS + 1)
      ]
    )
  return np.mean(per_class, axis=0)


PARTS = ()  # --only=interactions.<part>


def run(ctx: Context) -> Result:
  cfg = CONFIGS[ctx.scale]
  data = load_digits(ctx.seed)
  records, plots, notes = [], [], []
  runs = {}
  for noise in (0.0, 0.3):
    runs[noise] = _run(ctx, cfg, data, noise)

  orders = tuple(range(1, N_VARS + 1))
  for noise, (params, history, baseline) in runs.items():
    tag = "clean labels" if noise == 0 else f"{noise:.0%} label noise"
    dists, taus = _order_distributions(history)
    epochs = [h["epoch"] for h in history]
    gaps = np.array([h["test_loss"] - h["train_loss"] for h in history])
    mean_orders = [_mean_order(d) for d in dists]
    start = 1 + int(np.argmin(mean_orders[1:]))  # checkpoint with the lowest mean order: phase 2 starts
    phase2 = epochs[start]
    # The gap "starts to grow" at the first checkpoint 20% of its range above the lowest gap so far.
    grown = gaps > np.minimum.accumulate(gaps) + 0.2 * max(np.ptp(gaps), 1e-9)
    overfit = epochs[int(np.argmax(grown))] if grown.any() else epochs[-1]
    records += [
      ctx.record(f"test accuracy ({tag})", history[-1]["test_acc"], "fraction"),
      ctx.record(f"test - train loss gap at the end ({tag})", float(gaps[-1]), "nats"),
      ctx.record(f"mean interaction order at init ({tag})", mean_orders[0], "order", "spindle: middle orders", PAPER),
      ctx.record(f"lowest mean order, epoch ({tag})", phase2, "epoch", "phase 2 starts here", PAPER),
      ctx.record(f"loss gap starts to grow, epoch ({tag})", overfit, "epoch", "about when phase 2 starts", PAPER),
      ctx.record(f"mean interaction order at the end ({tag})", mean_orders[-1], "order", "rises in phase 2", PAPER),
      ctx.record(f"universal matching error, max ({tag})", max(h["matching_error"] for h in history), "log-odds"),
    ]
    plots.append(
      Plot(
        f"orders_{int(noise * 100)}",
        f"Salient interaction strength per order ({tag})",
        "order",
        "normalised strength",
        tuple(Series(f"epoch {e}", orders, tuple(float(x) for x in d[1:])) for e, d in zip(epochs, dists)),
      )
    )
    plots.append(
      Plot(
        f"loss_{int(noise * 100)}",
        f"Loss over training ({tag})",
        "epoch",
        "cross-entropy",
        (
          Series("train", tuple(epochs), tuple(h["train_loss"] for h in history)),
          Series("test", tuple(epochs), tuple(h["test_loss"] for h in history)),
        ),
      )
    )
    # Theory (phase 2 only: phase 1 leaves the random init): sigma^2 fitted at each checkpoint
    # from the phase-2 start on, w* = the final model's AND interactions.
    sigma2, predicted = dynamics.fit_sigma2(np.stack(dists[start:]), history[-1]["i_and"], N_VARS, tau=taus[-1])
    records += [
      ctx.record(
        f"fitted sigma^2 at phase-2 start, epoch {phase2} ({tag})",
        sigma2[0],
        "sigma^2",
        "decreases over training",
        THEORY,
      ),
      ctx.record(f"fitted sigma^2 at the end ({tag})", sigma2[-1], "sigma^2", "decreases over training", THEORY),
    ]
    if noise > 0:  # the run whose phase 2 is long enough to compare shapes
      shown = sorted({0, len(sigma2) // 2, len(sigma2) - 1})
      plots.append(
        Plot(
          "theory",
          f"Phase 2: measured vs theory ({tag})",
          "order",
          "normalised strength",
          tuple(
            series
            for i in shown
            for series in (
              Series(f"epoch {epochs[start + i]} measured", orders, tuple(float(x) for x in dists[start + i][1:])),
              Series(
                f"epoch {epochs[start + i]} theory, sigma^2={sigma2[i]:.3g}",
                orders,
                tuple(float(x) for x in predicted[i][1:]),
              ),
            )
          ),
        )
      )
    if noise == 0:
      jac = _jaccard_by_order(ctx, cfg, params, data, baseline)
      plots.append(
        Plot(
          "jaccard",
          "Train vs test interactions per class (clean labels)",
          "order",
          "Jaccard similarity",
          (Series("mean over classes", orders, tuple(float(x) for x in jac)),),
        )
      )
      records += [
        ctx.record("Jaccard train/test, order 1", float(jac[0]), "similarity"),
        ctx.record(f"Jaccard train/test, order {N_VARS - 1}", float(jac[-2]), "similarity"),
        ctx.record(
          f"Jaccard order {N_VARS - 1} / order 1",
          float(jac[-2] / max(jac[0], 1e-12)),
          "ratio",
          "< 1 (falls with order)",
          PAPER,
        ),
      ]
    notes.append(
      f"{tag}: salience threshold tau = {taus[0]:.3g} at init, {taus[-1]:.3g} at the end; "
      f"checkpoints at epochs {epochs}; "
      "mean order per checkpoint "
      f"{[round(m, 2) for m in mean_orders]}."
    )
  notes.append(
    f"Digits: {len(data[0])} train / {len(data[2])} test images; n = {N_VARS} patch variables, baseline = the mean "
    f"training image; {cfg.samples} tracked training samples; "
    f"decomposition: SGD + momentum, {cfg.decompose_steps} steps."
  )
  return Result(ctx.benchmark, tuple(records), tuple(plots), tuple(notes))


if __name__ == "__main__":
  app.run(cli.main_for({"interactions": Benchmark(run, PARTS)}))
