"""Reward models: a scalar head on a Llama trunk and the Bradley-Terry loss.

Shapes: B batch, T time, D width.

  r(x, y) = h_last . w + b,   h_last = final hidden state of the last non-padding token
  L = -mean log sig(r_c - r_r - m) + c * mean((r_c + r_r)^2)

m is an optional per-pair margin (Llama 2: by preference strength, `LLAMA2_MARGINS`;
Llama 3 dropped it), c the reward-centering weight. Accuracy = share of pairs with
r_c > r_r. Ranked responses (edited > chosen > rejected) become every ordered pair.
"""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np

from paperjax.models.transformer import llama
from paperjax.ops import checks

LLAMA2_MARGINS = {
  "significantly better": 1.0,
  "better": 2 / 3,
  "slightly better": 1 / 3,
  "negligibly better": 0.0,
}


def init(key: jax.Array, cfg: llama.LlamaConfig) -> dict:
  """{"model": Llama params, "head": {"w": [D] zeros, "b": 0}}: every reward starts at 0."""
  return {
    "model": llama.init(key, cfg),
    "head": {"w": jnp.zeros((cfg.dim,), jnp.float32), "b": jnp.zeros((), jnp.float32)},
  }


def rewards(params: dict, tokens_BT: jax.Array, lengths_B: jax.Array, cfg: llama.LlamaConfig) -> jax.Array:
  """float32 rewards [B] read at each row's last real token (index lengths - 1).

  Value checks (ids in [0, V), lengths in 1 .. T) run on concrete inputs, or inside
  `ops.checks.checked`."""
  if not isinstance(params, dict) or "model" not in params or "head" not in params:
    raise TypeError(f"params: expected reward.init's {{'model': ..., 'head': ...}}, got {type(params).__name__}")
  head = params["head"]
  if tuple(getattr(head.get("w"), "shape", ())) != (cfg.dim,) or tuple(getattr(head.get("b"), "shape", (0,))) != ():
    raise ValueError(
      f"params['head']: expected w [{cfg.dim}] and a scalar b, got "
      f"{getattr(head.get('w'), 'shape', None)}, {getattr(head.get('b'), 'shape', None)}"
    )
  batch, time = checks.check_tokens(tokens_BT, cfg.vocab_size)
  lengths_B = checks.check_lengths(lengths_B, batch, time)
  hidden_BTD, _ = llama.forward_hidden(params["model"], tokens_BT, cfg)
  last_BD = hidden_BTD[jnp.arange(tokens_BT.shape[0]), lengths_B - 1].astype(jnp.float32)
  return last_BD @ params["head"]["w"] + params["head"]["b"]


def bradley_terry_loss(
  r_chosen_B: jax.Array, r_rejected_B: jax.Array, *, margin_B: jax.Array | None = None, centering: float = 0.0
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """-mean log sig(r_c - r_r - m) + centering * mean((r_c + r_r)^2), with accuracy and margin.

  Value checks (finite rewards and margins) run on concrete inputs, or inside `ops.checks.checked`."""
  for name, x in (("r_chosen_B", r_chosen_B), ("r_rejected_B", r_rejected_B), ("margin_B", margin_B)):
    if x is not None and (not hasattr(x, "dtype") or not jnp.issubdtype(x.dtype, jnp.floating)):
      raise TypeError(f"{name}: expected a float array [B], got {getattr(x, 'dtype', type(x).__name__)}")
  if r_chosen_B.shape != r_rejected_B.shape or r_chosen_B.ndim != 1:
    raise ValueError(f"r_chosen_B, r_rejected_B: expected one shape [B], got {r_chosen_B.shape}, {r_rejected_B.shape}")
  if margin_B is not None and margin_B.shape != r_chosen_B.shape:
    raise ValueError(f"margin_B: expected shape {r_chosen_B.shape}, got {margin_B.shape}")
  check_centering(centering)
  for name, x in (("r_chosen_B", r_chosen_B), ("r_rejected_B", r_rejected_B), ("margin_B", margin_B)):
    if x is not None:
      checks.check_finite(name, x)
  diff_B = r_chosen_B - r_rejected_B
  loss = -jnp.mean(jax.nn.log_sigmoid(diff_B - (0.0 if margin_B is None else margin_B)))
  if centering:
    loss = loss + centering * jnp.mean((r_chosen_B + r_rejected_B) ** 2)
  return loss, {"accuracy": jnp.mean((diff_B > 0).astype(jnp.float32)), "margin": jnp.mean(diff_B)}


def check_centering(centering: float) -> None:
  """Raises unless `centering` (the reward-centering weight) is a float >= 0."""
  if isinstance(centering, bool) or not isinstance(centering, (int, float, np.integer, np.floating)):
    raise TypeError(f"centering: expected a float >= 0, got {type(centering).__name__} {centering!r}")
  if not centering >= 0:  # NaN fails too
    raise ValueError(f"centering: expected >= 0, got {centering}")


def ranked_pairs(num_ranked: int) -> list[tuple[int, int]]:
  """(better, worse) index pairs of responses ranked best first: 3 -> (0,1), (0,2), (1,2)."""
  if not isinstance(num_ranked, (int, np.integer)) or isinstance(num_ranked, bool):
    raise TypeError(f"num_ranked: expected an int >= 2, got {type(num_ranked).__name__} {num_ranked!r}")
  if num_ranked < 2:
    raise ValueError(f"num_ranked: need at least 2 ranked responses, got {num_ranked}")
  return list(itertools.combinations(range(num_ranked), 2))
