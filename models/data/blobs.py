"""Synthetic videos of coloured blobs moving along smooth trajectories, with captions.

Shapes: B batch, T frames, N blobs (a trajectory's points), S caption tokens (2 per blob).
`video` is float32 [B, T, height, width, 3] in [-1, 1] (background -1); `tracks` is
[B, T, N, 2], each blob's centre (x, y) in pixels as `models.diffusion.trajectory` reads it.

Blob n follows a bounded, smooth path, so any number of frames stays inside the frame:

  p[t, n] = c[n] + a[n] * sin(omega[n] t + phi[n])   (per axis, omega in [0.15, 0.35] rad/frame)

and is drawn with an antialiased edge (coverage = clip(radius + 1/2 - distance, 0, 1), the
distance Euclidean for a circle and Chebyshev for a square). Its caption is two tokens,
colour then shape; overlapping blobs add and clip. Each call is seeded and generated on the
fly (numpy on the host).
"""

from __future__ import annotations

import dataclasses
from typing import Annotated

import numpy as np

from paperjax.ops import checks

COLOURS: dict[str, tuple[float, float, float]] = {
  "red": (1.0, -1.0, -1.0),
  "green": (-1.0, 1.0, -1.0),
  "blue": (-1.0, -1.0, 1.0),
  "yellow": (1.0, 1.0, -1.0),
  "cyan": (-1.0, 1.0, 1.0),
  "magenta": (1.0, -1.0, 1.0),
  "white": (1.0, 1.0, 1.0),
}
SHAPES: tuple[str, ...] = ("circle", "square")
VOCAB: tuple[str, ...] = (*COLOURS, *SHAPES)  # caption token ids index this
OMEGA = (0.15, 0.35)  # rad / frame: a period of 18 to 42 frames


@checks.config
class BlobConfig:
  """The videos' size and blobs; every field is checked at construction (`ops.checks.config`)."""

  frames: checks.PositiveInt = 16
  height: checks.PositiveInt = 32
  width: checks.PositiveInt = 32
  blobs: checks.PositiveInt = 1
  radius: Annotated[float, checks.Range(low=1)] = 4.0  # and < min(height, width) / 2 - 2

  def __post_init__(self):
    if not self.radius < min(self.height, self.width) / 2 - 2:
      raise ValueError(
        f"radius: expected 1 <= radius < min(height, width) / 2 - 2 = {min(self.height, self.width) / 2 - 2}, "
        f"got {self.radius}"
      )


@dataclasses.dataclass(frozen=True)
class Blobs:
  video: np.ndarray  # float32 [B, T, height, width, 3]
  caption_BS: np.ndarray  # int32 [B, 2 * blobs]: colour id, shape id per blob
  tracks: np.ndarray  # float32 [B, T, N, 2]


def sample(seed: int, batch: int, cfg: BlobConfig) -> Blobs:
  """`batch` videos of cfg.blobs blobs, seeded (the same seed gives the same videos)."""
  if not checks.is_int(batch) or batch < 1:
    raise ValueError(f"batch: expected an int >= 1, got {batch!r}")
  if not isinstance(cfg, BlobConfig):
    raise TypeError(f"cfg: expected a BlobConfig, got {type(cfg).__name__}")
  rng = np.random.default_rng(seed)
  shape = (batch, cfg.blobs)
  colour = rng.integers(0, len(COLOURS), shape)
  form = rng.integers(0, len(SHAPES), shape)
  tracks = np.stack(
    [_path(rng, shape, cfg.frames, cfg.width, cfg.radius), _path(rng, shape, cfg.frames, cfg.height, cfg.radius)], -1
  )
  return Blobs(
    render(tracks, colour, form, cfg),
    np.stack([colour, len(COLOURS) + form], -1).reshape(batch, -1).astype(np.int32),
    tracks,
  )


def _path(rng: np.random.Generator, shape: tuple[int, int], frames: int, size: int, radius: float) -> np.ndarray:
  """One axis of p[t] = c + a sin(omega t + phi), [B, T, N], within [radius + 1, size - 2 - radius]."""
  low, high = radius + 1, size - 2 - radius
  amplitude = rng.uniform(0.25, 0.5, shape) * (high - low)
  centre = rng.uniform(low + amplitude, high - amplitude)
  omega, phase = rng.uniform(*OMEGA, shape), rng.uniform(0, 2 * np.pi, shape)
  t = np.arange(frames)[None, :, None]
  return (centre[:, None] + amplitude[:, None] * np.sin(omega[:, None] * t + phase[:, None])).astype(np.float32)


