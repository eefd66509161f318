"""Llama 3 dense decoder-only Transformer, as pure functions over a parameter pytree.

  h   = x + Attn(RMSNorm(x))          GQA, RoPE (theta 500000, optional 3.1 scaling)
  out = h + SwiGLU(RMSNorm(h))
  logits = RMSNorm(x_L) W_unembed     (float32)

Shapes: B batch, T time (new tokens), S cache slots (of a row, or of a page), D model width,
H query heads, G kv heads, K head dim, E MLP hidden width, V vocabulary, L layers, A = K / 2
RoPE angles, P pages (of a paged cache's pool, or a row's block-table entries), N tokens of
a packed call (`PackedPagedKVCache`).

A `models.protocol.DecodingModel`: one code path (`models.stack.scan_layers` over the L
stacked layers) serves training (no state), prefill and decode (a `KVCache` in and out):
new tokens of row b are written to cache slots lengths[b] .. lengths[b] + T - 1 and attend
causally over the slots before them. Parameters are stored in `param_dtype` and cast to
the compute `dtype` layer by layer (f32 master weights, bf16 compute); softmax, norms and
logits stay float32.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import operator
from collections.abc import Sequence
from typing import Annotated, Any

import jax
import jax.numpy as jnp
from flax import struct

from paperjax.models import sharding, stack
from paperjax.ops import attention, checks, mlp, norms, paged_attention, quant, rope
from paperjax.ops.dense import dense

# Logical axis names per parameter leaf; sharding rules map them to mesh axes.
_AXES = {
  "embed": ("vocab", "embed"),
  "layers": {
    "attn_norm": ("layers", "embed"),
    "wq": ("layers", "embed", "heads", "head_dim"),
    "wk": ("layers", "embed", "kv_heads", "head_dim"),
    "wv": ("layers", "embed", "kv_heads", "head_dim"),
    "wo": ("layers", "heads", "head_dim", "embed"),
    "mlp_norm": ("layers", "embed"),
    "w1": ("layers", "embed", "ffn"),
    "w3": ("layers", "embed", "ffn"),
    "w2": ("layers", "ffn", "embed"),
  },
  "final_norm": ("embed",),
  "unembed": ("embed", "vocab"),
}
# Activation sites per layer, in order (TransformerLens hook names).
SITE_KINDS = ("hook_resid_pre", "hook_attn_out", "hook_resid_mid", "hook_mlp_out", "hook_resid_post")


@checks.config
class LlamaConfig:
  """Model shape and numerics; hashable, so it is a static jit argument. Every field is
  checked for type and range at construction (`ops.checks.config`)."""

  vocab_size: checks.PositiveInt
  dim: checks.PositiveInt
  n_layers: checks.PositiveInt
  n_heads: checks.PositiveInt
  n_kv_heads: checks.PositiveInt
  ffn_dim: checks.PositiveInt
  head_dim: checks.PositiveInt | None = None  # default dim // n_heads
  rope_theta: Annotated[float, checks.Range(low=1, low_open=True)] = 500_000.0
  rope_scaling: rope.RopeScaling | None = dataclasses.field(
    default=None, metadata={"dict": "llama_import.config_from_hf reads a whole HF config.json dict"}
  )
  norm_eps: checks.PositiveFloat = 1e-5
  max_seq_len: checks.PositiveInt = 8192
  tie_embeddings: bool = False
  param_dtype: Any = "float32"  # how parameters are stored (and what the optimizer updates); a name or a dtype
  dtype: Any = "float32"  # compute: activations and the KV cache (softmax, norms and logits stay float32)
  remat: stack.RematPolicy = "none"  # what the backward pass recomputes (models.stack)
  unroll: bool = False  # write the layers out instead of one scan: faster on CPU, compile grows with L (models.stack)
  attention_impl: attention.Impl = "reference"  # training / KVCache; a PagedKVCache uses ops.paged_attention
  # Logical-axis rules of the activation constraints (`models.sharding.RULES[strategy]`);
  # () or no mesh in context: none.
  axis_rules: sharding.Rules = ()

  def __post_init__(self):
    if self.n_heads % self.n_kv_heads:
      raise ValueError(
        f"n_heads, n_kv_heads: query heads must be a multiple of kv heads, got {self.n_heads}, {self.n_kv_heads}"
      )
    if self.head_dim is None and self.dim % self.n_heads:
      raise ValueError(f"dim: {self.dim} is not divisible by n_heads={self.n_heads}; set head_dim")
    if self.k % 2:
      raise ValueError(f"head_dim: RoPE needs an even head dim, got {self.k}")
    for name in ("param_dtype", "dtype"):  # stored as the dtype's name: hashable, comparable
      try:
        dtype = jnp.dtype(getattr(self, name))
      except TypeError:
        raise TypeError(
          f"{name}: expected a float dtype or its name, such as 'bfloat16', got {getattr(self, name)!r}"
        ) from None
      if not jnp.issubdtype(dtype, jnp.floating):
        raise ValueError(f"{name}: expected a float dtype, got {dtype.name}")
      object.__setattr__(self, name, dtype.name)
    stack.check_remat(self.remat, self.unroll)

  @property
  def k(self) -> int:
    return self.dim // self.n_heads if self.head_dim is None else self.head_dim

  def num_params(self) -> int:
    return sum(math.prod(x.shape) for x in jax.tree.leaves(param_shapes(self)))

  def kv_cache_bytes_per_token(self, itemsize: int = 2) -> int:
    """2 (K and V) * L * G * K * bytes: GQA is H/G times smaller than MHA."""
    return 2 * self.n_layers * self.n_kv_heads * self.k * itemsize


_LLAMA31_SCALING = rope.RopeScaling(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position=8192)
_LLAMA31_8B = LlamaConfig(
  vocab_size=128_256,
  dim=4096,
  n_layers=32,
  n_heads=32,
  n_kv_heads=8,
  ffn_dim=14_336,
  rope_scaling=_LLAMA31_SCALING,
  max_seq_len=131_072,
  param_dtype="bfloat16",
  dtype="bfloat16",
)
PRESETS = {
  # Test and CPU-benchmark sizes.
  "tiny": LlamaConfig(vocab_size=256, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=128, max_seq_len=256),
  "small": LlamaConfig(vocab_size=4096, dim=256, n_layers=4, n_heads=8, n_kv_heads=2, ffn_dim=768, max_seq_len=1024),
  # Llama 3.1 shapes (parameter and KV-cache accounting; far too big to run here).
  "llama3_8b": _LLAMA31_8B,
  "llama3_70b": dataclasses.replace(_LLAMA31_8B, dim=8192, n_layers=80, n_heads=64, ffn_dim=28_672),
  "llama3_405b": dataclasses.replace(_LLAMA31_8B, dim=16_384, n_layers=126, n_heads=128, ffn_dim=53_248),
}


@struct.dataclass
class KVCache:
  """Keys and values of every layer at fixed slots; row b holds lengths_B[b] valid slots.

  The slot of a token is its index in the row's sequence, so causality is slot order.
  """

  k_LBSGK: jax.Array
  v_LBSGK: jax.Array
  lengths_B: jax.Array  # int32

  @property
  def capacity(self) -> int:
    return self.k_LBSGK.shape[2]


@struct.dataclass
class PagedKVCache:
  """Keys and values in pages of a shared pool (`ops.paged_attention`). The pools are
  [G, L * P, S, K]: layer l's pages are l * P .. l * P + P - 1, so every layer reads the one
  pool array (a per-layer slice would be copied before the kernel reads it). Token i of row b
  is at page l * P + block_tables_BP[b, i // S], slot i % S, in layer l; row b holds
  lengths_B[b] tokens. Built by the serving engine from its block manager
  (`models.serving.blocks`), whose block ids are the per-layer page ids."""

  k_pages_GPSK: jax.Array
  v_pages_GPSK: jax.Array
  block_tables_BP: jax.Array  # int32, per-layer page ids in [0, P)
  lengths_B: jax.Array  # int32

  @property
  def capacity(self) -> int:
    return self.block_tables_BP.shape[1] * self.k_pages_GPSK.shape[2]


@struct.dataclass
class PagedRows:
  """Rows of one width in a `PackedPagedKVCache`: block tables [B, P] (per-layer page ids),
  lengths [B] before the call, and num_new_B [B] <= width real tokens per row (the rest is
  padding, never written)."""

  block_tables_BP: jax.Array  # int32
  lengths_B: jax.Array  # int32
  num_new_B: jax.Array  # int32
  width: int = struct.field(pytree_node=False)  # T of these rows


@struct.dataclass
class PackedPagedKVCache:
  """A paged pool (as `PagedKVCache`) fed rows of different widths in one call: a serving
  step's decode rows (width 1) and prompt chunks (width T) together, with no padding of one
  kind to the other. The call's tokens are [1, N], N = sum over groups of B * width: group
  after group, each group's rows in order, row-major. Every per-token computation (the
  projections, the MLP) runs on the N tokens at once; attention runs group by group over
  each row's pages. A sequence has one row in one group: every group writes before any
  attends, but a row reads only its own row's tokens of this call."""

  k_pages_GPSK: jax.Array
  v_pages_GPSK: jax.Array
  groups: tuple[PagedRows, ...]

  @property
  def num_tokens(self) -> int:
    return sum(g.block_tables_BP.shape[0] * g.width for g in self.groups)


