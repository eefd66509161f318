"""Tora (arXiv 2407.21705): a trajectory-conditioned Spatial-Temporal DiT, in pixel space.

Shapes: B batch, T frames, N patches per frame (points, for `tracks`), D model width, E MLP
hidden width, H heads, K head dim, S caption tokens, V caption vocabulary, L blocks,
A = K / 2 RoPE angles. Pixel grids have no letters: `video` is [B, T, height, width, 3],
`tracks` [B, T, N, 2] (`models.diffusion.trajectory`), a patch vector holds patch^2 * 3 pixels.

The denoiser, v = velocity(params, z, t, caption, motion): the video is cut into patch x
patch patches per frame, embedded (plus a 2-D sin-cos position of the patch), and run
through L ST-DiT blocks, each (with c = MLP(sincos(1000 t)), adaLN-Zero modulation
(shift_i, scale_i, gate_i) = W_l silu(c), and n(x) = RMSNorm(x) without a learned scale)

  h += gate_1 * SpatialAttn(n(h) (1 + scale_1) + shift_1)    over the N patches of each frame
  h += CrossAttn(RMSNorm(h), caption)                        every patch reads the caption
  h += gate_2 * SwiGLU(n(h) (1 + scale_2) + shift_2)         pointwise
  h = Fuser(h, m)                                            motion guidance (below)
  h += gate_3 * TemporalAttn(n(h) (1 + scale_3) + shift_3)   over the T frames of each patch
                                                             position, RoPE on the frame index

then a modulated final norm and a zero-initialised linear back to patch pixels. Attention is
bidirectional; all of it is `ops.attention` on reshaped batches, so nothing depends on a
fixed grid: any frame count and any height and width divisible by the patch size run.

Trajectory Extractor: flow maps of the tracks (`trajectory.flow_maps`, [B, T, height,
width, 3]) pass through log2(patch) 3-D convolutions (3x3x3, stride 1 in time and 2 in
space, SiLU), then a linear map to D: motion patches m [B, T, N, D] on the video's patch
grid, computed once per video (the sampler reuses them at every step).

Motion-guidance Fuser, one per block (`fuser`), each residual with zero-initialised output
weights, so a new fuser leaves the DiT unchanged:
  "concat":          h += [h, m] W + b                             (channel concatenation)
  "cross_attention": h += CrossAttn(RMSNorm(h), m)                  (a frame's patches read its motion patches)
  "adanorm":         h += (m W_g + b_g) * h + (m W_b + b_b)         (Tora's adaptive norm: h_i = g h + b + h)
  "none":            no extractor, no fuser (the baseline without motion guidance)

Objective: rectified flow (as OpenSora v1.2, Tora's base). With data x, noise e ~ N(0, I)
and t ~ U(0, 1): z_t = (1 - t) x + t e, the target velocity e - x, the loss
mean((v(z_t, t) - (e - x))^2). The sampler integrates dz/dt = v from t = 1 (noise) to 0 with
`steps` Euler steps in a `lax.fori_loop`.
"""

from __future__ import annotations

import functools
import itertools
import math
from typing import Annotated, Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from paperjax.models import stack
from paperjax.models.data import blobs
from paperjax.models.diffusion import trajectory
from paperjax.ops import attention, checks, mlp, norms, rope
from paperjax.ops.dense import dense

Fuser = Literal["none", "concat", "cross_attention", "adanorm"]
FUSERS: tuple[str, ...] = ("none", "concat", "cross_attention", "adanorm")
ATTENTIONS = ("spatial", "cross", "temporal")  # each block's attention sublayers


