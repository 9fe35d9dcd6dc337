"""How megatron fuses and shards Llama's projections, as pure tensor functions.

Fused QKV (``linear_qkv``), grouped by query group so a TP shard holds whole groups::

    rows = [q_0 .. q_{n/g-1}, k, v] for group 0, then group 1, ...   each block head_dim rows
    n = query heads, g = KV heads (query groups); shape ((n + 2g) * d, h)

Gate/up (``linear_fc1`` with a gated linear unit) is fused *per TP rank*: rank r holds
``cat(gate_r, up_r)``, where ``gate_r`` is the r-th of ``tp`` row chunks of gate. The concatenation of
all ranks' shards is therefore not ``cat(gate, up)`` unless tp == 1; convert through these helpers only.

Row-parallel weights (``linear_proj``, ``linear_fc2``) shard dim 1; column-parallel ones dim 0.
"""

from __future__ import annotations

import torch


def fuse_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_heads: int, num_groups: int) -> torch.Tensor:
    """Stack HF q/k/v projection rows (or LoRA B factors) into megatron's query-group order."""
    d = k.shape[0] // num_groups
    rest = q.shape[1:]
    qg = q.reshape(num_groups, (num_heads // num_groups) * d, *rest)
    kg = k.reshape(num_groups, d, *rest)
    vg = v.reshape(num_groups, d, *rest)
    return torch.cat([qg, kg, vg], dim=1).reshape(-1, *rest)


def split_qkv(fused: torch.Tensor, num_heads: int, num_groups: int):
    """Inverse of :func:`fuse_qkv`: returns (q, k, v) in HF row order."""
    per_group = fused.shape[0] // num_groups
    d = per_group // (num_heads // num_groups + 2)
    rest = fused.shape[1:]
    g = fused.reshape(num_groups, per_group, *rest)
    nq = per_group - 2 * d
    q, k, v = g[:, :nq], g[:, nq:nq + d], g[:, nq + d:]
    return q.reshape(-1, *rest), k.reshape(-1, *rest), v.reshape(-1, *rest)


def shard(t: torch.Tensor, dim: int, rank: int, tp: int) -> torch.Tensor:
    """The rank-th of tp equal chunks along dim (contiguous copy)."""
    if t.shape[dim] % tp:
        raise ValueError(f"dimension {dim} of size {t.shape[dim]} does not split into {tp} equal shards")
    return t.chunk(tp, dim=dim)[rank].contiguous()


def fuse_gate_up(gate: torch.Tensor, up: torch.Tensor, rank: int, tp: int) -> torch.Tensor:
    """Rank r's shard of linear_fc1: cat(gate_r, up_r)."""
    return torch.cat([shard(gate, 0, rank, tp), shard(up, 0, rank, tp)], dim=0)


def unfuse_gate_up(shards: list[torch.Tensor]):
    """From every rank's linear_fc1 shard (in rank order) back to full (gate, up)."""
    gates, ups = zip(*(s.chunk(2, dim=0) for s in shards))
    return torch.cat(gates, dim=0), torch.cat(ups, dim=0)
