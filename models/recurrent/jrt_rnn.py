"""JRT-RNN: Based with Prefix Linear Attention over an M-token encoder region, NTP + MLM loss.

Shapes: B batch, T time (T >= prefix_len M), V vocabulary, D model width, L blocks.

The linear-attention layers get encoder projections (wk_e, wv_e) that read the first M
tokens non-causally (ops.linear_attention.prefix_linear_attention, JRT Eq. 3); the rest of
the stack is Based's. After the prompt the state is Eq. 4's s_M, z_M and decoding is
Based's recurrence: no extra decode state. Prompts shorter than M are left-padded to M
and their padded keys zeroed (`based.left_pad`). A `models.protocol.DecodingModel`.

`JRTConfig.encoder` selects the encoder term: "eq3" (the default) is the paper's. Two
variants that depart from the paper exist for diagnosing training (bench/jrt's diagnosis
part): "zero_values" has no wv_e (encoder values are 0, its keys stay in the denominator)
and "gated" scales the encoder's keys per layer and head by sigmoid(g), g learned from
GATE_INIT, so the encoder starts almost out of numerator and denominator.

Training loss (Eq. 5): L = (w1 L_NTP + w2 L_MLM) / (w1 + w2), w1 = 1, w2 = 0.25. Each
encoder token is replaced by [MASK] with probability 15% and predicted at its own position
(MLM, masked positions only); next-token loss only from positions >= M.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Annotated, Literal

import jax
import jax.numpy as jnp
import optax

from paperjax.models.recurrent import based
from paperjax.ops import checks

GATE_INIT = -4.0  # sigmoid(-4) = 0.018


@checks.config
class JRTConfig:
  based: based.BasedConfig
  prefix_len: checks.PositiveInt  # M
  mask_id: checks.NonNegativeInt  # the [MASK] token (a vocabulary id unused by the data)
  mlm_prob: Annotated[float, checks.Range(low=0, high=1, high_open=True)] = 0.15
  ntp_weight: checks.NonNegativeFloat = 1.0
  mlm_weight: checks.NonNegativeFloat = 0.25
  encoder: Literal["eq3", "zero_values", "gated"] = "eq3"  # the paper's Eq. 3, or a named departure

  def __post_init__(self):
    if self.mask_id >= self.based.vocab_size:
      raise ValueError(f"mask_id: expected an id in [0, {self.based.vocab_size}), got {self.mask_id}")
    if self.ntp_weight + self.mlm_weight == 0:
      raise ValueError("ntp_weight, mlm_weight: expected at least one > 0, got both 0")

  @property
  def vocab_size(self) -> int:
    return self.based.vocab_size


def init(key: jax.Array, cfg: JRTConfig) -> dict:
  k_model, k_enc, v_enc = jax.random.split(key, 3)
  params = based.init(k_model, cfg.based)
  b = cfg.based
  fan = 1 / math.sqrt(b.dim)
  encoder = {
    "wk_e": jax.random.truncated_normal(k_enc, -2, 2, (b.n_blocks, b.dim, b.n_heads, b.feature_dim)) * fan,
    "wv_e": jax.random.truncated_normal(v_enc, -2, 2, (b.n_blocks, b.dim, b.n_heads, b.head_dim)) * fan,
    "encoder_gate": jnp.full((b.n_blocks, b.n_heads), GATE_INIT),
  }
  params["linear"] = {**params["linear"], **{name: encoder[name] for name in _encoder_params(cfg)}}
  return params


def param_axes(cfg: JRTConfig) -> dict:
  axes = based.param_axes(cfg.based)
  encoder = {
    "wk_e": ("layers", "embed", "heads", "feature"),
    "wv_e": ("layers", "embed", "heads", "head_dim"),
    "encoder_gate": ("layers", "heads"),
  }
  axes["linear"] = {**axes["linear"], **{name: encoder[name] for name in _encoder_params(cfg)}}
  return axes


def _encoder_params(cfg: JRTConfig) -> tuple[str, ...]:
  return {"eq3": ("wk_e", "wv_e"), "zero_values": ("wk_e",), "gated": ("wk_e", "wv_e", "encoder_gate")}[cfg.encoder]


def init_state(cfg: JRTConfig, batch: int, capacity: int | None = None) -> based.State:
  """Based's empty state (JRT-RNN decodes with Based's recurrence)."""
  return based.init_state(cfg.based, batch, capacity)


def site_names(cfg: JRTConfig) -> tuple[str, ...]:
  return based.site_names(cfg.based)


def forward(
  params: dict,
  tokens_BT: jax.Array,
  cfg: JRTConfig,
  *,
  state: based.State | None = None,
  key_mask_BT: jax.Array | None = None,
) -> tuple[jax.Array, based.State | None]:
  """Logits float32 [B, T, V]: Prefix Linear Attention over the first M tokens from an empty
  context (T >= M; `key_mask_BT` marks padding; the encoder is each row's first M real tokens), or
  Based's recurrence from `state`."""
  logits_BTV, state, _ = forward_with_sites(params, tokens_BT, cfg, (), state=state, key_mask_BT=key_mask_BT)
  return logits_BTV, state


def forward_with_sites(
  params: dict,
  tokens_BT: jax.Array,
  cfg: JRTConfig,
  sites: Sequence[str],
  *,
  state: based.State | None = None,
  key_mask_BT: jax.Array | None = None,
) -> tuple[jax.Array, based.State | None, dict[str, jax.Array]]:
  """`forward` plus the activations [B, T, D] at `sites` (names from `site_names(cfg)`)."""
  prefix_len = None if state is not None else _check_prefix(tokens_BT, cfg)
  check_params(params, cfg)
  return based.forward_with_sites(
    params, tokens_BT, cfg.based, sites, state=state, key_mask_BT=key_mask_BT, prefix_len=prefix_len
  )


def prefill(
  params: dict,
  tokens_BT: jax.Array,
  cfg: JRTConfig,
  *,
  lengths_B: jax.Array | None = None,
  capacity: int | None = None,
) -> tuple[jax.Array, based.State]:
  """Right-padded prompts (T >= M), the encoder = each row's first M real tokens: (logits
  [B, V] after each row's last token, the state; Eq. 4's s_M, z_M for a row of M tokens)."""
  check_params(params, cfg)
  return based.prefill(
    params, tokens_BT, cfg.based, lengths_B=lengths_B, capacity=capacity, prefix_len=_check_prefix(tokens_BT, cfg)
  )


def decode(params: dict, token_B: jax.Array, state: based.State, cfg: JRTConfig) -> tuple[jax.Array, based.State]:
  """Decoding after the prompt is Based's recurrence."""
  return based.decode(params, token_B, state, cfg.based)


def check_params(params: dict, cfg: JRTConfig) -> None:
  """Raises unless params has init(key, cfg)'s tree (the encoder's projections included) and
  leaf shapes, naming the leaf and both shapes."""
  if not isinstance(params, dict) or not isinstance(params.get("linear"), dict):
    raise TypeError(f"params: expected the dict of jrt_rnn.init(key, cfg), got {type(params).__name__}")
  got = tuple(name for name in based.ENCODER_PARAMS if name in params["linear"])
  if got != _encoder_params(cfg):
    raise ValueError(f"params: encoder={cfg.encoder!r} expects linear encoder params {_encoder_params(cfg)}, got {got}")
  checks.check_tree("params", params, checks.init_shapes(init, cfg))


def _check_prefix(tokens_BT: jax.Array, cfg: JRTConfig) -> int:
  if tokens_BT.ndim != 2:
    raise ValueError(f"tokens_BT: expected shape [B, T], got {tokens_BT.shape}")
  if tokens_BT.shape[1] < cfg.prefix_len:
    raise ValueError(
      f"tokens_BT: {tokens_BT.shape[1]} tokens are fewer than the encoder length M={cfg.prefix_len}; left_pad them"
    )
  return cfg.prefix_len


def encoder_share(
  params: dict, tokens_BT: jax.Array, cfg: JRTConfig, *, key_mask_BT: jax.Array | None = None
) -> jax.Array:
  """The encoder's share of each linear layer's denominator at each position, [L, B, T, H]
  (`ops.linear_attention.prefix_encoder_share`; gated keys included as scaled)."""
  check_params(params, cfg)
  prefix_len = _check_prefix(tokens_BT, cfg)
  return based.prefix_encoder_share(params, tokens_BT, cfg.based, prefix_len, key_mask_BT=key_mask_BT)


def loss_masks(time: int, prefix_len: int, masked_BT: jax.Array, key_mask_BT: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(ntp_BT: positions t >= M whose next token t + 1 exists, mlm_BT: masked real encoder positions)."""
  t = jnp.arange(time)[None, :]
  ntp = (t >= prefix_len) & (t < time - 1) & key_mask_BT
  mlm = masked_BT & (t < prefix_len) & key_mask_BT
  return ntp, mlm


def loss(params, tokens_BT, cfg: JRTConfig, key: jax.Array, key_mask_BT=None) -> tuple[jax.Array, dict]:
  """Eq. 5 on a batch: [MASK] corruption of the encoder, then weighted NTP + MLM cross-entropy."""
  batch, time = tokens_BT.shape
  key_mask_BT = jnp.ones((batch, time), bool) if key_mask_BT is None else key_mask_BT
  masked_BT = (
    (jax.random.uniform(key, (batch, time)) < cfg.mlm_prob) & (jnp.arange(time) < cfg.prefix_len) & key_mask_BT
  )
  inputs_BT = jnp.where(masked_BT, cfg.mask_id, tokens_BT)
  logits_BTV, _ = forward(params, inputs_BT, cfg, key_mask_BT=key_mask_BT)
  ntp_BT, mlm_BT = loss_masks(time, cfg.prefix_len, masked_BT, key_mask_BT)
  next_BT = jnp.concatenate([tokens_BT[:, 1:], tokens_BT[:, -1:]], axis=1)
  ntp = optax.softmax_cross_entropy_with_integer_labels(logits_BTV, next_BT)
  mlm = optax.softmax_cross_entropy_with_integer_labels(logits_BTV, tokens_BT)
  mean = lambda x, m: jnp.sum(x * m) / jnp.maximum(m.sum(), 1)
  l_ntp, l_mlm = mean(ntp, ntp_BT), mean(mlm, mlm_BT)
  total = (cfg.ntp_weight * l_ntp + cfg.mlm_weight * l_mlm) / (cfg.ntp_weight + cfg.mlm_weight)
  return total, {"ntp": l_ntp, "mlm": l_mlm, "masked": mlm_BT.sum()}