Cache = KVCache | PagedKVCache | PackedPagedKVCache


def init_pages(cfg: LlamaConfig, num_pages: int, page_size: int) -> tuple[jax.Array, jax.Array]:
  """Empty K and V pools [G, L * num_pages, S, K] in the compute dtype (`PagedKVCache`)."""
  num_pages, page_size = checks.check_int("num_pages", num_pages, 1), checks.check_int("page_size", page_size, 1)
  shape = (cfg.n_kv_heads, cfg.n_layers * num_pages, page_size, cfg.k)
  return jnp.zeros(shape, cfg.dtype), jnp.zeros(shape, cfg.dtype)  # two buffers: callers may donate both


def init_state(cfg: LlamaConfig, batch: int, capacity: int) -> KVCache:
  """An empty cache of `capacity` slots per row (lengths 0), in the compute dtype."""
  capacity = checks.check_int("capacity", capacity, 1, cfg.max_seq_len)
  batch = checks.check_int("batch", batch, 1)
  zeros = jnp.zeros((cfg.n_layers, batch, capacity, cfg.n_kv_heads, cfg.k), cfg.dtype)
  return KVCache(zeros, zeros, jnp.zeros((batch,), jnp.int32))


@functools.partial(jax.jit, static_argnums=1)  # one compilation instead of one per eager op and shape
def init(key: jax.Array, cfg: LlamaConfig) -> dict:
  """Parameters in param_dtype: truncated normal, std fan_in^-1/2 (residual outputs / sqrt(2L)), norms 1."""
  if not isinstance(cfg, LlamaConfig):
    raise TypeError(f"cfg: expected a LlamaConfig, got {type(cfg).__name__}")
  L, D, H, G, K, E, V = cfg.n_layers, cfg.dim, cfg.n_heads, cfg.n_kv_heads, cfg.k, cfg.ffn_dim, cfg.vocab_size
  keys = iter(jax.random.split(key, 9))
  residual = 1 / math.sqrt(2 * L)

  def normal(shape, fan_in, scale=1.0):
    std = scale / math.sqrt(fan_in)
    return (std * jax.random.truncated_normal(next(keys), -2, 2, shape, jnp.float32)).astype(cfg.param_dtype)

  params = {
    "embed": normal((V, D), 1),
    "layers": {
      "attn_norm": jnp.ones((L, D), cfg.param_dtype),
      "wq": normal((L, D, H, K), D),
      "wk": normal((L, D, G, K), D),
      "wv": normal((L, D, G, K), D),
      "wo": normal((L, H, K, D), H * K, residual),
      "mlp_norm": jnp.ones((L, D), cfg.param_dtype),
      "w1": normal((L, D, E), D),
      "w3": normal((L, D, E), D),
      "w2": normal((L, E, D), E, residual),
    },
    "final_norm": jnp.ones((D,), cfg.param_dtype),
    "unembed": normal((D, V), D),
  }
  if cfg.tie_embeddings:
    del params["unembed"]
  return params


