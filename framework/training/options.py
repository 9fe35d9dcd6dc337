"""The training loop's options (``trainer.*`` in conf/trainer/default.yaml), checked before any process
group starts; each problem names the key, the value and what is expected."""

from __future__ import annotations

import importlib.util
from pathlib import Path


def _positive_int(tr, key: str, nullable: bool) -> str | None:
    value = tr.get(key)
    if value is None:
        return None if nullable else f"trainer.{key} is required (an integer >= 1)"
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        return f"trainer.{key}={value!r}: expected an integer >= 1{' or null' if nullable else ''}"
    return None


def trainer_problems(tr) -> list[str]:
    """Every problem with the loop's keys of the ``trainer`` node (empty: fine)."""
    problems = [p for p in (
        _positive_int(tr, "max_steps", nullable=tr.get("max_epochs") is not None),
        _positive_int(tr, "eval_interval", nullable=False),
        _positive_int(tr, "log_interval", nullable=False),
        _positive_int(tr, "save_interval", nullable=True),
        _positive_int(tr, "keep_last", nullable=True),
        _positive_int(tr, "steps_per_run", nullable=True),
    ) if p]
    epochs = tr.get("max_epochs")
    if epochs is not None and (isinstance(epochs, bool) or not isinstance(epochs, (int, float)) or epochs <= 0):
        problems.append(f"trainer.max_epochs={epochs!r}: expected a number > 0 or null")
    resume = tr.get("resume", "auto")
    if resume not in ("auto", "never") and not Path(str(resume)).exists():
        problems.append(f"trainer.resume={resume!r}: expected auto, never, or an existing checkpoint directory")
    stop = tr.get("early_stopping") or {}
    patience, min_delta = stop.get("patience"), stop.get("min_delta", 0.0)
    if patience is not None and (isinstance(patience, bool) or not isinstance(patience, int) or patience < 1):
        problems.append(f"trainer.early_stopping.patience={patience!r}: expected an integer >= 1 (validations) or null")
    if isinstance(min_delta, bool) or not isinstance(min_delta, (int, float)) or min_delta < 0:
        problems.append(f"trainer.early_stopping.min_delta={min_delta!r}: expected a number >= 0")
    for key, default in (("tensorboard", True), ("async_save", False)):
        if not isinstance(tr.get(key, default), bool):
            problems.append(f"trainer.{key}={tr.get(key)!r}: expected true or false")
    peak = tr.get("peak_tflops")
    if peak is not None and (isinstance(peak, bool) or not isinstance(peak, (int, float)) or peak <= 0):
        problems.append(f"trainer.peak_tflops={peak!r}: expected a number > 0 (TFLOP/s per GPU) or null")
    project = (tr.get("wandb") or {}).get("project")
    if project and importlib.util.find_spec("wandb") is None:
        problems.append(f"trainer.wandb.project={project!r} asks for Weights & Biases logging, but the wandb package "
                        "is not installed: `pip install wandb`, or set trainer.wandb.project=null")
    return problems
