"""The engine on a mesh (issue 32, item 6): tensor parallelism over kv heads on the 8 host CPU
devices gives the one-device engine's outputs (greedy, and sampled with the same keys), with
the pools and weights split across devices and only Megatron's collectives in a model call;
bad meshes raise; and 2 processes of 4 devices serve SPMD as one.

Every engine here serves `spmd.CFG` (8 kv heads, tensor axis 8) with `spmd.ENGINE_CFG` on
`spmd.requests()`, so the in-process engines and the launched job share one model, one trace
and the compiled shapes."""

import dataclasses
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from paperjax.models import sharding
from paperjax.models.serving import placement, spmd
from paperjax.models.transformer import llama

CFG, ECFG = spmd.CFG, spmd.ENGINE_CFG


@pytest.fixture(scope="module")
def one_device():
  return spmd.serve(placement.Placement())


@pytest.fixture(scope="module")
def on_mesh():
  place = spmd.mesh_placement()
  outputs, eng = spmd.serve(place)
  return outputs, eng, place


def test_mesh_outputs_equal_one_device(one_device, on_mesh):
  requests = spmd.requests()
  # The trace is mixed: more requests than rows, prompts longer than a prefill chunk, greedy
  # and sampled requests (keys and sampling parameters are host inputs too), and requests
  # that end on the stop id before max_new_tokens as well as at it.
  assert len(requests) > ECFG.max_batch
  assert any(len(r.prompt) > ECFG.prefill_chunk for r in requests)
  assert {r.temperature > 0 for r in requests} == {True, False}
  expected, _ = one_device
  assert {r.id for r in requests} == set(expected)
  lengths = {r.id: (len(expected[r.id]), r.max_new_tokens) for r in requests}
  assert any(expected[i][-1] == spmd.STOP and n < m for i, (n, m) in lengths.items()), lengths
  assert any(n == m and spmd.STOP not in expected[i] for i, (n, m) in lengths.items()), lengths
  assert len({tuple(v) for v in expected.values()}) == len(expected)  # not one degenerate output
  outputs, eng, _ = on_mesh
  assert outputs == expected
  # Each call signature compiled once: the pools a call returns have the sharding it was given.
  assert 0 < eng.stats.compiles <= eng.stats.shapes, eng.stats