def param_shapes(cfg: LlamaConfig) -> dict:
  """The tree of `init(key, cfg)` as jax.ShapeDtypeStructs."""
  return checks.init_shapes(init, cfg)


def check_params(params: dict, cfg: LlamaConfig) -> None:
  """Raises unless params has init(key, cfg)'s tree and leaf shapes, naming the leaf and both
  shapes. params["layers"] may be split into segments (`llama_quant`), whose leaves may be
  `ops.quant.QuantizedTensor`s; dtypes are free (forward casts to cfg.dtype). Shapes are
  static, so this holds under jit."""
  if not isinstance(cfg, LlamaConfig):
    raise TypeError(f"cfg: expected a LlamaConfig, got {type(cfg).__name__}")
  if not isinstance(params, dict):
    raise TypeError(f"params: expected the dict of llama.init(key, cfg), got {type(params).__name__}")
  if "layers" not in params:
    raise ValueError(f"params: expected the dict of llama.init(key, cfg), with 'layers'; got keys {sorted(params)}")
  expected = param_shapes(cfg)
  checks.check_tree("params", {k: v for k, v in params.items() if k != "layers"}, {**expected, "layers": None})
  segments = layer_segments(params, cfg)
  for start, stop, segment in segments:
    size = stop - start
    want = jax.tree.map(lambda x, n=size: jax.ShapeDtypeStruct((n, *x.shape[1:]), x.dtype), expected["layers"])
    name = "params['layers']" if len(segments) == 1 else f"params['layers'] (layers {start}..{stop - 1})"
    checks.check_tree(name, segment, want, is_leaf=lambda x: isinstance(x, quant.QuantizedTensor))


def param_axes(cfg: LlamaConfig) -> dict:
  """Logical axis names of every leaf of `init(key, cfg)`, in the same tree structure."""
  axes = {k: (dict(v) if isinstance(v, dict) else v) for k, v in _AXES.items()}
  if cfg.tie_embeddings:
    del axes["unembed"]
  return axes


def site_names(cfg: LlamaConfig) -> tuple[str, ...]:
  """blocks.{l}.{kind} for every layer l and kind in SITE_KINDS."""
  return stack.site_names(cfg.n_layers, SITE_KINDS)


