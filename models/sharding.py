"""Logical-axis sharding rules: data, FSDP and tensor parallelism on one device mesh.

Every parameter leaf and constrained activation names its dimensions with logical axes
(a model's `param_axes(cfg)`: "embed", "heads", "ffn", ...; activations: "act_batch",
"act_length", "act_embed", ...). A strategy is a table of rules mapping each logical
axis to mesh axes (or None: replicated). The mesh always has the axes MESH_AXES =
(data, fsdp, tensor, pipe); a strategy leaves the axes it does not use at size 1.

  dp       act_batch -> data                                 params replicated
  fsdp     act_batch -> (data, fsdp), embed -> fsdp          ZeRO-3: params, grads and
                                                             optimizer state split D-wise
  tp       act_batch -> data; heads, kv_heads, ffn, vocab -> tensor (Megatron: wq, wk, wv,
           w1, w3 split by output columns, wo, w2 by input rows; logits split by vocab)
  fsdp_tp  both
  pp       act_batch -> data, layers -> pipe (`models.parallel.pipeline`: stage s holds layers
           s L/S .. (s + 1) L/S - 1)

A logical name that a table does not map is an error, never a silent replication; so is
a mesh axis of size > 1 that no rule uses (its devices would repeat each other's work)
and a dimension the mesh does not divide.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import numpy as np
import optax
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor", "pipe")
MeshAxes = str | tuple[str, ...] | None
Rules = tuple[tuple[str, MeshAxes], ...]  # hashable: a static field of a model config

# Every logical axis a model's param_axes or an activation constraint may name.
PARAM_AXES = ("vocab", "embed", "embed_out", "layers", "heads", "kv_heads", "head_dim", "ffn", "conv", "feature")
ACTIVATION_AXES = ("act_batch", "act_length", "act_embed", "act_heads", "act_kv_heads", "act_ffn", "act_vocab")


def _table(**mapped: MeshAxes) -> Rules:
  unknown = set(mapped) - {*PARAM_AXES, *ACTIVATION_AXES}
  assert not unknown, unknown
  return tuple((name, mapped.get(name)) for name in (*PARAM_AXES, *ACTIVATION_AXES))


_TP = {
  name: "tensor" for name in ("heads", "kv_heads", "ffn", "vocab", "act_heads", "act_kv_heads", "act_ffn", "act_vocab")
}
RULES: dict[str, Rules] = {
  "dp": _table(act_batch="data"),
  "fsdp": _table(act_batch=("data", "fsdp"), embed="fsdp"),
  "tp": _table(act_batch="data", **_TP),
  "fsdp_tp": _table(act_batch=("data", "fsdp"), embed="fsdp", **_TP),
  "pp": _table(act_batch="data", layers="pipe"),
}


def make_mesh(
  *, data: int = 1, fsdp: int = 1, tensor: int = 1, pipe: int = 1, devices: Sequence[Any] | None = None
) -> Mesh:
  """A (data, fsdp, tensor, pipe) mesh over `devices` (default all), in auto-sharding mode."""
  sizes = {"data": data, "fsdp": fsdp, "tensor": tensor, "pipe": pipe}
  for name, size in sizes.items():
    if not isinstance(size, int) or size < 1:
      raise ValueError(f"{name}: expected a mesh axis size >= 1, got {size!r}")
  devices = jax.devices() if devices is None else list(devices)
  if math.prod(sizes.values()) != len(devices):
    raise ValueError(
      f"mesh: axis sizes {sizes} multiply to {math.prod(sizes.values())}, but there are {len(devices)} devices"
    )
  shape = tuple(sizes.values())
  return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(shape), devices=devices)


def _mesh_axes(rule: MeshAxes) -> tuple[str, ...]:
  return () if rule is None else (rule,) if isinstance(rule, str) else tuple(rule)


def spec(names: Sequence[str | None], rules: Rules) -> PartitionSpec:
  """The PartitionSpec of an array whose dimensions have logical `names` (None: replicated)."""
  table = dict(rules)
  used: set[str] = set()
  entries: list[MeshAxes] = []
  for name in names:
    if name is None:
      entries.append(None)
      continue
    if name not in table:
      raise ValueError(f"logical axis {name!r}: no sharding rule maps it; the rules cover {sorted(table)}")
    axes = _mesh_axes(table[name])
    if used & set(axes):
      raise ValueError(f"logical axes {tuple(names)}: mesh axes {sorted(used & set(axes))} would shard two dimensions")
    used |= set(axes)
    entries.append(None if not axes else axes[0] if len(axes) == 1 else axes)
  return PartitionSpec(*entries)


def check_mesh(mesh: Mesh, rules: Rules) -> None:
  """Raises if a mesh axis of size > 1 is used by no rule, or a rule names an axis the mesh lacks."""
  mapped = {axis for _, rule in rules for axis in _mesh_axes(rule)}
  missing = mapped - set(mesh.axis_names)
  if missing:
    raise ValueError(f"mesh: the rules use mesh axes {sorted(missing)}, which mesh {dict(mesh.shape)} lacks")
  idle = [axis for axis, size in mesh.shape.items() if size > 1 and axis not in mapped]
  if idle:
    raise ValueError(
      f"mesh: axis {idle[0]!r} has size {mesh.shape[idle[0]]} but no rule of this strategy shards over it "
      f"(its devices would repeat each other's work); rules use {sorted(mapped)}"
    )


def _is_names(x: Any) -> bool:
  return isinstance(x, tuple) and all(isinstance(n, str) or n is None for n in x)


def _check_divides(
  what: str, shape: Sequence[int], pspec: PartitionSpec, names: Sequence[str | None], mesh: Mesh
) -> None:
  for dim, (size, entry, name) in enumerate(zip(shape, pspec, names)):
    parts = math.prod(mesh.shape[a] for a in _mesh_axes(entry))
    if size % parts:
      raise ValueError(
        f"{what}: dimension {dim} ({name!r}, size {size}) is not divisible by mesh axes {_mesh_axes(entry)} "
        f"of total size {parts}"
      )


def param_shardings(params: Any, axes: Any, mesh: Mesh, rules: Rules) -> Any:
  """NamedShardings for every leaf of `params` (arrays or ShapeDtypeStructs) from its
  logical axes (`model.param_axes(cfg)`, same tree); raises on an unmapped logical name or a
  dimension the mesh does not divide."""
  check_mesh(mesh, rules)

  def one(path, names, leaf):
    where = jax.tree_util.keystr(path)
    if len(names) != len(leaf.shape):
      raise ValueError(f"param_axes{where}: {len(names)} names {names} for a leaf of shape {leaf.shape}")
    return named(mesh, names, rules, leaf.shape, f"params{where}")

  return jax.tree_util.tree_map_with_path(one, axes, params, is_leaf=_is_names)


def named(
  mesh: Mesh, names: Sequence[str | None], rules: Rules, shape: Sequence[int] | None = None, what: str = "array"
) -> NamedSharding:
  """The NamedSharding of an array with logical `names`; checks divisibility when `shape` is given."""
  pspec = spec(names, rules)
  if shape is not None:
    _check_divides(what, shape, pspec, names, mesh)
  return NamedSharding(mesh, pspec)


def shard(x: jax.Array, names: Sequence[str | None], rules: Rules) -> jax.Array:
  """An activation sharding constraint by logical names: nothing without rules or outside a
  mesh context (`jax.set_mesh`), so a model runs unchanged on one device."""
  if not rules or jax.sharding.get_abstract_mesh().empty:
    return x
  return jax.lax.with_sharding_constraint(x, spec(names, rules))


def put(tree: Any, shardings: Any) -> Any:
  """Host values (numpy or arrays, the same on every process) as global arrays with
  `shardings` (a tree prefix): each process fills only the shards it holds, so this
  works across processes too."""

  def one(x, sharding):
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])

  return jax.tree.map(one, tree, _broadcast(shardings, tree))


def _broadcast(prefix: Any, tree: Any) -> Any:
  """A tree-prefix of shardings expanded to the full structure of `tree`."""
  return jax.tree.map(
    lambda s, sub: jax.tree.map(lambda _: s, sub), prefix, tree, is_leaf=lambda s: isinstance(s, NamedSharding)
  )


class Shardings(NamedTuple):
  """What a sharded training step needs: the mesh and the state's and batch's shardings."""

  mesh: Mesh
  state: Any
  batch: Any


def batch_sharding(mesh: Mesh, rules: Rules) -> NamedSharding:
  """[B, T] arrays split over the rules' act_batch mesh axes."""
  return NamedSharding(mesh, spec(("act_batch", "act_length"), rules))


def check_batch(batch_size: int, mesh: Mesh, rules: Rules) -> None:
  """Raises unless the batch splits evenly over the act_batch mesh axes."""
  named(mesh, ("act_batch",), rules, (batch_size,), "batch")


def state_shardings(state: Any, axes: Any, mesh: Mesh, rules: Rules, tx: Any) -> Any:
  """Shardings of a `training.train.TrainState`: params by `axes`, every params-shaped
  optimizer buffer (Adam's moments) like its parameter, counters replicated."""
  params = param_shardings(state.params, axes, mesh, rules)
  replicated = NamedSharding(mesh, PartitionSpec())
  opt_state = optax.tree_map_params(
    tx, lambda _, s: s, state.opt_state, params, transform_non_params=lambda _: replicated
  )
  return state.replace(step=replicated, params=params, opt_state=opt_state)
