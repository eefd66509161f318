"""Based: a hybrid recurrent LM of gated short convolutions, linear attention and sliding windows.

Shapes: B batch, T time, D width, H heads, P feature-map input dim, F = 1 + P + P^2,
K head dim, W conv width, N window length, V vocabulary, L blocks.

Each block is three pre-norm layers, each followed by a SwiGLU MLP:
  conv:    x + BaseConv(RMSNorm(x))                         (gated short convolution)
  linear:  x + Wo LinearAttention(phi(x Wq), phi(x Wk), x Wv)   (Taylor feature map)
  window:  x + Wo SoftmaxAttention over the last N tokens (RoPE)
Blocks are stacked on a leading L axis and run with `lax.scan`.

`forward` is the parallel (training) form; `prefill` also returns the recurrent `State`
and `decode` advances it one token in constant memory: conv inputs (W - 1 tokens), the
linear-attention sums (H (F K + F) numbers) and the last N window keys/values per block,
whatever the sequence length.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import struct

from paperjax.ops import attention, mlp, norms, rope
from paperjax.ops import linear_attention as la


@dataclasses.dataclass(frozen=True)
class BasedConfig:
  vocab_size: int
  dim: int
  n_blocks: int
  n_heads: int = 4
  feature_dim: int = 16
  window: int = 64
  conv_width: int = 3
  ffn_dim: int = 256
  norm_eps: float = 1e-5
  eps: float = la.DEFAULT_EPS
  chunk: int = 64
  rope_theta: float = 10_000.0

  def __post_init__(self):
    for name in ("vocab_size", "dim", "n_blocks", "n_heads", "feature_dim", "window", "conv_width", "ffn_dim"):
      if getattr(self, name) <= 0:
        raise ValueError(f"{name}: expected > 0, got {getattr(self, name)}")
    if self.dim % self.n_heads or (self.dim // self.n_heads) % 2:
      raise ValueError(f"dim, n_heads: head dim dim // n_heads must be an even int, got {self.dim}, {self.n_heads}")

  @property
  def head_dim(self) -> int:
    return self.dim // self.n_heads

  @property
  def features(self) -> int:
    return 1 + self.feature_dim + self.feature_dim**2


@struct.dataclass
class State:
  conv_LBWD: jax.Array  # the last W - 1 conv inputs
  linear: la.State  # stacked on L: s [L, B, H, F, K], z [L, B, H, F]
  window_k_LBNHK: jax.Array  # the last N keys (RoPE applied) and values
  window_v_LBNHK: jax.Array
  length_B: jax.Array  # tokens seen


def _layer_params(normal, cfg: BasedConfig, mixer: dict) -> dict:
  """A layer's mixer weights plus its pre-norms and SwiGLU MLP, stacked over L blocks."""
  L, D, F = cfg.n_blocks, cfg.dim, cfg.ffn_dim
  return {
    "norm": jnp.ones((L, D)),
    **mixer,
    "mlp_norm": jnp.ones((L, D)),
    "w1": normal((L, D, F), D),
    "w3": normal((L, D, F), D),
    "w2": normal((L, F, D), F) / math.sqrt(2 * 3 * L),
  }


def init(key: jax.Array, cfg: BasedConfig) -> dict:
  L, D, H, P, K = cfg.n_blocks, cfg.dim, cfg.n_heads, cfg.feature_dim, cfg.head_dim
  keys = iter(jax.random.split(key, 32))
  normal = lambda shape, fan_in: jax.random.truncated_normal(next(keys), -2, 2, shape) / math.sqrt(fan_in)
  out = lambda: normal((L, H, K, D), D) / math.sqrt(2 * 3 * L)
  return {
    "embed": normal((cfg.vocab_size, D), 1),
    "conv": _layer_params(
      normal,
      cfg,
      {
        "w_in": normal((L, D, D), D),
        "w_gate": normal((L, D, D), D),
        "kernel": normal((L, cfg.conv_width, D), cfg.conv_width),
      },
    ),
    "linear": _layer_params(
      normal,
      cfg,
      {
        "wq": normal((L, D, H, P), D),
        "wk": normal((L, D, H, P), D),
        "wv": normal((L, D, H, K), D),
        "wo": out(),
      },
    ),
    "window": _layer_params(
      normal,
      cfg,
      {
        "wq": normal((L, D, H, K), D),
        "wk": normal((L, D, H, K), D),
        "wv": normal((L, D, H, K), D),
        "wo": out(),
      },
    ),
    "final_norm": jnp.ones((D,)),
    "unembed": normal((D, cfg.vocab_size), D),
  }


