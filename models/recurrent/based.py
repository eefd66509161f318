"""Based: a hybrid recurrent LM of gated short convolutions, linear attention and sliding windows.

Shapes: B batch, T time, S window slots (the last `window` tokens), D model width,
H heads, J feature-map input dim, F = 1 + J + J^2 features, K head dim, W conv width,
E MLP hidden width, V vocabulary, L blocks, A = K / 2 RoPE angles.

Each block is three pre-norm layers, each followed by a SwiGLU MLP:
  conv:    x + BaseConv(RMSNorm(x))                         (gated short convolution)
  linear:  x + Wo LinearAttention(phi(x Wq), phi(x Wk), x Wv)   (Taylor feature map)
  window:  x + Wo SoftmaxAttention over the last N tokens (RoPE)
Blocks are stacked on a leading L axis and scanned (`models.stack`).

A `models.protocol.DecodingModel`. `forward` is the parallel form; with a `State` it
continues from it. `prefill` returns the recurrent `State` and `decode` advances it one
token in constant memory: conv inputs (W - 1 tokens), the linear-attention sums
(H (F K + F) numbers) and the last N window keys/values per block, whatever the length.

Padding: `key_mask_BT` (False at padding) zeroes padded conv inputs and linear-attention
keys; real tokens are numbered by their rank among the row's real tokens and padding gets
position -1, which every window (now and in later decode steps) treats as an empty slot.
So a left- or right-padded row computes exactly what the unpadded row does (padding in
the middle of a row is not: the convolution sees its zeros), and after left padding the
state continues as the row's would. `prefill` takes right-padded prompts and right-aligns them
(`left_pad`) so that each row's last token is the last column.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Annotated

import jax
import jax.numpy as jnp
from flax import struct

from paperjax.models import stack
from paperjax.ops import attention, checks, mlp, norms, rope
from paperjax.ops import linear_attention as la
from paperjax.ops.dense import dense

# Activation sites per block, in order (TransformerLens-style hook names).
SITE_KINDS = ("hook_resid_pre", "hook_conv_out", "hook_linear_out", "hook_window_out", "hook_resid_post")


@checks.config
class BasedConfig:
  vocab_size: checks.PositiveInt
  dim: checks.PositiveInt
  n_blocks: checks.PositiveInt
  n_heads: checks.PositiveInt = 4
  feature_dim: checks.PositiveInt = 16  # J: the feature map's input dim
  window: checks.PositiveInt = 64
  conv_width: checks.PositiveInt = 3
  ffn_dim: checks.PositiveInt = 256
  norm_eps: checks.PositiveFloat = 1e-5
  eps: checks.PositiveFloat = la.DEFAULT_EPS
  chunk: checks.PositiveInt = 64
  rope_theta: Annotated[float, checks.Range(low=1, low_open=True)] = 10_000.0
  remat: stack.RematPolicy = "none"  # what the backward pass recomputes (models.stack)

  def __post_init__(self):
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
  window_k_LBSHK: jax.Array  # the last N keys (RoPE applied) and values
  window_v_LBSHK: jax.Array
  length_B: jax.Array  # real tokens seen (left padding excluded)


def _layer_params(normal, cfg: BasedConfig, mixer: dict) -> dict:
  """A layer's mixer weights plus its pre-norms and SwiGLU MLP, stacked over L blocks."""
  L, D, E = cfg.n_blocks, cfg.dim, cfg.ffn_dim
  return {
    "norm": jnp.ones((L, D)),
    **mixer,
    "mlp_norm": jnp.ones((L, D)),
    "w1": normal((L, D, E), D),
    "w3": normal((L, D, E), D),
    "w2": normal((L, E, D), E) / math.sqrt(2 * 3 * L),
  }


def init(key: jax.Array, cfg: BasedConfig) -> dict:
  """Parameters: truncated normal, std fan_in^-1/2 (mixer and MLP outputs / sqrt(6L)), norms 1."""
  L, D, H, J, K = cfg.n_blocks, cfg.dim, cfg.n_heads, cfg.feature_dim, cfg.head_dim
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
        "wq": normal((L, D, H, J), D),
        "wk": normal((L, D, H, J), D),
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
  """Logical axis names of every leaf of `init(key, cfg)`, in the same tree structure."""
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


