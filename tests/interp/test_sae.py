"""SAE architectures: losses against numpy transcriptions, JumpReLU's pseudo-derivative,
TopK / BatchTopK counts, the decoder-norm constraint, the geometric median, scale folding."""

import dataclasses

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from paperjax.interp import sae

D, F, B = 8, 32, 16
CONFIGS = {
  "standard": sae.SAEConfig(architecture="standard", d_in=D, d_sae=F, coefficient=0.3),
  "topk": sae.SAEConfig(architecture="topk", d_in=D, d_sae=F, k=4, k_aux=6),
  "batchtopk": sae.SAEConfig(architecture="batchtopk", d_in=D, d_sae=F, k=4, k_aux=6),
  "gated": sae.SAEConfig(architecture="gated", d_in=D, d_sae=F, coefficient=0.3),
  "jumprelu": sae.SAEConfig(architecture="jumprelu", d_in=D, d_sae=F, coefficient=0.3, bandwidth=0.5),
}


def _params(arch: str) -> dict:
  """Random, non-degenerate parameters (nonzero biases, decoder rows of unequal norms)."""
  rng = np.random.default_rng(1)
  params = sae.init(jax.random.key(0), CONFIGS[arch], jnp.asarray(rng.normal(size=D) * 0.1, jnp.float32))
  out = {}
  for name, value in params.items():
    noise = rng.normal(size=value.shape).astype(np.float32)
    out[name] = value + 0.1 * noise if name not in ("threshold",) else value
  if arch == "jumprelu":
    out["log_threshold"] = jnp.log(jnp.asarray(rng.uniform(0.05, 0.4, F), jnp.float32))
  return {k: jnp.asarray(v, jnp.float32) for k, v in out.items()}


def _x(seed: int = 2) -> jax.Array:
  return jnp.asarray(np.random.default_rng(seed).normal(size=(B, D)), jnp.float32)


def _numpy_loss(arch, p, x, cfg, dead):
  """Each loss written out per row and per latent in float64."""
  p = {k: np.asarray(v, np.float64) for k, v in p.items()}
  x = np.asarray(x, np.float64)
  norms = np.sqrt((p["W_dec"] ** 2).sum(1))
  total = 0.0
  for row in x:
    xc = row - p["b_dec"]
    if arch == "gated":
      gate = xc @ p["W_enc"] + p["b_gate"]
      mag = xc @ (p["W_enc"] * np.exp(p["r_mag"])) + p["b_mag"]
      f = np.where(gate > 0, np.maximum(mag, 0), 0)
    else:
      pre = xc @ p["W_enc"] + p["b_enc"]
      if arch == "standard":
        f = np.maximum(pre, 0)
      elif arch == "topk":
        f = np.zeros(F)
        for j in np.argsort(-pre, kind="stable")[: cfg.k]:
          f[j] = max(pre[j], 0)
      elif arch == "jumprelu":
        f = np.where(pre > np.exp(p["log_threshold"]), pre, 0)
    if arch == "batchtopk":
      continue
    recon = f @ p["W_dec"] + p["b_dec"]
    term = ((recon - row) ** 2).sum()
    if arch == "standard":
      term += cfg.coefficient * (f * norms).sum()
    if arch == "gated":
      term += cfg.coefficient * (np.maximum(gate, 0) * norms).sum()
      term += ((np.maximum(gate, 0) @ p["W_dec"] + p["b_dec"] - row) ** 2).sum()
    if arch == "jumprelu":
      term += cfg.coefficient * (pre > np.exp(p["log_threshold"])).sum()
    if arch == "topk":
      live_pre = np.where(dead, pre, -np.inf)
      keep = np.argsort(-live_pre, kind="stable")[: min(cfg.aux_k, dead.sum())]
      z = np.zeros(F)
      z[keep] = np.maximum(pre[keep], 0)
      term += cfg.aux_coefficient * (((z @ p["W_dec"]) - (row - recon)) ** 2).sum()
    total += term
  if arch == "batchtopk":  # the batch's k*B largest ReLU(pre)
    pre = (x - p["b_dec"]) @ p["W_enc"] + p["b_enc"]
    acts = np.maximum(pre, 0)
    cut = np.sort(acts.ravel())[::-1][cfg.k * len(x) - 1]
    f = np.where(acts >= cut, acts, 0)
    recon = f @ p["W_dec"] + p["b_dec"]
    return ((recon - x) ** 2).sum(1).mean()  # AuxK checked through topk; no dead latents here
  return total / len(x)


@pytest.mark.parametrize("arch", sae.ARCHITECTURES)
def test_loss_equals_numpy_transcription(arch):
  cfg, p, x = CONFIGS[arch], _params(arch), _x()
  dead = np.zeros(F, bool)
  dead[[1, 5, 9, 20, 21, 30, 31]] = True  # more than k_aux = 6 dead: AuxK takes the top 6
  dead_F = jnp.asarray(dead) if arch == "topk" else None
  total, aux = sae.loss(p, x, cfg, dead_F=dead_F)
  np.testing.assert_allclose(total, _numpy_loss(arch, p, x, cfg, dead), rtol=2e-5)
  chex.assert_shape(aux["f_BF"], (B, F))
  assert float(aux["l0"]) == pytest.approx(float(np.mean(np.sum(np.asarray(aux["f_BF"]) != 0, 1))))