def forward(
  params: dict, tokens_BT: jax.Array, cfg: LlamaConfig, *, state: Cache | None = None, **inputs
) -> tuple[jax.Array, Cache | None]:
  """Next-token logits (float32 [B, T, V]) and the updated cache (None without one).

  Without a state: causal attention over tokens_BT, restricted to equal `segment_ids_BT`
  when given (packed documents); `positions_BT` default to 0 .. T-1.
  With a state (a `KVCache`): tokens are written at slots lengths[b] + t and attend to
  every earlier slot; positions default to the slots; only the first `num_new_B[b]`
  tokens of row b (default all T) count, so right-padded prompts prefill together.
  A `PagedKVCache` works the same way through pages (`ops.paged_attention`): a chunk of new
  tokens attends causally over the row's pages, one token (decode) goes through the kernel
  on GPU; tokens past num_new_B are not written, so padded rows leave the pool untouched.
  `edits` ({site name: fn([B, T, D]) -> [B, T, D]}, see `models.stack`) replace the
  activation at each site for the rest of the pass: SAE splicing and steering.
  """
  logits_BTV, state, _ = forward_with_sites(params, tokens_BT, cfg, (), state=state, **inputs)
  return logits_BTV, state


def forward_with_sites(
  params: dict, tokens_BT: jax.Array, cfg: LlamaConfig, sites: Sequence[str], *, state: Cache | None = None, **inputs
) -> tuple[jax.Array, Cache | None, dict[str, jax.Array]]:
  """`forward` plus the activations [B, T, D] at `sites` (names from `site_names(cfg)`)."""
  check_params(params, cfg)
  kinds = stack.parse_sites(sites, cfg.n_layers, SITE_KINDS)
  hidden_BTD, state, stacked = _forward(params, tokens_BT, cfg, state=state, kinds=kinds, **inputs)
  return unembed(params, hidden_BTD, cfg), state, stack.pick_sites(sites, stacked)


def prefill(
  params: dict,
  tokens_BT: jax.Array,
  cfg: LlamaConfig,
  *,
  lengths_B: jax.Array | None = None,
  capacity: int | None = None,
) -> tuple[jax.Array, KVCache]:
  """Right-padded prompts into a fresh cache of `capacity` slots (default T).

  Row b's first lengths_B[b] tokens (default all T) are written; returns the float32
  logits [B, V] after each row's last real token and the cache. Ids and lengths (1 .. T)
  are checked as in `forward`.
  """
  batch, time = checks.check_tokens(tokens_BT, cfg.vocab_size)
  lengths_B = jnp.full((batch,), time, jnp.int32) if lengths_B is None else checks.check_lengths(lengths_B, batch, time)
  capacity = time if capacity is None else checks.check_int("capacity", capacity, 1)
  if capacity < time:
    raise ValueError(f"capacity: expected >= T={time} (the prompt's slots), got {capacity}")
  empty = init_state(cfg, batch, capacity)
  hidden_BTD, cache = forward_hidden(params, tokens_BT, cfg, state=empty, num_new_B=lengths_B)
  assert isinstance(cache, KVCache)
  last_B1D = hidden_BTD[jnp.arange(batch), lengths_B - 1][:, None]
  return unembed(params, last_B1D, cfg)[:, 0], cache


def decode(params: dict, token_B: jax.Array, state: Cache, cfg: LlamaConfig) -> tuple[jax.Array, Cache]:
  """One token per row at its own slot: (float32 logits [B, V], the cache after it)."""
  return stack.decode_by_forward(forward, params, token_B, state, cfg)


def unembed(params: dict, hidden_BTD: jax.Array, cfg: LlamaConfig) -> jax.Array:
  """float32 logits of final hidden states: h W_unembed (or h E^T when tied)."""
  w_DV = params["embed"].T if cfg.tie_embeddings else params["unembed"]
  logits_BTV = dense(hidden_BTD, w_DV.astype(cfg.dtype), out_dtype=jnp.float32)
  return sharding.shard(logits_BTV, ("act_batch", "act_length", "act_vocab"), cfg.axis_rules)


def forward_hidden(
  params: dict, tokens_BT: jax.Array, cfg: LlamaConfig, *, state: Cache | None = None, **inputs
) -> tuple[jax.Array, Cache | None]:
  """Hidden states after the final RMSNorm ([B, T, D], compute dtype) and the updated cache
  (keyword inputs as in `forward`)."""
  check_params(params, cfg)
  hidden_BTD, state, _ = _forward(params, tokens_BT, cfg, state=state, **inputs)
  return hidden_BTD, state