def init_state(cfg: BasedConfig, batch: int, capacity: int | None = None) -> State:
  """The empty state of `batch` rows. Its size does not depend on the sequence length, so
  `capacity` (the protocol's tokens per row) is only checked to be >= 1."""
  if batch < 1 or (capacity is not None and capacity < 1):
    raise ValueError(f"batch, capacity: expected >= 1, got {batch}, {capacity}")
  L, H, K = cfg.n_blocks, cfg.n_heads, cfg.head_dim
  lin = la.empty_state(batch, H, cfg.features, K)
  window = jnp.zeros((L, batch, cfg.window, H, K))
  return State(
    jnp.zeros((L, batch, cfg.conv_width - 1, cfg.dim)),
    jax.tree.map(lambda x: jnp.broadcast_to(x, (L, *x.shape)), lin),
    window,
    window,
    jnp.zeros((batch,), jnp.int32),
  )


ENCODER_PARAMS = ("wk_e", "wv_e", "encoder_gate")  # JRT-RNN's, in params["linear"] (`jrt_rnn.check_params`)


def check_params(params: dict, cfg: BasedConfig) -> None:
  """Raises unless params has init(key, cfg)'s tree and leaf shapes, naming the leaf and both
  shapes; JRT-RNN's encoder projections in params["linear"] are left to jrt_rnn."""
  if not isinstance(params, dict) or not isinstance(params.get("linear"), dict):
    raise TypeError(f"params: expected the dict of based.init(key, cfg), got {type(params).__name__}")
  linear = {k: v for k, v in params["linear"].items() if k not in ENCODER_PARAMS}
  checks.check_tree("params", {**params, "linear": linear}, checks.init_shapes(init, cfg))


def site_names(cfg: BasedConfig) -> tuple[str, ...]:
  """blocks.{l}.{kind} for every block l and kind in SITE_KINDS."""
  return stack.site_names(cfg.n_blocks, SITE_KINDS)


def left_pad(tokens_BT: jax.Array, lengths_B: jax.Array, width: int | None = None) -> tuple[jax.Array, jax.Array]:
  """Right-aligns each row's first lengths_B[b] tokens in `width` slots (default T).

  Returns (ids [B, width] with 0 at the padding, key mask [B, width], True at real tokens).
  """
  tokens_BT = jnp.asarray(tokens_BT)
  if tokens_BT.ndim != 2:
    raise ValueError(f"tokens_BT: expected shape [B, T], got {tokens_BT.shape}")
  time = tokens_BT.shape[1]
  width = time if width is None else width
  lengths_B = checks.check_lengths(lengths_B, tokens_BT.shape[0], min(width, time))
  slots_BW = jnp.arange(width)[None, :]
  pad_B1 = (width - lengths_B)[:, None]
  mask_BW = slots_BW >= pad_B1
  source_BW = jnp.clip(slots_BW - pad_B1, 0, time - 1)
  return jnp.where(mask_BW, jnp.take_along_axis(tokens_BT, source_BW, axis=1), 0).astype(jnp.int32), mask_BW


def forward(
  params: dict,
  tokens_BT: jax.Array,
  cfg: BasedConfig,
  *,
  state: State | None = None,
  key_mask_BT: jax.Array | None = None,
  prefix_len: int | None = None,
) -> tuple[jax.Array, State | None]:
  """Next-token logits float32 [B, T, V] and the state after T tokens (None without one).

  Params are checked against the config's shapes, also under jit; ids in [0, V) on
  concrete inputs, or under your own jax.jit inside `ops.checks.checked`."""
  logits_BTV, state, _ = forward_with_sites(
    params, tokens_BT, cfg, (), state=state, key_mask_BT=key_mask_BT, prefix_len=prefix_len
  )
  return logits_BTV, state


def forward_with_sites(
  params: dict,
  tokens_BT: jax.Array,
  cfg: BasedConfig,
  sites: Sequence[str],
  *,
  state: State | None = None,
  key_mask_BT: jax.Array | None = None,
  prefix_len: int | None = None,
) -> tuple[jax.Array, State | None, dict[str, jax.Array]]:
  """`forward` plus the activations [B, T, D] at `sites` (names from `site_names(cfg)`).

  `key_mask_BT` marks real tokens (False at padding). The state returned after a masked
  chunk continues correctly when each row's padding comes first (left padding), which is
  how `prefill` lays rows out.
  `prefix_len` M (JRT-RNN, from an empty state) runs the linear layers as Prefix Linear
  Attention with their encoder projections wk_e / wv_e over the first M tokens.
  """
  kinds = stack.parse_sites(sites, cfg.n_blocks, SITE_KINDS)
  x_BTD, new_state, stacked = _blocks(
    params, tokens_BT, cfg, state, kinds, prefix_len=prefix_len, key_mask_BT=key_mask_BT
  )
  return _logits(params, x_BTD, cfg), (None if state is None else new_state), stack.pick_sites(sites, stacked)


