"""Linear attention (Based), Prefix Linear Attention (JRT-RNN), short convolutions.

Shapes: B batch, T time, S key time, H heads, J feature-map input dim (16 in the papers),
F = 1 + J + J^2 features, K value (head) dim, N chunks, U chunk length, W conv width,
D model width.

  phi(x) = [1, x / J^(1/4), vec(x x^T) / (sqrt(2) sqrt(J))]     (Based's 2nd-order Taylor map)
  phi(q) . phi(k) = 1 + q.k / sqrt(J) + (q.k)^2 / (2 J)  ~  exp(q.k / sqrt(J))

Causal linear attention (three equal forms: quadratic, chunked, recurrent):
  y_i = phi(q_i) S_i / (phi(q_i) z_i + eps),  S_i = sum_{j<=i} phi(k_j)^T v_j,  z_i = sum_{j<=i} phi(k_j)

Prefix Linear Attention (JRT Eq. 3): the first M positions are an encoder region with their
own keys/values (k_e, v_e) that every query sees; the decoder keys (k_d, v_d) are causal:
  y_i = phi(q_i) [sum_{j<=i} phi(k_d,j)^T v_d,j + sum_{j<M} phi(k_e,j)^T v_e,j]
        / phi(q_i) [sum_{j<=i} phi(k_d,j) + sum_{j<M} phi(k_e,j)]

Functions take feature-mapped queries and keys (`phi_q_BTHF = taylor_features(q_BTHJ)`);
states and sums are float32 whatever the input dtype.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from paperjax.ops import checks
from paperjax.ops.dense import dense

DEFAULT_EPS = 1e-6


@struct.dataclass
class State:
  """Recurrent state per layer: s = sum phi(k)^T v [B, H, F, K], z = sum phi(k) [B, H, F].

  Its size is H (F K + F) per row, independent of the sequence length.
  """

  s_BHFK: jax.Array
  z_BHF: jax.Array


def taylor_features(x_BTHJ: jax.Array) -> jax.Array:
  """phi(x) = [1, x / J^(1/4), vec(x x^T) / (sqrt(2) sqrt(J))], float32 [..., 1 + J + J^2]."""
  x = x_BTHJ.astype(jnp.float32)
  d = x.shape[-1]
  outer = (x[..., :, None] * x[..., None, :]).reshape(*x.shape[:-1], d * d)
  return jnp.concatenate([jnp.ones_like(x[..., :1]), x / d**0.25, outer / math.sqrt(2 * d)], axis=-1)


def empty_state(batch: int, heads: int, features: int, value_dim: int) -> State:
  return State(
    jnp.zeros((batch, heads, features, value_dim), jnp.float32), jnp.zeros((batch, heads, features), jnp.float32)
  )


def causal_quadratic(phi_q_BTHF, phi_k_BTHF, v_BTHK, eps: float = DEFAULT_EPS) -> jax.Array:
  """The parallel form: A = (phi(Q) phi(K)^T) * causal mask; Y = A V / (rowsum(A) + eps). O(T^2)."""
  _check(phi_q_BTHF, phi_k_BTHF, v_BTHK, eps=eps)
  a_BHTS = jnp.einsum("bthf,bshf->bhts", phi_q_BTHF, phi_k_BTHF)
  a_BHTS = jnp.where(jnp.tril(jnp.ones(a_BHTS.shape[-2:], bool)), a_BHTS, 0.0)
  num = jnp.einsum("bhts,bshk->bthk", a_BHTS, v_BTHK.astype(jnp.float32))
  return (num / (a_BHTS.sum(-1).transpose(0, 2, 1)[..., None] + eps)).astype(v_BTHK.dtype)


def causal_chunked(
  phi_q_BTHF, phi_k_BTHF, v_BTHK, *, chunk: int = 64, eps: float = DEFAULT_EPS, state: State | None = None
):
  """Chunks of C tokens: the running state for earlier chunks, the masked quadratic form inside.

  Cost O(T U F K); returns (y [B, T, H, K], the state after the last token).
  """
  _check(phi_q_BTHF, phi_k_BTHF, v_BTHK, eps=eps, state=state)
  if not isinstance(chunk, (int, np.integer)) or isinstance(chunk, bool) or chunk < 1:
    raise ValueError(f"chunk: expected an int >= 1, got {chunk!r}")
  batch, time, heads, features = phi_q_BTHF.shape
  value_dim = v_BTHK.shape[-1]
  pad = -time % chunk
  pad_t = lambda x: jnp.pad(x.astype(jnp.float32), ((0, 0), (0, pad), (0, 0), (0, 0)))  # padded keys are 0
  to_chunks = lambda x: pad_t(x).reshape(batch, -1, chunk, heads, x.shape[-1]).transpose(1, 0, 2, 3, 4)
  q_NBUHF, k_NBUHF, v_NBUHK = to_chunks(phi_q_BTHF), to_chunks(phi_k_BTHF), to_chunks(v_BTHK)
  mask_UU = jnp.tril(jnp.ones((chunk, chunk), bool))
  start = empty_state(batch, heads, features, value_dim) if state is None else state

  def one_chunk(state: State, xs):
    q, k, v = xs
    a_BHUU = jnp.where(mask_UU, jnp.einsum("buhf,bshf->bhus", q, k), 0.0)
    num = jnp.einsum("bhus,bshk->buhk", a_BHUU, v) + jnp.einsum("buhf,bhfk->buhk", q, state.s_BHFK)
    den = a_BHUU.sum(-1).transpose(0, 2, 1) + jnp.einsum("buhf,bhf->buh", q, state.z_BHF)
    state = State(state.s_BHFK + jnp.einsum("buhf,buhk->bhfk", k, v), state.z_BHF + k.sum(1))
    return state, num / (den[..., None] + eps)

  end, y_NBUHK = jax.lax.scan(one_chunk, start, (q_NBUHF, k_NBUHF, v_NBUHK))
  y = y_NBUHK.transpose(1, 0, 2, 3, 4).reshape(batch, -1, heads, value_dim)[:, :time]
  return y.astype(v_BTHK.dtype), end


def causal_recurrent(phi_q_BTHF, phi_k_BTHF, v_BTHK, *, eps: float = DEFAULT_EPS, state: State | None = None):
  """Token by token with `decode_step`: returns (y [B, T, H, K], the final state)."""
  _check(phi_q_BTHF, phi_k_BTHF, v_BTHK, eps=eps, state=state)
  batch, _, heads, features = phi_q_BTHF.shape
  state = empty_state(batch, heads, features, v_BTHK.shape[-1]) if state is None else state

  def step(state, xs):
    y, state = decode_step(state, *xs, eps=eps)
    return state, y

  xs = tuple(x.transpose(1, 0, 2, 3) for x in (phi_q_BTHF, phi_k_BTHF, v_BTHK))
  state, y_TBHK = jax.lax.scan(step, state, xs)
  return y_TBHK.transpose(1, 0, 2, 3), state


def decode_step(state: State, phi_q_BHF, phi_k_BHF, v_BHK, *, eps: float = DEFAULT_EPS) -> tuple[jax.Array, State]:
  """One token: S += phi(k)^T v, z += phi(k); y = phi(q) S / (phi(q) z + eps). Constant memory."""
  for name, x in (("phi_q_BHF", phi_q_BHF), ("phi_k_BHF", phi_k_BHF), ("v_BHK", v_BHK)):
    checks.check_array(name, x, 3, shape="[B, H, F]" if name != "v_BHK" else "[B, H, K]")
  if phi_q_BHF.shape != phi_k_BHF.shape or v_BHK.shape[:2] != phi_q_BHF.shape[:2]:
    raise ValueError(
      f"phi_q_BHF, phi_k_BHF, v_BHK: expected [B, H, F] twice and [B, H, K], got {phi_q_BHF.shape}, "
      f"{phi_k_BHF.shape}, {v_BHK.shape}"
    )
  _check_state(state, (*phi_q_BHF.shape, v_BHK.shape[-1]))
  _check_eps(eps)
  k, v = phi_k_BHF.astype(jnp.float32), v_BHK.astype(jnp.float32)
  state = State(state.s_BHFK + k[..., :, None] * v[..., None, :], state.z_BHF + k)
  q = phi_q_BHF.astype(jnp.float32)
  y = jnp.einsum("bhf,bhfk->bhk", q, state.s_BHFK) / (jnp.einsum("bhf,bhf->bh", q, state.z_BHF)[..., None] + eps)
  return y.astype(v_BHK.dtype), state


def non_causal(phi_q_BTHF, phi_k_BTHF, v_BTHK, *, key_mask_BT: jax.Array | None = None, eps: float = DEFAULT_EPS):
  """Every query sees every (unmasked) key: y_i = phi(q_i) S_T / (phi(q_i) z_T + eps)."""
  _check(phi_q_BTHF, phi_k_BTHF, v_BTHK, eps=eps, key_mask_BT=key_mask_BT)
  k = phi_k_BTHF.astype(jnp.float32)
  if key_mask_BT is not None:
    k = k * key_mask_BT[:, :, None, None]
  s = jnp.einsum("bshf,bshk->bhfk", k, v_BTHK.astype(jnp.float32))
  z = k.sum(1)
  num = jnp.einsum("bthf,bhfk->bthk", phi_q_BTHF, s)
  return (num / (jnp.einsum("bthf,bhf->bth", phi_q_BTHF, z)[..., None] + eps)).astype(v_BTHK.dtype)


def prefix_linear_attention(
  phi_q_BTHF,
  phi_kd_BTHF,
  vd_BTHK,
  phi_ke_BTHF,
  ve_BTHK,
  prefix_len: int,
  *,
  key_mask_BT: jax.Array | None = None,
  chunk: int = 64,
  eps: float = DEFAULT_EPS,
) -> tuple[jax.Array, State]:
  """JRT's PLA (Eq. 3): all M encoder keys for every query plus causal decoder keys.

  The encoder is each row's first M real tokens: with `key_mask_BT` (False at padding) a
  left-padded row's encoder starts at its first real token, so a row's result does not
  depend on the batch's width. Other encoder keys and masked keys are zeroed. Returns
  (y [B, T, H, K], the recurrent state after the last token), so decoding continues with
  `decode_step`. The state after the prompt alone is Eq. 4's s_M, z_M.
  """
  _check(phi_q_BTHF, phi_kd_BTHF, vd_BTHK, eps=eps, key_mask_BT=key_mask_BT)
  _check(phi_q_BTHF, phi_ke_BTHF, ve_BTHK)
  phi_kd, phi_ke = _prefix_keys(phi_kd_BTHF, phi_ke_BTHF, prefix_len, key_mask_BT)
  enc = State(jnp.einsum("bshf,bshk->bhfk", phi_ke, ve_BTHK.astype(jnp.float32)), phi_ke.sum(1))
  y, state = causal_chunked(phi_q_BTHF, phi_kd, vd_BTHK, chunk=chunk, eps=eps, state=enc)
  return y, state


def prefix_encoder_share(
  phi_q_BTHF, phi_kd_BTHF, phi_ke_BTHF, prefix_len: int, *, key_mask_BT: jax.Array | None = None
) -> jax.Array:
  """The encoder's share of PLA's denominator at each query, float32 [B, T, H]:

    phi(q_i) z_e / (phi(q_i) z_e + phi(q_i) sum_{j<=i} phi(k_d,j)),  z_e = sum_{j<=M} phi(k_e,j).

  The Taylor kernel phi(q).phi(k) = 1 + s + s^2/2 is >= 1/2, so the encoder's M keys add at
  least M / 2 to every denominator whatever the weights; near s = 0 (at initialisation) the
  share at position i is about M / (M + i + 1).
  """
  if phi_q_BTHF.shape != phi_kd_BTHF.shape or phi_q_BTHF.shape != phi_ke_BTHF.shape:
    raise ValueError(
      f"phi_q_BTHF, phi_kd_BTHF, phi_ke_BTHF: expected one shape, got {phi_q_BTHF.shape}, {phi_kd_BTHF.shape}, "
      f"{phi_ke_BTHF.shape}"
    )
  _check_mask(key_mask_BT, phi_q_BTHF.shape[:2])
  phi_kd, phi_ke = _prefix_keys(phi_kd_BTHF, phi_ke_BTHF, prefix_len, key_mask_BT)
  phi_q = phi_q_BTHF.astype(jnp.float32)
  enc_BTH = jnp.einsum("bthf,bhf->bth", phi_q, phi_ke.sum(1))
  dec_BTH = jnp.einsum("bthf,bthf->bth", phi_q, jnp.cumsum(phi_kd, axis=1))
  return enc_BTH / (enc_BTH + dec_BTH)


def _prefix_keys(phi_kd_BTHF, phi_ke_BTHF, prefix_len: int, key_mask_BT: jax.Array | None):
  """(decoder keys with padding zeroed, encoder keys outside each row's first M real tokens zeroed), float32."""
  time = phi_kd_BTHF.shape[1]
  if not isinstance(prefix_len, (int, np.integer)) or isinstance(prefix_len, bool) or not 0 < prefix_len <= time:
    raise ValueError(f"prefix_len: expected 0 < M <= T={time} (an int), got {prefix_len!r}")
  real_BT = jnp.ones(phi_kd_BTHF.shape[:2], bool) if key_mask_BT is None else key_mask_BT
  enc_keep_BT = real_BT & (jnp.cumsum(real_BT, axis=1) <= prefix_len)
  phi_kd = phi_kd_BTHF.astype(jnp.float32) * real_BT[:, :, None, None]
  return phi_kd, phi_ke_BTHF.astype(jnp.float32) * enc_keep_BT[:, :, None, None]


def short_conv(
  x_BTD: jax.Array, kernel_WD: jax.Array, state_BWD: jax.Array | None = None
) -> tuple[jax.Array, jax.Array]:
  """Causal depthwise convolution: y_t = sum_w kernel[w] x_{t - W + 1 + w}.

  `state_BWD` holds the W - 1 inputs before x (zeros at the start); returns (y, the new
  state), so a decode step is the same call with T = 1.
  """
  checks.check_array("x_BTD", x_BTD, 3, shape="[B, T, D]")
  checks.check_array("kernel_WD", kernel_WD, 2, shape="[W, D]")
  width = kernel_WD.shape[0]
  if width < 1 or kernel_WD.shape[1] != x_BTD.shape[-1]:
    raise ValueError(f"kernel_WD: expected [W >= 1, D={x_BTD.shape[-1]}], got {kernel_WD.shape}")
  if state_BWD is not None and tuple(state_BWD.shape) != (x_BTD.shape[0], width - 1, x_BTD.shape[-1]):
    raise ValueError(
      f"state_BWD: expected the W - 1 inputs before x, shape {(x_BTD.shape[0], width - 1, x_BTD.shape[-1])}, "
      f"got {tuple(state_BWD.shape)}"
    )
  if state_BWD is None:
    state_BWD = jnp.zeros((x_BTD.shape[0], width - 1, x_BTD.shape[-1]), x_BTD.dtype)
  full = jnp.concatenate([state_BWD, x_BTD], axis=1)
  time = x_BTD.shape[1]
  y = functools.reduce(jnp.add, (full[:, w : w + time] * kernel_WD[w] for w in range(width)))
  return y, full[:, full.shape[1] - (width - 1) :]


def base_conv(x_BTD, w_in_DD, w_gate_DD, kernel_WD, state_BWD=None) -> tuple[jax.Array, jax.Array]:
  """BaseConv (Based): a gated short convolution, y = (x W_gate) * conv(x W_in); returns (y, conv state)."""
  conv, state = short_conv(dense(x_BTD, w_in_DD), kernel_WD, state_BWD)
  return dense(x_BTD, w_gate_DD) * conv, state


def _check(phi_q_BTHF, phi_k_BTHF, v_BTHK, *, eps: float = DEFAULT_EPS, state=None, key_mask_BT=None) -> None:
  for name, x in (("phi_q_BTHF", phi_q_BTHF), ("phi_k_BTHF", phi_k_BTHF), ("v_BTHK", v_BTHK)):
    if not hasattr(x, "ndim") or not hasattr(x, "dtype"):
      raise TypeError(f"{name}: expected an array (jnp.asarray(...)), got {type(x).__name__}")
  if phi_q_BTHF.ndim != 4 or phi_q_BTHF.shape != phi_k_BTHF.shape:
    raise ValueError(f"phi_q_BTHF, phi_k_BTHF: expected one rank-4 shape, got {phi_q_BTHF.shape}, {phi_k_BTHF.shape}")
  if v_BTHK.ndim != 4 or v_BTHK.shape[:3] != phi_q_BTHF.shape[:3]:
    raise ValueError(f"v_BTHK: expected [B, T, H] = {phi_q_BTHF.shape[:3]}, got {v_BTHK.shape}")
  if not jnp.issubdtype(v_BTHK.dtype, jnp.floating):
    raise TypeError(f"v_BTHK: expected a floating dtype (y comes back in it), got {v_BTHK.dtype}")
  _check_eps(eps)
  batch, _, heads, features = phi_q_BTHF.shape
  _check_state(state, (batch, heads, features, v_BTHK.shape[-1]))
  _check_mask(key_mask_BT, phi_q_BTHF.shape[:2])


def _check_eps(eps) -> None:
  checks.check_scalar("eps", eps, checks.Range(low=0, low_open=True))  # it keeps the denominator away from 0


def _check_state(state: State | None, shape_BHFK: tuple[int, ...]) -> None:
  if state is None:
    return
  if not isinstance(state, State):
    raise TypeError(f"state: expected a linear_attention.State, got {type(state).__name__}")
  if tuple(state.s_BHFK.shape) != tuple(shape_BHFK) or tuple(state.z_BHF.shape) != tuple(shape_BHFK[:3]):
    raise ValueError(
      f"state: expected s [B, H, F, K] = {tuple(shape_BHFK)} and z {tuple(shape_BHFK[:3])}, got "
      f"{tuple(state.s_BHFK.shape)}, {tuple(state.z_BHF.shape)}"
    )


def _check_mask(key_mask_BT, shape_BT: tuple[int, ...]) -> None:
  if key_mask_BT is None:
    return
  checks.check_array("key_mask_BT", key_mask_BT, 2, shape="[B, T]")
  if key_mask_BT.dtype != jnp.bool_:
    raise TypeError(f"key_mask_BT: expected a bool mask (False at padding), got {key_mask_BT.dtype}")
  if tuple(key_mask_BT.shape) != tuple(shape_BT):
    raise ValueError(f"key_mask_BT: expected shape {tuple(shape_BT)}, got {tuple(key_mask_BT.shape)}")
