"""The fine-tuning job of launch/finetune.py: the SFT task (framework/training/sft.py) run by the job engine
(framework/training/engine.py)."""

from __future__ import annotations

from omegaconf import DictConfig

from framework.training import engine
from framework.training.sft import RunResult, SFTTask


def run(cfg: DictConfig) -> RunResult:
    return engine.run(cfg, SFTTask())