def _forward(
  params: dict,
  tokens_BT: jax.Array,
  cfg: LlamaConfig,
  *,
  state: Cache | None = None,
  positions_BT: jax.Array | None = None,
  segment_ids_BT: jax.Array | None = None,
  num_new_B: jax.Array | None = None,
  edits: stack.Edits | None = None,
  kinds: frozenset[str] = frozenset(),
) -> tuple[jax.Array, Cache | None, dict[str, jax.Array]]:
  """Hidden states after the final RMSNorm, the updated cache and the stacked site
  activations (inputs as in `forward`). The sites record what their edits receive."""
  _check_inputs(tokens_BT, cfg, positions_BT, segment_ids_BT, state, num_new_B)
  # The table whole along D before the lookup (FSDP's gather of a weight before its use):
  # a gather from a table split on D into rows split on the batch is a reshard XLA cannot
  # do efficiently ("Involuntary full rematerialization").
  embed_VD = sharding.shard(params["embed"], ("vocab", None), cfg.axis_rules)
  x_BTD = sharding.shard(
    embed_VD[tokens_BT].astype(cfg.dtype), ("act_batch", "act_length", "act_embed"), cfg.axis_rules
  )
  x_BTD, cache, stacked = _blocks(
    layer_segments(params, cfg),
    x_BTD,
    cfg,
    cache=state,
    positions_BT=positions_BT,
    segment_ids_BT=segment_ids_BT,
    num_new_B=num_new_B,
    edits=edits,
    kinds=kinds,
  )
  hidden_BTD = norms.rms_norm(x_BTD, params["final_norm"].astype(cfg.dtype), cfg.norm_eps)
  return hidden_BTD, cache, stacked


def run_layers(
  layers: dict,
  x_BTD: jax.Array,
  cfg: LlamaConfig,
  *,
  state: KVCache | None = None,
  positions_BT: jax.Array | None = None,
  segment_ids_BT: jax.Array | None = None,
  num_new_B: jax.Array | None = None,
) -> tuple[jax.Array, KVCache | None]:
  """Hidden states [B, T, D] through a run of consecutive layers alone (no embedding, no
  final norm): a pipeline stage's work. `layers` is a slice [n, ...] of params["layers"];
  `state`, when given, is a `KVCache` of those n layers. Inputs as in `forward`."""
  n = jax.tree.leaves(layers)[0].shape[0]
  if state is not None and (not isinstance(state, KVCache) or state.k_LBSGK.shape[0] != n):
    raise ValueError(f"state: expected a KVCache of the {n} layers given, got {type(state).__name__}")
  x_BTD, cache, _ = _blocks(
    [(0, n, layers)],
    x_BTD,
    cfg,
    cache=state,
    positions_BT=positions_BT,
    segment_ids_BT=segment_ids_BT,
    num_new_B=num_new_B,
  )
  assert cache is None or isinstance(cache, KVCache)
  return x_BTD, cache


