"""One interface for every decoding model (Llama, Based, JRT-RNN).

Shapes: B batch, T time (new tokens), V vocabulary.

A decoding model is a module of pure functions over a config, a parameter pytree and an
explicit state (a KV cache, a recurrent state); the module itself satisfies
`DecodingModel`, so engines, trainers and benchmarks take `(model, params, cfg)` and need
no per-model code. `model_for(cfg)` finds the module of a config.

  init(key, cfg) -> params
  param_axes(cfg) -> the tree of `params` with a tuple of logical axis names per leaf
  check_params(params, cfg) -> None, or raises naming the leaf whose shape is not init's
  init_state(cfg, batch, capacity) -> an empty state for `capacity` tokens per row
  forward(params, tokens_BT, cfg, *, state=None) -> (logits_BTV float32, state)
      the parallel form: from an empty context without a state (training; the state
      returned is None), or continuing from `state` (returning the state after tokens_BT)
  forward_with_sites(params, tokens_BT, cfg, sites, *, state=None)
      -> (logits_BTV, state, {site: activation [B, T, D]}) for site names from
      site_names(cfg), `blocks.{l}.{kind}` as TransformerLens / SAELens name hooks
  prefill(params, tokens_BT, cfg, *, lengths_B=None, capacity=None)
      -> (logits_BV at each row's last real token, state after it): right-padded prompts,
      row b's real tokens are the first lengths_B[b]; the state holds `capacity` tokens
      per row (default T; a recurrent state's size does not depend on it)
  decode(params, token_B, state, cfg) -> (logits_BV, state after token_B)
  site_names(cfg) -> every valid site name

Every model checks its params against `init`'s shapes (`check_params(params, cfg)`; shapes
are static, so also under jit) and the values of its inputs (ids, lengths) where they are
concrete; under a user's own jax.jit, `ops.checks.checked` keeps the value checks.

Models add their own keyword inputs after these (Llama: positions_BT, segment_ids_BT;
Based: key_mask_BT), always with defaults, so the protocol's calls work on every model.
Invariant, tested for every model: prefill of a prefix, then decode token by token, gives
forward's logits over the whole sequence.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

import jax

from paperjax.models.recurrent import based, jrt_rnn
from paperjax.models.transformer import llama


@runtime_checkable
class DecodingModel(Protocol):
  """The functions every decoding model module defines (see the module docstring)."""

  def init(self, key: jax.Array, cfg: Any) -> Any: ...

  def param_axes(self, cfg: Any) -> Any: ...

  def check_params(self, params: Any, cfg: Any) -> None: ...

  def init_state(self, cfg: Any, batch: int, capacity: int) -> Any: ...

  def forward(self, params: Any, tokens_BT: jax.Array, cfg: Any, *, state: Any = None) -> tuple[jax.Array, Any]: ...

  def forward_with_sites(
    self, params: Any, tokens_BT: jax.Array, cfg: Any, sites: Sequence[str], *, state: Any = None
  ) -> tuple[jax.Array, Any, dict[str, jax.Array]]: ...

  def prefill(
    self,
    params: Any,
    tokens_BT: jax.Array,
    cfg: Any,
    *,
    lengths_B: jax.Array | None = None,
    capacity: int | None = None,
  ) -> tuple[jax.Array, Any]: ...

  def decode(self, params: Any, token_B: jax.Array, state: Any, cfg: Any) -> tuple[jax.Array, Any]: ...

  def site_names(self, cfg: Any) -> tuple[str, ...]: ...


def model_for(cfg: Any) -> DecodingModel:
  """The model module whose config `cfg` is (LlamaConfig -> llama, BasedConfig -> based, ...)."""
  modules: dict[type, DecodingModel] = {llama.LlamaConfig: llama, based.BasedConfig: based, jrt_rnn.JRTConfig: jrt_rnn}
  try:
    return modules[type(cfg)]
  except KeyError:
    raise TypeError(f"cfg: expected a config of {[t.__name__ for t in modules]}, got {type(cfg).__name__}") from None


def check_site(cfg: Any, site: str) -> None:
  """Raises unless `site` is one of model_for(cfg).site_names(cfg)."""
  names = model_for(cfg).site_names(cfg)
  if site not in names:
    raise ValueError(
      f"site: {site!r} is not a site of this model; expected one of its {len(names)} sites "
      f"{names[0]!r} .. {names[-1]!r} (site_names(cfg))"
    )
