"""Judging and using a trained SAE: reconstruction metrics, splicing, features, steering.

Shapes: B batch rows, T time, N tokens (rows of flattened activations), D the site's width,
F dictionary features, V vocabulary.

  L0                  = mean_N #{f : f_NF != 0}
  explained variance  = 1 - sum_N ||x - x_hat||^2 / sum_N ||x - mean_N x||^2
                        (= 1 - E||x - x_hat||^2 / (E||x||^2 - ||E x||^2))
  loss recovered      = (CE_zero - CE_spliced) / (CE_zero - CE_clean)
  KL                  = mean over positions of KL(p_clean || p_spliced)

Splicing and steering run the model with `edits` at the SAE's site (`models.stack`): the
reconstruction x_hat replaces x, zeros replace x (zero ablation), or x + scale * W_dec[f]
replaces x (steering); the model is a Llama (`models.transformer.llama`, whose forward takes
`edits`). SAE parameters here are in the activations' own units (`sae.fold_scale` applied).
"""

from __future__ import annotations

import functools
import numbers
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from paperjax.interp import sae
from paperjax.models import protocol
from paperjax.models.transformer import llama
from paperjax.ops import checks


def explained_variance(x_ND: jax.Array, x_hat_ND: jax.Array) -> jax.Array:
  """1 - sum ||x - x_hat||^2 / sum ||x - mean x||^2 over the N rows (module docstring)."""
  if x_ND.ndim != 2:
    raise ValueError(f"x_ND: expected activations [N, D], got shape {x_ND.shape}")
  if x_hat_ND.shape != x_ND.shape:
    raise ValueError(f"x_hat_ND: expected the shape of x_ND {x_ND.shape}, got {x_hat_ND.shape}")
  total = jnp.sum((x_ND - jnp.mean(x_ND, axis=0)) ** 2)
  return 1.0 - jnp.sum((x_ND - x_hat_ND) ** 2) / total


def firing_frequency(f_NF: Any) -> np.ndarray:
  """The fraction of the N rows on which each feature is nonzero, float64 [F]."""
  if np.ndim(f_NF) != 2:
    raise ValueError(f"f_NF: expected features [N, F], got shape {np.shape(f_NF)}")
  return np.asarray(np.mean(np.asarray(f_NF) != 0, axis=0, dtype=np.float64))


class Reconstruction(NamedTuple):
  l0: float
  mse: float  # mean_N sum_D (x - x_hat)^2
  explained_variance: float
  dead: float  # fraction of features that never fired on these rows
  dense: float  # fraction firing on more than `dense_above` of the rows
  frequency_F: np.ndarray


def reconstruction(
  params: dict, cfg: sae.SAEConfig, x_ND: Any, *, dense_above: float = 0.1, chunk: int = 8192
) -> Reconstruction:
  """Reconstruction metrics of an SAE over activations x_ND (module docstring)."""
  sae.check_params(params, cfg)
  x_ND = np.asarray(x_ND)
  sae.check_input(x_ND, cfg, name="x_ND")  # on the host: every value is checked
  x_ND = x_ND.astype(np.float32)
  if len(x_ND) == 0:
    raise ValueError(f"x_ND: expected at least one row, got shape {x_ND.shape}")
  if not 0 < dense_above < 1:
    raise ValueError(f"dense_above: expected a fraction in (0, 1), got {dense_above}")
  if not isinstance(chunk, (int, np.integer)) or isinstance(chunk, bool) or chunk < 1:
    raise ValueError(f"chunk: expected an int >= 1, got {chunk!r}")
  f_parts, x_hat_parts = [], []
  for start in range(0, len(x_ND), chunk):
    f_NF, x_hat_ND = _encode_decode(params, jnp.asarray(x_ND[start : start + chunk]), sae.inference_config(cfg))
    f_parts.append(np.asarray(f_NF))
    x_hat_parts.append(np.asarray(x_hat_ND))
  f_NF, x_hat_ND = np.concatenate(f_parts), np.concatenate(x_hat_parts)
  freq_F = firing_frequency(f_NF)
  return Reconstruction(
    l0=float(np.mean(np.sum(f_NF != 0, axis=-1))),
    mse=float(np.mean(np.sum((x_hat_ND - x_ND) ** 2, axis=-1, dtype=np.float64))),
    explained_variance=float(explained_variance(jnp.asarray(x_ND, jnp.float32), jnp.asarray(x_hat_ND))),
    dead=float(np.mean(freq_F == 0)),
    dense=float(np.mean(freq_F > dense_above)),
    frequency_F=freq_F,
  )


