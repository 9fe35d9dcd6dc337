"""Fold the model's adapter into its base weights, and take it out again, at any TP/PP layout.

Each wrapper merges into this rank's shard of its base weight, from its own shards of the adapter tensors
(LoRA: W_shard += s B A for the local blocks, s = alpha/r or alpha/sqrt(r); DoRA: W_shard <- (m/n)(W_shard
+ s B A); IA3: rows/columns scaled), so merging needs no communication beyond DoRA's norm all-reduce over
TP for row-parallel layers. While merged, a wrapper's forward is its base's; unmerging subtracts (divides)
the same update, which restores the base up to float rounding (about 1e-7 relative in fp32).

Methods whose update is not a change of the weight (Houlsby adapters), a tied output layer (its weight is
the embedding's) and NF4 bases (QLoRA) are refused with the reason, before any weight is touched. Every
rank of a stage must call these together.
"""

from __future__ import annotations

from torch import nn

from framework.peft.wrapping import peft_modules


def _wrappers(model: nn.Module) -> list:
    mods = list(peft_modules(model))
    if not mods:
        raise ValueError("the model has no adapter on this stage to merge")
    return mods


def merge_adapter(model: nn.Module) -> int:
    """Merge every wrapper of this stage into its base weight; returns how many were merged."""
    mods = _wrappers(model)
    for mod in mods:  # refuse before touching any weight
        reason = mod.merge_refusal()
        if reason:
            raise ValueError(reason)
    done = []
    try:
        for mod in mods:
            mod.merge()
            done.append(mod)
    except Exception:
        for mod in reversed(done):  # a subclass refused late: take back what was merged (up to rounding)
            mod.unmerge()
        raise
    return len(done)


def unmerge_adapter(model: nn.Module) -> int:
    """Take every merged wrapper's update out of its base weight again; returns how many were unmerged."""
    mods = _wrappers(model)
    for mod in mods:
        mod.unmerge()
    return len(mods)


def is_merged(model: nn.Module) -> bool:
    return any(mod.merged for mod in peft_modules(model))
