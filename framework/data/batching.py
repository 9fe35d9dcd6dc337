"""Turning samples into training batches: sample order, per-rank micro-batches, padded tensors.

Shift. A causal LM predicts token ``t+1`` from tokens ``0..t``. A sample of ``n`` ids becomes ``n-1``
positions: ``tokens[t] = input_ids[t]``, ``labels[t] = input_ids[t+1]`` and
``loss_mask[t] = sample.loss_mask[t+1]`` (position ``t`` carries loss iff its label is a target).

Padding. Rows are padded on the right with ``pad_id`` and ``loss_mask = 0`` (so padding never adds loss,
and causal attention means real positions never see it), to the longest row rounded up to
``pad_to_multiple_of`` (sequence parallelism splits the sequence over TP ranks, so it must divide), or to
a fixed ``seq_length``. Labels are padded with ``pad_id`` rather than -100: megatron's vocab-parallel
cross entropy needs every label to be a valid id, and the mask already removes those positions. A
training step's micro-batches (``collate_global_batch``) share one length only where pipeline parallelism
needs it; otherwise each is padded to its own longest row: the same loss over fewer positions when a
global batch mixes short and long samples.

Order. ``BatchOrder`` reads a fresh seeded permutation of all samples each epoch and cuts it into global
batches; a batch that reaches the end of an epoch continues into the next one, so every sample is seen
exactly once per epoch and none is skipped. Its position ``(epoch, position)`` is its whole state
(``state_dict`` adds a digest of the epoch's order, checked on ``load_state_dict``).

Packing. With ``data.packing`` several samples share a row: ``collate_packed`` (framework/data/packing.py,
re-exported here) and the batch semantics documented there.
"""

from __future__ import annotations

import hashlib
import math

import torch

from framework.data.packing import collate_packed  # noqa: F401  (re-export: the packed collate)
from framework.data.sample import Sample
from framework.data.seq2seq import collate_seq2seq, lengths


def collate(samples: list[Sample], pad_id: int, pad_to_multiple_of: int = 1,
            seq_length: int | None = None) -> dict[str, torch.Tensor]:
    """Batch-first tensors ``tokens``, ``labels``, ``position_ids`` (int64) and ``loss_mask`` (float32), [b, s]."""
    if not samples:
        raise ValueError("collate: no samples")
    if pad_to_multiple_of < 1:
        raise ValueError(f"collate: pad_to_multiple_of must be >= 1, got {pad_to_multiple_of}")
    lengths = [len(s.input_ids) - 1 for s in samples]
    if min(lengths) < 1:
        raise ValueError("collate: a sample needs at least 2 tokens (one input, one label)")
    longest = max(lengths)
    if seq_length is None:
        seq = math.ceil(longest / pad_to_multiple_of) * pad_to_multiple_of
    else:
        if seq_length % pad_to_multiple_of:
            raise ValueError(f"collate: seq_length={seq_length} is not a multiple of {pad_to_multiple_of}")
        if longest > seq_length:
            raise ValueError(f"collate: a sample needs {longest} positions but seq_length={seq_length}")
        seq = seq_length

    b = len(samples)
    tokens = torch.full((b, seq), pad_id, dtype=torch.long)
    labels = torch.full((b, seq), pad_id, dtype=torch.long)
    loss_mask = torch.zeros((b, seq), dtype=torch.float32)
    for row, (s, n) in enumerate(zip(samples, lengths)):
        ids = torch.as_tensor(s.input_ids, dtype=torch.long)
        tokens[row, :n] = ids[:-1]
        labels[row, :n] = ids[1:]
        loss_mask[row, :n] = torch.as_tensor(s.loss_mask[1:], dtype=torch.float32)
    position_ids = torch.arange(seq, dtype=torch.long).unsqueeze(0).expand(b, seq).contiguous()
    return {"tokens": tokens, "labels": labels, "loss_mask": loss_mask, "position_ids": position_ids}


