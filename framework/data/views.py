"""Read-only sequences of samples over another sequence, so that splitting or padding a memory-mapped
data set (``framework.data.cache.CachedSamples``) never copies it.

- ``holdout_split(n, fraction, seed)``: the validation split of ``data.validation_split``. A permutation of
  ``range(n)`` seeded with ``seed`` (numpy PCG64, the same on every rank and machine) puts its first
  ``round(fraction * n)`` indices (at least 1, at most ``n - 1``) in validation and the rest in training;
  both index lists are returned sorted, so each half keeps the file's order.
- ``Subset(base, indices)``: ``base[indices[i]]``; the two halves of a split.
- ``Padded(base, multiple)``: ``base`` followed by zero-target copies of ``base[0]`` up to a multiple of
  ``multiple``. Evaluation runs in whole groups of micro-batch x data-parallel size; the copies add neither
  loss nor target tokens, so the mean loss per target token is over every sample exactly once, at any layout.
"""

from __future__ import annotations

import operator
from collections.abc import Sequence

import numpy as np

from framework.data.sample import Sample


def holdout_split(n: int, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``(train indices, held-out indices)`` of ``n`` samples; see the module docstring."""
    if n < 2:
        raise ValueError(f"holdout_split: need at least 2 samples to hold some out, got {n}")
    if not 0 < fraction < 1:
        raise ValueError(f"holdout_split: fraction must be between 0 and 1, got {fraction}")
    k = min(max(1, round(fraction * n)), n - 1)
    perm = np.random.default_rng(seed).permutation(n)
    return np.sort(perm[k:]), np.sort(perm[:k])


def sample_index(i, n: int) -> int:
    """``i`` as a non-negative index into ``n`` samples (negative counts from the end); IndexError outside."""
    i = operator.index(i)
    if i < 0:
        i += n
    if not 0 <= i < n:
        raise IndexError(f"sample index {i} out of range ({n} samples)")
    return i


class Subset(Sequence):
    """``base[indices[i]]`` for ``i < len(indices)``."""

    def __init__(self, base: Sequence[Sample], indices):
        self.base, self.indices = base, np.asarray(indices, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i) -> Sample:
        return self.base[int(self.indices[sample_index(i, len(self))])]


class Padded(Sequence):
    """``base`` then zero-target copies of ``base[0]`` up to a multiple of ``multiple`` samples."""

    def __init__(self, base: Sequence[Sample], multiple: int):
        if len(base) == 0 or multiple < 1:
            raise ValueError(f"Padded: need samples and a multiple >= 1, got {len(base)} and {multiple}")
        self.base, self.total = base, -(-len(base) // multiple) * multiple
        first = base[0]
        self.filler = Sample(list(first.input_ids), [0] * len(first))

    def __len__(self) -> int:
        return self.total

    def __getitem__(self, i) -> Sample:
        i = sample_index(i, self.total)
        return self.base[i] if i < len(self.base) else self.filler
