"""Bad input never passes silently (issue 31): Tora's loss, sampler and velocity, its
trajectories and its blob data raise an error naming the argument, the expectation and the
value. `tora.loss`'s value checks also compile into `checks.checked`, the jit to use for it."""

from __future__ import annotations

import functools

import jax
import numpy as np
import pytest
from jax.experimental import checkify

from paperjax.models.data import blobs
from paperjax.models.diffusion import tora, trajectory
from paperjax.ops import checks

# 2 frames of 4x4 pixels, patch 2: the smallest video the checks see as real.
FRAMES, SIZE = 2, 4
TINY = dict(patch=2, width=8, heads=2, mlp_hidden=16, blocks=1, motion_channels=2, sigma=1.0)
CFG = tora.ToraConfig(**TINY)  # type: ignore[arg-type]
NONE = tora.ToraConfig(**{**TINY, "fuser": "none"})  # type: ignore[arg-type]
KEY = jax.random.key(0)
NAN = float("nan")


@functools.cache
def _params(cfg: tora.ToraConfig = CFG) -> dict:
  return tora.init(jax.random.key(0), cfg)


@functools.cache
def _data() -> blobs.Blobs:
  """Two videos in [-1, 1], their captions (ids < 9) and one-blob tracks inside the frame."""
  rng = np.random.default_rng(0)
  video = rng.uniform(-1, 1, (2, FRAMES, SIZE, SIZE, 3)).astype(np.float32)
  caption = rng.integers(0, len(blobs.VOCAB), (2, 2)).astype(np.int32)
  tracks = rng.uniform(0, SIZE - 1, (2, FRAMES, 1, 2)).astype(np.float32)
  return blobs.Blobs(video, caption, tracks)


def _loss(video=None, caption=None, tracks=None, *, cfg=CFG, params=None):
  d = _data()
  video = d.video if video is None else video
  caption = d.caption_BS if caption is None else caption
  tracks = d.tracks if tracks is None else tracks
  return tora.loss(_params() if params is None else params, video, caption, tracks, KEY, cfg)


def _sample(caption=None, tracks=None, **kwargs):
  d = _data()
  caption = d.caption_BS if caption is None else caption
  tracks = d.tracks if tracks is None else tracks
  shape = {"frames": FRAMES, "height": SIZE, "width": SIZE, "steps": 1, **kwargs}
  return tora.sample(_params(), KEY, caption, tracks, CFG, **shape)


def _velocity(t_B=(0.5, 0.5), caption=None):
  d = _data()
  return tora.velocity(
    _params(), d.video, np.asarray(t_B, np.float32), d.caption_BS if caption is None else caption, None, CFG
  )


def _set(array, index, value):
  out = np.array(array)
  out[index] = value
  return out