def _blocks(
  segments: list[tuple[int, int, dict]],
  x_BTD: jax.Array,
  cfg: LlamaConfig,
  *,
  cache: Cache | None,
  positions_BT: jax.Array | None,
  segment_ids_BT: jax.Array | None,
  num_new_B: jax.Array | None,
  edits: stack.Edits | None = None,
  kinds: frozenset[str] = frozenset(),
) -> tuple[jax.Array, Cache | None, dict[str, jax.Array]]:
  """x_BTD through the layer segments (start, stop, stacked layers); the cache holds the
  segments' layers. Returns the hidden states, the updated cache and the stacked sites."""
  edit_by_kind = stack.parse_edits(edits, cfg.n_layers, SITE_KINDS)
  batch, time = x_BTD.shape[:2]
  added_B = jnp.full((batch,), time, jnp.int32) if num_new_B is None else num_new_B.astype(jnp.int32)
  pool_cache = cache if isinstance(cache, (PagedKVCache, PackedPagedKVCache)) else None
  paged = pool_cache is not None
  groups: tuple[PagedRows, ...] = ()
  mask_BTS = None
  if isinstance(cache, PagedKVCache):
    groups = (PagedRows(cache.block_tables_BP, cache.lengths_B, added_B, time),)
  elif isinstance(cache, PackedPagedKVCache):
    groups = cache.groups
  if cache is None:
    index_BT = jnp.broadcast_to(jnp.arange(time, dtype=jnp.int32), (batch, time))
    mask_BTS = attention.make_mask(
      index_BT, index_BT, q_segment_ids_BT=segment_ids_BT, kv_segment_ids_BS=segment_ids_BT
    )
  elif groups:
    index_BT = jnp.concatenate(
      [(g.lengths_B[:, None] + jnp.arange(g.width, dtype=jnp.int32)).reshape(-1) for g in groups]
    ).reshape(batch, time)
  elif isinstance(cache, KVCache):
    index_BT = cache.lengths_B[:, None] + jnp.arange(time, dtype=jnp.int32)
    slots_BS = jnp.broadcast_to(jnp.arange(cache.capacity, dtype=jnp.int32), (batch, cache.capacity))
    mask_BTS = attention.make_mask(index_BT, slots_BS)
  positions_BT = index_BT if positions_BT is None else positions_BT
  # cos/sin once for all layers' q and k (XLA:CPU recomputed them inside every rotation's fusion).
  cos_BTA, sin_BTA = rope.tables(
    positions_BT, jnp.asarray(rope.inv_frequencies(cfg.k, cfg.rope_theta, cfg.rope_scaling))
  )
  constrain = lambda x, *names: sharding.shard(x, names, cfg.axis_rules)

  layer_pages = 0 if pool_cache is None else pool_cache.k_pages_GPSK.shape[1] // cfg.n_layers

  def layer(carry, xs):
    # A paged pool rides in the scan carry with the layer's page offset and is written in
    # place; a contiguous cache goes through xs/ys one layer slice at a time.
    (x_BTD, pool), (p, kv, layer_idx) = (carry, xs) if paged else ((carry, None), xs)
    hook = lambda kind, x: stack.edit(edit_by_kind, kind, layer_idx, x)
    # One layer's compute copy at a time; quantized weights stay as they are (ops.quant.matmul reads them).
    p = quant.map_unquantized(lambda w: w.astype(cfg.dtype), p)
    resid_pre = x_BTD
    x_BTD = hook("hook_resid_pre", x_BTD)
    with jax.named_scope("attention"):
      h_BTD = norms.rms_norm(x_BTD, p["attn_norm"], cfg.norm_eps)
      q_BTHK = rope.rotate(dense(h_BTD, p["wq"]), cos_BTA, sin_BTA)
      k_BTGK = rope.rotate(dense(h_BTD, p["wk"]), cos_BTA, sin_BTA)
      v_BTGK = dense(h_BTD, p["wv"])
      q_BTHK = constrain(q_BTHK, "act_batch", "act_length", "act_heads", None)
      k_BTGK = constrain(k_BTGK, "act_batch", "act_length", "act_kv_heads", None)
      v_BTGK = constrain(v_BTGK, "act_batch", "act_length", "act_kv_heads", None)
      if paged:  # write the new tokens into their pages, attend over the row's pages
        assert pool is not None
        k_pool, v_pool, offset = pool
        k_pool, v_pool, attn_BTHK = _paged_layer(q_BTHK, k_BTGK, v_BTGK, k_pool, v_pool, groups, offset)
        pool = (k_pool, v_pool, offset + layer_pages)
      else:
        if kv is not None:  # write the new keys/values at their slots, then read the whole cache
          rows_BT = jnp.arange(batch)[:, None]
          k_BSGK = kv[0].at[rows_BT, index_BT].set(k_BTGK, mode="drop")
          v_BSGK = kv[1].at[rows_BT, index_BT].set(v_BTGK, mode="drop")
          kv = (k_BSGK, v_BSGK)
        else:
          k_BSGK, v_BSGK = k_BTGK, v_BTGK
        attn_BTHK = attention.attention(q_BTHK, k_BSGK, v_BSGK, mask_BTS, impl=cfg.attention_impl)
      attn_BTHK = constrain(attn_BTHK, "act_batch", "act_length", "act_heads", None)
      attn_out = constrain(dense(attn_BTHK, p["wo"], n_in=2), "act_batch", "act_length", "act_embed")
    resid_mid = x_BTD + hook("hook_attn_out", attn_out)
    x_BTD = hook("hook_resid_mid", resid_mid)
    with jax.named_scope("mlp"):
      mlp_out = mlp.swiglu(norms.rms_norm(x_BTD, p["mlp_norm"], cfg.norm_eps), p["w1"], p["w3"], p["w2"])
      mlp_out = constrain(mlp_out, "act_batch", "act_length", "act_embed")
    resid_post = x_BTD + hook("hook_mlp_out", mlp_out)
    x_BTD = hook("hook_resid_post", resid_post)
    acts = {
      "hook_resid_pre": resid_pre,
      "hook_attn_out": attn_out,
      "hook_resid_mid": resid_mid,
      "hook_mlp_out": mlp_out,
      "hook_resid_post": resid_post,
    }
    return ((x_BTD, pool) if paged else x_BTD), kv, acts

  k_out, v_out, acts = [], [], []
  if pool_cache is not None:
    pool = (pool_cache.k_pages_GPSK, pool_cache.v_pages_GPSK, jnp.int32(0))
    for start, stop, segment in segments:
      (x_BTD, pool), _, stacked = stack.scan_layers(
        layer, (x_BTD, pool), (segment, None, jnp.arange(start, stop)), remat=cfg.remat, unroll=cfg.unroll, kinds=kinds
      )
      acts.append(stacked)
  else:
    for start, stop, segment in segments:
      kv_in = None if not isinstance(cache, KVCache) else (cache.k_LBSGK[start:stop], cache.v_LBSGK[start:stop])
      x_BTD, kv_out, stacked = stack.scan_layers(
        layer, x_BTD, (segment, kv_in, jnp.arange(start, stop)), remat=cfg.remat, unroll=cfg.unroll, kinds=kinds
      )
      if cache is not None:
        k_out.append(kv_out[0])
        v_out.append(kv_out[1])
      acts.append(stacked)
  join = lambda parts: parts[0] if len(parts) == 1 else jnp.concatenate(parts)
  stacked = {kind: join([a[kind] for a in acts]) for kind in kinds}
  if isinstance(cache, PagedKVCache):
    cache = PagedKVCache(pool[0], pool[1], cache.block_tables_BP, cache.lengths_B + added_B)
  elif isinstance(cache, PackedPagedKVCache):
    after = tuple(dataclasses.replace(g, lengths_B=g.lengths_B + g.num_new_B) for g in groups)
    cache = PackedPagedKVCache(pool[0], pool[1], after)
  elif cache is not None:
    cache = KVCache(join(k_out), join(v_out), cache.lengths_B + added_B)
  return x_BTD, cache, stacked


