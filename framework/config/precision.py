"""``precision`` and ``fp8.*``: numeric precision of weights, activations and GEMMs (conf/precision/)."""

from __future__ import annotations

import dataclasses

from framework.config.checks import at_least, one_of

PRECISIONS = ("fp32", "bf16", "fp8")
#: fp8.recipe -> megatron's name for it
FP8_RECIPES = {"delayed": "delayed", "current": "tensorwise"}
FP8_FORMATS = ("hybrid", "e4m3")


@dataclasses.dataclass
class Fp8Section:
    recipe: str = "delayed"          # delayed (amax history) | current (per-tensor scaling from the current tensors)
    format: str = "hybrid"           # hybrid (e4m3 forward, e5m2 backward) | e4m3
    amax_history_len: int = 1024
    amax_compute_algo: str = "max"   # max | most_recent

    def problems(self) -> list[str]:
        out = [one_of("fp8.recipe", self.recipe, tuple(FP8_RECIPES)), one_of("fp8.format", self.format, FP8_FORMATS),
               at_least("fp8.amax_history_len", self.amax_history_len, 1),
               one_of("fp8.amax_compute_algo", self.amax_compute_algo, ("max", "most_recent"))]
        return [p for p in out if p]


def precision_problems(precision: str, fp8: Fp8Section | None) -> list[str]:
    """The values alone; whether this machine can run fp8 is framework/models/precision.py's question."""
    out = [p for p in [one_of("precision", precision, PRECISIONS)] if p]
    if precision == "fp8" and fp8 is not None:
        out += fp8.problems()
    return out
