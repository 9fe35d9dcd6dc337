"""``model.*``: where the weights and tokenizer come from, and the architecture they must have (conf/model/)."""

from __future__ import annotations

import dataclasses
from typing import Any

from framework.config.checks import one_of

#: model.source: the bundled SmolLM2 (converted once), an HF directory, our checkpoint (or .tar), or random
#: weights of model.arch (tests, benchmarks; needs model.tokenizer)
SOURCES = ("smollm2", "hf", "ckpt", "random")


@dataclasses.dataclass
class ModelSection:
    name: str = "model"
    source: str = "hf"
    path: str | None = None
    tokenizer: str | None = None
    # family and sizes; checked against the checkpoint's config.json on load (framework/models/config.py
    # reads it into a ModelConfig, which knows every field)
    arch: dict[str, Any] = dataclasses.field(default_factory=dict)

    def problems(self) -> list[str]:
        # a missing model.path is framework/checkpoint/hub.py's to report: planning needs no weights
        return [p for p in [one_of("model.source", self.source, SOURCES)] if p]
