"""The preference-tuning job of launch/dpo.py: the DPO task (framework/training/dpo_task.py) run by the job
engine (framework/training/engine.py)."""

from __future__ import annotations

from omegaconf import DictConfig

from framework.training import engine
from framework.training.dpo_task import DPOResult, DPOTask


def run(cfg: DictConfig) -> DPOResult:
    return engine.run(cfg, DPOTask())