CASES = [
  # The user's cases, eagerly (under checks.checked: test_checked_loss_raises_for_the_same_cases).
  pytest.param(
    lambda: _loss(caption=_set(_data().caption_BS, (0, 1), 99)),
    ValueError,
    r"caption_BS: expected ids in \[0, 9\), got \[99\] at index \[\(0, 1\)\]",
    id="caption-99",
  ),
  pytest.param(
    lambda: _loss(tracks=_data().tracks + 100),
    ValueError,
    r"tracks: expected x positions \(columns\) inside the 4x4 frame in \[0, 3\], got \[10",
    id="tracks-100px",
  ),
  pytest.param(
    lambda: _loss(tracks=_set(_data().tracks, (1, 0, 0, 1), -5)),
    ValueError,
    r"tracks: expected y positions \(rows\) .*got \[-5.0\] at index \[\(1, 0, 0\)\]",
    id="tracks-y-negative",
  ),
  pytest.param(
    lambda: _loss(video=(_data().video + 1) * 127.5),
    ValueError,
    r"video: expected pixels in \[-1.0, 1.0\], got \[",
    id="pixels-0-255",
  ),
  pytest.param(
    lambda: _loss(video=_data().video[:1]),
    ValueError,
    "caption_BS: expected one caption per video, batch 1, got 2 rows",
    id="batch-video-1-caption-2",
  ),
  pytest.param(
    lambda: _loss(caption=_data().caption_BS[:1]),
    ValueError,
    "caption_BS: expected one caption per video, batch 2, got 1 rows",
    id="batch-caption-1",
  ),
  pytest.param(
    lambda: _loss(tracks=_data().tracks[:1]),
    ValueError,
    "tracks: expected one trajectory set per video, batch 2, got 1",
    id="batch-tracks-1",
  ),
  # More: dtypes, ranks, NaN, the fuser's tracks, params of another model.
  pytest.param(
    lambda: _loss(video=_set(_data().video, (0, 1, 2, 3, 0), NAN)),
    ValueError,
    r"video: expected finite values, got \[nan\] at index \[\(0, 1, 2, 3, 0\)\]",
    id="video-nan",
  ),
  pytest.param(
    lambda: _loss(video=((_data().video + 1) * 127.5).astype(np.uint8)),
    TypeError,
    "video: expected float pixels",
    id="video-uint8",
  ),
  pytest.param(
    lambda: _loss(video=_data().video[0]), ValueError, r"video: expected \[B, T, height, width, 3\]", id="video-rank-4"
  ),
  pytest.param(
    lambda: _loss(video=np.concatenate([_data().video] * 2, -1)[..., :4]),
    ValueError,
    "video: expected shape .* got \\(2, 2, 4, 4, 4\\)",
    id="video-4-channels",
  ),
  pytest.param(
    lambda: _loss(video=_data().video[:, :, :3]),
    ValueError,
    "video: expected frames >= 1 and height, width positive multiples of patch=2",
    id="video-height-3",
  ),
  pytest.param(lambda: _loss(video=list(_data().video)), TypeError, "video: expected an array", id="video-list"),
  pytest.param(
    lambda: _loss(caption=_data().caption_BS.astype(np.float32)),
    TypeError,
    "caption_BS: expected integer",
    id="caption-float",
  ),
  pytest.param(
    lambda: _loss(caption=_data().caption_BS[0]), ValueError, r"caption_BS: expected \[B, S\]", id="caption-1d"
  ),
  pytest.param(
    lambda: _loss(caption=_data().caption_BS[:, :0]),
    ValueError,
    "caption_BS: expected at least one caption token",
    id="caption-empty",
  ),
  pytest.param(
    lambda: _loss(caption=-_data().caption_BS - 1),
    ValueError,
    r"caption_BS: expected ids in \[0, 9\), got \[-",
    id="caption-negative",
  ),
  pytest.param(
    lambda: _loss(tracks=_data().tracks[:, :1]),
    ValueError,
    "tracks: expected one position per frame, T = 2, got 1 frames",
    id="tracks-frames",
  ),
  pytest.param(
    lambda: _loss(tracks=_set(_data().tracks, (0, 0, 0, 0), NAN)),
    ValueError,
    r"tracks: expected finite values, got \[nan\]",
    id="tracks-nan",
  ),
  pytest.param(
    lambda: _loss(tracks=_data().tracks[..., :1]),
    ValueError,
    r"tracks: expected shape \[B, T, N, 2\]",
    id="tracks-one-coordinate",
  ),
  pytest.param(
    lambda: tora.loss(_params(), _data().video, _data().caption_BS, None, KEY, CFG),
    ValueError,
    "tracks: this model is guided by trajectories",
    id="tracks-none",
  ),
  pytest.param(lambda: _loss(cfg=NONE), ValueError, "tracks: this model has no motion guidance", id="tracks-unguided"),
  pytest.param(
    lambda: tora.loss(_params(), _data().video, _data().caption_BS, None, KEY, NONE),
    ValueError,
    r"params: expected the leaves of the config's init.*unexpected.*\['fuser'\]",
    id="params-other-fuser",
  ),
  pytest.param(
    lambda: tora.loss(_params(), _data().video, _data().caption_BS, _data().tracks, KEY, TINY),
    TypeError,
    "cfg: expected a ToraConfig, got dict",
    id="cfg-dict",
  ),
  pytest.param(lambda: _sample(steps=0), ValueError, "steps: expected an int >= 1, got 0", id="sample-steps-0"),
  pytest.param(lambda: _sample(steps=2.5), ValueError, "steps: expected an int >= 1, got 2.5", id="sample-steps-float"),
  pytest.param(
    lambda: _sample(height=4.0), TypeError, "height: expected an int, got float 4.0", id="sample-height-float"
  ),
  pytest.param(
    lambda: _sample(caption=_set(_data().caption_BS, (1, 0), 9)),
    ValueError,
    r"caption_BS: expected ids in \[0, 9\), got \[9\]",
    id="sample-caption-9",
  ),
  pytest.param(
    lambda: _sample(tracks=_data().tracks - 100), ValueError, "tracks: expected x positions", id="sample-tracks-outside"
  ),
  pytest.param(
    lambda: _sample(tracks=_data().tracks[:1]),
    ValueError,
    "tracks: expected one trajectory set per video, batch 2, got 1",
    id="sample-tracks-batch",
  ),
  pytest.param(
    lambda: _velocity(t_B=(0.5, 1.5)),
    ValueError,
    r"t_B: expected times in \[0.0, 1.0\], got \[1.5\] at index \[1\]",
    id="velocity-t-1.5",
  ),
  pytest.param(
    lambda: _velocity(t_B=(0.5,)),
    ValueError,
    r"t_B: expected one time per video, shape \(2,\), got \(1,\)",
    id="velocity-t-batch",
  ),
  pytest.param(
    lambda: _velocity(caption=_data().caption_BS[:1]),
    ValueError,
    "caption_BS: expected one caption per video",
    id="velocity-caption-batch",
  ),
  pytest.param(
    lambda: tora.ToraConfig(patch=3), ValueError, "patch: expected a power of two, got 3", id="config-patch-3"
  ),
  pytest.param(
    lambda: tora.ToraConfig(width=0), ValueError, "ToraConfig.width: expected int >= 1, got int 0", id="config-width-0"
  ),
  pytest.param(
    lambda: tora.ToraConfig(heads=2.0), TypeError, "ToraConfig.heads: expected int", id="config-heads-float"
  ),
  pytest.param(
    lambda: tora.ToraConfig(fuser="film"),
    ValueError,
    "ToraConfig.fuser: expected one of 'none', 'concat', 'cross_attention', 'adanorm', got str 'film'",
    id="config-fuser",
  ),
  pytest.param(
    lambda: tora.ToraConfig(sigma=NAN),
    ValueError,
    "ToraConfig.sigma: expected float > 0, got float nan",
    id="config-sigma-nan",
  ),
  pytest.param(
    lambda: tora.ToraConfig(width=18, heads=2),
    ValueError,
    "width, heads: expected width divisible by 4",
    id="config-width-heads",
  ),
  pytest.param(
    lambda: trajectory.flow_maps(_data().tracks, height=SIZE, width=SIZE, sigma=NAN),
    ValueError,
    "sigma: expected > 0 pixels, got nan",
    id="flow-sigma-nan",
  ),
  pytest.param(
    lambda: blobs.BlobConfig(radius=0.5),
    ValueError,
    "BlobConfig.radius: expected float >= 1, got float 0.5",
    id="blobs-radius",
  ),
  pytest.param(
    lambda: blobs.BlobConfig(frames=0),
    ValueError,
    "BlobConfig.frames: expected int >= 1, got int 0",
    id="blobs-frames-0",
  ),
  pytest.param(
    lambda: blobs.BlobConfig(height=8, width=8, radius=3.0),
    ValueError,
    r"radius: expected 1 <= radius < min\(height, width\) / 2 - 2",
    id="blobs-radius-too-big",
  ),
  pytest.param(
    lambda: blobs.sample(0, 0, blobs.BlobConfig()), ValueError, "batch: expected an int >= 1, got 0", id="blobs-batch-0"
  ),
  pytest.param(
    lambda: blobs.sample(0, 2.0, blobs.BlobConfig()),
    ValueError,
    "batch: expected an int >= 1, got 2.0",
    id="blobs-batch-float",
  ),
  pytest.param(
    lambda: blobs.render(
      _data().tracks, np.array([[7], [0]]), np.zeros((2, 1), int), blobs.BlobConfig(height=8, width=8, radius=1.0)
    ),
    ValueError,
    r"colour_BN: expected ids in \[0, 6\], got \[7\]",
    id="render-colour-7",
  ),
  pytest.param(
    lambda: blobs.centroids(_data().video, threshold=1.5),
    ValueError,
    r"threshold: expected a brightness in \[0, 1\)",
    id="centroids-threshold",
  ),
]