def render(tracks: np.ndarray, colour_BN: np.ndarray, shape_BN: np.ndarray, cfg: BlobConfig) -> np.ndarray:
  """The video [B, T, height, width, 3] of blobs at `tracks` (module equation)."""
  tracks, colour_BN, shape_BN = np.asarray(tracks), np.asarray(colour_BN), np.asarray(shape_BN)
  if tracks.ndim != 4 or tracks.shape[-1] != 2 or not np.isfinite(tracks).all():
    raise ValueError(f"tracks: expected finite positions [B, T, N, 2], got shape {tracks.shape}")
  for name, ids, count in (("colour_BN", colour_BN, len(COLOURS)), ("shape_BN", shape_BN, len(SHAPES))):
    if not np.issubdtype(ids.dtype, np.integer):
      raise TypeError(f"{name}: expected int ids, got dtype {ids.dtype}")
    if ids.shape != (tracks.shape[0], tracks.shape[2]):
      raise ValueError(f"{name}: expected ids [B, N] = {(tracks.shape[0], tracks.shape[2])}, got shape {ids.shape}")
    checks.check_in(name, ids, 0, count - 1, what="ids")
  dx = np.arange(cfg.width)[None, None, None, None, :] - tracks[..., 0, None, None]  # [B, T, N, 1, width]
  dy = np.arange(cfg.height)[None, None, None, :, None] - tracks[..., 1, None, None]  # [B, T, N, height, 1]
  square = shape_BN[:, None, :, None, None] == SHAPES.index("square")
  distance = np.where(square, np.maximum(np.abs(dx), np.abs(dy)), np.sqrt(dx**2 + dy**2))
  coverage = np.clip(cfg.radius + 0.5 - distance, 0.0, 1.0)  # [B, T, N, height, width]
  rgb = np.asarray(list(COLOURS.values()), np.float32)[colour_BN] + 1  # [B, N, 3], 0 or 2
  video = -1 + np.einsum("btnyx,bnc->btyxc", coverage, rgb)
  return np.clip(video, -1.0, 1.0).astype(np.float32)


def centroids(video: np.ndarray, *, threshold: float = 0.5) -> tuple[np.ndarray, np.ndarray]:
  """Each frame's blob centre (x, y) [B, T, 2] and whether it has one [B, T].

  Brightness w = clip((max over channels + 1) / 2, 0, 1); the centre is the mean position
  weighted by max(w - threshold, 0), so faint noise does not pull it. A frame with no pixel
  above the threshold has no centre (reported at the frame's middle, `found` False).
  """
  video = np.asarray(video)
  if video.ndim != 5 or video.shape[-1] != 3:
    raise ValueError(f"video: expected shape [B, T, height, width, 3], got {video.shape}")
  if not 0 <= threshold < 1:
    raise ValueError(f"threshold: expected a brightness in [0, 1), got {threshold}")
  height, width = video.shape[2:4]
  w = np.maximum(np.clip((video.max(-1) + 1) / 2, 0, 1) - threshold, 0)  # [B, T, height, width]
  mass = w.sum((-2, -1))
  found = mass > 1e-6
  safe = np.where(found, mass, 1.0)
  x = np.where(found, (w * np.arange(width)).sum((-2, -1)) / safe, (width - 1) / 2)
  y = np.where(found, (w * np.arange(height)[:, None]).sum((-2, -1)) / safe, (height - 1) / 2)
  return np.stack([x, y], -1), found


def trajectory_error(video: np.ndarray, tracks: np.ndarray) -> np.ndarray:
  """Per-frame distance [B, T] in pixels between the video's blob centre and the requested
  one-point trajectory (`tracks` [B, T, 1, 2])."""
  video, tracks = np.asarray(video), np.asarray(tracks)
  if video.ndim != 5:
    raise ValueError(f"video: expected shape [B, T, height, width, 3], got {video.shape}")
  if tracks.ndim != 4 or tracks.shape[2] != 1 or tracks.shape[:2] != video.shape[:2]:
    raise ValueError(f"tracks: expected one point per frame, shape {(*video.shape[:2], 1, 2)}, got {tracks.shape}")
  centre, _ = centroids(video)
  return np.linalg.norm(centre - tracks[:, :, 0], axis=-1)
