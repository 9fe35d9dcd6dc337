"""The one place that decides device and backend, starts torch.distributed and builds process groups.

CUDA present: NCCL, one GPU per local rank. CUDA absent: gloo on CPU, with the CPU compatibility layer
(cpu_compat.py) switched on so megatron-core runs unchanged. Rank and world size come from torchrun
(RANK/WORLD_SIZE/LOCAL_RANK), from Slurm (SLURM_PROCID/SLURM_NTASKS/SLURM_LOCALID), or default to a
single process.
"""

from __future__ import annotations

import dataclasses
import datetime
import logging
import os
import random
import socket

import numpy as np
import torch

from framework.runtime import cpu_compat

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Runtime:
    device: torch.device
    backend: str
    rank: int
    world_size: int
    local_rank: int
    tp: int
    pp: int
    dp: int
    sp: bool

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launcher_env() -> tuple[int, int, int]:
    """(rank, world_size, local_rank) from torchrun, else Slurm, else a single process."""
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0))
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env and "MASTER_ADDR" in env:
        return int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]), int(env.get("SLURM_LOCALID", 0))
    return 0, 1, 0


def data_parallel_size(world_size: int, tp: int, pp: int) -> int:
    """The data-parallel size of a layout: the world divided by TP x PP (the one place this is derived; a
    world that is not a multiple of TP x PP is refused before any process group starts)."""
    return max(1, world_size // max(1, tp * pp))


def world_size_from_env() -> int:
    return launcher_env()[1]


def choose_device(local_rank: int = 0) -> tuple[torch.device, str]:
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
        return torch.device("cuda", torch.cuda.current_device()), "nccl"
    return torch.device("cpu"), "gloo"


def seed_everything(seed: int) -> None:
    """Seed python, numpy, torch and megatron's tensor-parallel RNG tracker (per TP rank)."""
    from megatron.core import tensor_parallel

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    tensor_parallel.model_parallel_cuda_manual_seed(seed)


def initialize(tp: int = 1, pp: int = 1, sp: bool = False, seed: int = 1234,
               timeout_s: int = 600) -> Runtime:
    """Start torch.distributed and megatron's process groups. Safe to call once per process."""
    from megatron.core import parallel_state

    rank, world, local_rank = launcher_env()
    device, backend = choose_device(local_rank)
    if device.type == "cpu":
        cpu_compat.enable()
        # Two cores shared by up to 8 ranks: one intra-op thread each avoids oversubscription.
        if world > 1:
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    if world % (tp * pp) != 0:
        raise ValueError(f"world size {world} is not divisible by tensor x pipeline = {tp} x {pp}")
    if not torch.distributed.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        if world == 1:
            os.environ.setdefault("MASTER_PORT", str(free_port()))
        else:
            os.environ.setdefault("MASTER_PORT", "29500")
        torch.distributed.init_process_group(
            backend=backend, rank=rank, world_size=world,
            timeout=datetime.timedelta(seconds=timeout_s),
            device_id=device if device.type == "cuda" else None,
        )
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(
            tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
        )
    seed_everything(seed)
    rt = Runtime(device=device, backend=backend, rank=rank, world_size=world, local_rank=local_rank,
                 tp=tp, pp=pp, dp=data_parallel_size(world, tp, pp), sp=sp)
    log.debug("runtime: %s", rt)
    return rt


def shutdown() -> None:
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