@functools.partial(jax.jit, static_argnums=2)
def _encode_decode(params, x_ND, cfg):
  f_NF = sae.encode(params, x_ND, cfg)
  return f_NF, sae.decode(params, f_NF)


def density_histogram(frequency_F: Any, *, bins: Sequence[float] = tuple(range(-8, 1))) -> tuple[np.ndarray, int]:
  """(counts per log10-frequency bin, dead count): the feature-density histogram over the
  edges `bins` (log10 of the firing frequency); features that never fired are counted apart."""
  freq_F = np.asarray(frequency_F, np.float64)
  if freq_F.ndim != 1:
    raise ValueError(f"frequency_F: expected firing frequencies [F], got shape {freq_F.shape}")
  checks.check_in("frequency_F", freq_F, 0.0, 1.0, what="fractions")
  checks.check_finite("frequency_F", freq_F)
  edges = np.asarray(bins, np.float64)
  if edges.ndim != 1 or edges.size < 2 or not (np.diff(edges) > 0).all():
    raise ValueError(f"bins: expected at least 2 increasing log10 edges, got {edges.tolist()}")
  alive = freq_F > 0
  counts, _ = np.histogram(np.log10(freq_F[alive]), bins=edges)
  return counts, int((~alive).sum())


class Splice(NamedTuple):
  ce_clean: float
  ce_spliced: float
  ce_zero: float
  loss_recovered: float
  kl: float  # KL(clean || spliced), nats per position


def splice(model_params: Any, model_cfg: Any, site: str, params: dict, cfg: sae.SAEConfig, tokens_BT: Any) -> Splice:
  """Next-token CE with x_hat spliced in at `site`, against the clean model and zero ablation
  (module docstring); CE is the mean over every position t >= 1 of tokens_BT. Loss recovered
  is NaN when zero ablation leaves the CE unchanged (the ratio is undefined)."""
  tokens_BT = _check(model_cfg, site, tokens_BT)
  _check_sae(params, cfg, model_cfg)
  if tokens_BT.shape[1] < 2:
    raise ValueError(f"tokens_BT: expected at least 2 tokens per row, got shape {tokens_BT.shape}")
  losses = _splice(model_params, params, tokens_BT, model_cfg, site, sae.inference_config(cfg))
  clean, spliced, zero, kl = (float(v) for v in losses)
  recovered = (zero - spliced) / (zero - clean) if zero != clean else float("nan")  # undefined: ablation is free
  return Splice(clean, spliced, zero, recovered, kl)


@functools.partial(jax.jit, static_argnums=(3, 4, 5))
def _splice(model_params, params, tokens_BT, model_cfg, site, cfg):
  def recon(x_BTD):
    return sae.reconstruct(params, x_BTD.reshape(-1, x_BTD.shape[-1]).astype(jnp.float32), cfg).reshape(x_BTD.shape)

  logits = {
    "clean": llama.forward(model_params, tokens_BT, model_cfg)[0],
    "spliced": llama.forward(model_params, tokens_BT, model_cfg, edits={site: recon})[0],
    "zero": llama.forward(model_params, tokens_BT, model_cfg, edits={site: jnp.zeros_like})[0],
  }
  ce = {
    k: jnp.mean(optax.softmax_cross_entropy_with_integer_labels(v[:, :-1], tokens_BT[:, 1:])) for k, v in logits.items()
  }
  logp_clean = jax.nn.log_softmax(logits["clean"][:, :-1], axis=-1)
  logp_spliced = jax.nn.log_softmax(logits["spliced"][:, :-1], axis=-1)
  kl = jnp.mean(jnp.sum(jnp.exp(logp_clean) * (logp_clean - logp_spliced), axis=-1))
  return ce["clean"], ce["spliced"], ce["zero"], kl


def _check_sae(params: dict, cfg: sae.SAEConfig, model_cfg: llama.LlamaConfig) -> None:
  sae.check_params(params, cfg)
  if cfg.d_in != model_cfg.dim:
    raise ValueError(f"cfg: the SAE reads d_in={cfg.d_in} activations, the model's sites have dim={model_cfg.dim}")


def _check_direction(direction_D: Any, model_cfg: llama.LlamaConfig) -> jax.Array:
  direction_D = jnp.asarray(direction_D, jnp.float32)
  if direction_D.shape != (model_cfg.dim,):
    raise ValueError(f"direction_D: expected a vector [D = {model_cfg.dim}], got shape {direction_D.shape}")
  checks.check_finite("direction_D", direction_D)
  return direction_D