def test_auxk_is_zero_without_dead_latents_and_only_reads_dead_ones():
  cfg, p, x = CONFIGS["topk"], _params("topk"), _x()
  no_dead, _ = sae.loss(p, x, cfg, dead_F=jnp.zeros(F, bool))
  assert float(no_dead) == pytest.approx(float(sae.loss(p, x, cfg)[0]))
  dead = jnp.zeros(F, bool).at[3].set(True)  # one dead latent: its gradient comes only from AuxK
  g_aux = jax.grad(lambda q: sae.loss(q, x, cfg, dead_F=dead)[0])(p)
  g = jax.grad(lambda q: sae.loss(q, x, cfg)[0])(p)
  diff_F = np.abs(np.asarray(g_aux["W_dec"] - g["W_dec"])).sum(1)
  assert diff_F[3] > 0 and np.all(np.delete(diff_F, 3) == 0)


def test_jumprelu_pseudo_derivative_is_the_rectangle_kernel():
  eps = 0.2
  pi = jnp.asarray(np.random.default_rng(0).uniform(-0.5, 1.0, (64, F)), jnp.float32)
  theta = jnp.asarray(np.random.default_rng(1).uniform(0.1, 0.5, F), jnp.float32)
  g = jnp.asarray(np.random.default_rng(2).normal(size=(64, F)), jnp.float32)
  d_pi, d_theta = jax.grad(lambda a, t: jnp.sum(g * sae.jumprelu(a, t, eps)), argnums=(0, 1))(pi, theta)
  pi_, th_, g_ = (np.asarray(a, np.float64) for a in (pi, theta, g))
  inside = np.abs(pi_ - th_) < eps / 2  # K((pi - theta) / eps) = 1[|u| < 1/2]
  np.testing.assert_allclose(d_theta, (-(th_ / eps) * inside * g_).sum(0), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(d_pi, g_ * (pi_ > th_), rtol=1e-6)
  d_pi, d_theta = jax.grad(lambda a, t: jnp.sum(g * sae.step(a, t, eps)), argnums=(0, 1))(pi, theta)
  np.testing.assert_allclose(d_theta, (-(1 / eps) * inside * g_).sum(0), rtol=1e-5, atol=1e-6)
  assert not np.any(d_pi)  # the step passes no gradient to the pre-activations


def test_topk_keeps_k_per_row_and_batchtopk_k_times_b_per_batch():
  pi = jnp.asarray(np.random.default_rng(0).normal(size=(B, F)) + 3.0, jnp.float32)  # all positive
  mask = np.asarray(sae.topk_mask(pi, 5))
  np.testing.assert_array_equal(mask.sum(1), 5)
  np.testing.assert_array_equal(np.sort(np.where(mask, pi, -np.inf), 1)[:, -5:], np.sort(np.asarray(pi), 1)[:, -5:])
  batch_mask = np.asarray(sae.batch_topk_mask(pi, 5))
  assert batch_mask.sum() == 5 * B
  assert np.asarray(pi)[batch_mask].min() >= np.asarray(pi)[~batch_mask].max()
  assert batch_mask.sum(1).std() > 0  # rows keep different counts
  for arch, count in (("topk", lambda f: (f != 0).sum(1).max() <= 4), ("batchtopk", lambda f: (f != 0).sum() <= 4 * B)):
    _, aux = sae.loss(_params(arch), _x(), CONFIGS[arch])
    assert count(np.asarray(aux["f_BF"]))


def test_batchtopk_inference_threshold():
  f = jnp.asarray([[0.0, 0.5, 2.0], [0.3, 0.0, 0.0]])
  assert float(sae.batchtopk_threshold(jnp.float32(1.0), f, 0.1)) == pytest.approx(0.9 * 1.0 + 0.1 * 0.3)
  assert float(sae.batchtopk_threshold(jnp.float32(1.0), jnp.zeros((2, 3)), 0.1)) == 1.0
  assert float(sae.batchtopk_threshold(jnp.float32(0.0), f, 0.1)) == pytest.approx(0.3)  # unset: starts at the min
  cfg = CONFIGS["batchtopk"]
  p = _params("batchtopk") | {"threshold": jnp.float32(0.25)}
  pre = np.asarray(sae.pre_activations(p, _x()))
  np.testing.assert_allclose(sae.encode(p, _x(), cfg), np.where(pre > 0.25, pre, 0), rtol=1e-6)


def test_gated_auxiliary_loss_trains_the_gate_through_a_frozen_decoder():
  cfg, p, x = CONFIGS["gated"], _params("gated"), _x()
  only_aux = dataclasses.replace(cfg, coefficient=0.0)
  g_all = jax.grad(lambda q: sae.loss(q, x, only_aux)[0])(p)
  # the reconstruction term alone, through the same forward pass
  g_mse = jax.grad(lambda q: sae.loss(q, x, only_aux)[1]["mse"])(p)
  # the auxiliary term adds nothing to W_dec's gradient (b_dec still learns through the
  # gate's input x - b_dec, which is not frozen)
  np.testing.assert_allclose(g_all["W_dec"], g_mse["W_dec"], rtol=1e-5, atol=1e-6)
  for name in ("W_enc", "b_gate"):  # but trains the gate (through ReLU(pi_gate))
    assert np.abs(np.asarray(g_all[name] - g_mse[name])).max() > 1e-3


def test_decoder_projection_and_renormalisation():
  cfg, p = CONFIGS["topk"], sae.init(jax.random.key(0), CONFIGS["topk"])
  np.testing.assert_allclose(np.linalg.norm(p["W_dec"], axis=1), 1.0, rtol=1e-6)
  grads = jax.grad(lambda q: sae.loss(q, _x(), cfg)[0])(p)
  projected = sae.project_decoder_grads(grads, p)
  np.testing.assert_allclose(np.sum(projected["W_dec"] * p["W_dec"], 1), 0.0, atol=1e-6)
  moved = sae.normalize_decoder(p | {"W_dec": p["W_dec"] - 0.5 * projected["W_dec"]})
  np.testing.assert_allclose(np.linalg.norm(moved["W_dec"], axis=1), 1.0, rtol=1e-6)
  std = sae.init(jax.random.key(0), CONFIGS["standard"])
  np.testing.assert_allclose(np.linalg.norm(std["W_dec"], axis=1), 0.1, rtol=1e-5)
  np.testing.assert_array_equal(std["W_enc"], std["W_dec"].T)


def test_geometric_median():
  # 1-D: the geometric median is the median; an outlier barely moves it (unlike the mean).
  pts = jnp.asarray([[0.0], [1.0], [2.0], [3.0], [100.0]])
  assert float(sae.geometric_median(pts, iters=500)[0]) == pytest.approx(2.0, abs=1e-3)
  x = np.random.default_rng(0).normal(size=(200, 3))
  y = np.asarray(sae.geometric_median(jnp.asarray(x)))
  objective = lambda c: np.linalg.norm(x - c, axis=1).sum()
  # optimality: the gradient sum (x - y) / ||x - y|| vanishes, and no nearby point is better
  unit = (x - y) / np.linalg.norm(x - y, axis=1, keepdims=True)
  assert np.linalg.norm(unit.sum(0)) < 1e-2 * len(x)
  for d in np.random.default_rng(1).normal(size=(20, 3)) * 1e-2:
    assert objective(y) <= objective(y + d) + 1e-9


@pytest.mark.parametrize("arch", sae.ARCHITECTURES)
def test_fold_scale_gives_the_same_sae_on_unscaled_inputs(arch):
  cfg, p = CONFIGS[arch], _params(arch)
  x = _x() * 7.0
  s = sae.normalization_scale(np.asarray(x))
  assert np.mean(np.sum((np.asarray(x) * s) ** 2, 1)) == pytest.approx(D)
  folded = sae.fold_scale(p, s)
  np.testing.assert_allclose(sae.reconstruct(folded, x, cfg), sae.reconstruct(p, x * s, cfg) / s, rtol=1e-4, atol=1e-5)


def test_errors():
  with pytest.raises(ValueError, match="k: expected 1 <= k <= d_sae=32"):
    sae.SAEConfig(architecture="topk", d_in=D, d_sae=F, k=33)
  with pytest.raises(ValueError, match="architecture: expected one of"):
    sae.SAEConfig(architecture="relu", d_in=D, d_sae=F)  # type: ignore[arg-type]
  with pytest.raises(ValueError, match="k: only topk and batchtopk"):
    sae.SAEConfig(architecture="standard", d_in=D, d_sae=F, k=3)
  with pytest.raises(ValueError, match="coefficient: topk has no sparsity penalty"):
    sae.SAEConfig(architecture="topk", d_in=D, d_sae=F, k=3, coefficient=1.0)
  with pytest.raises(ValueError, match=r"SAEConfig.bandwidth: expected float in \(0, inf\), got float 0.0"):
    sae.SAEConfig(architecture="jumprelu", d_in=D, d_sae=F, bandwidth=0.0)
  with pytest.raises(ValueError, match=r"bandwidth: only \['jumprelu'\] read it, got 0.1 for topk"):
    sae.SAEConfig(architecture="topk", d_in=D, d_sae=F, k=2, bandwidth=0.1)
  with pytest.raises(ValueError, match="k_aux: only"):
    sae.SAEConfig(architecture="standard", d_in=D, d_sae=F, k_aux=3)
  with pytest.raises(ValueError, match="dead_F: expected a bool mask of shape"):
    sae.loss(_params("topk"), _x(), CONFIGS["topk"], dead_F=jnp.zeros(3, bool))
  with pytest.raises(ValueError, match=r"x_BD: expected shape \[B, 8\] \(d_in\), got \(4, 9\)"):
    sae.encode(_params("standard"), jnp.zeros((4, 9)), CONFIGS["standard"])
  with pytest.raises(ValueError, match="b_dec_D: expected shape"):
    sae.init(jax.random.key(0), CONFIGS["standard"], jnp.zeros(3))
