"""Trajectories and their flow maps: Tora's Trajectory Extractor input.

Shapes: B batch, T frames, N points per trajectory. Pixel grids have no letters:
`tracks` is [B, T, N, 2], the (x, y) position of each point in each frame, in pixels, with
pixel (row i, column j) centred at (x = j, y = i); `flow` is [B, T, height, width, 3].

Tora turns a trajectory into dense flow maps: each point's displacement between frames,
spread over the frame by a Gaussian around the point,

  d[t, n] = p[t, n] - p[t - 1, n]  (t >= 1),   d[0, n] = d[1, n]  (frame 0 carries the first step)
  g[t, n](x, y) = exp(-((x - p[t, n].x)^2 + (y - p[t, n].y)^2) / (2 sigma^2))
  flow[t](x, y) = (sum_n g[t, n] d[t, n].x,  sum_n g[t, n] d[t, n].y,  sum_n g[t, n])

Tora then visualises the flow as an RGB image; here the displacements stay raw and the
splat's weight is the third channel, so a point that stands still still marks where it is.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from paperjax.ops import checks


def check_tracks(tracks: jax.Array, *, frames: int, height: int, width: int) -> jax.Array:
  """`tracks` as float32 [B, frames, N, 2]; raises on a wrong shape or dtype, and on a
  non-finite value or a point outside the frame (x in [0, width - 1], y in [0, height - 1]).
  Value checks run on concrete inputs, or inside `ops.checks.checked`."""
  if isinstance(tracks, (list, tuple)):
    tracks = np.asarray(tracks)
  checks.check_array("tracks", tracks, 4, shape="[B, T, N, 2]")
  if tracks.shape[-1] != 2 or tracks.shape[2] < 1:
    raise ValueError(f"tracks: expected shape [B, T, N, 2] (x, y per point), got {tuple(tracks.shape)}")
  if not (jnp.issubdtype(tracks.dtype, jnp.floating) or jnp.issubdtype(tracks.dtype, jnp.integer)):
    raise TypeError(f"tracks: expected real pixel positions, got dtype {tracks.dtype}")
  if tracks.shape[1] != frames:
    raise ValueError(f"tracks: expected one position per frame, T = {frames}, got {tracks.shape[1]} frames")
  _, (source,) = checks.on_host(tracks)  # slices of a concrete array stay on the host
  checks.check_finite("tracks", source)
  frame = f"inside the {height}x{width} frame"
  checks.check_in("tracks", source[..., 0], 0, width - 1, what=f"x positions (columns) {frame}")
  checks.check_in("tracks", source[..., 1], 0, height - 1, what=f"y positions (rows) {frame}")
  return jnp.asarray(tracks, jnp.float32)


def displacements(tracks: jax.Array) -> jax.Array:
  """d [B, T, N, 2]: p[t] - p[t - 1], with frame 0 given frame 1's step (zero for one frame)."""
  steps = tracks[:, 1:] - tracks[:, :-1]
  first = steps[:, :1] if tracks.shape[1] > 1 else jnp.zeros_like(tracks[:, :1])
  return jnp.concatenate([first, steps], axis=1)


def flow_maps(tracks: jax.Array, *, height: int, width: int, sigma: float) -> jax.Array:
  """Dense flow maps [B, T, height, width, 3] of `tracks` (module equation)."""
  if not sigma > 0:
    raise ValueError(f"sigma: expected > 0 pixels, got {sigma}")
  tracks = check_tracks(tracks, frames=jnp.shape(tracks)[1], height=height, width=width)
  x = jnp.arange(width, dtype=jnp.float32)
  y = jnp.arange(height, dtype=jnp.float32)
  # g[b, t, n, y, x], separable: exp(-dx^2 / 2s^2) exp(-dy^2 / 2s^2)
  gx = jnp.exp(-((x - tracks[..., 0:1]) ** 2) / (2 * sigma**2))  # [B, T, N, width]
  gy = jnp.exp(-((y - tracks[..., 1:2]) ** 2) / (2 * sigma**2))  # [B, T, N, height]
  g = gy[..., :, None] * gx[..., None, :]
  weighted = jnp.einsum("btnyx,btnc->btyxc", g, displacements(tracks))
  return jnp.concatenate([weighted, g.sum(axis=2)[..., None]], axis=-1)
