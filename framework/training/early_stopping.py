"""Best validation loss and early stopping (``trainer.early_stopping``).

Rule (as Keras' EarlyStopping): a validation *improves* when ``loss < best - min_delta``; only then does
``best`` move to it and the counter of validations without improvement reset to 0; otherwise the counter
grows by one. With ``patience`` set, training stops at the validation where the counter reaches
``patience``. ``patience=None`` never stops, but the best loss and step are still tracked (they name the
best checkpoint). Validations run every ``trainer.eval_interval`` steps and after the last step; the
validation before training measures the base model and does not take part.
"""

from __future__ import annotations

import dataclasses
import math


@dataclasses.dataclass
class EarlyStopping:
    patience: int | None = None
    min_delta: float = 0.0
    best_loss: float = math.inf
    best_step: int | None = None
    bad_validations: int = 0      # consecutive validations without an improvement of min_delta
    stopped_step: int | None = None

    @classmethod
    def from_config(cls, trainer) -> "EarlyStopping":
        """From ``trainer.early_stopping`` (absent: never stop, min_delta 0)."""
        stop = trainer.get("early_stopping") or {}
        return cls(patience=None if stop.get("patience") is None else int(stop["patience"]),
                   min_delta=float(stop.get("min_delta") or 0.0))

    def update(self, step: int, loss: float) -> bool:
        """Record the validation ``loss`` measured after ``step``; True when it is a new best."""
        if loss < self.best_loss - self.min_delta:
            self.best_loss, self.best_step, self.bad_validations = float(loss), step, 0
            return True
        self.bad_validations += 1
        if self.patience is not None and self.bad_validations >= self.patience:
            self.stopped_step = step
        return False

    @property
    def should_stop(self) -> bool:
        return self.stopped_step is not None

    def state_dict(self) -> dict:
        # JSON has no infinity: no best yet is stored as None
        return {"best_loss": None if math.isinf(self.best_loss) else self.best_loss, "best_step": self.best_step,
                "bad_validations": self.bad_validations, "stopped_step": self.stopped_step}

    def load_state_dict(self, state: dict) -> None:
        """Restore the counters; ``patience``/``min_delta`` stay as configured now (they may be changed)."""
        self.best_loss = math.inf if state["best_loss"] is None else float(state["best_loss"])
        self.best_step, self.bad_validations = state["best_step"], int(state["bad_validations"])
        self.stopped_step = state["stopped_step"]
