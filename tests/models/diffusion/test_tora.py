"""Tora: attention locality, the fusers' zero start, the objective and sampler, shapes, errors."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from paperjax.models.data import blobs
from paperjax.models.diffusion import tora, trajectory
from paperjax.ops import rope

# Odd frame count, non-square frames: 5 frames of 4x6 pixels, a 2x3 patch grid.
FRAMES, HEIGHT, WIDTH = 5, 4, 6
TINY = dict(patch=2, width=16, heads=2, mlp_hidden=32, blocks=2, motion_channels=4, sigma=1.0)
velocity = jax.jit(tora.velocity, static_argnums=5)
loss = jax.jit(tora.loss, static_argnums=5)
motion_patches = jax.jit(tora.motion_patches, static_argnums=2, static_argnames=("height", "width"))
spatial_attention = jax.jit(tora.spatial_attention)
temporal_attention = jax.jit(tora.temporal_attention)


def _config(fuser: str) -> tora.ToraConfig:
  return tora.ToraConfig(fuser=fuser, **TINY)  # type: ignore[arg-type]


def _randomised(params, seed: int, scale=0.3):
  """Every leaf redrawn from scale * N(0, 1): a trained-looking model (numpy: no compiles)."""
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda x: jnp.asarray(scale * rng.standard_normal(x.shape), jnp.float32), params)


@pytest.fixture(scope="module")
def inputs():
  rng = np.random.default_rng(1)
  z = jnp.asarray(rng.standard_normal((2, FRAMES, HEIGHT, WIDTH, 3)), jnp.float32)
  caption_BS = jnp.asarray(rng.integers(0, len(blobs.VOCAB), (2, 2)), jnp.int32)
  tracks = jnp.asarray(rng.uniform(0, 1, (2, FRAMES, 1, 2)) * [WIDTH - 1, HEIGHT - 1], jnp.float32)
  return z, jnp.array([0.3, 0.8]), caption_BS, tracks


def test_param_axes_match_params_for_every_fuser(key):
  for fuser in tora.FUSERS:
    cfg = _config(fuser)
    params = jax.eval_shape(lambda k, cfg=cfg: tora.init(k, cfg), key)
    axes = tora.param_axes(cfg)
    assert jax.tree.structure(params) == jax.tree.structure(axes, is_leaf=lambda x: isinstance(x, tuple))
    for leaf, names in zip(jax.tree.leaves(params), jax.tree.leaves(axes, is_leaf=lambda x: isinstance(x, tuple))):
      assert leaf.ndim == len(names), (leaf.shape, names)


def test_spatial_attention_never_mixes_frames_and_temporal_never_mixes_positions(key):
  cfg = _config("none")
  w = jax.tree.map(lambda x: x[0], _randomised(tora.init(key, cfg)["blocks"], 0))
  x = jnp.asarray(np.random.default_rng(2).standard_normal((2, FRAMES, 6, cfg.width)), jnp.float32)
  inv_freq = jnp.asarray(rope.inv_frequencies(cfg.head_dim, cfg.rope_theta))
  frame, position = 2, 4
  moved_frames = np.abs(
    spatial_attention(x.at[:, frame].add(1.0), w["spatial"]) - spatial_attention(x, w["spatial"])
  ).max(axis=(0, 2, 3))
  assert moved_frames[frame] > 1e-3 and np.delete(moved_frames, frame).max() == 0, moved_frames
  temporal = lambda x: temporal_attention(x, w["temporal"], inv_freq)
  moved_positions = np.abs(temporal(x.at[:, :, position].add(1.0)) - temporal(x)).max(axis=(0, 1, 3))
  assert moved_positions[position] > 1e-3 and np.delete(moved_positions, position).max() == 0, moved_positions
  # ...while the temporal layer does mix frames (perturbing one frame moves the others).
  moved_by_frame = np.abs(temporal(x.at[:, frame].add(1.0)) - temporal(x)).max(axis=(0, 2, 3))
  assert np.delete(moved_by_frame, frame).min() > 1e-4


@pytest.mark.parametrize("fuser", ["concat", "cross_attention", "adanorm"])
def test_a_zero_initialised_fuser_leaves_the_dit_unchanged(fuser, key, inputs):
  z, t_B, caption_BS, tracks = inputs
  cfg = _config(fuser)
  fresh = tora.init(key, cfg)
  params = _randomised(fresh, 5)  # a trained-looking DiT ...
  params["blocks"]["fuser"] = fresh["blocks"]["fuser"]  # ... with a new (zero-output) fuser
  baseline = {k: v for k, v in params.items() if k != "motion"}
  baseline["blocks"] = {k: v for k, v in params["blocks"].items() if k != "fuser"}
  expected = velocity(baseline, z, t_B, caption_BS, None, _config("none"))
  motion = motion_patches(params, tracks, cfg, height=HEIGHT, width=WIDTH)
  assert np.abs(motion).max() > 1e-2  # the motion input is not zero, yet nothing moves
  for m_BTND in (motion, jnp.zeros_like(motion)):
    chex.assert_trees_all_close(velocity(params, z, t_B, caption_BS, m_BTND, cfg), expected, atol=1e-6)
  # The test can fail: trained fuser weights do move the output.
  params["blocks"]["fuser"] = _randomised(fresh["blocks"]["fuser"], 6)
  assert np.abs(velocity(params, z, t_B, caption_BS, motion, cfg) - expected).max() > 1e-3


@functools.partial(jax.jit, static_argnums=1)
def _draws(key, shape):
  """The (t, noise) `tora.loss` draws from `key`, drawn here the same way."""
  key_t, key_e = jax.random.split(key)
  return jax.random.uniform(key_t, shape[:1]), jax.random.normal(key_e, shape)


def test_loss_is_the_rectified_flow_objective(key, inputs):
  """A new model predicts v = 0 (adaLN-Zero), so its loss is mean((e - x)^2) for the noise e
  the key draws; a trained-looking one matches the formula evaluated by hand."""
  z, _, caption_BS, tracks = inputs
  video = jnp.tanh(z)
  cfg = _config("adanorm")
  params = tora.init(key, cfg)
  t_B, noise = _draws(jax.random.key(7), video.shape)
  value, _ = loss(params, video, caption_BS, tracks, jax.random.key(7), cfg)
  np.testing.assert_allclose(value, np.mean((np.asarray(noise) - np.asarray(video)) ** 2), rtol=1e-5)
  params = _randomised(params, 7)
  z = (1 - t_B[:, None, None, None, None]) * video + t_B[:, None, None, None, None] * noise
  v = velocity(params, z, t_B, caption_BS, motion_patches(params, tracks, cfg, height=HEIGHT, width=WIDTH), cfg)
  value, _ = loss(params, video, caption_BS, tracks, jax.random.key(7), cfg)
  np.testing.assert_allclose(value, np.mean((np.asarray(v) - (np.asarray(noise) - np.asarray(video))) ** 2), rtol=1e-5)


def test_sampler_is_euler_from_noise_and_deterministic_per_key(key, inputs):
  _, _, caption_BS, tracks = inputs
  cfg = _config("cross_attention")
  params = _randomised(tora.init(key, cfg), 8, scale=0.1)
  run = lambda k: tora.sample(params, k, caption_BS, tracks, cfg, frames=FRAMES, height=HEIGHT, width=WIDTH, steps=2)
  first = run(jax.random.key(11))
  chex.assert_shape(first, (2, FRAMES, HEIGHT, WIDTH, 3))
  np.testing.assert_array_equal(first, run(jax.random.key(11)))
  assert np.abs(first - run(jax.random.key(12))).max() > 1e-2
  # Two Euler steps by hand: z1 = noise, z_half = z1 - v(z1, 1) / 2, z0 = z_half - v(z_half, 1/2) / 2.
  motion = motion_patches(params, tracks, cfg, height=HEIGHT, width=WIDTH)
  z = jax.random.normal(jax.random.key(11), first.shape)
  for t in (1.0, 0.5):
    z = z - velocity(params, z, jnp.full((2,), t), caption_BS, motion, cfg) / 2
  np.testing.assert_allclose(first, z, atol=1e-5)


def test_shapes_hold_for_other_frame_counts_and_aspect_ratios(key):
  cfg = _config("adanorm")
  params = _randomised(tora.init(key, cfg), 8, scale=0.1)
  for frames, height, width in ((1, 2, 8), (7, 6, 2)):
    tracks = jnp.full((1, frames, 2, 2), 1.0)  # two points
    motion = motion_patches(params, tracks, cfg, height=height, width=width)
    z = jnp.zeros((1, frames, height, width, 3))
    v = velocity(params, z, jnp.array([0.5]), jnp.array([[1, 7, 3, 8]]), motion, cfg)
    chex.assert_shape(v, (1, frames, height, width, 3))
    assert np.isfinite(np.asarray(v)).all()


def test_patchify_and_conv3d_against_independent_references(np_rng):
  video = np_rng.normal(size=(2, 3, 4, 6, 3)).astype(np.float32)
  patches = np.asarray(tora.patchify(jnp.asarray(video), 2))
  for row in range(2):
    for col in range(3):
      np.testing.assert_array_equal(
        patches[:, :, row * 3 + col], video[:, :, 2 * row : 2 * row + 2, 2 * col : 2 * col + 2].reshape(2, 3, -1)
      )
  np.testing.assert_array_equal(tora.unpatchify(jnp.asarray(patches), 2, 4, 6), video)
  kernel = np_rng.normal(size=(3, 3, 3, 3, 5)).astype(np.float32)
  expected = jax.lax.conv_general_dilated(
    video, kernel, (1, 2, 2), ((1, 1), (1, 1), (1, 1)), dimension_numbers=("NDHWC", "DHWIO", "NDHWC")
  )
  np.testing.assert_allclose(tora.conv3d(jnp.asarray(video), jnp.asarray(kernel)), expected, atol=1e-5)


def test_bad_inputs_raise_naming_the_argument(key, inputs):
  z, t_B, caption_BS, tracks = inputs
  for bad, match in (
    (dict(fuser="film"), "fuser"),
    (dict(patch=3), "patch"),
    (dict(width=18), "width, heads"),
  ):
    with pytest.raises(ValueError, match=match):
      tora.ToraConfig(**{**TINY, **bad})
  cfg = _config("adanorm")
  params = tora.init(key, cfg)
  sample = lambda tracks, cfg=cfg, **kw: tora.sample(
    params, key, caption_BS, tracks, cfg, **{"frames": FRAMES, "height": HEIGHT, "width": WIDTH, "steps": 1, **kw}
  )
  with pytest.raises(ValueError, match="tracks: expected one position per frame, T = 5, got 4"):
    sample(tracks[:, :4])
  with pytest.raises(ValueError, match="tracks: expected finite"):
    sample(tracks.at[0, 1, 0, 0].set(jnp.nan))
  with pytest.raises(
    ValueError, match=r"tracks: expected x positions \(columns\) inside the 4x6 frame in \[0, 5\], got \[7.0\]"
  ):
    sample(tracks.at[1, 2, 0, 0].set(7.0))
  with pytest.raises(ValueError, match="tracks: expected shape"):
    sample(tracks[..., :1])
  with pytest.raises(ValueError, match="tracks: this model is guided"):
    sample(None)
  with pytest.raises(ValueError, match="tracks: this model has no motion guidance"):
    sample(tracks, cfg=_config("none"))
  with pytest.raises(ValueError, match="video: expected .* multiples of patch=2"):
    sample(tracks, height=5)
  with pytest.raises(ValueError, match=r"caption_BS: expected ids in \[0, 9\), got \[9\] at index \[\(0, 0\)\]"):
    tora.sample(
      params, key, caption_BS.at[0, 0].set(9), tracks, cfg, frames=FRAMES, height=HEIGHT, width=WIDTH, steps=1
    )
  with pytest.raises(TypeError, match="caption_BS: expected integer"):
    tora.loss(params, jnp.tanh(z), caption_BS.astype(jnp.float32), tracks, key, cfg)
  with pytest.raises(ValueError, match="m_BTND"):
    tora.velocity(params, z, t_B, caption_BS, None, cfg)


def test_flow_maps_of_a_known_trajectory_equal_a_hand_computed_example():
  """One point, (1, 1) then (2, 1), on a 3x4 frame with sigma 1: both frames move by (1, 0)
  (frame 0 carries frame 1's step), and the splat is q^(squared distance), q = e^(-1/2)."""
  q = np.exp(-0.5)
  g0 = q ** np.array([[2, 1, 2, 5], [1, 0, 1, 4], [2, 1, 2, 5]])
  g1 = q ** np.array([[5, 2, 1, 2], [4, 1, 0, 1], [5, 2, 1, 2]])
  expected = np.stack([np.stack([g, np.zeros_like(g), g], -1) for g in (g0, g1)])[None]
  tracks = np.array([[[[1.0, 1.0]], [[2.0, 1.0]]]])
  np.testing.assert_allclose(trajectory.flow_maps(tracks, height=3, width=4, sigma=1.0), expected, rtol=1e-6)
  # Points add: a second point's map is added to the first's.
  other = np.array([[[[3.0, 2.0]], [[2.5, 0.0]]]])
  both = trajectory.flow_maps(np.concatenate([tracks, other], axis=2), height=3, width=4, sigma=1.0)
  single = trajectory.flow_maps(other, height=3, width=4, sigma=1.0)
  np.testing.assert_allclose(both, expected + single, rtol=1e-6)