@checks.config
class ToraConfig:
  """Model shape; hashable, so it is a static jit argument. Every field is checked for type
  and range at construction (`ops.checks.config`)."""

  patch: checks.PositiveInt = 4  # a power of two
  width: checks.PositiveInt = 64  # D
  heads: checks.PositiveInt = 4
  mlp_hidden: checks.PositiveInt = 128  # E
  blocks: checks.PositiveInt = 2  # L
  vocab_size: checks.PositiveInt = len(blobs.VOCAB)  # V
  fuser: Fuser = "adanorm"
  motion_channels: checks.PositiveInt = 16  # the extractor's convolution channels
  sigma: checks.PositiveFloat = 1.5  # the flow maps' Gaussian, pixels
  rope_theta: Annotated[float, checks.Range(low=1, low_open=True)] = 10_000.0

  def __post_init__(self):
    if self.patch & (self.patch - 1):
      raise ValueError(f"patch: expected a power of two, got {self.patch}")
    if self.width % self.heads or (self.width // self.heads) % 2 or self.width % 4:
      raise ValueError(
        f"width, heads: expected width divisible by 4 and by heads (even head dim), got {self.width}, {self.heads}"
      )

  @property
  def head_dim(self) -> int:
    return self.width // self.heads

  @property
  def patch_dim(self) -> int:
    return self.patch * self.patch * 3


class _Init(NamedTuple):
  """A leaf of the init spec: `std` * N(0, 1) when std > 0, else the constant `fill`."""

  shape: tuple[int, ...]
  std: float = 0.0
  fill: float = 0.0


def _attention_spec(cfg: ToraConfig, *, zero_out: bool = False) -> dict:
  """{wq, wk, wv: [L, D, H, K], wo: [L, H, K, D]}."""
  d, h, k, n = cfg.width, cfg.heads, cfg.head_dim, cfg.blocks
  return {
    "wq": _Init((n, d, h, k), d**-0.5),
    "wk": _Init((n, d, h, k), d**-0.5),
    "wv": _Init((n, d, h, k), d**-0.5),
    "wo": _Init((n, h, k, d), 0.0 if zero_out else (h * k) ** -0.5),
  }


def _spec(cfg: ToraConfig) -> dict:
  """The init spec: adaLN-Zero (every block's modulation and the output layer start at zero,
  so each block is the identity and the velocity 0) and zero fuser outputs."""
  d, e, n, c = cfg.width, cfg.mlp_hidden, cfg.blocks, cfg.motion_channels
  blocks = {
    "ada": _Init((n, d, 9 * d)),
    "ada_bias": _Init((n, 9 * d)),
    **{name: _attention_spec(cfg) for name in ATTENTIONS},
    "cross_norm": _Init((n, d), fill=1.0),
    "w1": _Init((n, d, e), d**-0.5),
    "w3": _Init((n, d, e), d**-0.5),
    "w2": _Init((n, e, d), e**-0.5),
  }
  spec = {
    "patch_in": _Init((cfg.patch_dim, d), cfg.patch_dim**-0.5),
    "patch_bias": _Init((d,)),
    "caption": _Init((cfg.vocab_size, d), 1.0),
    "time": {"w1": _Init((d, d), d**-0.5), "b1": _Init((d,)), "w2": _Init((d, d), d**-0.5), "b2": _Init((d,))},
    "blocks": blocks,
    "final_ada": _Init((d, 2 * d)),
    "final_ada_bias": _Init((2 * d,)),
    "out": _Init((d, cfg.patch_dim)),
    "out_bias": _Init((cfg.patch_dim,)),
  }
  if cfg.fuser != "none":
    blocks["fuser"] = {
      "concat": {"w": _Init((n, 2 * d, d)), "b": _Init((n, d))},
      "cross_attention": {"norm": _Init((n, d), fill=1.0), **_attention_spec(cfg, zero_out=True)},
      "adanorm": {
        "w_scale": _Init((n, d, d)),
        "b_scale": _Init((n, d)),
        "w_shift": _Init((n, d, d)),
        "b_shift": _Init((n, d)),
      },
    }[cfg.fuser]
    channels = (3,) + (c,) * _levels(cfg)
    spec["motion"] = {
      "convs": [
        {"w": _Init((3, 3, 3, c_in, c_out), (27 * c_in) ** -0.5), "b": _Init((c_out,))}
        for c_in, c_out in itertools.pairwise(channels)
      ],
      "out": _Init((channels[-1], d), channels[-1] ** -0.5),
      "out_bias": _Init((d,)),
    }
  return spec


def init(key: jax.Array, cfg: ToraConfig) -> dict:
  """Parameters (float32) as `_spec` says: the random leaves are consecutive slices of one
  normal draw (one random program to compile, not one per leaf)."""
  _check_cfg(cfg)
  return _init(key, cfg)


def check_params(params: Any, cfg: ToraConfig) -> None:
  """params has the leaves of `init(key, cfg)` at their shapes (a tree of another config's, or
  of another fuser's, raises naming the leaf)."""
  _check_cfg(cfg)
  expected = jax.tree.map(
    lambda leaf: jax.ShapeDtypeStruct(leaf.shape, jnp.float32), _spec(cfg), is_leaf=lambda x: isinstance(x, _Init)
  )
  if not isinstance(params, dict):
    raise TypeError(f"params: expected the dict of tora.init(key, cfg), got {type(params).__name__}")
  checks.check_tree("params", params, expected)


def _check_cfg(cfg: Any) -> None:
  if not isinstance(cfg, ToraConfig):
    raise TypeError(f"cfg: expected a ToraConfig, got {type(cfg).__name__}")


@functools.partial(jax.jit, static_argnums=1)
def _init(key: jax.Array, cfg: ToraConfig) -> dict:
  leaves, tree = jax.tree.flatten(_spec(cfg), is_leaf=lambda x: isinstance(x, _Init))
  sizes = [math.prod(leaf.shape) if leaf.std > 0 else 0 for leaf in leaves]
  draws = jnp.split(jax.random.normal(key, (sum(sizes),)), np.cumsum(sizes)[:-1])
  return jax.tree.unflatten(
    tree,
    [
      draw.reshape(leaf.shape) * leaf.std if leaf.std > 0 else jnp.full(leaf.shape, leaf.fill, jnp.float32)
      for leaf, draw in zip(leaves, draws, strict=True)
    ],
  )


def param_axes(cfg: ToraConfig) -> dict:
  """Logical axis names of every leaf of `init(key, cfg)`, in the same tree structure."""
  attn = {
    "wq": ("layers", "embed", "heads", "head_dim"),
    "wk": ("layers", "embed", "heads", "head_dim"),
    "wv": ("layers", "embed", "heads", "head_dim"),
    "wo": ("layers", "heads", "head_dim", "embed"),
  }
  blocks: dict = {
    "ada": ("layers", "embed", "modulation"),
    "ada_bias": ("layers", "modulation"),
    **{name: dict(attn) for name in ATTENTIONS},
    "cross_norm": ("layers", "embed"),
    "w1": ("layers", "embed", "ffn"),
    "w3": ("layers", "embed", "ffn"),
    "w2": ("layers", "ffn", "embed"),
  }
  axes: dict = {
    "patch_in": ("patch_pixels", "embed"),
    "patch_bias": ("embed",),
    "caption": ("vocab", "embed"),
    "time": {"w1": ("embed", "embed_out"), "b1": ("embed_out",), "w2": ("embed_out", "embed"), "b2": ("embed",)},
    "blocks": blocks,
    "final_ada": ("embed", "modulation"),
    "final_ada_bias": ("modulation",),
    "out": ("embed", "patch_pixels"),
    "out_bias": ("patch_pixels",),
  }
  if cfg.fuser != "none":
    blocks["fuser"] = {
      "concat": {"w": ("layers", "embed_in", "embed"), "b": ("layers", "embed")},
      "cross_attention": {"norm": ("layers", "embed"), **attn},
      "adanorm": {
        "w_scale": ("layers", "embed_in", "embed"),
        "b_scale": ("layers", "embed"),
        "w_shift": ("layers", "embed_in", "embed"),
        "b_shift": ("layers", "embed"),
      },
    }[cfg.fuser]
    conv = {"w": ("conv_time", "conv_height", "conv_width", "channels_in", "channels"), "b": ("channels",)}
    axes["motion"] = {
      "convs": [dict(conv) for _ in range(_levels(cfg))],
      "out": ("channels", "embed"),
      "out_bias": ("embed",),
    }
  return axes


def _levels(cfg: ToraConfig) -> int:
  return int(math.log2(cfg.patch))


def check_video_shape(cfg: ToraConfig, frames: int, height: int, width: int) -> None:
  for name, value in (("frames", frames), ("height", height), ("width", width)):
    if not isinstance(value, (int, np.integer)) or isinstance(value, (bool, np.bool_)):
      raise TypeError(f"{name}: expected an int, got {type(value).__name__} {value!r}")
  if frames < 1 or height < 1 or width < 1 or height % cfg.patch or width % cfg.patch:
    raise ValueError(
      f"video: expected frames >= 1 and height, width positive multiples of patch={cfg.patch}, "
      f"got {frames} frames of {height}x{width}"
    )


def check_caption(caption_BS: jax.Array, cfg: ToraConfig, *, batch: int | None = None) -> jax.Array:
  """Caption ids [B, S] (S >= 1, B = `batch` when given), each in [0, vocab_size): an
  embedding lookup would clamp an out-of-range id silently. Value checks run on concrete
  inputs, or inside `ops.checks.checked`."""
  if isinstance(caption_BS, (list, tuple)):
    caption_BS = np.asarray(caption_BS)
  checks.check_array("caption_BS", caption_BS, 2, integer=True, shape="[B, S]")
  if caption_BS.shape[1] < 1:
    raise ValueError(f"caption_BS: expected at least one caption token per row, got shape {tuple(caption_BS.shape)}")
  if batch is not None and caption_BS.shape[0] != batch:
    raise ValueError(f"caption_BS: expected one caption per video, batch {batch}, got {caption_BS.shape[0]} rows")
  checks.check_tokens(caption_BS, cfg.vocab_size, name="caption_BS")
  return jnp.asarray(caption_BS)


def check_video(video: jax.Array, cfg: ToraConfig, *, name: str = "video") -> None:
  """A float video [B, T, height, width, 3] of finite pixels in [-1, 1] (`blobs`' range), height
  and width multiples of the patch. Value checks run on concrete inputs, or inside
  `ops.checks.checked`."""
  checks.check_array(name, video, 5, shape="[B, T, height, width, 3]")
  if video.shape[-1] != 3 or video.shape[0] < 1:
    raise ValueError(f"{name}: expected shape [B, T, height, width, 3] (RGB), got {tuple(video.shape)}")
  if not jnp.issubdtype(video.dtype, jnp.floating):
    raise TypeError(f"{name}: expected float pixels in [-1, 1] (x / 127.5 - 1 for 8-bit), got dtype {video.dtype}")
  check_video_shape(cfg, *video.shape[1:4])
  checks.check_finite(name, video)
  checks.check_in(name, video, -1.0, 1.0, what="pixels")


def _check_tracks(
  tracks: jax.Array | None, cfg: ToraConfig, batch: int, frames: int, height: int, width: int
) -> jax.Array | None:
  """tracks for a model of cfg's fuser (None iff "none"), checked as `trajectory.check_tracks`
  says, one set per video."""
  if tracks is None:
    if cfg.fuser != "none":
      raise ValueError(f"tracks: this model is guided by trajectories (fuser={cfg.fuser!r}); got None")
    return None
  if cfg.fuser == "none":
    raise ValueError("tracks: this model has no motion guidance (fuser='none'); pass tracks=None")
  tracks = trajectory.check_tracks(tracks, frames=frames, height=height, width=width)
  if tracks.shape[0] != batch:
    raise ValueError(f"tracks: expected one trajectory set per video, batch {batch}, got {tracks.shape[0]}")
  return tracks


def patchify(video: jax.Array, patch: int) -> jax.Array:
  """[B, T, height, width, 3] -> [B, T, N, patch^2 * 3], patches row-major."""
  b, t, h, w, c = video.shape
  grid = video.reshape(b, t, h // patch, patch, w // patch, patch, c).transpose(0, 1, 2, 4, 3, 5, 6)
  return grid.reshape(b, t, (h // patch) * (w // patch), patch * patch * c)


def unpatchify(patches: jax.Array, patch: int, height: int, width: int) -> jax.Array:
  """The inverse of `patchify`."""
  b, t = patches.shape[:2]
  grid = patches.reshape(b, t, height // patch, width // patch, patch, patch, -1).transpose(0, 1, 2, 4, 3, 5, 6)
  return grid.reshape(b, t, height, width, -1)


def _sincos(positions: np.ndarray, dim: int) -> np.ndarray:
  """[P, dim]: (sin(p w_i), cos(p w_i)) with w_i = 10000^(-2i/dim), i < dim / 2."""
  freq = 10_000.0 ** (-np.arange(dim // 2) / (dim // 2))
  angle = positions[:, None] * freq[None]
  return np.concatenate([np.sin(angle), np.cos(angle)], axis=-1)


def grid_positions(rows: int, cols: int, width: int) -> np.ndarray:
  """The 2-D sin-cos embedding [N, D] of a rows x cols patch grid (DiT's): half the channels
  encode the row, half the column."""
  row, col = np.divmod(np.arange(rows * cols), cols)
  return np.concatenate([_sincos(row, width // 2), _sincos(col, width // 2)], axis=-1).astype(np.float32)


def _mha(x_BND: jax.Array, kv_BSD: jax.Array, w: dict, *, inv_freq_A: jax.Array | None = None) -> jax.Array:
  """Bidirectional multi-head attention of x over kv, [B, N, D] -> [B, N, D]; RoPE on both
  sides' positions (0 .. N - 1, 0 .. S - 1) when `inv_freq_A` is given."""
  q, k, v = dense(x_BND, w["wq"]), dense(kv_BSD, w["wk"]), dense(kv_BSD, w["wv"])
  if inv_freq_A is not None:
    q = rope.apply_rope(q, jnp.broadcast_to(jnp.arange(q.shape[1]), q.shape[:2]), inv_freq_A)
    k = rope.apply_rope(k, jnp.broadcast_to(jnp.arange(k.shape[1]), k.shape[:2]), inv_freq_A)
  return dense(attention.attention(q, k, v), w["wo"], n_in=2)


def spatial_attention(x_BTND: jax.Array, w: dict) -> jax.Array:
  """Self-attention over the N patches of each frame separately (frames never mix)."""
  b, t, n, d = x_BTND.shape
  flat_BND = x_BTND.reshape(b * t, n, d)
  return _mha(flat_BND, flat_BND, w).reshape(b, t, n, d)


def temporal_attention(x_BTND: jax.Array, w: dict, inv_freq_A: jax.Array) -> jax.Array:
  """Self-attention over the T frames of each patch position separately (positions never
  mix), RoPE on the frame index."""
  b, t, n, d = x_BTND.shape
  flat_BTD = x_BTND.transpose(0, 2, 1, 3).reshape(b * n, t, d)
  return _mha(flat_BTD, flat_BTD, w, inv_freq_A=inv_freq_A).reshape(b, n, t, d).transpose(0, 2, 1, 3)


def conv3d(x: jax.Array, kernel: jax.Array) -> jax.Array:
  """A 3x3x3 convolution, stride 1 in time and 2 in height and width, zero padding 1:
  [B, T, height, width, C_in] -> [B, T, height / 2, width / 2, C_out] with `kernel`
  [3, 3, 3, C_in, C_out] (DHWIO),

    out[t, i, j] = sum_{a, b, c < 3} x_pad[t + a, 2 i + b, 2 j + c] kernel[a, b, c],

  written as 27 strided slices and one matmul: XLA's CPU convolution is 4x slower here."""
  _, frames, height, width, _ = x.shape
  padded = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (1, 1), (0, 0)))
  taps = [
    padded[:, a : a + frames, b : b + height : 2, c : c + width : 2]
    for a in range(3)
    for b in range(3)
    for c in range(3)
  ]
  return jnp.einsum("kbthwc,kco->bthwo", jnp.stack(taps), kernel.reshape(27, *kernel.shape[3:]))


def motion_patches(params: dict, tracks: jax.Array, cfg: ToraConfig, *, height: int, width: int) -> jax.Array:
  """The Trajectory Extractor: tracks [B, T, points, 2] -> motion patches m [B, T, N, D] on
  the (height / patch) x (width / patch) patch grid."""
  if cfg.fuser == "none":
    raise ValueError("tracks: this model has no motion guidance (fuser='none'); pass tracks=None")
  x = trajectory.flow_maps(tracks, height=height, width=width, sigma=cfg.sigma)
  for conv in params["motion"]["convs"]:
    x = jax.nn.silu(conv3d(x, conv["w"]) + conv["b"])
  b, t, rows, cols, c = x.shape
  return dense(x.reshape(b, t, rows * cols, c), params["motion"]["out"]) + params["motion"]["out_bias"]


def fuse(h_BTND: jax.Array, m_BTND: jax.Array, w: dict, fuser: str) -> jax.Array:
  """One block's Motion-guidance Fuser (module docstring); h unchanged for "none"."""
  if fuser == "concat":
    return h_BTND + dense(jnp.concatenate([h_BTND, m_BTND], axis=-1), w["w"]) + w["b"]
  if fuser == "adanorm":
    return h_BTND + (dense(m_BTND, w["w_scale"]) + w["b_scale"]) * h_BTND + dense(m_BTND, w["w_shift"]) + w["b_shift"]
  if fuser == "cross_attention":
    b, t, n, d = h_BTND.shape
    normed_BND = norms.rms_norm(h_BTND, w["norm"]).reshape(b * t, n, d)
    return h_BTND + _mha(normed_BND, m_BTND.reshape(b * t, n, d), w).reshape(b, t, n, d)
  return h_BTND


def _modulate(x_BTND: jax.Array, shift: jax.Array, scale: jax.Array) -> jax.Array:
  """n(x) (1 + scale) + shift, with shift and scale [B, 1, 1, D] (one per video)."""
  normed = norms.rms_norm(x_BTND, jnp.ones(x_BTND.shape[-1:], x_BTND.dtype))
  return normed * (1 + scale) + shift


def _time_embedding(params: dict, t_B: jax.Array, width: int) -> jax.Array:
  """c [B, D] = W2 silu(W1 sincos(1000 t) + b1) + b2."""
  freq = 10_000.0 ** (-jnp.arange(width // 2) / (width // 2))
  angle = 1000.0 * t_B[:, None] * freq[None]
  emb = jnp.concatenate([jnp.sin(angle), jnp.cos(angle)], axis=-1)
  w = params["time"]
  return jax.nn.silu(emb @ w["w1"] + w["b1"]) @ w["w2"] + w["b2"]


def velocity(
  params: dict, z: jax.Array, t_B: jax.Array, caption_BS: jax.Array, m_BTND: jax.Array | None, cfg: ToraConfig
) -> jax.Array:
  """The denoiser's velocity v [B, T, height, width, 3] at noisy video z and time t_B in
  [0, 1] (module equations); m_BTND are the motion patches (None iff fuser is "none").

  Value checks (caption ids in range, t in [0, 1], z finite) run on concrete inputs, or
  inside `ops.checks.checked`."""
  _check_cfg(cfg)
  checks.check_array("z", z, 5, shape="[B, T, height, width, 3]")
  if not jnp.issubdtype(z.dtype, jnp.floating):
    raise TypeError(f"z: expected a float video [B, T, height, width, 3], got {z.dtype}")
  if z.shape[-1] != 3:
    raise ValueError(f"z: expected shape [B, T, height, width, 3] (RGB), got {tuple(z.shape)}")
  batch, frames, height, width, _ = z.shape
  check_video_shape(cfg, frames, height, width)
  checks.check_finite("z", z)
  t_B = jnp.asarray(t_B) if isinstance(t_B, (list, tuple, float, int)) else t_B
  checks.check_array("t_B", t_B, 1, shape=f"[{batch}]")
  if not jnp.issubdtype(t_B.dtype, jnp.floating):
    raise TypeError(f"t_B: expected float times in [0, 1], got {t_B.dtype}")
  if t_B.shape != (batch,):
    raise ValueError(f"t_B: expected one time per video, shape ({batch},), got {tuple(t_B.shape)}")
  checks.check_in("t_B", t_B, 0.0, 1.0, what="times")
  caption_BS = check_caption(caption_BS, cfg, batch=batch)
  if (m_BTND is None) != (cfg.fuser == "none"):
    raise ValueError(f"m_BTND: expected motion patches exactly when the model has a fuser, fuser={cfg.fuser!r}")
  rows, cols = height // cfg.patch, width // cfg.patch
  if m_BTND is not None and tuple(m_BTND.shape) != (batch, frames, rows * cols, cfg.width):
    raise ValueError(
      f"m_BTND: expected motion patches {(batch, frames, rows * cols, cfg.width)} (motion_patches of the same "
      f"video's tracks), got {tuple(m_BTND.shape)}"
    )
  check_params(params, cfg)
  return _velocity(params, z, t_B, caption_BS, m_BTND, cfg)


def _velocity(
  params: dict, z: jax.Array, t_B: jax.Array, caption_BS: jax.Array, m_BTND: jax.Array | None, cfg: ToraConfig
) -> jax.Array:
  """`velocity` without its checks (its callers have made them)."""
  _, _, height, width, _ = z.shape
  rows, cols = height // cfg.patch, width // cfg.patch
  h_BTND = dense(patchify(z, cfg.patch), params["patch_in"]) + params["patch_bias"]
  h_BTND = h_BTND + grid_positions(rows, cols, cfg.width)
  c_BD = jax.nn.silu(_time_embedding(params, t_B, cfg.width))
  caption_BSD = params["caption"][caption_BS] + _sincos(np.arange(caption_BS.shape[1]), cfg.width).astype(np.float32)
  inv_freq_A = jnp.asarray(rope.inv_frequencies(cfg.head_dim, cfg.rope_theta))

  def block(h_BTND, w):
    modulation = (c_BD @ w["ada"] + w["ada_bias"])[:, None, None]  # [B, 1, 1, 9D]
    shift1, scale1, gate1, shift2, scale2, gate2, shift3, scale3, gate3 = jnp.split(modulation, 9, -1)
    h_BTND = h_BTND + gate1 * spatial_attention(_modulate(h_BTND, shift1, scale1), w["spatial"])
    b, t, n, d = h_BTND.shape
    normed_BND = norms.rms_norm(h_BTND, w["cross_norm"]).reshape(b, t * n, d)
    h_BTND = h_BTND + _mha(normed_BND, caption_BSD, w["cross"]).reshape(b, t, n, d)
    h_BTND = h_BTND + gate2 * mlp.swiglu(_modulate(h_BTND, shift2, scale2), w["w1"], w["w3"], w["w2"])
    if m_BTND is not None:
      h_BTND = fuse(h_BTND, m_BTND, w["fuser"], cfg.fuser)
    h_BTND = h_BTND + gate3 * temporal_attention(_modulate(h_BTND, shift3, scale3), w["temporal"], inv_freq_A)
    return h_BTND, None, {}

  h_BTND, _, _ = stack.scan_layers(block, h_BTND, params["blocks"], name="st_dit_block")
  shift, scale = jnp.split((c_BD @ params["final_ada"] + params["final_ada_bias"])[:, None, None], 2, -1)
  out = dense(_modulate(h_BTND, shift, scale), params["out"]) + params["out_bias"]
  return unpatchify(out, cfg.patch, height, width)


def _motion(params: dict, tracks: jax.Array | None, cfg: ToraConfig, height: int, width: int) -> jax.Array | None:
  if tracks is None:
    if cfg.fuser != "none":
      raise ValueError(f"tracks: this model is guided by trajectories (fuser={cfg.fuser!r}); got None")
    return None
  return motion_patches(params, tracks, cfg, height=height, width=width)


def loss(
  params: dict, video: jax.Array, caption_BS: jax.Array, tracks: jax.Array | None, key: jax.Array, cfg: ToraConfig
) -> tuple[jax.Array, dict]:
  """Rectified-flow loss mean((v(z_t, t) - (e - x))^2) over a batch of videos x (module
  docstring), with t ~ U(0, 1) and e ~ N(0, I) drawn from `key`; (loss, {}) for `train.make_step`.

  video: float [B, T, height, width, 3], pixels in [-1, 1]; caption_BS: ids [B, S] in
  [0, vocab_size); tracks: [B, T, N, 2] inside the frame (None iff fuser is "none").
  Shapes are checked always. Value checks (caption ids in range, finite pixels in [-1, 1],
  finite tracks inside the frame) run on concrete inputs, or inside `ops.checks.checked`;
  under a plain `jax.jit` the inputs are tracers and they cannot run (an out-of-range id
  would be clamped silently), so jit it as `checks.checked(tora.loss, static_argnames="cfg")`
  and pass cfg by keyword.
  """
  _check_cfg(cfg)
  check_video(video, cfg)
  batch, frames, height, width, _ = video.shape
  caption_BS = check_caption(caption_BS, cfg, batch=batch)
  tracks = _check_tracks(tracks, cfg, batch, frames, height, width)
  check_params(params, cfg)
  key_t, key_e = jax.random.split(key)
  t_B = jax.random.uniform(key_t, video.shape[:1])
  noise = jax.random.normal(key_e, video.shape)
  z = (1 - t_B[:, None, None, None, None]) * video + t_B[:, None, None, None, None] * noise
  v = _velocity(params, z, t_B, caption_BS, _motion(params, tracks, cfg, height, width), cfg)
  return jnp.mean((v - (noise - video)) ** 2), {}


def sample(
  params: dict,
  key: jax.Array,
  caption_BS: jax.Array,
  tracks: jax.Array | None,
  cfg: ToraConfig,
  *,
  frames: int,
  height: int,
  width: int,
  steps: int,
) -> jax.Array:
  """Videos [B, frames, height, width, 3] from noise drawn with `key`: `steps` Euler steps of
  dz/dt = v from t = 1 to 0 (deterministic per key). Every argument is checked on the host
  before the jitted sampler (caption ids in range, tracks finite and inside the frame)."""
  _check_cfg(cfg)
  check_video_shape(cfg, frames, height, width)
  if not isinstance(steps, (int, np.integer)) or isinstance(steps, (bool, np.bool_)) or steps < 1:
    raise ValueError(f"steps: expected an int >= 1, got {steps!r}")
  caption_BS = check_caption(caption_BS, cfg)
  tracks = _check_tracks(tracks, cfg, caption_BS.shape[0], frames, height, width)
  check_params(params, cfg)
  return _sample(params, key, caption_BS, tracks, cfg, int(frames), int(height), int(width), int(steps))


@functools.partial(jax.jit, static_argnums=(4, 5, 6, 7, 8))
def _sample(params, key, caption_BS, tracks, cfg, frames, height, width, steps):
  m_BTND = _motion(params, tracks, cfg, height, width)
  z = jax.random.normal(key, (caption_BS.shape[0], frames, height, width, 3))

  def euler(i, z):
    t = 1.0 - i / steps
    v = _velocity(params, z, jnp.full(z.shape[:1], t), caption_BS, m_BTND, cfg)
    return z - v / steps

  return jax.lax.fori_loop(0, steps, euler, z)