def param_axes(cfg: BasedConfig) -> dict:
  mlp_axes = {
    "norm": ("layers", "embed"),
    "mlp_norm": ("layers", "embed"),
    "w1": ("layers", "embed", "ffn"),
    "w3": ("layers", "embed", "ffn"),
    "w2": ("layers", "ffn", "embed"),
  }
  attn = lambda q: {
    "wq": ("layers", "embed", "heads", q),
    "wk": ("layers", "embed", "heads", q),
    "wv": ("layers", "embed", "heads", "head_dim"),
    "wo": ("layers", "heads", "head_dim", "embed"),
  }
  return {
    "embed": ("vocab", "embed"),
    "conv": {
      **mlp_axes,
      "w_in": ("layers", "embed", "embed_out"),
      "w_gate": ("layers", "embed", "embed_out"),
      "kernel": ("layers", "conv", "embed"),
    },
    "linear": {**mlp_axes, **attn("feature")},
    "window": {**mlp_axes, **attn("head_dim")},
    "final_norm": ("embed",),
    "unembed": ("embed", "vocab"),
  }


def init_state(cfg: BasedConfig, batch: int) -> State:
  L, H, K = cfg.n_blocks, cfg.n_heads, cfg.head_dim
  lin = la.empty_state(batch, H, cfg.features, K)
  stack = lambda x: jnp.broadcast_to(x, (L, *x.shape))
  window = jnp.zeros((L, batch, cfg.window, H, K))
  return State(
    jnp.zeros((L, batch, cfg.conv_width - 1, cfg.dim)),
    jax.tree.map(stack, lin),
    window,
    window,
    jnp.zeros((batch,), jnp.int32),
  )


def _mlp(p, x, cfg):
  return x + mlp.swiglu(norms.rms_norm(x, p["mlp_norm"], cfg.norm_eps), p["w1"], p["w3"], p["w2"])