@pytest.mark.parametrize("call, error, match", CASES)
def test_bad_input(call, error, match):
  with pytest.raises(error, match=match):
    call()


def test_checked_loss_raises_for_the_same_cases():
  """`jax.jit(tora.loss)` (README) cannot see values: an id of 99 is clamped to 8 there.
  `checks.checked` compiles the same checks in and raises naming the argument."""
  d = _data()
  loss = checks.checked(tora.loss, static_argnames="cfg")
  good, _ = loss(_params(), d.video, d.caption_BS, d.tracks, KEY, cfg=CFG)
  assert np.isfinite(good)
  with pytest.raises(checkify.JaxRuntimeError, match=r"caption_BS: expected ids in \[0, 9\), got 99"):
    loss(_params(), d.video, _set(d.caption_BS, (0, 1), 99), d.tracks, KEY, cfg=CFG)
  with pytest.raises(checkify.JaxRuntimeError, match=r"tracks: expected x positions .* in \[0, 3\], got 10"):
    loss(_params(), d.video, d.caption_BS, d.tracks + 100, KEY, cfg=CFG)
  with pytest.raises(checkify.JaxRuntimeError, match=r"video: expected pixels in \[-1.0, 1.0\]"):
    loss(_params(), (d.video + 1) * 127.5, d.caption_BS, d.tracks, KEY, cfg=CFG)