def _paged_layer(q_BTHK, k_BTGK, v_BTGK, k_pool, v_pool, groups, offset):
  """One layer's paged attention over row groups: the call's tokens taken group by group
  (`PackedPagedKVCache`), every group's new K/V written to its rows' pages (padding past a
  row's num_new is dropped), then each group's queries attend over those pages. Returns the
  pools and the attention output, shaped like q_BTHK. A `PagedKVCache` is one group of the
  call's rows. All writes come before any read: a read between two writes of a pool would
  make XLA copy the whole pool to keep the version it reads."""
  flat = lambda x: x.reshape(-1, *x.shape[2:])
  q_NHK, k_NGK, v_NGK = flat(q_BTHK), flat(k_BTGK), flat(v_BTGK)
  reads, start = [], 0
  for g in groups:
    rows, width = g.block_tables_BP.shape[0], g.width
    q, k, v = (x_N[start : start + rows * width].reshape(rows, width, *x_N.shape[1:]) for x_N in (q_NHK, k_NGK, v_NGK))
    index_BT = g.lengths_B[:, None] + jnp.arange(width, dtype=jnp.int32)
    valid_BT = jnp.arange(width)[None, :] < g.num_new_B[:, None]
    tables_BP = g.block_tables_BP + offset  # this layer's pages
    k_pool, v_pool = paged_attention.write(k_pool, v_pool, k, v, tables_BP, index_BT, valid_BT)
    reads.append((q, tables_BP, index_BT, g.lengths_B + g.num_new_B))
    start += rows * width
  outs = []
  for q, tables_BP, index_BT, lengths_B in reads:
    out_BTHK = _paged_attend(q, (k_pool, v_pool), tables_BP, index_BT, lengths_B)
    outs.append(out_BTHK.reshape(-1, *out_BTHK.shape[2:]))
  return k_pool, v_pool, jnp.concatenate(outs).reshape(q_BTHK.shape)


def _paged_attend(q_BTHK, kv, block_tables_BP, index_BT, lengths_B) -> jax.Array:
  """Decode (one token per row) through `paged_attention`'s dispatcher (the Pallas kernel on
  GPU); a chunk of prompt tokens through the causal reference."""
  k_pages_GPSK, v_pages_GPSK = kv
  if q_BTHK.shape[1] == 1:
    return paged_attention.paged_attention(q_BTHK[:, 0], k_pages_GPSK, v_pages_GPSK, block_tables_BP, lengths_B)[
      :, None
    ]
  return paged_attention.paged_attention_reference(
    q_BTHK, k_pages_GPSK, v_pages_GPSK, block_tables_BP, index_BT, lengths_B
  )


def layer_segments(params: dict, cfg: LlamaConfig) -> list[tuple[int, int, dict]]:
  """(start, stop, stacked layers) of each scanned segment, in order.

  params["layers"] is one stack of the L layers, or consecutive segments of it (a tuple of
  stacks: `llama_quant` keeps the first and last layers float between quantized ones).
  """
  segments = params["layers"] if isinstance(params["layers"], tuple) else (params["layers"],)
  sizes = [jax.tree.leaves(segment)[0].shape[0] for segment in segments]
  if sum(sizes) != cfg.n_layers:
    raise ValueError(f"params['layers']: expected {cfg.n_layers} layers over its segments, got sizes {sizes}")
  starts = [sum(sizes[:i]) for i in range(len(sizes))]
  return [(start, start + size, segment) for start, size, segment in zip(starts, sizes, segments)]


