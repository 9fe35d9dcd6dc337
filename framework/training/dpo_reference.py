"""DPO's reference model: where the reference log-probabilities of a micro-batch come from (``dpo.reference``).

- ``adapters_disabled`` (the default for adapter methods): the policy network itself with its adapters
  switched off (``framework.peft.wrapping.adapters_disabled``), a forward-only pass before the policy's.
  The base weights are the reference: no second copy.
- ``frozen_copy`` (the default for full fine-tuning): a second model of the same family, built at the same
  TP/PP/SP layout and dtype, its weights copied from the policy's base weights before the first step, every
  parameter frozen; no DDP, no gradients, no optimizer state, one more (sharded) copy of the weights.
- ``precomputed``: before the first step, the reference log-probabilities of every training and validation
  pair are computed once (by the policy as it starts, adapters off) into a [pairs, 2] table held by every
  rank (float64, 16 bytes a pair); training then runs no reference forward at all. Each pair is computed by
  one data-parallel rank (pairs ``i`` with ``i % DP == rank``) and the table is summed over all ranks, with
  only the first TP rank of the last pipeline stage contributing.

Each reference exposes ``attach(micro_batches, indices, split)``: it sets ``ref_logps`` (float32 [2m], the
chosen sequences first, as ``framework.data.preference`` orders them, packed or not) on every micro-batch of
this rank; ``indices`` are the pair indices of each micro-batch in the ``split`` ("train" or
"validation") data set, in that order. Off the last pipeline stage the values are zeros (only the last
stage's loss reads them).

Checkpoints and resume (``save(directory)``, ``load_tables``). The reference is the model as training
*starts*, so the job builds it before a resume restores the trained weights: ``adapters_disabled`` needs
nothing saved (its base weights never change), ``frozen_copy`` is copied from the freshly loaded starting
weights again. ``precomputed`` writes its tables into every checkpoint (``reference_logps.safetensors``,
keys ``train`` and ``validation``, float64 [pairs, 2]) and a resume reads them back instead of computing
them again, so the reference is bitwise the one the interrupted run used, at any layout.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file

from framework.models.unwrap import unwrap_model
from framework.peft.wrapping import adapters_disabled, is_adapter_key
from framework.training.dpo import num_pairs, sequence_logps

TABLES_FILE = "reference_logps.safetensors"


def _set(micro_batches: list[dict], logps: list[torch.Tensor] | None) -> None:
    for i, mb in enumerate(micro_batches):
        mb["ref_logps"] = (torch.zeros(2 * num_pairs(mb), dtype=torch.float32) if logps is None
                           else logps[i].float().cpu())


class _NothingToSave:
    def save(self, directory) -> None:
        """The reference is rebuilt from the starting weights on resume: nothing to write."""


class AdaptersDisabled(_NothingToSave):
    """The policy with its adapters switched off."""

    def __init__(self, model, precision: str):
        self.model, self.precision = model, precision

    def attach(self, micro_batches: list[dict], indices=None, split: str = "train") -> None:
        with adapters_disabled(self.model):
            _set(micro_batches, sequence_logps(self.model, micro_batches, self.precision))


class FrozenCopy(_NothingToSave):
    """A frozen second model holding the policy's starting base weights."""

    def __init__(self, reference_model, precision: str):
        self.model, self.precision = reference_model, precision

    def attach(self, micro_batches: list[dict], indices=None, split: str = "train") -> None:
        _set(micro_batches, sequence_logps(self.model, micro_batches, self.precision))


def frozen_copy(policy, build):
    """``build()`` a model of the same family and layout, copy the policy's base weights into it (adapter
    tensors left out) and freeze it. Copying rather than loading the checkpoint again also makes a randomly
    initialised policy (model.source=random) its own reference."""
    ref = build()
    state = {k: v for k, v in unwrap_model(policy).state_dict().items() if not is_adapter_key(k)}
    unwrap_model(ref).load_state_dict(state, strict=True)
    for p in ref.parameters():
        p.requires_grad_(False)
    return ref.eval()


class Precomputed:
    """Reference log-probabilities looked up in tables computed once before training."""

    def __init__(self, tables: dict[str, torch.Tensor]):
        self.tables = tables  # split -> float64 [pairs, 2]: (chosen, rejected)

    def save(self, directory) -> None:
        """Write the tables into checkpoint ``directory`` (global rank 0; every rank holds the same)."""
        if dist.get_rank() == 0:
            save_file({k: v.contiguous() for k, v in self.tables.items()}, str(Path(directory) / TABLES_FILE))

    def attach(self, micro_batches: list[dict], indices, split: str = "train") -> None:
        table = self.tables[split]
        for mb, idx in zip(micro_batches, indices):
            rows = table[torch.as_tensor(list(idx), dtype=torch.long)]
            mb["ref_logps"] = torch.cat([rows[:, 0], rows[:, 1]]).float()


def load_tables(checkpoint, sizes: dict[str, int]) -> dict[str, torch.Tensor]:
    """The tables a checkpoint holds, checked against this run's pair counts ``{split: pairs}``."""
    path = Path(checkpoint) / TABLES_FILE
    tables = load_file(str(path))
    for split, n in sizes.items():
        shape = tuple(tables[split].shape) if split in tables else None
        if shape != (n, 2):
            raise ValueError(f"{path}: {split} table has shape {shape}, this run has {n} {split} pairs "
                             "(expected [pairs, 2]); the data changed since the checkpoint was written")
    return tables


def precompute_table(model, pairs, micro_batch_size: int, collate, precision: str) -> torch.Tensor:
    """float64 [len(pairs), 2] reference log-probabilities of ``pairs`` (chosen, rejected) under ``model``
    with its adapters off, the same on every rank. ``collate(list of pairs)`` makes a micro-batch."""
    from megatron.core import parallel_state as ps

    dp, rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    mine = list(range(rank, len(pairs), dp))
    chunks = [mine[i:i + micro_batch_size] for i in range(0, len(mine), micro_batch_size)]
    micro_batches = [collate([pairs[i] for i in c]) for c in chunks]
    table = torch.zeros(len(pairs), 2, dtype=torch.float64)
    with adapters_disabled(model):
        logps = sequence_logps(model, micro_batches, precision) if micro_batches else []
    if logps is not None and ps.get_tensor_model_parallel_rank() == 0:
        for c, lp in zip(chunks, logps):
            m = len(c)
            table[c, 0], table[c, 1] = lp[:m].double().cpu(), lp[m:].double().cpu()
    device = next(model.parameters()).device
    table = table.to(device)
    dist.all_reduce(table)
    return table.cpu()