def prefill(
  params: dict,
  tokens_BT: jax.Array,
  cfg: BasedConfig,
  *,
  lengths_B: jax.Array | None = None,
  capacity: int | None = None,
  prefix_len: int | None = None,
) -> tuple[jax.Array, State]:
  """Right-padded prompts (row b's first lengths_B[b] tokens, default all T) into a state.

  Returns the float32 logits [B, V] after each row's last real token and the recurrent
  state after it. The state's size is constant: `capacity` is only checked against T.
  """
  time = checks.check_tokens(tokens_BT, cfg.vocab_size)[1]
  if capacity is not None and capacity < time:
    raise ValueError(f"capacity: expected >= T={time} (tokens the state will have seen), got {capacity}")
  key_mask_BT = None
  if lengths_B is not None:
    tokens_BT, key_mask_BT = left_pad(tokens_BT, lengths_B)
  x_BTD, state, _ = _blocks(params, tokens_BT, cfg, None, frozenset(), prefix_len=prefix_len, key_mask_BT=key_mask_BT)
  return _logits(params, x_BTD[:, -1:], cfg)[:, 0], state  # right-aligned: the last column is each row's last token


def prefix_encoder_share(
  params: dict, tokens_BT: jax.Array, cfg: BasedConfig, prefix_len: int, *, key_mask_BT: jax.Array | None = None
) -> jax.Array:
  """JRT-RNN's encoder share of each linear layer's denominator, float32 [L, B, T, H]
  (`ops.linear_attention.prefix_encoder_share`), from an empty state."""
  kinds = frozenset({"encoder_share"})
  _, _, sites = _blocks(params, tokens_BT, cfg, None, kinds, prefix_len=prefix_len, key_mask_BT=key_mask_BT)
  return sites["encoder_share"]


def decode(params: dict, token_B: jax.Array, state: State, cfg: BasedConfig) -> tuple[jax.Array, State]:
  """One token per row in constant memory: (float32 logits [B, V], the state after it)."""
  return stack.decode_by_forward(forward, params, token_B, state, cfg)


def _logits(params: dict, x_BTD: jax.Array, cfg: BasedConfig) -> jax.Array:
  h_BTD = norms.rms_norm(x_BTD, params["final_norm"], cfg.norm_eps)
  return dense(h_BTD, params["unembed"], out_dtype=jnp.float32)


def _mlp(p, x_BTD, cfg):
  with jax.named_scope("mlp"):
    return x_BTD + mlp.swiglu(norms.rms_norm(x_BTD, p["mlp_norm"], cfg.norm_eps), p["w1"], p["w3"], p["w2"])


