"""The scanned layer stack every model shares: remat policy, named scope, activation sites.

Shapes: L layers (blocks), B batch, T time, D model width.

A model's layers are stacked on a leading L axis and run with `lax.scan`, so compile time
does not grow with depth (unless they are unrolled, below). A layer body is
`layer(x_BTD, xs) -> (x_BTD, ys, acts)`, where `acts` maps the model's site kinds
(`hook_resid_pre`, `hook_attn_out`, ...) to [B, T, D] arrays. `scan_layers` keeps the kinds
that were asked for, stacked to [L, B, T, D]; the others are never materialised. Sites are
named as TransformerLens and SAELens name their hooks, `blocks.{l}.{kind}`, so an SAE
config's `hook_name` reads the same here.

Edits are the pure-function counterpart of TransformerLens' forward hooks: a mapping
{site name: fn([B, T, D]) -> [B, T, D]} whose fn replaces the activation at that site for
the rest of the pass (an SAE's reconstruction spliced in, a steering vector added). The
layer body calls `edit(by_kind, kind, layer_idx, x)` at each site; inside the scan the layer
index is traced, so each edit runs under `lax.cond` on it.

Unrolling: a scanned stack is one XLA while loop whose backward pass keeps each layer's
residuals in [L, ...] buffers, written and read one layer slice at a time. On XLA:CPU that
bookkeeping costs a sixth of a small model's gradient (the `small` Llama preset at B=8,
T=128: 336 ms scanned against 280 ms unrolled; `python -m paperjax.bench.llama
--only=llama.train_speed`). `unroll=True` writes the layers out instead: the same function
(float results can differ in the last bits), a compile that grows with depth, and no remat
policy (unrolled, XLA merges the recomputation back and keeps what remat would drop).
`LlamaConfig.unroll` passes it.

Remat policies name what the backward pass may keep instead of recomputing:
  "none"           keep every activation (no rematerialisation)
  "full"           keep nothing inside a layer; recompute it from the layer input
  "dots_saveable"  keep matmul outputs, recompute the elementwise work between them

A model whose `forward` continues from a state gets its one-token `decode` from
`decode_by_forward`.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

import jax

RematPolicy = Literal["none", "full", "dots_saveable"]
_POLICIES = {
  "full": jax.checkpoint_policies.nothing_saveable,
  "dots_saveable": jax.checkpoint_policies.dots_saveable,
}
REMAT_POLICIES: tuple[str, ...] = ("none", *_POLICIES)
_SITE = re.compile(r"blocks\.(\d+)\.(\w+)")


def check_remat(remat: str, unroll: bool = False) -> None:
  """Raises on an unknown policy, a non-bool `unroll`, or a policy with unrolled layers."""
  if remat not in REMAT_POLICIES:
    raise ValueError(f"remat: expected one of {REMAT_POLICIES}, got {remat!r}")
  if not isinstance(unroll, bool):
    raise TypeError(f"unroll: expected a bool, got {unroll!r}")
  if unroll and remat != "none":
    raise ValueError(
      f"unroll, remat: a remat policy needs the scan (unrolled, XLA merges the recomputation back into the "
      f"forward and keeps what remat would drop), got unroll=True with remat={remat!r}"
    )


def site_names(n_layers: int, kinds: Sequence[str]) -> tuple[str, ...]:
  """Every site of a stack: blocks.{l}.{kind} for l < L, layer-major."""
  return tuple(f"blocks.{layer}.{kind}" for layer in range(n_layers) for kind in kinds)


def parse_sites(sites: Sequence[str], n_layers: int, kinds: Sequence[str]) -> frozenset[str]:
  """The kinds a list of site names needs; raises on a name that is not a site of the stack."""
  if isinstance(sites, str):
    raise TypeError(f"sites: expected a sequence of site names, got the string {sites!r}")
  needed = set()
  for name in sites:
    if not isinstance(name, str):
      raise TypeError(f"sites: expected site names (str), got {type(name).__name__} {name!r}")
    match = _SITE.fullmatch(name)
    if not match or int(match[1]) >= n_layers or match[2] not in kinds:
      raise ValueError(
        f"sites: {name!r} is not a site of this model; expected 'blocks.<l>.<kind>' with l < {n_layers} "
        f"and kind in {tuple(kinds)}"
      )
    needed.add(match[2])
  return frozenset(needed)


Edit = Callable[[jax.Array], jax.Array]
Edits = Mapping[str, Edit]


def parse_edits(edits: Edits | None, n_layers: int, kinds: Sequence[str]) -> dict[str, tuple[tuple[int, Edit], ...]]:
  """{kind: ((layer, fn), ...)} of an edits mapping; raises on a name that is not a site of
  the stack or a value that is not callable."""
  if not edits:
    return {}
  if not isinstance(edits, Mapping):
    raise TypeError(f"edits: expected a mapping of site name -> function, got {type(edits).__name__}")
  parse_sites(list(edits), n_layers, kinds)
  by_kind: dict[str, list[tuple[int, Edit]]] = {}
  for name, fn in edits.items():
    if not callable(fn):
      raise TypeError(f"edits[{name!r}]: expected a function [B, T, D] -> [B, T, D], got {type(fn).__name__}")
    match = _SITE.fullmatch(name)
    assert match is not None  # parse_sites checked it
    by_kind.setdefault(match[2], []).append((int(match[1]), fn))
  return {kind: tuple(fns) for kind, fns in by_kind.items()}


def edit(
  by_kind: dict[str, tuple[tuple[int, Edit], ...]], kind: str, layer_idx: jax.Array, x_BTD: jax.Array
) -> jax.Array:
  """x_BTD after the edits of `kind` whose layer equals `layer_idx` (a traced scalar)."""
  for layer, fn in by_kind.get(kind, ()):

    def edited(x, fn=fn, layer=layer):
      y = fn(x)
      if y.shape != x.shape:
        raise ValueError(f"edits: the edit at blocks.{layer}.{kind} returned shape {y.shape}, expected {x.shape}")
      return y.astype(x.dtype)

    x_BTD = jax.lax.cond(layer_idx == layer, edited, lambda x: x, x_BTD)
  return x_BTD


def pick_sites(sites: Sequence[str], stacked: dict[str, jax.Array]) -> dict[str, jax.Array]:
  """{name: stacked[kind][l]} for each blocks.{l}.{kind} in `sites` (already parsed)."""
  picked = {}
  for name in sites:
    if not isinstance(name, str):
      raise TypeError(f"sites: expected site names (str), got {type(name).__name__} {name!r}")
    match = _SITE.fullmatch(name)
    assert match is not None, name  # parse_sites ran first
    picked[name] = stacked[match[2]][int(match[1])]
  return picked


def scan_layers(
  layer: Callable[[jax.Array, Any], tuple[jax.Array, Any, dict[str, jax.Array]]],
  x_BTD: Any,
  xs: Any,
  *,
  remat: RematPolicy = "none",
  unroll: bool = False,
  kinds: frozenset[str] = frozenset(),
  name: str = "layer",
) -> tuple[jax.Array, Any, dict[str, jax.Array]]:
  """x_L = layer_L(... layer_1(x_0)) over the leading L axis of `xs`.

  The carry x_BTD is the hidden state, or a tuple that starts with it and carries state a
  layer updates in place (Llama's paged KV pool).

  Returns (x after the last layer, the layers' ys stacked on L, {kind: [L, ...]} for each
  kind in `kinds`). Each layer body runs under `jax.named_scope(name)` and the `remat`
  policy. `unroll=True` writes the L layers out in the program (module docstring: a compile
  that grows with L, a faster backward pass on CPU, and no remat policy).
  """
  check_remat(remat, unroll)

  def body(x, xs):
    with jax.named_scope(name):
      x, ys, acts = layer(x, xs)
    return x, (ys, {kind: acts[kind] for kind in kinds})

  if remat != "none":
    body = jax.checkpoint(body, policy=_POLICIES[remat], prevent_cse=False)  # scan already prevents CSE
  x_BTD, (ys, acts) = jax.lax.scan(body, x_BTD, xs, unroll=unroll)
  return x_BTD, ys, acts


def decode_by_forward(forward: Any, params: Any, token_B: jax.Array, state: Any, cfg: Any) -> tuple[jax.Array, Any]:
  """`decode` for a model whose `forward` continues from a state: one token per row,
  (float32 logits [B, V], the state after it)."""
  if token_B.ndim != 1:
    raise ValueError(f"token_B: expected shape [B], got {token_B.shape}")
  logits_B1V, new_state = forward(params, token_B[:, None], cfg, state=state)
  if new_state is None:
    raise ValueError("state: forward returned no state to continue from")
  return logits_B1V[:, 0], new_state
