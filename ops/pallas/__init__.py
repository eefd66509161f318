"""Pallas GPU kernels (Triton lowering). Each has a jnp reference with the same signature
in its op module and is reached through that module's dispatcher."""
