"""Where the engine's arrays live: one device (the default) or a mesh.

`Placement` is what `engine.Engine` calls for every array it hands the device and every
output it reads back, so the scheduling code is the same on one device, on a mesh, and on a
mesh spanning several processes (each process runs the same engine on the same requests):

  params(params)          once: the weights
  pools(k_GPSK, v_GPSK)   once: the K/V pools [G, L * P, S, K]
  host(x)                 every numpy input of a model call (the same value on every process)
  fetch(x)                every output read back (small, replicated)
  context()               entered around every model call

One device (`Placement`): every method is the identity (numpy inputs go to the default device).

A mesh (`MeshPlacement`, Megatron tensor parallelism over kv heads): with M the size of the
mesh axes that `cfg.axis_rules` map "kv_heads" to (`sharding.RULES["tp"]`: the "tensor" axis),
device m holds

  the pools' kv heads    g in [m G / M, (m + 1) G / M)        [G / M, L * P, S, K] each
  wq, wk, wv (columns)   heads (wq: H / M, wk and wv: G / M)  attention is local to a device's
  wo (rows)              heads H / M                          kv groups (H / G query heads each)
  w1, w3 / w2            ffn columns / rows E / M
  embed, unembed         vocab rows / columns V / M
  norms                  replicated

so a device holds 1/M of the pools and about 1/M of the weights (`device_bytes`), and a model
call's collectives are all-reduces of [N, D] token activations (after wo and w2 in every
layer, and the vocab-split embedding lookup) and the vocab-split argmax's all-gather of each
shard's best; K/V pages never cross devices. The mesh context (`jax.set_mesh`) turns on the
activation constraints of `cfg.axis_rules`; inputs are replicated global arrays built with
`sharding.put` (each process fills its own devices' copies), and outputs are read from a
process's own copy, so the same program runs across processes (`models.serving.spmd`). The
donated pools come back with the sharding they went in with, so no call reshards them or
compiles twice (tests/models/serving/test_engine_mesh.py checks all of this).

Shapes: G kv heads, P pages (L * pages of the pool), S page slots, K head dim.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from paperjax.models import sharding
from paperjax.models.transformer import llama

POOL_AXES = ("kv_heads", None, None, None)  # [G, L * P, S, K]: split by kv head only
Pool = jax.Array | jax.ShapeDtypeStruct  # a pool, or the shape and dtype of an empty (zero) one


class Placement:
  """The identity placement: one device, one process."""

  def params(self, params: dict) -> dict:
    return params

  def pools(self, k_pages_GPSK: Pool, v_pages_GPSK: Pool) -> tuple[jax.Array, jax.Array]:
    """The pools on the device; a jax.ShapeDtypeStruct stands for zeros of its shape and dtype."""
    return _zeros(k_pages_GPSK, None), _zeros(v_pages_GPSK, None)

  def host(self, x: np.ndarray) -> Any:
    """A host input of a model call (the same value on every process)."""
    return x

  def fetch(self, x: jax.Array) -> np.ndarray:
    """A model call's (replicated) output on the host."""
    return np.asarray(x)

  def context(self) -> contextlib.AbstractContextManager:
    """Entered around every model call (a mesh sets itself here)."""
    return contextlib.nullcontext()