def _blocks(
  params: dict,
  tokens_BT: jax.Array,
  cfg: BasedConfig,
  state: State | None,
  kinds: frozenset[str],
  *,
  prefix_len: int | None,
  key_mask_BT: jax.Array | None,
) -> tuple[jax.Array, State, dict[str, jax.Array]]:
  """Runs all blocks over T new tokens from `state` (None: empty); returns (x, new state, sites)."""
  check_params(params, cfg)
  batch, time = checks.check_tokens(tokens_BT, cfg.vocab_size)
  if prefix_len is not None and state is not None:
    raise ValueError(f"prefix_len: the encoder prefix starts a sequence; got prefix_len={prefix_len} and a state")
  if prefix_len is not None and "wk_e" not in params["linear"]:
    raise ValueError("params: prefix_len needs JRT-RNN's encoder projections (jrt_rnn.init)")
  if key_mask_BT is not None and (key_mask_BT.shape != (batch, time) or key_mask_BT.dtype != jnp.bool_):
    raise ValueError(f"key_mask_BT: expected bool shape {(batch, time)}, got {key_mask_BT.dtype} {key_mask_BT.shape}")
  if state is not None and not isinstance(state, State):
    raise TypeError(f"state: expected a based.State (init_state, prefill), got {type(state).__name__}")
  state = init_state(cfg, batch) if state is None else state
  checks.check_array("state.length_B", state.length_B, 1, integer=True, shape=f"[{batch}]")
  checks.check_values("state.length_B", state.length_B, lambda n: n < 0, "counts of tokens seen >= 0")
  if state.length_B.shape != (batch,):
    raise ValueError(f"state: built for batch {state.length_B.shape[0]}, got tokens for batch {batch}")
  real_BT = jnp.ones((batch, time), bool) if key_mask_BT is None else key_mask_BT
  # Real tokens are numbered by their rank; padding gets -1, an empty slot to every window.
  positions_BT = jnp.where(real_BT, state.length_B[:, None] + jnp.cumsum(real_BT, axis=1) - 1, -1)
  real_B = real_BT.sum(axis=1)
  keep_BT1 = None if key_mask_BT is None else key_mask_BT[:, :, None]
  cos_BTA, sin_BTA = rope.tables(positions_BT, jnp.asarray(rope.inv_frequencies(cfg.head_dim, cfg.rope_theta)))
  n = cfg.window
  window_positions_BS = state.length_B[:, None] - n + jnp.arange(n)

  def block(x, xs):
    pc, pl, pw, conv_state, lin_state, window_k, window_v = xs
    resid_pre = x
    with jax.named_scope("conv"):
      h = norms.rms_norm(x, pc["norm"], cfg.norm_eps)
      if keep_BT1 is not None:
        h = h * keep_BT1
      conv_out, conv_state = la.base_conv(h, pc["w_in"], pc["w_gate"], pc["kernel"], conv_state)
    x = _mlp(pc, x + conv_out, cfg)

    with jax.named_scope("linear_attention"):
      h = norms.rms_norm(x, pl["norm"], cfg.norm_eps)
      phi_q = la.taylor_features(dense(h, pl["wq"]))
      phi_k = la.taylor_features(dense(h, pl["wk"]))
      v = dense(h, pl["wv"])
      diagnostics = {}
      if prefix_len is not None:
        phi_ke = la.taylor_features(dense(h, pl["wk_e"]))
        if "encoder_gate" in pl:  # JRT-RNN's gated variant: sigmoid(g_h) scales the encoder's keys
          phi_ke = phi_ke * jax.nn.sigmoid(pl["encoder_gate"])[:, None]
        # Without wv_e (the zero-values variant) the encoder's keys only add to the denominator.
        v_e = dense(h, pl["wv_e"]) if "wv_e" in pl else jnp.zeros_like(v)
        y, lin_state = la.prefix_linear_attention(
          phi_q, phi_k, v, phi_ke, v_e, prefix_len, key_mask_BT=key_mask_BT, chunk=cfg.chunk, eps=cfg.eps
        )
        if "encoder_share" in kinds:
          diagnostics["encoder_share"] = la.prefix_encoder_share(
            phi_q, phi_k, phi_ke, prefix_len, key_mask_BT=key_mask_BT
          )
      else:
        if keep_BT1 is not None:
          phi_k = phi_k * keep_BT1[..., None]
        y, lin_state = la.causal_chunked(phi_q, phi_k, v, chunk=cfg.chunk, eps=cfg.eps, state=lin_state)
      linear_out = dense(y, pl["wo"], n_in=2)
    x = _mlp(pl, x + linear_out, cfg)

    with jax.named_scope("window_attention"):
      h = norms.rms_norm(x, pw["norm"], cfg.norm_eps)
      q = rope.rotate(dense(h, pw["wq"]), cos_BTA, sin_BTA)
      k = rope.rotate(dense(h, pw["wk"]), cos_BTA, sin_BTA)
      v = dense(h, pw["wv"])
      keys, values = jnp.concatenate([window_k, k], axis=1), jnp.concatenate([window_v, v], axis=1)  # [B, N + T]
      y = attention.sliding_window_attention(
        q,
        keys,
        values,
        n,
        q_positions_BT=positions_BT,
        k_positions_BS=jnp.concatenate([window_positions_BS, positions_BT], axis=1),
      )
      window_out = dense(y, pw["wo"], n_in=2)
    x = _mlp(pw, x + window_out, cfg)
    acts = {
      "hook_resid_pre": resid_pre,
      "hook_conv_out": conv_out,
      "hook_linear_out": linear_out,
      "hook_window_out": window_out,
      "hook_resid_post": x,
      **diagnostics,
    }
    return x, (conv_state, lin_state, keys[:, -n:], values[:, -n:]), acts

  xs = (
    params["conv"],
    params["linear"],
    params["window"],
    state.conv_LBWD,
    state.linear,
    state.window_k_LBSHK,
    state.window_v_LBSHK,
  )
  x_BTD, (conv, lin, wk, wv), stacked = stack.scan_layers(
    block, params["embed"][tokens_BT], xs, remat=cfg.remat, kinds=kinds, name="block"
  )
  return x_BTD, State(conv, lin, wk, wv, state.length_B + real_B.astype(jnp.int32)), stacked
