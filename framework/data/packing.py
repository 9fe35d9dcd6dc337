"""Sequence packing: several samples share one fixed-length row, each attending only to itself.

Bins. ``pack(lengths, bin_size)`` assigns sample indices to bins of ``bin_size`` positions by best-fit
decreasing: samples in decreasing length (ties by index, so the packing is deterministic), each put in
the fullest bin it still fits in, or a new bin. A sample of ``n`` token ids occupies ``n - 1`` positions
after the label shift (see ``framework.data.batching``), so callers pass those lengths.
``packing_efficiency`` = used positions / (bins x bin_size).

Rows. ``collate_packed`` builds one row per bin: its samples concatenated, each shifted exactly as
``collate`` shifts one sample (tokens = ids[:-1], labels = ids[1:], loss_mask = mask[1:]),
``position_ids`` restarting at 0 at every sample (the model takes RoPE angles from them, see
``framework.models.gpt``), right padding with ``loss_mask = 0``, and a boolean ``attention_mask``
[b, 1, s, s], True where attention is forbidden (megatron's convention): block-diagonal causal, so a token
sees only earlier tokens of its own sample; a padding position sees only itself (no all-masked softmax
row, no NaN). Per-sample losses and gradients are then those of the same samples batched one per row.

Batch semantics when ``data.packing`` is true. A global batch is ``trainer.global_batch_size`` *bins*
(rows of ``data.max_length`` positions, rounded up to a multiple of TP under sequence parallelism), split
into micro-batches of ``trainer.micro_batch_size`` bins per data-parallel rank; it therefore holds more
samples than ``global_batch_size`` (about ``efficiency x max_length / mean sample length`` per row).
The loss is still the mean over all target tokens of the global batch, exactly as without packing. The
training set is packed once, at the start, in the deterministic order above; ``BatchOrder`` then
shuffles bins each epoch (an epoch visits every bin, hence every sample, once). Validation is not packed,
so validation losses stay comparable between packed and unpacked runs.
"""

from __future__ import annotations

import bisect

import torch

from framework.data.sample import Sample


def pack(lengths: list[int], bin_size: int) -> list[list[int]]:
    """Best-fit decreasing: bins (lists of indices into ``lengths``) whose lengths sum to <= ``bin_size``."""
    if bin_size < 1:
        raise ValueError(f"pack: bin_size must be >= 1, got {bin_size}")
    for i, n in enumerate(lengths):
        if n > bin_size:
            raise ValueError(f"pack: sample {i} needs {n} positions but bins hold {bin_size}; "
                             "truncate or drop it first (data.max_length)")
        if n < 1:
            raise ValueError(f"pack: sample {i} has length {n}; every sample needs at least 1 position")
    bins: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (remaining capacity, bin id), sorted: best fit = first with room
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        n = lengths[i]
        k = bisect.bisect_left(free, (n, -1))
        if k < len(free):
            room, b = free.pop(k)
        else:
            room, b = bin_size, len(bins)
            bins.append([])
        bins[b].append(i)
        if room - n > 0:
            bisect.insort(free, (room - n, b))
    return bins


def packing_efficiency(bins: list[list[int]], lengths: list[int], bin_size: int) -> float:
    """Used positions / available positions (bins x bin_size); 1.0 is perfect packing."""
    if not bins:
        return 0.0
    return sum(lengths[i] for b in bins for i in b) / (len(bins) * bin_size)


def sample_positions(sample: Sample) -> int:
    """Positions a sample occupies in a row after the label shift."""
    return len(sample.input_ids) - 1


def collate_packed(rows: list[list[Sample]], pad_id: int, seq_length: int) -> dict[str, torch.Tensor]:
    """One row per bin: ``tokens``, ``labels``, ``position_ids`` (int64), ``loss_mask`` (float32) [b, s] and
    ``attention_mask`` (bool, True = masked out) [b, 1, s, s]; see the module docstring."""
    if not rows or any(not r for r in rows):
        raise ValueError("collate_packed: need at least one bin and no empty bins")
    b = len(rows)
    tokens = torch.full((b, seq_length), pad_id, dtype=torch.long)
    labels = torch.full((b, seq_length), pad_id, dtype=torch.long)
    loss_mask = torch.zeros((b, seq_length), dtype=torch.float32)
    position_ids = torch.zeros((b, seq_length), dtype=torch.long)
    # segment id per position: sample k of the row -> k; padding -> -(1 + position), unique, so it sees itself
    segment = -1 - torch.arange(seq_length).repeat(b, 1)
    for r, samples in enumerate(rows):
        at = 0
        for k, s in enumerate(samples):
            n = sample_positions(s)
            if n < 1:
                raise ValueError("collate_packed: a sample needs at least 2 tokens (one input, one label)")
            if at + n > seq_length:
                raise ValueError(f"collate_packed: bin {r} needs more than seq_length={seq_length} positions")
            ids = torch.as_tensor(s.input_ids, dtype=torch.long)
            tokens[r, at:at + n] = ids[:-1]
            labels[r, at:at + n] = ids[1:]
            loss_mask[r, at:at + n] = torch.as_tensor(s.loss_mask[1:], dtype=torch.float32)
            position_ids[r, at:at + n] = torch.arange(n)
            segment[r, at:at + n] = k
            at += n
    causal = torch.ones(seq_length, seq_length, dtype=torch.bool).tril()
    allowed = (segment[:, :, None] == segment[:, None, :]) & causal
    return {"tokens": tokens, "labels": labels, "loss_mask": loss_mask, "position_ids": position_ids,
            "attention_mask": (~allowed).unsqueeze(1)}