def _check_scale(scale: Any) -> None:
  """A real scalar (python, numpy or jax), finite: through `checks`, so it also runs under `checks.checked`."""
  if isinstance(scale, (bool, np.bool_)) or not (isinstance(scale, numbers.Real) or hasattr(scale, "dtype")):
    raise TypeError(f"scale: expected a finite float, got {type(scale).__name__} {scale!r}")
  if jnp.ndim(scale) != 0:
    raise ValueError(f"scale: expected a finite float (a scalar), got shape {jnp.shape(scale)}")
  checks.check_finite("scale", scale)


def _check(model_cfg: Any, site: str, tokens_BT: Any) -> jax.Array:
  """tokens_BT as an array, once the model is a Llama and `site` one of its sites."""
  if not isinstance(model_cfg, llama.LlamaConfig):
    raise TypeError(f"model_cfg: expected a LlamaConfig (a forward that takes edits), got {type(model_cfg).__name__}")
  protocol.check_site(model_cfg, site)
  tokens_BT = jnp.asarray(tokens_BT)
  checks.check_tokens(tokens_BT, model_cfg.vocab_size)
  return tokens_BT


class Context(NamedTuple):
  feature: int
  activation: float
  row: int
  position: int
  text: str  # the context before the token, then the token itself in [[ ]]


def top_contexts(
  f_NF: Any,
  tokens_BT: Any,
  features: Sequence[int],
  decode: Callable[[np.ndarray], str],
  *,
  n: int = 5,
  before: int = 12,
) -> list[list[Context]]:
  """For each feature, the n tokens of tokens_BT where it is largest (f_NF holds the features
  of tokens_BT's tokens in row-major order), each with `before` tokens of context, as text by
  `decode` (ids -> str: a tokenizer's decode, or one that maps a compact vocabulary first)."""
  f_NF, tokens_BT = np.asarray(f_NF), np.asarray(tokens_BT)
  if tokens_BT.ndim != 2 or f_NF.ndim != 2:
    raise ValueError(f"tokens_BT, f_NF: expected [B, T] and [N, F], got shapes {tokens_BT.shape}, {f_NF.shape}")
  for name, value, low in (("n", n, 1), ("before", before, 0)):
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < low:
      raise ValueError(f"{name}: expected an int >= {low}, got {value!r}")
  if f_NF.shape[0] != tokens_BT.size:
    raise ValueError(f"f_NF: expected one row per token of tokens_BT ({tokens_BT.size}), got {f_NF.shape[0]}")
  time = tokens_BT.shape[1]
  out = []
  for feature in features:
    if not isinstance(feature, (int, np.integer)) or not 0 <= feature < f_NF.shape[1]:
      raise ValueError(f"features: expected ids in [0, {f_NF.shape[1]}), got {feature}")
    top = np.argsort(-f_NF[:, feature], kind="stable")[:n]
    rows = []
    for index in top:
      row, pos = divmod(int(index), time)
      prefix = decode(tokens_BT[row, max(0, pos - before) : pos])
      token = decode(tokens_BT[row, pos : pos + 1])
      rows.append(Context(feature, float(f_NF[index, feature]), row, pos, f"{prefix}[[{token}]]"))
    out.append(rows)
  return out


def steer(direction_D: Any, scale: float | jax.Array):
  """The edit x -> x + scale * direction (Anthropic's feature steering at one site).

  Value checks (finite direction and scale) run on concrete inputs, or inside
  `ops.checks.checked`."""
  direction_D = jnp.asarray(direction_D, jnp.float32)
  if direction_D.ndim != 1:
    raise ValueError(f"direction_D: expected a vector [D], got shape {direction_D.shape}")
  checks.check_finite("direction_D", direction_D)
  _check_scale(scale)

  def edit(x_BTD: jax.Array) -> jax.Array:
    if x_BTD.shape[-1] != direction_D.shape[0]:
      raise ValueError(f"direction_D: expected the site's width {x_BTD.shape[-1]}, got {direction_D.shape[0]}")
    return x_BTD + scale * direction_D.astype(x_BTD.dtype)

  return edit


class Steering(NamedTuple):
  promoted: np.ndarray  # the n token ids whose log-probability rose most on the first half
  p_clean: float  # their total probability on the second half's positions, clean
  p_steered: float  # and steered


