"""``parallel.*``: the layout of one job over its processes (conf/parallel/default.yaml)."""

from __future__ import annotations

import dataclasses

from framework.config.checks import at_least


@dataclasses.dataclass
class ParallelSection:
    tensor: int = 1                           # TP: must divide the query heads (framework/models/layout.py)
    pipeline: int = 1                         # PP: uneven layer counts go to the first/last stage
    first_stage_layers: int | None = None     # explicit uneven split (null: automatic)
    last_stage_layers: int | None = None
    sequence: bool = False                    # SP: needs tensor > 1

    def problems(self) -> list[str]:
        out = [at_least("parallel.tensor", self.tensor, 1), at_least("parallel.pipeline", self.pipeline, 1),
               at_least("parallel.first_stage_layers", self.first_stage_layers, 1, nullable=True),
               at_least("parallel.last_stage_layers", self.last_stage_layers, 1, nullable=True)]
        if self.sequence and self.tensor == 1:
            out.append("parallel.sequence=true needs parallel.tensor > 1 (sequence parallelism splits along the "
                       "tensor-parallel group)")
        return [p for p in out if p]