class BatchOrder:
    """An endless, seeded, epoch-aware iterator over global batches of sample indices.

    Epoch ``e`` visits ``permutation(seed, e)`` of ``range(num_samples)``; a new permutation each epoch.
    The same ``(num_samples, global_batch_size, seed)`` and state always give the same batches, on every
    rank and across restarts, which is what resuming needs: save ``state_dict()``, later ``load_state_dict``.
    If ``global_batch_size > num_samples`` a batch spans several epochs and may repeat a sample.
    """

    def __init__(self, num_samples: int, global_batch_size: int, seed: int = 0):
        if num_samples < 1:
            raise ValueError(f"BatchOrder: need at least one sample, got {num_samples}")
        if global_batch_size < 1:
            raise ValueError(f"trainer.global_batch_size: expected >= 1, got {global_batch_size}")
        self.num_samples, self.global_batch_size, self.seed = num_samples, global_batch_size, seed
        self.epoch, self.position = 0, 0
        self._perm: list[int] | None = None

    def permutation(self, epoch: int) -> list[int]:
        """The sample order of ``epoch``: depends only on (seed, epoch, num_samples)."""
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)  # distinct stream per epoch
        return torch.randperm(self.num_samples, generator=g).tolist()

    @property
    def steps_per_epoch(self) -> float:
        return self.num_samples / self.global_batch_size

    def __iter__(self):
        return self

    def __next__(self) -> list[int]:
        batch: list[int] = []
        while len(batch) < self.global_batch_size:
            if self._perm is None:
                self._perm = self.permutation(self.epoch)
            take = min(self.global_batch_size - len(batch), self.num_samples - self.position)
            batch.extend(self._perm[self.position:self.position + take])
            self.position += take
            if self.position == self.num_samples:
                self.epoch, self.position, self._perm = self.epoch + 1, 0, None
        return batch

    def state_dict(self) -> dict:
        """The position, plus a SHA-256 of the current epoch's permutation: the order is regenerated from
        (seed, epoch) on load, and the digest proves it is the same order (a different torch could
        generate another one; resuming would then silently train on other batches)."""
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed,
                "num_samples": self.num_samples, "global_batch_size": self.global_batch_size,
                "permutation_sha256": _digest(self.permutation(self.epoch))}

    def load_state_dict(self, state: dict) -> None:
        """Continue from a saved position; refuse a state from a different data set, seed or order."""
        for key in ("seed", "num_samples"):
            if state[key] != getattr(self, key):
                raise ValueError(f"BatchOrder: saved {key}={state[key]} but this run has {key}={getattr(self, key)}; "
                                 "the data order cannot be resumed")
        if not 0 <= state["position"] < self.num_samples or state["epoch"] < 0:
            raise ValueError(f"BatchOrder: invalid saved position {state['epoch']}:{state['position']}")
        perm = self.permutation(int(state["epoch"]))
        if "permutation_sha256" in state and _digest(perm) != state["permutation_sha256"]:
            raise ValueError(f"BatchOrder: the sample order of epoch {state['epoch']} regenerated here differs from "
                             "the saved one (another torch version?); the data order cannot be resumed exactly")
        self.epoch, self.position, self._perm = int(state["epoch"]), int(state["position"]), perm


def _digest(permutation: list[int]) -> str:
    return hashlib.sha256(",".join(map(str, permutation)).encode()).hexdigest()


def micro_batches(indices: list[int], dp_rank: int, dp_size: int, micro_batch_size: int) -> list[list[int]]:
    """This data-parallel rank's micro-batches of a global batch.

    Rank ``r`` takes the ``r``-th contiguous slice of ``len(indices) / dp_size`` indices and cuts it into
    micro-batches of ``micro_batch_size``; the number of micro-batches is the gradient-accumulation count.
    """
    if micro_batch_size < 1 or dp_size < 1:
        raise ValueError(f"trainer.micro_batch_size ({micro_batch_size}) and data-parallel size ({dp_size}) "
                         "must be >= 1")
    if not 0 <= dp_rank < dp_size:
        raise ValueError(f"micro_batches: dp_rank {dp_rank} outside 0..{dp_size - 1}")
    step = micro_batch_size * dp_size
    if len(indices) % step:
        raise ValueError(f"trainer.global_batch_size ({len(indices)}) must be divisible by "
                         f"trainer.micro_batch_size x data-parallel size ({micro_batch_size} x {dp_size} = {step})")
    per_rank = len(indices) // dp_size
    mine = list(indices[dp_rank * per_rank:(dp_rank + 1) * per_rank])
    return [mine[i:i + micro_batch_size] for i in range(0, per_rank, micro_batch_size)]


def collate_global_batch(kind: str, micro_batch_indices: list[list[int]], indices: list[int], dataset,
                         pad_id: int, multiple: int = 1, same_length: bool = True) -> list[dict]:
    """This rank's micro-batches (``micro_batch_indices``) of a global batch (``indices``), padded to a
    multiple of ``multiple``. ``same_length``: every one to the global batch's longest, so that every
    micro-batch of every rank has one shape (pipeline parallelism sends activations of one shape per step);
    otherwise each to its own longest: without a pipeline nothing needs one shape, the loss is the same
    (padding carries none) and the shorter micro-batches cost less. ``kind`` is the model's
    (framework/models/kinds.py): a decoder-only model takes shifted token rows (:func:`collate`); an
    encoder-decoder model its encoder inputs and labels (framework/data/seq2seq.py), the decoder starting
    from the pad id (T5's ``decoder_start_token_id``)."""
    if kind == "encoder_decoder":
        # None: each micro-batch its own lengths
        se, sd = lengths([dataset[i] for i in indices]) if same_length else (None, None)
        return [collate_seq2seq([dataset[i] for i in mb], pad_id, pad_id, multiple, encoder_length=se,
                                decoder_length=sd) for mb in micro_batch_indices]
    if not same_length:
        return [collate([dataset[i] for i in mb], pad_id, pad_to_multiple_of=multiple) for mb in micro_batch_indices]
    longest = max(len(dataset[i].input_ids) - 1 for i in indices)
    seq = math.ceil(longest / multiple) * multiple
    return [collate([dataset[i] for i in mb], pad_id, seq_length=seq) for mb in micro_batch_indices]
