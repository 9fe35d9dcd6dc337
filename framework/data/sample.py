"""One tokenised training sample."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class Sample:
    """Token ids and which of them are training targets.

    ``loss_mask[i] == 1`` means token ``i`` is a *target*: the model is trained to predict
    ``input_ids[i]`` from ``input_ids[:i]``. Token 0 can never be a target (nothing precedes it), which is
    why batching shifts by one (see ``framework.data.batching.collate``).
    """

    input_ids: list[int]
    loss_mask: list[int]

    def __post_init__(self):
        if len(self.input_ids) != len(self.loss_mask):
            raise ValueError(f"Sample: {len(self.input_ids)} input_ids but {len(self.loss_mask)} loss_mask entries")

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def num_targets(self) -> int:
        return sum(self.loss_mask)