def _blocks(params, x_BTD, cfg: BasedConfig, state: State, *, prefix_len: int | None = None, key_mask_BT=None):
  """Runs all blocks over T new tokens starting from `state`; returns (x, new state).

  With `prefix_len` M (JRT-RNN, from an empty state) the linear layers run Prefix Linear
  Attention with their encoder projections wk_e / wv_e over the first M tokens.
  `key_mask_BT` marks real tokens (False: left padding): padded inputs are zeroed before
  the convolutions and padded keys are invisible to every attention.
  """
  batch, time, _ = x_BTD.shape
  keep_BT1 = None if key_mask_BT is None else key_mask_BT[:, :, None]
  positions_BT = state.length_B[:, None] + jnp.arange(time)
  inv_freq = jnp.asarray(rope.inv_frequencies(cfg.head_dim, cfg.rope_theta))
  n = cfg.window

  def block(x, xs):
    pc, pl_, pw, conv_state, lin_state, wk, wv = xs
    h = norms.rms_norm(x, pc["norm"], cfg.norm_eps)
    if keep_BT1 is not None:
      h = h * keep_BT1
    y, conv_state = la.base_conv(h, pc["w_in"], pc["w_gate"], pc["kernel"], conv_state)
    x = _mlp(pc, x + y, cfg)

    h = norms.rms_norm(x, pl_["norm"], cfg.norm_eps)
    phi_q = la.taylor_features(jnp.einsum("btd,dhp->bthp", h, pl_["wq"]))
    phi_k = la.taylor_features(jnp.einsum("btd,dhp->bthp", h, pl_["wk"]))
    v = jnp.einsum("btd,dhk->bthk", h, pl_["wv"])
    if prefix_len is not None:
      phi_ke = la.taylor_features(jnp.einsum("btd,dhp->bthp", h, pl_["wk_e"]))
      v_e = jnp.einsum("btd,dhk->bthk", h, pl_["wv_e"])
      y, lin_state = la.prefix_linear_attention(
        phi_q, phi_k, v, phi_ke, v_e, prefix_len, key_mask_BT=key_mask_BT, chunk=cfg.chunk, eps=cfg.eps
      )
    else:
      if keep_BT1 is not None:
        phi_k = phi_k * keep_BT1[..., None]
      y, lin_state = la.causal_chunked(phi_q, phi_k, v, chunk=cfg.chunk, eps=cfg.eps, state=lin_state)
    x = _mlp(pl_, x + jnp.einsum("bthk,hkd->btd", y, pl_["wo"]), cfg)

    h = norms.rms_norm(x, pw["norm"], cfg.norm_eps)
    q = rope.apply_rope(jnp.einsum("btd,dhk->bthk", h, pw["wq"]), positions_BT, inv_freq)
    k = rope.apply_rope(jnp.einsum("btd,dhk->bthk", h, pw["wk"]), positions_BT, inv_freq)
    v = jnp.einsum("btd,dhk->bthk", h, pw["wv"])
    keys, values = jnp.concatenate([wk, k], axis=1), jnp.concatenate([wv, v], axis=1)  # [B, N + T, H, K]
    slot_pos = jnp.concatenate([state.length_B[:, None] - n + jnp.arange(n), positions_BT], axis=1)
    mask = (slot_pos[:, None, :] <= positions_BT[:, :, None]) & (slot_pos[:, None, :] > positions_BT[:, :, None] - n)
    mask &= slot_pos[:, None, :] >= 0
    if key_mask_BT is not None:
      mask &= jnp.concatenate([jnp.ones((batch, n), bool), key_mask_BT], axis=1)[:, None, :]
    y = attention.attention(q, keys, values, mask)
    x = _mlp(pw, x + jnp.einsum("bthk,hkd->btd", y, pw["wo"]), cfg)
    return x, (conv_state, lin_state, keys[:, -n:], values[:, -n:])

  xs = (
    params["conv"],
    params["linear"],
    params["window"],
    state.conv_LBWD,
    state.linear,
    state.window_k_LBNHK,
    state.window_v_LBNHK,
  )
  x_BTD, (conv, lin, wk, wv) = jax.lax.scan(block, x_BTD, xs)
  return x_BTD, State(conv, lin, wk, wv, state.length_B + time)


def prefill(
  params: dict,
  tokens_BT: jax.Array,
  cfg: BasedConfig,
  state: State | None = None,
  *,
  key_mask_BT: jax.Array | None = None,
  prefix_len: int | None = None,
) -> tuple[jax.Array, State]:
  """Logits float32 [B, T, V] of T tokens and the recurrent state after them.

  Rows of different lengths are left-padded with key_mask_BT False at the padding.
  """
  if tokens_BT.ndim != 2 or not jnp.issubdtype(tokens_BT.dtype, jnp.integer):
    raise ValueError(f"tokens_BT: expected integer ids of shape [B, T], got {tokens_BT.dtype} {tokens_BT.shape}")
  state = init_state(cfg, tokens_BT.shape[0]) if state is None else state
  x, state = _blocks(params, params["embed"][tokens_BT], cfg, state, prefix_len=prefix_len, key_mask_BT=key_mask_BT)
  h = norms.rms_norm(x, params["final_norm"], cfg.norm_eps)
  return jnp.einsum("btd,dv->btv", h, params["unembed"], preferred_element_type=jnp.float32), state


def forward(params: dict, tokens_BT: jax.Array, cfg: BasedConfig) -> jax.Array:
  """The parallel (training) form: next-token logits float32 [B, T, V]."""
  return prefill(params, tokens_BT, cfg)[0]


def decode(params: dict, token_B: jax.Array, state: State, cfg: BasedConfig) -> tuple[jax.Array, State]:
  """One token per row in constant memory: (logits [B, V], new state)."""
  logits, state = prefill(params, token_B[:, None], cfg, state)
  return logits[:, 0], state
