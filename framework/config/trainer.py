"""``trainer.*``: the loop's steps, batch sizes, optimiser, schedule, validation, checkpoints and logging
(conf/trainer/default.yaml, where every key is described)."""

from __future__ import annotations

import dataclasses
import importlib.util
from pathlib import Path

from framework.config.checks import at_least, one_of

RECOMPUTE = ("none", "selective", "full")


@dataclasses.dataclass
class EarlyStoppingSection:
    patience: int | None = None   # validations without an improvement of min_delta before stopping; null: never
    min_delta: float = 0.0


@dataclasses.dataclass
class WandbSection:
    project: str | None = None
    run_name: str | None = None


@dataclasses.dataclass
class TrainerSection:
    max_steps: int | None = 24
    max_epochs: float | None = None
    global_batch_size: int = 8
    micro_batch_size: int = 2
    lr: float = 1e-3
    min_lr: float = 1e-4
    warmup_steps: int = 2
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    clip_grad: float = 1.0
    distributed_optimizer: bool = False
    eval_interval: int = 12
    eval_samples: int | None = 16
    log_interval: int = 1
    save_interval: int | None = 12
    keep_last: int | None = 2
    resume: str = "auto"
    async_save: bool = False
    steps_per_run: int | None = None
    early_stopping: EarlyStoppingSection = dataclasses.field(default_factory=EarlyStoppingSection)
    peak_tflops: float | None = None
    tensorboard: bool = True
    wandb: WandbSection = dataclasses.field(default_factory=WandbSection)
    recompute: str = "none"

    def problems(self) -> list[str]:
        """Every problem with the loop's keys (empty: fine); each names the key, the value and what works."""
        out = [at_least("trainer.max_steps", self.max_steps, 1, nullable=self.max_epochs is not None),
               at_least("trainer.global_batch_size", self.global_batch_size, 1),
               at_least("trainer.micro_batch_size", self.micro_batch_size, 1),
               at_least("trainer.warmup_steps", self.warmup_steps, 0),
               at_least("trainer.eval_interval", self.eval_interval, 1),
               at_least("trainer.log_interval", self.log_interval, 1),
               at_least("trainer.save_interval", self.save_interval, 1, nullable=True),
               at_least("trainer.keep_last", self.keep_last, 1, nullable=True),
               at_least("trainer.steps_per_run", self.steps_per_run, 1, nullable=True),
               at_least("trainer.eval_samples", self.eval_samples, 1, nullable=True),
               at_least("trainer.early_stopping.patience", self.early_stopping.patience, 1, nullable=True,
                        what="an integer (validations)"),
               one_of("trainer.recompute", self.recompute, RECOMPUTE)]
        if self.max_epochs is not None and self.max_epochs <= 0:
            out.append(f"trainer.max_epochs={self.max_epochs!r}: expected a number > 0 or null")
        if self.lr <= 0 or self.min_lr < 0 or self.min_lr > self.lr:
            out.append(f"trainer.lr={self.lr!r}, trainer.min_lr={self.min_lr!r}: expected 0 <= min_lr <= lr, lr > 0")
        if self.resume not in ("auto", "never") and not Path(self.resume).exists():
            out.append(f"trainer.resume={self.resume!r}: expected auto, never, or an existing checkpoint directory")
        if self.early_stopping.min_delta < 0:
            out.append(f"trainer.early_stopping.min_delta={self.early_stopping.min_delta!r}: expected a number >= 0")
        if self.peak_tflops is not None and self.peak_tflops <= 0:
            out.append(f"trainer.peak_tflops={self.peak_tflops!r}: expected a number > 0 (TFLOP/s per GPU) or null")
        if self.wandb.project and importlib.util.find_spec("wandb") is None:
            out.append(f"trainer.wandb.project={self.wandb.project!r} asks for Weights & Biases logging, but the "
                       "wandb package is not installed: `pip install wandb`, or set trainer.wandb.project=null")
        return [p for p in out if p]