def steering_effect(
  model_params: Any, model_cfg: Any, site: str, direction_D: Any, scale: float, tokens_BT: Any, *, n: int = 10
) -> Steering:
  """The tokens a direction promotes and how much steering raises them, measured on held-out
  rows: the n tokens with the largest mean rise in log-probability on the first half of the
  rows are chosen, and their total probability is compared, clean vs steered, on the rest."""
  tokens_BT = _check(model_cfg, site, tokens_BT)
  if tokens_BT.shape[0] < 2:
    raise ValueError(
      f"tokens_BT: expected at least 2 rows (choose on one half, measure on the other), got {tokens_BT.shape}"
    )
  if not isinstance(n, (int, np.integer)) or isinstance(n, bool) or not 1 <= n <= model_cfg.vocab_size:
    raise ValueError(f"n: expected an int in [1, {model_cfg.vocab_size}] (token ids to promote), got {n!r}")
  _check_scale(scale)
  half = tokens_BT.shape[0] // 2
  direction_D = _check_direction(direction_D, model_cfg)
  rise_V, _, _ = _steer(model_params, tokens_BT[:half], direction_D, jnp.float32(scale), model_cfg, site)
  promoted_V = np.zeros(model_cfg.vocab_size, bool)
  promoted = np.argsort(-np.asarray(rise_V), kind="stable")[:n]
  promoted_V[promoted] = True
  _, p_clean_V, p_steered_V = _steer(model_params, tokens_BT[half:], direction_D, jnp.float32(scale), model_cfg, site)
  mass = lambda p_V: float(np.asarray(p_V)[promoted_V].sum())
  return Steering(promoted, mass(p_clean_V), mass(p_steered_V))


@functools.partial(jax.jit, static_argnums=(4, 5))
def _steer(model_params, tokens_BT, direction_D, scale, model_cfg, site):
  """(mean rise of log p per token [V], mean clean p [V], mean steered p [V]) over positions."""
  edits = {site: steer(direction_D, scale)}
  logp_clean = jax.nn.log_softmax(llama.forward(model_params, tokens_BT, model_cfg)[0], axis=-1)
  logp_steered = jax.nn.log_softmax(llama.forward(model_params, tokens_BT, model_cfg, edits=edits)[0], axis=-1)
  mean = lambda a: jnp.mean(a.reshape(-1, a.shape[-1]), axis=0)
  return mean(logp_steered - logp_clean), mean(jnp.exp(logp_clean)), mean(jnp.exp(logp_steered))


def steered_greedy(
  model_params: Any, model_cfg: Any, prompt_BT: Any, max_new_tokens: int, site: str, direction_D: Any, scale: float
) -> jax.Array:
  """Greedy continuation [B, max_new_tokens] of equal-length prompts with x + scale * direction
  at `site` on every position (the prefix is recomputed each step, so the edit reaches every
  position as a hook does; scale 0 is the clean model)."""
  prompt_BT = _check(model_cfg, site, prompt_BT)
  if not isinstance(max_new_tokens, (int, np.integer)) or isinstance(max_new_tokens, bool) or max_new_tokens < 1:
    raise ValueError(f"max_new_tokens: expected >= 1, got {max_new_tokens!r}")
  if prompt_BT.shape[1] + max_new_tokens > model_cfg.max_seq_len:
    raise ValueError(
      f"max_new_tokens: prompt length {prompt_BT.shape[1]} + {max_new_tokens} new tokens exceed "
      f"max_seq_len={model_cfg.max_seq_len}"
    )
  _check_scale(scale)
  direction_D = _check_direction(direction_D, model_cfg)
  return _greedy(model_params, prompt_BT, direction_D, jnp.float32(scale), model_cfg, site, int(max_new_tokens))


@functools.partial(jax.jit, static_argnums=(4, 5, 6))
def _greedy(model_params, prompt_BT, direction_D, scale, model_cfg, site, max_new_tokens):
  batch, time = prompt_BT.shape
  buf_BT = jnp.concatenate([prompt_BT, jnp.zeros((batch, max_new_tokens), prompt_BT.dtype)], axis=1)
  edits = {site: steer(direction_D, scale)}

  def body(i, buf_BT):
    logits_BTV = llama.forward(model_params, buf_BT, model_cfg, edits=edits)[0]  # causal: later slots do not matter
    next_B = jnp.argmax(logits_BTV[:, time + i - 1], axis=-1).astype(buf_BT.dtype)
    return buf_BT.at[:, time + i].set(next_B)

  return jax.lax.fori_loop(0, max_new_tokens, body, buf_BT)[:, time:]
