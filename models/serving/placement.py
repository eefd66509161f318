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

A mesh (`MeshPlacement`, Megatron tensor parallelism over kv heads): with T the size of the
mesh axes that `cfg.axis_rules` map "kv_heads" to (`sharding.RULES["tp"]`: the "tensor" axis),
device t holds

  the pools' kv heads    g in [t G / T, (t + 1) G / T)        [G / T, L * P, S, K] each
  wq, wk, wv (columns)   heads (wq: H / T, wk and wv: G / T)  Megatron: attention is local to
  wo (rows)              heads H / T                          a device's heads, one all-reduce
  w1, w3 / w2            ffn columns / rows E / T             after wo and one after w2
  embed, unembed         vocab rows / columns V / T
  norms                  replicated

so a device holds 1/T of the pools and about 1/T of the weights (`device_bytes`). The mesh
context (`jax.set_mesh`) turns on the activation constraints of `cfg.axis_rules`; inputs are
replicated global arrays, built with `sharding.put` (each process fills its own devices'
copies), and outputs are read from a process's own copy, so the same program runs across
processes (`models.serving.spmd`). The donated pools come back with the same sharding
(tests/models/serving/test_engine_mesh.py checks it), so no call reshards them.
"""

from __future__ import annotations

import collections
import contextlib
import math
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from paperjax.models import sharding
from paperjax.models.transformer import llama

POOL_AXES = ("kv_heads", None, None, None)  # [G, L * P, S, K]: split by kv head only


class Placement:
  """The identity placement: one device, one process."""

  def params(self, params: dict) -> dict:
    return params

  def pools(self, k_pages_GPSK: jax.Array, v_pages_GPSK: jax.Array) -> tuple[jax.Array, jax.Array]:
    return k_pages_GPSK, v_pages_GPSK

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

  def pools(self, k_pages_GPSK: jax.Array, v_pages_GPSK: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The pools [G, L * P, S, K] split over G (each device holds its kv heads' pages)."""
    for name, pool in (("k_pages_GPSK", k_pages_GPSK), ("v_pages_GPSK", v_pages_GPSK)):
      if np.ndim(pool) != 4 or np.shape(pool)[0] != self.cfg.n_kv_heads:
        raise ValueError(
          f"{name}: expected a pool [G={self.cfg.n_kv_heads}, L * P, S, K] (llama.init_pages), got shape "
          f"{np.shape(pool)}"
        )
    return sharding.put(k_pages_GPSK, self.pool_sharding), sharding.put(v_pages_GPSK, self.pool_sharding)

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


def on_mesh(mesh: Mesh, cfg: llama.LlamaConfig) -> MeshPlacement:
  """`MeshPlacement(mesh, cfg)`."""
  return MeshPlacement(mesh, cfg)


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
