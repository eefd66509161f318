"""Parallelism over device meshes: sharding rules (data, FSDP, tensor), the GPipe pipeline,
multi-process runs. See each module."""
