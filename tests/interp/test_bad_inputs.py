"""Bad input never passes silently (issue 31): SAEs, their training and evaluation, AND-OR
interactions and their theory raise an error naming the argument, the expectation and the
value, before any jitted work."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import checkify

from paperjax.interp import dynamics, sae, sae_eval, sae_train
from paperjax.interp import interactions as ia
from paperjax.models.transformer import llama
from paperjax.ops import checks

D, F, B = 4, 8, 4
NAN, INF = float("nan"), float("inf")
TOPK = sae.SAEConfig(architecture="topk", d_in=D, d_sae=F, k=2)
WIDER = sae.SAEConfig(architecture="topk", d_in=D, d_sae=2 * F, k=2)
GATED = sae.SAEConfig(architecture="gated", d_in=D, d_sae=F, coefficient=0.1)
TCFG = sae_train.TrainConfig(steps=5, batch_size=B)
KEY = jax.random.key(0)
MODEL = llama.LlamaConfig(vocab_size=32, dim=D, n_layers=1, n_heads=2, n_kv_heads=1, ffn_dim=8, max_seq_len=8)


@functools.cache
def _params(cfg: sae.SAEConfig = TOPK) -> dict:
  return sae.init(KEY, cfg)


def _x(rows: int = B, seed: int = 0) -> np.ndarray:
  return np.random.default_rng(seed).normal(size=(rows, D)).astype(np.float32)


def _nan_x() -> np.ndarray:
  x = _x()
  x[1, 2] = NAN
  return x


def _train(batches, tcfg=TCFG, **kwargs):
  return sae_train.train(KEY, TOPK, tcfg, batches, **kwargs)


def _step(x_BD):
  state = sae_train.start_state(_params(), TOPK, TCFG)
  return sae_train.make_step(TOPK, TCFG)(state, x_BD)


def _linear(params, x_KF):
  return x_KF @ params  # logits [K, C]


def _subsets(**changes):
  """evaluate_subsets of a 3-class linear model on 2 samples of 3 features, one variable each."""
  args = {
    "model_fn": _linear,
    "params": jnp.ones((3, 3)),
    "x_BF": np.ones((2, 3), np.float32),
    "baseline_F": np.zeros(3, np.float32),
    "variable_of_F": np.arange(3),
    "labels_B": np.array([0, 2]),
    "n": 3,
    **changes,
  }
  return ia.evaluate_subsets(**args)


SAE = [
  # The user's case: a 2-batch stream for 5 steps ended in a bare StopIteration.
  pytest.param(
    lambda: _train(iter([_x(), _x(seed=1)])),
    ValueError,
    r"batches: the stream ran out after 2 batches, at step 2 of the steps=5 requested",
    id="train-stream-short",
  ),
  pytest.param(
    lambda: _train(iter([])),
    ValueError,
    "batches: the stream ran out after 0 batches, at step 0 of the steps=5",
    id="train-stream-empty",
  ),
  pytest.param(
    lambda: _train([_x(), _x(rows=3)]),
    ValueError,
    r"batches: expected arrays \[batch_size=4, d_in=4\], got \(3, 4\)",
    id="train-short-second-batch",
  ),
  pytest.param(
    lambda: _train(iter([_nan_x()])),
    ValueError,
    r"batches: expected finite values, got \[nan\] at index \[\(1, 2\)\]",
    id="train-nan",
  ),
  pytest.param(
    lambda: _train(iter([_x().astype(int)])),
    TypeError,
    "batches: expected float activations, got dtype int",
    id="train-int-batch",
  ),
  pytest.param(lambda: _train(5), TypeError, "batches: expected an iterator of arrays", id="train-not-iterable"),
  pytest.param(
    lambda: _train(iter([_x()]), scale=NAN),
    ValueError,
    "scale: expected a finite float > 0, got nan",
    id="train-scale-nan",
  ),
  pytest.param(
    lambda: _train(iter([_x()]), scale=-1.0),
    ValueError,
    "scale: expected a finite float > 0, got -1.0",
    id="train-scale-negative",
  ),
  pytest.param(
    lambda: _train(iter([_x()]), checkpoint_every=-1),
    ValueError,
    "checkpoint_every: expected an int >= 0",
    id="train-checkpoint-every",
  ),
  pytest.param(
    lambda: sae_train.train(KEY, TCFG, TOPK, iter([_x()])),
    TypeError,
    "cfg: expected an sae.SAEConfig, got TrainConfig",
    id="train-configs-swapped",
  ),
  pytest.param(
    lambda: _step(jnp.asarray(_nan_x())), ValueError, r"x_BD: expected finite values, got \[nan\]", id="step-nan"
  ),
  pytest.param(
    lambda: _step(jnp.asarray(_x(rows=3))),
    ValueError,
    r"x_BD: expected arrays \[batch_size=4, d_in=4\], got \(3, 4\)",
    id="step-batch",
  ),
  pytest.param(
    lambda: sae_train.make_step(TOPK, sae_train.TrainConfig(steps=5, threshold_lr=0.1)),
    ValueError,
    "threshold_lr: only JumpReLU",
    id="step-threshold-lr-topk",
  ),
  pytest.param(
    lambda: sae_train.TrainConfig(steps=0),
    ValueError,
    "TrainConfig.steps: expected int >= 1, got int 0",
    id="tcfg-steps-0",
  ),
  pytest.param(
    lambda: sae_train.TrainConfig(steps=5, lr=0.0),
    ValueError,
    r"TrainConfig.lr: expected float in \(0, inf\), got float 0.0",
    id="tcfg-lr-0",
  ),
  pytest.param(
    lambda: sae_train.TrainConfig(steps=5, lr=NAN), ValueError, "TrainConfig.lr: expected float", id="tcfg-lr-nan"
  ),
  pytest.param(
    lambda: sae_train.TrainConfig(steps=5, b1=1.0),
    ValueError,
    r"TrainConfig.b1: expected float in \[0, 1\)",
    id="tcfg-b1-1",
  ),
  pytest.param(
    lambda: sae_train.TrainConfig(steps=5, lr_warmup_steps=10),
    ValueError,
    "lr_warmup_steps: expected 0 <= lr_warmup_steps <= steps=5, got 10",
    id="tcfg-warmup",
  ),
  pytest.param(
    lambda: sae_train.TrainConfig(steps=5, batch_size=2.5),
    TypeError,
    "TrainConfig.batch_size: expected int",
    id="tcfg-batch-float",
  ),
  pytest.param(
    lambda: sae.SAEConfig(architecture="topk", d_in=D, d_sae=F, k=F + 1),
    ValueError,
    "k: expected 1 <= k <= d_sae=8 for topk, got 9",
    id="k-past-dictionary",
  ),
  pytest.param(
    lambda: sae.SAEConfig(architecture="topk", d_in=D, d_sae=F, k=0),
    ValueError,
    "k: expected 1 <= k <= d_sae=8",
    id="k-0",
  ),
  pytest.param(
    lambda: sae.SAEConfig(architecture="relu", d_in=D, d_sae=F),
    ValueError,
    "SAEConfig.architecture: expected one of 'standard'",
    id="architecture",
  ),
  pytest.param(
    lambda: sae.SAEConfig(architecture="standard", d_in=0, d_sae=F),
    ValueError,
    "SAEConfig.d_in: expected int >= 1, got int 0",
    id="d-in-0",
  ),
  pytest.param(
    lambda: sae.SAEConfig(architecture="standard", d_in=D, d_sae=16.0),
    TypeError,
    "SAEConfig.d_sae: expected int",
    id="d-sae-float",
  ),
  pytest.param(
    lambda: sae.SAEConfig(architecture="standard", d_in=D, d_sae=F, coefficient=NAN),
    ValueError,
    "SAEConfig.coefficient: expected float",
    id="coefficient-nan",
  ),
  pytest.param(
    lambda: sae.SAEConfig(architecture="standard", d_in=D, d_sae=F, coefficient=-1.0),
    ValueError,
    "SAEConfig.coefficient",
    id="coefficient-negative",
  ),
  pytest.param(
    lambda: sae.SAEConfig(architecture="batchtopk", d_in=D, d_sae=F, k=2, threshold_rate=1.5),
    ValueError,
    r"SAEConfig.threshold_rate: expected float in \(0, 1\]",
    id="threshold-rate",
  ),
  pytest.param(
    lambda: sae.encode(_params(), _nan_x(), TOPK),
    ValueError,
    r"x_BD: expected finite values, got \[nan\] at index \[\(1, 2\)\]",
    id="encode-nan",
  ),
  pytest.param(
    lambda: sae.encode(_params(), _x().astype(np.int32), TOPK),
    TypeError,
    "x_BD: expected float activations, got dtype int32",
    id="encode-int",
  ),
  pytest.param(
    lambda: sae.encode(_params(), _x().tolist(), TOPK), TypeError, r"x_BD: expected an array \[B, 4\]", id="encode-list"
  ),
  pytest.param(
    lambda: sae.encode(_params(), _x()[:, :3], TOPK),
    ValueError,
    r"x_BD: expected shape \[B, 4\] \(d_in\), got \(4, 3\)",
    id="encode-width",
  ),
  pytest.param(
    lambda: sae.encode(_params(WIDER), _x(), TOPK),
    ValueError,
    r"params\['W_dec'\]: expected shape \(8, 4\) for this config, got \(16, 4\)",
    id="encode-params-of-a-wider-sae",
  ),
  pytest.param(
    lambda: sae.loss(_params(GATED), _x(), TOPK),
    ValueError,
    r"params: expected the leaves.*b_gate",
    id="loss-gated-params",
  ),
  pytest.param(
    lambda: sae.loss(_params(), _x(), TOPK, dead_F=np.zeros(F, int)),
    ValueError,
    r"dead_F: expected a bool mask of shape \(8,\), got int",
    id="loss-dead-int",
  ),
  pytest.param(
    lambda: sae.loss(_params(), _x(), TOPK, penalty_scale=NAN),
    ValueError,
    r"penalty_scale: expected finite values, got nan",
    id="loss-penalty-nan",
  ),
  pytest.param(
    lambda: sae.topk_mask(jnp.zeros((2, F)), F + 1), ValueError, r"k: expected an int in \[1, 8\]", id="topk-mask-k"
  ),
  pytest.param(
    lambda: sae.init(KEY, TOPK, np.full(D, NAN)), ValueError, "b_dec_D: expected finite values", id="init-b-dec-nan"
  ),
  pytest.param(
    lambda: sae.init(KEY, {"architecture": "topk"}),
    TypeError,
    "cfg: expected an SAEConfig, got dict",
    id="init-dict-config",
  ),
  pytest.param(
    lambda: sae.fold_scale(_params(), 0.0),
    ValueError,
    "scale: expected a finite number > 0, got 0.0",
    id="fold-scale-0",
  ),
  pytest.param(
    lambda: sae.normalization_scale(_nan_x()), ValueError, "x_ND: expected finite values", id="normalization-nan"
  ),
  pytest.param(
    lambda: sae_eval.reconstruction(_params(), TOPK, _nan_x()),
    ValueError,
    r"x_ND: expected finite values, got \[nan\]",
    id="reconstruction-nan",
  ),
  pytest.param(
    lambda: sae_eval.reconstruction(_params(), TOPK, _x(), dense_above=1.5),
    ValueError,
    r"dense_above: expected a fraction in \(0, 1\), got 1.5",
    id="reconstruction-dense",
  ),
  pytest.param(
    lambda: sae_eval.reconstruction(_params(), TOPK, _x(), chunk=0),
    ValueError,
    "chunk: expected an int >= 1, got 0",
    id="reconstruction-chunk",
  ),
  pytest.param(
    lambda: sae_eval.density_histogram(np.array([0.5, 1.5])),
    ValueError,
    r"frequency_F: expected fractions in \[0.0, 1.0\], got \[1.5\]",
    id="histogram-frequency",
  ),
  pytest.param(
    lambda: sae_eval.density_histogram(np.array([0.5]), bins=(0, -1)),
    ValueError,
    "bins: expected at least 2 increasing",
    id="histogram-bins",
  ),
  pytest.param(
    lambda: sae_eval.top_contexts(np.zeros((4, F)), np.zeros((1, 4), int), [0], str, n=0),
    ValueError,
    "n: expected an int >= 1, got 0",
    id="contexts-n-0",
  ),
  pytest.param(
    lambda: sae_eval.top_contexts(np.zeros((4, F)), np.zeros(4, int), [0], str),
    ValueError,
    r"tokens_BT, f_NF: expected \[B, T\]",
    id="contexts-tokens-1d",
  ),
  pytest.param(
    lambda: sae_eval.steer(np.full(D, NAN), 1.0), ValueError, "direction_D: expected finite values", id="steer-nan"
  ),
  pytest.param(
    lambda: sae_eval.steer(np.ones(D), INF),
    ValueError,
    r"scale: expected finite values, got inf",
    id="steer-scale-inf",
  ),
  # The model is never run: each check fails before it (no parameters needed).
  pytest.param(
    lambda: sae_eval.steered_greedy(
      None, MODEL, np.zeros((1, 4), np.int32), 5, "blocks.0.hook_resid_post", np.ones(D), 1.0
    ),
    ValueError,
    "max_new_tokens: prompt length 4 .* max_seq_len=8",
    id="greedy-past-context",
  ),
  pytest.param(
    lambda: sae_eval.splice(
      None,
      MODEL,
      "blocks.0.hook_resid_post",
      _params(sae.SAEConfig(architecture="topk", d_in=8, d_sae=F, k=2)),
      sae.SAEConfig(architecture="topk", d_in=8, d_sae=F, k=2),
      np.zeros((1, 4), np.int32),
    ),
    ValueError,
    "cfg: the SAE reads d_in=8 activations, the model's sites have dim=4",
    id="splice-width",
  ),
]

INTERACTIONS = [
  pytest.param(
    lambda: ia.moebius(jnp.zeros(6)),
    ValueError,
    r"f_M: expected a vector over 2\^n subsets .*got shape \(6,\)",
    id="moebius-6",
  ),
  pytest.param(
    lambda: ia.and_interactions(jnp.zeros((2, 4))),
    ValueError,
    r"v_and_M: expected a vector over 2\^n subsets",
    id="and-2d",
  ),
  pytest.param(
    lambda: ia.or_interactions(jnp.zeros(1)), ValueError, r"v_or_M: expected a vector over 2\^n subsets", id="or-1"
  ),
  pytest.param(
    lambda: ia.order_strength(jnp.zeros(8), jnp.zeros(4), 0.1),
    ValueError,
    r"i_or_M: expected the shape of i_and_M \(8,\), got \(4,\)",
    id="strength-mismatch",
  ),
  pytest.param(
    lambda: ia.order_strength(jnp.zeros(8), jnp.zeros(8), NAN),
    ValueError,
    "tau: expected a finite number >= 0, got nan",
    id="strength-tau-nan",
  ),
  pytest.param(
    lambda: ia.order_vector(jnp.zeros(4), jnp.zeros(4), 3),
    ValueError,
    "k: expected an order in 0 .. n=2, got 3",
    id="order-vector-k",
  ),
  pytest.param(
    lambda: ia.reconstruct(jnp.zeros(4), jnp.zeros(8), 0.0),
    ValueError,
    "i_or_M: expected the shape of i_and_M",
    id="reconstruct-mismatch",
  ),
  pytest.param(
    lambda: ia.normalized_order_strength(jnp.zeros((2, 4)), jnp.zeros((3, 4)), 0.1),
    ValueError,
    "i_and_BM, i_or_BM: expected one shape",
    id="normalized-mismatch",
  ),
  pytest.param(
    lambda: ia.decompose(jnp.zeros(3)), ValueError, r"v_M: expected a vector over 2\^n subsets", id="decompose-3"
  ),
  pytest.param(
    lambda: ia.decompose(jnp.full(4, NAN)), ValueError, r"v_M: expected finite values, got \[nan", id="decompose-nan"
  ),
  pytest.param(
    lambda: ia.decompose(jnp.zeros(4), {"steps": 5}),
    TypeError,
    "cfg: expected a DecompositionConfig, got dict",
    id="decompose-dict-config",
  ),
  pytest.param(
    lambda: ia.DecompositionConfig(momentum=1.0),
    ValueError,
    r"DecompositionConfig.momentum: expected float in \[0, 1\), got float 1.0",
    id="decomposition-momentum",
  ),
  pytest.param(
    lambda: ia.DecompositionConfig(steps=0),
    ValueError,
    "DecompositionConfig.steps: expected int >= 1",
    id="decomposition-steps",
  ),
  pytest.param(
    lambda: ia.DecompositionConfig(learning_rate=NAN),
    ValueError,
    "DecompositionConfig.learning_rate: expected float > 0, got float nan",
    id="decomposition-lr-nan",
  ),
  pytest.param(
    lambda: ia.DecompositionConfig(decay=0.0),
    ValueError,
    r"DecompositionConfig.decay: expected float in \(0, 1\]",
    id="decomposition-decay",
  ),
  pytest.param(
    lambda: ia.log_odds(jnp.zeros((2, 10)), 10),
    ValueError,
    r"label: expected class ids in \[0, 9\], got 10",
    id="log-odds-label-10",
  ),
  pytest.param(
    lambda: ia.log_odds(jnp.zeros((2, 10)), 1.5),
    TypeError,
    "label: expected an int class id, got float",
    id="log-odds-label-float",
  ),
  pytest.param(
    lambda: ia.log_odds(jnp.zeros(10), 1),
    ValueError,
    r"logits_BC: expected logits \[B, C\], got shape \(10,\)",
    id="log-odds-1d",
  ),
  pytest.param(
    lambda: _subsets(labels_B=np.array([0, 3])),
    ValueError,
    r"labels_B: expected class ids of the model's 3 classes in \[0, 2\], got \[3\] at index \[1\]",
    id="subsets-label-3",
  ),
  pytest.param(
    lambda: _subsets(labels_B=np.array([0.0, 1.0])),
    TypeError,
    "labels_B: expected int class ids, got dtype float",
    id="subsets-label-float",
  ),
  pytest.param(
    lambda: _subsets(variable_of_F=np.array([0.0, 1.0, 2.0])),
    TypeError,
    "variable_of_F: expected int variable ids",
    id="subsets-variables-float",
  ),
  pytest.param(
    lambda: _subsets(variable_of_F=np.array([0, 1, 1])),
    ValueError,
    r"variable_of_F: expected every id 0 .. 2 used",
    id="subsets-variable-unused",
  ),
  pytest.param(
    lambda: _subsets(baseline_F=np.zeros(4, np.float32)),
    ValueError,
    "baseline_F, variable_of_F: expected a sample's shape",
    id="subsets-baseline-size",
  ),
  pytest.param(lambda: _subsets(chunk=0), ValueError, "chunk: expected an int >= 1, got 0", id="subsets-chunk-0"),
  pytest.param(
    lambda: _subsets(x_BF=np.full((2, 3), NAN, np.float32)),
    ValueError,
    r"x_BF: expected finite values",
    id="subsets-x-nan",
  ),
  pytest.param(lambda: _subsets(n=21), ValueError, "n: expected 1 <= n <= 20", id="subsets-n-21"),
  pytest.param(
    lambda: ia.salience_threshold(jnp.zeros(3), jnp.zeros(3), NAN),
    ValueError,
    r"fraction: expected a float in \[0, 1\], got nan",
    id="salience-fraction-nan",
  ),
  pytest.param(
    lambda: ia.salience_threshold(jnp.zeros(3), jnp.zeros(3), 2.0),
    ValueError,
    r"fraction: expected a float in \[0, 1\], got 2.0",
    id="salience-fraction-2",
  ),
  pytest.param(
    lambda: ia.log_odds(jnp.zeros((2, 1)), 0),
    ValueError,
    r"logits_BC: expected at least 2 classes \[B, C >= 2\], got shape \(2, 1\)",
    id="log-odds-one-class",
  ),
  pytest.param(
    lambda: ia.moebius([1.0, 2.0]), TypeError, r"f_M: expected an array over 2\^n subsets", id="moebius-list"
  ),
  pytest.param(
    lambda: sae.decode(_params(), jnp.ones((2, 10))),
    ValueError,
    r"f_BF: expected features \[B, d_sae=\d+\], got shape \(2, 10\)",
    id="decode-width",
  ),
  pytest.param(
    lambda: sae_eval.steer(np.ones(D), "big"),
    TypeError,
    r"scale: expected a finite float, got str",
    id="steer-scale-str",
  ),
  pytest.param(
    lambda: dynamics.m_hat(3, NAN), ValueError, "sigma2: expected a finite float >= 0, got nan", id="sigma2-nan"
  ),
  pytest.param(lambda: dynamics.m_hat(3, "0.1"), TypeError, "sigma2: expected a float >= 0, got str", id="sigma2-str"),
  pytest.param(
    lambda: dynamics.closed_form_weights(np.zeros(7), 3, 0.1),
    ValueError,
    r"w_star: expected shape \(8,\)",
    id="closed-form-w-size",
  ),
  pytest.param(
    lambda: dynamics.order_distribution(np.zeros(12), 3),
    ValueError,
    r"w: expected shape \(8,\) or \[X, 8\] for n=3, got \(12,\)",
    id="order-distribution-size",
  ),
  pytest.param(
    lambda: dynamics.fit_sigma2(np.ones(4), np.zeros(8), 3, grid=np.array([1.0, -1.0])),
    ValueError,
    "grid: expected a 1-D grid of finite sigma",
    id="fit-grid-negative",
  ),
  pytest.param(
    lambda: dynamics.fit_sigma2(np.full(4, NAN), np.zeros(8), 3),
    ValueError,
    "measured: expected finite order distributions",
    id="fit-measured-nan",
  ),
  pytest.param(
    lambda: dynamics.relative_residual(np.ones(4), np.ones(3)),
    ValueError,
    r"predicted: expected the shape of measured \(4,\), got \(3,\)",
    id="residual-shapes",
  ),
]


@pytest.mark.parametrize("call, error, match", SAE + INTERACTIONS)
def test_bad_input(call, error, match):
  with pytest.raises(error, match=match):
    call()


def test_checked_catches_what_a_plain_jit_cannot():
  """Inside a user's jit the values are tracers; under checks.checked the same checks raise."""
  odds = checks.checked(ia.log_odds)
  assert np.isfinite(odds(jnp.zeros((2, 10)), jnp.int32(3))).all()
  with pytest.raises(checkify.JaxRuntimeError, match=r"label: expected class ids in \[0, 9\], got 10"):
    odds(jnp.zeros((2, 10)), jnp.int32(10))
  encode = checks.checked(sae.encode, static_argnames="cfg")
  with pytest.raises(checkify.JaxRuntimeError, match="x_BD: expected finite values, got nan at flat index"):
    encode(_params(), jnp.asarray(_nan_x()), cfg=TOPK)


def test_steer_scale_is_checked_under_checked():
  # the scale check goes through ops.checks, so it compiles into checks.checked (it was concrete-only)
  steered = checks.checked(lambda d, scale, x: sae_eval.steer(d, scale)(x))
  x = jnp.zeros((1, 2, D))
  np.testing.assert_allclose(steered(jnp.ones(D), 2.0, x), 2.0 * np.ones((1, 2, D)))
  with pytest.raises(checkify.JaxRuntimeError, match="scale: expected finite values, got nan"):
    steered(jnp.ones(D), jnp.float32(np.nan), x)


def test_penalty_scale_and_label_checks_on_scalars():
  with pytest.raises(ValueError, match=r"penalty_scale: expected values in \[0, inf\], got -1.0"):
    sae.loss(_params(), jnp.ones((2, _params()["W_dec"].shape[1])), TOPK, penalty_scale=-1.0)
  with pytest.raises(ValueError, match=r"label: expected class ids in \[0, 9\], got 10"):
    ia.log_odds(jnp.zeros((2, 10)), 10)
