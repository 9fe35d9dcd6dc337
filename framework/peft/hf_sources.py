"""The Hugging Face tensors behind a wrapped layer's weight, whole, and the way back to this rank's shard.

A LoRA-wrapped layer holds this TP rank's rows (column-parallel) or columns (row-parallel) of our fused
weight: q, k and v of ``qkv`` side by side per rank (KV heads replicated when TP exceeds them), gate and up
of a gated ``fc1`` interleaved per rank. What is computed on the checkpoint's own tensors (QLoRA's NF4 blocks,
as bitsandbytes makes them; PiSSA/OLoRA's decompositions, as HF PEFT makes them) must see those tensors
whole, so that every TP layout starts from the same model.
"""

from __future__ import annotations

import torch

from framework.models.fused_layout import fuse_gate_up, fuse_qkv, shard, split_qkv, unfuse_gate_up
from framework.models.kv_replication import dereplicate_rows, replicate_rows


def source_layout(layer, weight: torch.Tensor, kv_spec):
    """(the full HF tensors of ``layer``'s weight -- q, k, v for ``qkv``; gate and up for a gated ``fc1``; the
    whole matrix otherwise --, the function laying tensors shaped like them out as this rank's local tensor).
    The full matrix is gathered over TP for the time of the call (one layer); every TP rank calls."""
    tp, rank = layer.tp_size, layer.tp_rank
    shards = [weight]
    if tp > 1:
        shards = [torch.empty_like(weight) for _ in range(tp)]
        torch.distributed.all_gather(shards, weight.contiguous(), group=layer.tp_group)
    config = layer.base_layer.config
    if getattr(layer, "target", None) == "qkv":
        n = config.num_attention_heads
        g = kv_spec.num_groups if kv_spec is not None else config.num_query_groups
        q, k, v = split_qkv(torch.cat(dereplicate_rows(shards, n, g), dim=0), n, g)
        return [q, k, v], lambda ts: replicate_rows(fuse_qkv(*ts, n, g), n, g, tp, rank)
    if getattr(layer, "glu_fused", False):
        gate, up = unfuse_gate_up(shards)
        return [gate, up], lambda ts: fuse_gate_up(ts[0], ts[1], rank, tp)
    dim = 0 if layer.parallel_mode == "column" else 1
    return [torch.cat(shards, dim=dim)], lambda ts: shard(ts[0], dim, rank, tp)
