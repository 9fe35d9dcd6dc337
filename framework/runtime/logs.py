"""Readable logs: INFO from the main rank, warnings and errors from every rank, megatron's noise muted."""

from __future__ import annotations

import logging
import os
import warnings


def setup_logging(level: str | None = None) -> None:
    rank = int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", 0)))
    level = level or os.environ.get("FRAMEWORK_LOG_LEVEL", "INFO")
    logging.basicConfig(
        level=level if rank == 0 else "WARNING",
        format=f"%(asctime)s [rank {rank}] %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S", force=True,
    )
    # megatron-core warns at import about missing Apex/TE and deprecated options; on CPU they are expected.
    warnings.filterwarnings("ignore", category=UserWarning, module=r"megatron\..*")
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.distributed\..*")
    warnings.filterwarnings("ignore", message=".*CUDA_DEVICE_MAX_CONNECTIONS.*")
    for noisy in ("megatron.core", "megatron.core.distributed.fsdp"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, logging.getLogger().level))