def _check_inputs(tokens_BT, cfg, positions_BT, segment_ids_BT, cache, num_new_B) -> tuple[int, int]:
  batch, time = checks.check_tokens(tokens_BT, cfg.vocab_size)
  for name, x in (("positions_BT", positions_BT), ("segment_ids_BT", segment_ids_BT)):
    if x is not None:
      checks.check_array(name, x, 2, integer=True, shape=f"[{batch}, {time}]")
      if x.shape != (batch, time):
        raise ValueError(f"{name}: expected integer shape {(batch, time)}, got {x.dtype} {x.shape}")
  if positions_BT is not None:
    what = f"positions (max_seq_len={cfg.max_seq_len})"
    checks.check_in("positions_BT", positions_BT, 0, cfg.max_seq_len - 1, what=what)
  if cache is None:
    if num_new_B is not None:
      raise ValueError("num_new_B: only meaningful with a state (KV cache)")
    if positions_BT is None and time > cfg.max_seq_len:
      raise ValueError(f"tokens_BT: {time} tokens exceed max_seq_len={cfg.max_seq_len}")
    return batch, time
  if not isinstance(cache, (KVCache, PagedKVCache, PackedPagedKVCache)):
    raise TypeError(
      f"state: expected a llama.KVCache, PagedKVCache or PackedPagedKVCache (init_state, prefill), got "
      f"{type(cache).__name__}"
    )
  if segment_ids_BT is not None:
    raise ValueError("segment_ids_BT: document masks are for training without a cache")
  if isinstance(cache, PackedPagedKVCache):
    _check_packed(cache, cfg, batch, time, num_new_B)
    return batch, time
  checks.check_array("state.lengths_B", cache.lengths_B, 1, integer=True, shape=f"[{batch}]")
  if cache.lengths_B.shape != (batch,):
    raise ValueError(f"state: cache built for batch {cache.lengths_B.shape[0]}, got tokens for batch {batch}")
  if isinstance(cache, PagedKVCache):
    _check_pool(cache.k_pages_GPSK, cfg)
    _check_tables("state", cache.block_tables_BP, batch)
  elif cache.k_LBSGK.shape[3:] != (cfg.n_kv_heads, cfg.k) or cache.k_LBSGK.shape[0] != cfg.n_layers:
    raise ValueError(f"state: cache shape {cache.k_LBSGK.shape} does not fit the config (L, G, K)")
  if num_new_B is not None:
    checks.check_array("num_new_B", num_new_B, 1, integer=True, shape=f"[{batch}]")
    if num_new_B.shape != (batch,):
      raise ValueError(f"num_new_B: expected shape ({batch},), got {num_new_B.shape}")
    checks.check_in("num_new_B", num_new_B, 0, time, what="counts of new tokens")
  checks.check_in("state.lengths_B", cache.lengths_B, 0, cache.capacity, what="lengths")
  end_B = cache.lengths_B + (time if num_new_B is None else num_new_B)
  checks.check_values("state", end_B, lambda end: end > cache.capacity, f"row lengths <= capacity {cache.capacity}")
  return batch, time


def _check_pool(k_pages_GPSK: jax.Array, cfg: LlamaConfig) -> None:
  shape = k_pages_GPSK.shape
  if len(shape) != 4 or shape[0] != cfg.n_kv_heads or shape[1] % cfg.n_layers or shape[3] != cfg.k:
    raise ValueError(f"state: page pool shape {shape} does not fit the config ([G, L * P, S, K])")


def _check_tables(name: str, block_tables_BP: jax.Array, batch: int) -> None:
  if block_tables_BP.ndim != 2 or block_tables_BP.shape[0] != batch or block_tables_BP.dtype != jnp.int32:
    raise ValueError(
      f"{name}: expected int32 block tables [{batch}, P], got {block_tables_BP.dtype} {block_tables_BP.shape}"
    )


def _check_packed(cache: PackedPagedKVCache, cfg: LlamaConfig, batch: int, time: int, num_new_B) -> None:
  """A packed call's tokens are [1, N] with N the groups' B * width; each group's counts fit."""
  if num_new_B is not None:
    raise ValueError("num_new_B: a PackedPagedKVCache carries each group's num_new_B")
  if not cache.groups:
    raise ValueError("state.groups: expected at least one group of rows, got none")
  if batch != 1 or time != cache.num_tokens:
    raise ValueError(
      f"tokens_BT: a packed call takes [1, N] tokens, N = {cache.num_tokens} (its groups' rows x widths), got "
      f"shape {(batch, time)}"
    )
  _check_pool(cache.k_pages_GPSK, cfg)
  for i, g in enumerate(cache.groups):
    rows, where = g.block_tables_BP.shape[0], f"state.groups[{i}]"
    if not checks.is_int(g.width) or g.width < 1:
      raise ValueError(f"{where}.width: expected an int >= 1, got {g.width!r}")
    _check_tables(f"{where}.block_tables_BP", g.block_tables_BP, rows)
    for name in ("lengths_B", "num_new_B"):
      x = getattr(g, name)
      checks.check_array(f"{where}.{name}", x, 1, integer=True, shape=f"[{rows}]")
      if x.shape != (rows,):
        raise ValueError(f"{where}.{name}: expected shape ({rows},), got {x.shape}")
    capacity = g.block_tables_BP.shape[1] * cache.k_pages_GPSK.shape[2]
    checks.check_in(f"{where}.num_new_B", g.num_new_B, 0, g.width, what="counts of new tokens")
    checks.check_in(f"{where}.lengths_B", g.lengths_B, 0, capacity, what="lengths")
    end_B = g.lengths_B + g.num_new_B
    checks.check_values(where, end_B, functools.partial(operator.lt, capacity), f"row lengths <= capacity {capacity}")
