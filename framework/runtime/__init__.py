"""Device, backend, process groups, seeds and the CPU compatibility layer (the ground floor)."""

from framework.runtime.distributed import Runtime, initialize, shutdown, seed_everything, free_port

__all__ = ["Runtime", "initialize", "shutdown", "seed_everything", "free_port"]
