"""Pallas GPU kernels (Triton lowering). Each has a jnp reference with the same signature
in its op module and is reached through that module's dispatcher."""

from __future__ import annotations

import jax


def resolve(impl: str) -> str:
  """An op's `impl` argument: "auto" is "pallas" on a GPU backend and "reference" elsewhere."""
  if impl == "auto":
    return "pallas" if jax.default_backend() == "gpu" else "reference"
  if impl not in ("reference", "pallas"):
    raise ValueError(f"impl: expected 'auto', 'reference' or 'pallas', got {impl!r}")
  return impl
