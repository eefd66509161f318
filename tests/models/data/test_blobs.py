"""Blob videos: seeded, inside the frame, coloured by their caption, and centroids that find them."""

import chex
import numpy as np
import pytest

from paperjax.models.data import blobs


def test_videos_are_seeded_and_blobs_stay_inside_the_frame_for_long_videos():
  cfg = blobs.BlobConfig(frames=64, height=24, width=40, blobs=2, radius=3.0)
  first, again, other = blobs.sample(5, 6, cfg), blobs.sample(5, 6, cfg), blobs.sample(6, 6, cfg)
  np.testing.assert_array_equal(first.video, again.video)
  assert np.abs(first.video - other.video).max() > 0.5
  chex.assert_shape([first.video, first.caption_BS, first.tracks], [(6, 64, 24, 40, 3), (6, 4), (6, 64, 2, 2)])
  x, y = first.tracks[..., 0], first.tracks[..., 1]
  assert x.min() >= cfg.radius + 1 and x.max() <= cfg.width - 2 - cfg.radius
  assert y.min() >= cfg.radius + 1 and y.max() <= cfg.height - 2 - cfg.radius
  steps = np.linalg.norm(np.diff(first.tracks, axis=1), axis=-1)
  assert steps.max() < 0.5 * (cfg.width - 3 - 2 * cfg.radius) * blobs.OMEGA[1] + 1e-4  # |p'| <= a omega: smooth


def test_a_blob_has_its_caption_colour_and_the_centroid_finds_it():
  cfg = blobs.BlobConfig(frames=8, height=32, width=32, blobs=1, radius=4.0)
  data = blobs.sample(0, 16, cfg)
  centre = np.rint(data.tracks[:, :, 0]).astype(int)  # [B, T, 2]
  b, t = np.meshgrid(np.arange(16), np.arange(8), indexing="ij")
  at_centre = data.video[b, t, centre[..., 1], centre[..., 0]]  # [B, T, 3]
  colours = np.asarray(list(blobs.COLOURS.values()))[data.caption_BS[:, 0]]
  np.testing.assert_allclose(at_centre, np.broadcast_to(colours[:, None], at_centre.shape))
  assert (data.caption_BS[:, 1] >= len(blobs.COLOURS)).all()  # the shape token follows the colour
  # A loop over pixels, written apart from `centroids`: the mean position of the bright ones.
  video = data.video[3, 5]
  w = np.maximum(np.clip((video.max(-1) + 1) / 2, 0, 1) - 0.5, 0)
  rows, cols = np.nonzero(w)
  expected = [np.sum(w[rows, cols] * cols) / w.sum(), np.sum(w[rows, cols] * rows) / w.sum()]
  found, has = blobs.centroids(data.video)
  np.testing.assert_allclose(found[3, 5], expected, rtol=1e-6)
  assert has.all()
  assert blobs.trajectory_error(data.video, data.tracks).max() < 0.1  # symmetric blobs: centroid = track


def test_an_empty_frame_has_no_centroid_and_bad_inputs_raise():
  video = -np.ones((1, 2, 8, 8, 3), np.float32)
  video[0, 1, 2, 6] = 1.0
  centre, found = blobs.centroids(video)
  np.testing.assert_array_equal(found, [[False, True]])
  np.testing.assert_allclose(centre[0], [[3.5, 3.5], [6.0, 2.0]])
  with pytest.raises(ValueError, match="radius"):
    blobs.BlobConfig(height=8, width=8, radius=3.0)
  with pytest.raises(ValueError, match="batch"):
    blobs.sample(0, 0, blobs.BlobConfig())
  with pytest.raises(ValueError, match="tracks: expected one point per frame"):
    blobs.trajectory_error(video, np.zeros((1, 2, 2, 2)))