def test_pools_and_weights_are_split_over_kv_heads(one_device, on_mesh):
  _, one = one_device
  _, eng, place = on_mesh
  tensor = place.mesh.shape["tensor"]
  assert tensor == len(jax.devices()) == CFG.n_kv_heads == 8
  G, LP, S, K = one.k_pages_GPSK.shape
  for pool, reference in ((eng.k_pages_GPSK, one.k_pages_GPSK), (eng.v_pages_GPSK, one.v_pages_GPSK)):
    # Still split after the run: every call returned the donated pools with their sharding.
    assert pool.sharding == place.pool_sharding and pool.sharding.spec == jax.sharding.PartitionSpec("tensor")
    shards = sorted(pool.addressable_shards, key=lambda s: s.index[0].start)
    assert len({s.device for s in shards}) == tensor
    assert [s.data.shape for s in shards] == [(G // tensor, LP, S, K)] * tensor
    # Each device wrote its own kv heads' K/V, and they are the one-device engine's.
    assert float(np.abs(np.asarray(reference)).max()) > 0
    for g, s in enumerate(shards):
      np.testing.assert_allclose(np.asarray(s.data), np.asarray(reference)[g : g + 1], atol=2e-5)
  # Megatron: column-split wq, wk, wv, w1, w3 and the unembedding, row-split wo, w2 and the embedding.
  L, D, H, E, V = CFG.n_layers, CFG.dim, CFG.n_heads, CFG.ffn_dim, CFG.vocab_size
  shard_shapes = {
    "wq": (L, D, H // tensor, K),
    "wk": (L, D, G // tensor, K),
    "wv": (L, D, G // tensor, K),
    "wo": (L, H // tensor, K, D),
    "w1": (L, D, E // tensor),
    "w3": (L, D, E // tensor),
    "w2": (L, E // tensor, D),
    "attn_norm": (L, D),
    "mlp_norm": (L, D),
  }
  for name, shape in shard_shapes.items():
    assert {s.data.shape for s in eng.params["layers"][name].addressable_shards} == {shape}, name
  assert eng.params["embed"].addressable_shards[0].data.shape == (V // tensor, D)
  assert eng.params["unembed"].addressable_shards[0].data.shape == (D, V // tensor)
  # Per-device bytes: the pools exactly 1/8, the weights 1/8 but for the replicated norms.
  pool_bytes = placement.device_bytes((eng.k_pages_GPSK, eng.v_pages_GPSK))
  one_pool_bytes = placement.device_bytes((one.k_pages_GPSK, one.v_pages_GPSK))
  assert list(one_pool_bytes.values()) == [2 * one.k_pages_GPSK.nbytes]
  assert set(pool_bytes) == set(jax.devices()) and set(pool_bytes.values()) == {2 * one.k_pages_GPSK.nbytes // 8}
  leaves = jax.tree.leaves(one.params)
  norms = 4 * (2 * L * D + D)  # attn_norm, mlp_norm, final_norm: float32, on every device
  assert list(placement.device_bytes(one.params).values()) == [sum(x.nbytes for x in leaves)]
  assert set(placement.device_bytes(eng.params).values()) == {(sum(x.nbytes for x in leaves) - norms) // 8 + norms}


def test_no_collective_moves_the_pool_or_its_pages(on_mesh):
  # The engine's packed model call (decode rows and prompt chunks in one `PackedPagedKVCache`
  # forward over the pools, then each row's argmax) compiled on the mesh: Megatron's
  # all-reduces of [N, D] token activations and the vocabulary-split argmax (an all-gather of
  # each shard's best scores) cross devices, nothing else: no collective carries the pools'
  # L * P axis or the K/V that the rows read, and the pools come back with their sharding.
  # (A pool split over pages or over the head dim passes the sharding checks, and fails here.)
  _, eng, place = on_mesh
  P = 8  # table width: the rows' K/V (R P S G K elements) are 9x the largest allowed collective
  widths = {ECFG.max_batch: 1, ECFG.prefill_rows: ECFG.prefill_chunk}  # rows: width

  @jax.jit
  def call(params, k_GPSK, v_GPSK, groups):
    rows = tuple(llama.PagedRows(tables, lengths, new, widths[len(new)]) for tables, lengths, new in groups)
    tokens_1N = jnp.zeros((1, sum(len(new) * widths[len(new)] for *_, new in groups)), jnp.int32)
    logits_1NV, after = llama.forward(params, tokens_1N, CFG, state=llama.PackedPagedKVCache(k_GPSK, v_GPSK, rows))
    assert isinstance(after, llama.PackedPagedKVCache)
    return logits_1NV.argmax(-1), after.k_pages_GPSK, after.v_pages_GPSK

  groups = [
    (np.zeros((rows, P), np.int32), np.zeros(rows, np.int32), np.full(rows, w, np.int32)) for rows, w in widths.items()
  ]
  with place.context():
    compiled = call.lower(eng.params, eng.k_pages_GPSK, eng.v_pages_GPSK, jax.tree.map(place.host, groups)).compile()
  hlo = compiled.as_text()
  assert hlo is not None
  collectives = _collectives(hlo)
  kinds = {kind for kind, _ in collectives}
  assert "all-reduce" in kinds and kinds <= {"all-reduce", "all-gather"}, collectives
  N = sum(rows * w for rows, w in widths.items())
  assert sum(widths) * P * ECFG.block_size * CFG.n_kv_heads * CFG.k >= 9 * N * CFG.dim
  for kind, shapes in collectives:
    size = sum(math.prod(shape) for shape in shapes)
    assert size <= (N * CFG.dim if kind == "all-reduce" else N * 8), collectives  # 8 shards: N best each
    assert not [shape for shape in shapes if CFG.n_layers * ECFG.num_blocks in shape], collectives  # L * P = 48
  assert all(s == place.pool_sharding for s in compiled.output_shardings[1:]), compiled.output_shardings


def _collectives(hlo: str) -> list[tuple[str, list[tuple[int, ...]]]]:
  """(kind, result shapes) of every cross-device op of compiled HLO text; a tuple result (an
  all-to-all of several arrays) lists each array, an async op counts at its start."""
  ops = "all-reduce|all-gather|all-to-all|collective-permute|collective-broadcast|reduce-scatter|ragged-all-to-all"
  found = []
  for result, kind in re.findall(rf"^\s*(?:ROOT )?%\S+ = (.+?) ({ops})(?:-start)?\(", hlo, re.M):
    shapes = [tuple(int(d) for d in dims.split(",") if d) for dims in re.findall(r"[a-z]+\d*\[([\d,]*)\]", result)]
    found.append((kind, shapes))
  return found


def test_host_inputs_are_replicated_and_fetch_reads_them(on_mesh):
  _, _, place = on_mesh
  x = np.arange(12, dtype=np.int32).reshape(3, 4)
  y = place.host(x)
  assert y.sharding.is_fully_replicated and len(y.addressable_shards) == 8
  np.testing.assert_array_equal(place.fetch(y), x)
  split = sharding.put(np.arange(16, dtype=np.int32), place.pool_sharding)  # not replicated: gathered
  np.testing.assert_array_equal(place.fetch(split), np.arange(16))
  # Model calls run under the mesh, where cfg.axis_rules constrain the activations.
  assert jax.sharding.get_abstract_mesh().empty
  with place.context():
    assert jax.sharding.get_abstract_mesh() == place.mesh.abstract_mesh


def test_empty_pools_are_made_split(on_mesh):
  # A ShapeDtypeStruct stands for an empty pool: each device makes its own [G / 8, ...] zeros,
  # so no device holds the whole pool; the identity placement makes them on one device.
  _, eng, place = on_mesh
  shape = jax.ShapeDtypeStruct(eng.k_pages_GPSK.shape, eng.k_pages_GPSK.dtype)
  k, v = place.pools(shape, shape)
  assert k.sharding == v.sharding == place.pool_sharding and k.shape == shape.shape and k.dtype == shape.dtype
  assert set(placement.device_bytes((k, v)).values()) == {2 * k.nbytes // 8}
  assert not np.asarray(k).any() and not np.asarray(v).any()
  k1, _ = placement.Placement().pools(shape, shape)
  assert k1.shape == shape.shape and list(placement.device_bytes(k1).values()) == [k1.nbytes]
  with pytest.raises(ValueError, match=r"v_pages_GPSK: expected a pool \[G=8, L \* P, S, K\].*\(4, 48, 4, 8\)"):
    place.pools(shape, jax.ShapeDtypeStruct((4, 48, 4, 8), shape.dtype))


def test_bad_meshes_raise():
  devices = jax.devices()
  with pytest.raises(ValueError, match=r"cfg.n_kv_heads=8 kv heads .* \('tensor',\) of total size 3"):
    placement.MeshPlacement(sharding.make_mesh(tensor=3, devices=devices[:3]), CFG)
  with pytest.raises(ValueError, match=r"axes \{'data': 2\} have size > 1.*\('tensor',\)"):
    placement.MeshPlacement(sharding.make_mesh(data=2, tensor=4), CFG)
  # The kv heads divide, the vocabulary does not: the leaf, dimension and mesh axes are named.
  odd_vocab = dataclasses.replace(CFG, vocab_size=66)
  with pytest.raises(ValueError, match=r"params\['embed'\]: dimension 0 \('vocab', size 66\).*\('tensor',\)"):
    placement.MeshPlacement(sharding.make_mesh(tensor=4, devices=devices[:4]), odd_vocab)
  odd_ffn = dataclasses.replace(CFG, ffn_dim=66)
  with pytest.raises(ValueError, match=r"params\['layers'\]\['w1'\]: dimension 2 \('ffn', size 66\)"):
    placement.MeshPlacement(sharding.make_mesh(tensor=4, devices=devices[:4]), odd_ffn)
  with pytest.raises(ValueError, match=r"cfg.axis_rules: expected the sharding rules .* got \(\)"):
    placement.MeshPlacement(sharding.make_mesh(tensor=8), dataclasses.replace(CFG, axis_rules=()))
  with pytest.raises(TypeError, match="mesh: expected a jax.sharding.Mesh"):
    placement.MeshPlacement(devices, CFG)  # type: ignore[arg-type]


def test_two_processes_serve_as_one(one_device):
  # 2 processes x 4 CPU devices (gloo over loopback), one tensor-8 mesh: each process runs
  # the same engine on the same requests and streams the one-device engine's tokens. The
  # first 4 requests (chunked prefill, a sampled one, a stop) keep the job's compiles few; a
  # request's tokens do not depend on its batch-mates, so they are the one-device run's.
  count = 4
  job = spmd.start(num_processes=2, local_devices=4, count=count)
  outputs, one = one_device
  expected = {r.id: outputs[r.id] for r in spmd.requests(count=count)}
  assert any(r.temperature > 0 for r in spmd.requests(count=count))
  results = job.results(timeout_s=300)
  spmd.check(results, expected)
  assert [r["process"] for r in results] == [0, 1]
  G, LP, S, K = one.k_pages_GPSK.shape
  for r in results:
    assert r["devices"] == 4
    assert r["pool_shards"] == [[G // 8, LP, S, K]] * 4  # each process holds half the kv heads
    assert r["pool_bytes"] == 2 * one.k_pages_GPSK.nbytes // 8
  with pytest.raises(AssertionError, match="process 1 generated"):  # the check can fail
    spmd.check([results[0], {**results[1], "outputs": {**results[1]["outputs"], "r0": []}}], expected)


def test_a_job_past_its_timeout_is_killed_and_raises():
  job = spmd.start(num_processes=2, local_devices=4)
  with pytest.raises(RuntimeError, match=r"spmd: the job ran past timeout_s=0.5; the workers were killed"):
    job.results(timeout_s=0.5)
  assert all(worker.poll() is not None for worker in job.workers)
  with pytest.raises(ValueError, match=r"num_processes, local_devices: 2 x 2 devices, expected 8"):
    spmd.start(num_processes=2, local_devices=2)
