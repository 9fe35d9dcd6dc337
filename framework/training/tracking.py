"""Metrics of a run for people watching it: TensorBoard scalars, optional Weights & Biases, memory in use.

TensorBoard (``trainer.tensorboard``): ``OUTPUT_DIR/tensorboard``, scalars ``train/loss``, ``train/lr``,
``train/grad_norm``, ``train/tokens_per_s``, ``train/tflops_per_gpu`` and ``train/mfu`` (model FLOPs,
framework/training/flops.py; MFU only with a known peak), ``train/memory_gib`` and ``val/loss`` against the
optimiser step. A resumed run opens the writer with ``purge_step`` at its first new step, so TensorBoard drops what the
interrupted invocation logged after its last checkpoint instead of showing those steps twice.
W&B (``trainer.wandb.project``): the same scalars and the resolved config, one W&B run per training run
(its id is kept in the train state, so a resumed run continues it; ``WANDB_MODE=offline`` writes it under
``OUTPUT_DIR/wandb`` for a later ``wandb sync``). Only global rank 0 writes.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import torch
from torch.utils.tensorboard import SummaryWriter


def memory_gib(device) -> dict[str, float]:
    """Resident memory of this process and, on a GPU, the peak memory allocated by torch (GiB)."""
    import psutil
    out = {"rss": psutil.Process(os.getpid()).memory_info().rss / 2 ** 30}
    if device.type == "cuda":
        out["gpu_max_allocated"] = torch.cuda.max_memory_allocated(device) / 2 ** 30
    return out


def format_memory(mem: dict[str, float]) -> str:
    return " ".join(f"{k} {v:.2f}GiB" for k, v in mem.items())


class Tracker:
    """Scalars to TensorBoard and W&B (each optional); a no-op off rank 0."""

    def __init__(self, trainer, output_dir: Path, enabled: bool, first_step: int, wandb_run_id: str | None,
                 run_config: dict | None = None):
        """``trainer``: the trainer section (tensorboard, wandb.project, wandb.run_name); ``run_config``: the
        job's whole resolved config, recorded with a W&B run."""
        self._tb = self._wandb = None
        self.wandb_run_id = wandb_run_id
        if not enabled:
            return
        tr = trainer
        if tr.get("tensorboard", True):
            self._tb = SummaryWriter(log_dir=str(Path(output_dir) / "tensorboard"), purge_step=first_step)
        project = (tr.get("wandb") or {}).get("project")
        if project:
            import wandb
            # our own id (wandb's generator moved between releases): 8 of [0-9a-f], valid as a W&B run id
            self.wandb_run_id = wandb_run_id or uuid.uuid4().hex[:8]
            self._wandb = wandb.init(project=project, name=tr.wandb.get("run_name") or Path(output_dir).name,
                                     id=self.wandb_run_id, resume="allow", dir=str(output_dir),
                                     config=run_config)

    def scalars(self, step: int, values: dict[str, float | None]) -> None:
        values = {k: float(v) for k, v in values.items() if v is not None}
        if self._tb is not None:
            for k, v in values.items():
                self._tb.add_scalar(k, v, step)
        if self._wandb is not None:
            self._wandb.log(values, step=step)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()