class MeshPlacement(Placement):
  """Tensor parallelism over kv heads on `mesh` (module docstring), for the model `cfg`.

  `cfg.axis_rules` name the strategy (`sharding.RULES["tp"]`); the engine must be given the
  same `cfg`, so its model calls constrain activations by these rules inside `context()`
  (outside a mesh context the rules do nothing, so the one-device engine runs the same cfg).
  Raises ValueError at construction, naming the dimension and the mesh axes, when the mesh
  does not divide the kv heads G, the query heads H, the FFN width E or the vocabulary V, or
  has a data or other axis of size > 1 (the engine splits over kv heads only).
  """

  def __init__(self, mesh: Mesh, cfg: llama.LlamaConfig):
    if not isinstance(mesh, Mesh):
      raise TypeError(f"mesh: expected a jax.sharding.Mesh (sharding.make_mesh), got {type(mesh).__name__}")
    if not isinstance(cfg, llama.LlamaConfig):
      raise TypeError(f"cfg: expected a llama.LlamaConfig, got {type(cfg).__name__}")
    rules = cfg.axis_rules
    if not rules:
      raise ValueError(
        "cfg.axis_rules: expected the sharding rules of the mesh strategy, got () (no rules); use "
        "dataclasses.replace(cfg, axis_rules=sharding.RULES['tp']) for the placement and the engine"
      )
    sharding.check_mesh(mesh, rules)
    rule = dict(rules).get("kv_heads")
    split = () if rule is None else (rule,) if isinstance(rule, str) else tuple(rule)
    idle = {axis: size for axis, size in mesh.shape.items() if size > 1 and axis not in split}
    if idle:
      raise ValueError(
        f"mesh: axes {idle} have size > 1, but the engine splits only over the kv heads' mesh axes {split} "
        f"(cfg.axis_rules map 'kv_heads' to them); give those other axes size 1 (one engine per data replica)"
      )
    tensor = math.prod(mesh.shape[axis] for axis in split)
    if cfg.n_kv_heads % tensor:
      raise ValueError(
        f"mesh: cfg.n_kv_heads={cfg.n_kv_heads} kv heads (the pools' G axis) do not split over mesh axes "
        f"{split} of total size {tensor}; expected a size that divides {cfg.n_kv_heads}"
      )
    self.mesh, self.cfg, self.rules = mesh, cfg, rules
    # Every weight's sharding now, from the shapes alone: a mesh that does not divide H, E or V
    # raises here (naming the leaf, dimension and mesh axes), not at the engine's first call.
    self._param_shardings = sharding.param_shardings(llama.param_shapes(cfg), llama.param_axes(cfg), mesh, rules)
    # Trailing replicated dimensions dropped from the spec: P("tensor") is how XLA writes the
    # jitted call's output pools, and an input sharding that differs from it only in spelling
    # still compiles a second time (once for the fresh pools, once for the returned ones).
    pool_spec = sharding.named(mesh, POOL_AXES, rules).spec
    while pool_spec and pool_spec[-1] is None:
      pool_spec = PartitionSpec(*pool_spec[:-1])
    self.pool_sharding = NamedSharding(mesh, pool_spec)
    self.replicated = NamedSharding(mesh, PartitionSpec())

  def params(self, params: dict) -> dict:
    """The weights split by `llama.param_axes` under the rules (a fresh copy; the input stays)."""
    llama.check_params(params, self.cfg)
    if isinstance(params["layers"], tuple):
      raise ValueError(
        "params['layers']: expected one stack of float layers (llama.init), got segments (a quantized model); "
        "the mesh placement shards float weights only"
      )
    return sharding.put(params, self._param_shardings)

  def pools(self, k_pages_GPSK: Pool, v_pages_GPSK: Pool) -> tuple[jax.Array, jax.Array]:
    """The pools [G, L * P, S, K] split over G (each device holds its kv heads' pages). A
    jax.ShapeDtypeStruct stands for zeros, made on each device as its own shard: no device
    or host ever holds the whole pool (an array is copied through the host)."""
    for name, pool in (("k_pages_GPSK", k_pages_GPSK), ("v_pages_GPSK", v_pages_GPSK)):
      if len(pool.shape) != 4 or pool.shape[0] != self.cfg.n_kv_heads:
        raise ValueError(
          f"{name}: expected a pool [G={self.cfg.n_kv_heads}, L * P, S, K] (llama.init_pages), got shape {pool.shape}"
        )
    return self._pool(k_pages_GPSK), self._pool(v_pages_GPSK)

  def _pool(self, pool: Pool) -> jax.Array:
    if isinstance(pool, jax.ShapeDtypeStruct):
      return _zeros(pool, self.pool_sharding)
    return sharding.put(pool, self.pool_sharding)

  def host(self, x: np.ndarray) -> jax.Array:
    """x replicated on every device of the mesh; each process fills its own devices' copies
    from its own x, which must be the same on every process."""
    return sharding.put(x, self.replicated)

  def fetch(self, x: jax.Array) -> np.ndarray:
    """x on the host: a replicated output from this process's own copy (no transfer between
    processes); a split one gathered (`process_allgather`, a collective every process runs)."""
    if x.sharding.is_fully_replicated:
      return np.asarray(x.addressable_data(0))
    if x.is_fully_addressable:
      return np.asarray(x)
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))

  def context(self) -> contextlib.AbstractContextManager:
    """The mesh as the context mesh: `sharding.shard` applies cfg.axis_rules inside it."""
    return jax.set_mesh(self.mesh)


def _zeros(pool: Pool, where: NamedSharding | None) -> jax.Array:
  """`pool` itself, or zeros for a ShapeDtypeStruct (each device making its own shard)."""
  if not isinstance(pool, jax.ShapeDtypeStruct):
    return pool
  return jax.jit(functools.partial(jnp.zeros, pool.shape, pool.dtype), out_shardings=where)()


def device_bytes(tree: Any) -> dict[jax.Device, int]:
  """Bytes each of this process's devices holds of the arrays in `tree` (the engine's
  `params`, or its pools as a tuple): sum over leaves of each addressable shard's nbytes. A
  replicated leaf counts on every device; one on one device counts there only."""
  held: collections.Counter = collections.Counter()
  for leaf in jax.tree.leaves(tree):
    if not isinstance(leaf, jax.Array):
      raise TypeError(f"tree: expected jax.Array leaves, got {type(leaf).__name__}")
    for shard in leaf.addressable_shards:
      held[shard.device] += shard.data.nbytes
  return dict(held)
