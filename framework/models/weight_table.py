"""Conversion tables: HF tensor names -> megatron parameters, through a few shared transforms.

A family's table is a tuple of :class:`WeightRule`. Placeholders in names: ``{i}`` is the layer index
(global in HF names, local to the pipeline stage in ours), ``{e}`` the expert index of a mixture-of-
experts layer (the same on both sides). Each transform has its inverse beside it::

    name         HF tensor(s) -> this TP rank's shard              inverse: every rank's shard -> HF tensor(s)
    replicate    W                                                  W (all ranks must agree)
    vocab        rows [r*V/tp, (r+1)*V/tp) of W                     cat over dim 0
    column       rows chunk r of W (column-parallel weight or bias) cat over dim 0
    row          columns chunk r of W (row-parallel weight)         cat over dim 1
    qkv          chunk r of fuse_qkv(q, k, v)  (weights or biases)  split_qkv(cat)
    gate_up      cat(chunk r of gate, chunk r of up)                unfuse_gate_up
    qkv_packed   a packed [q; k; v] (rows; MQA/GQA sizes) -> qkv    cat(q, k, v) of split_qkv
    conv1d_*     the same after a transpose (GPT-2's Conv1D stores [in, out])

Every rule carries enough for the importer (hf_import.py), the exporter (hf_export.py) and the checks
of the converters to treat all families alike.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Callable, Optional

import torch

from framework.models.fused_layout import fuse_gate_up, fuse_qkv, shard, split_qkv, unfuse_gate_up


@dataclasses.dataclass(frozen=True)
class ShardContext:
    """What a transform needs to know about the layout and the attention shapes."""

    tp_rank: int
    tp_size: int
    num_heads: int
    num_groups: int
    head_dim: int = 0


@dataclasses.dataclass(frozen=True)
class Transform:
    forward: Callable[[list, ShardContext], torch.Tensor]
    inverse: Callable[[list, ShardContext], list]
    n_hf: int = 1  # HF tensors per parameter


def _same(shards, ctx):
    for k, s in enumerate(shards[1:], 1):
        if not torch.equal(s, shards[0]):
            raise ValueError(f"a replicated parameter differs between TP rank 0 and {k}")
    return [shards[0]]


def _split_packed(w, ctx):
    """A packed [q; k; v] along dim 0 (q: n*d rows, k and v: g*d rows each)."""
    d = ctx.head_dim
    nq, nk = ctx.num_heads * d, ctx.num_groups * d
    if w.shape[0] != nq + 2 * nk:
        raise ValueError(f"packed qkv has {w.shape[0]} rows, expected {nq} + 2 x {nk}")
    return w[:nq], w[nq:nq + nk], w[nq + nk:]


def _qkv_fwd(ts, ctx):
    q, k, v = ts
    return shard(fuse_qkv(q, k, v, ctx.num_heads, ctx.num_groups), 0, ctx.tp_rank, ctx.tp_size)


def _qkv_inv(shards, ctx):
    return list(split_qkv(torch.cat(shards, dim=0), ctx.num_heads, ctx.num_groups))


TRANSFORMS: dict[str, Transform] = {
    "replicate": Transform(lambda ts, ctx: ts[0], _same),
    "vocab": Transform(lambda ts, ctx: shard(ts[0], 0, ctx.tp_rank, ctx.tp_size),
                       lambda sh, ctx: [torch.cat(sh, dim=0)]),
    "column": Transform(lambda ts, ctx: shard(ts[0], 0, ctx.tp_rank, ctx.tp_size),
                        lambda sh, ctx: [torch.cat(sh, dim=0)]),
    "row": Transform(lambda ts, ctx: shard(ts[0], 1, ctx.tp_rank, ctx.tp_size),
                     lambda sh, ctx: [torch.cat(sh, dim=1)]),
    "qkv": Transform(_qkv_fwd, _qkv_inv, n_hf=3),
    "gate_up": Transform(lambda ts, ctx: fuse_gate_up(ts[0], ts[1], ctx.tp_rank, ctx.tp_size),
                         lambda sh, ctx: list(unfuse_gate_up(sh)), n_hf=2),
    "qkv_packed": Transform(lambda ts, ctx: _qkv_fwd(_split_packed(ts[0], ctx), ctx),
                            lambda sh, ctx: [torch.cat(_qkv_inv(sh, ctx), dim=0)]),
    "conv1d_column": Transform(lambda ts, ctx: shard(ts[0].t(), 0, ctx.tp_rank, ctx.tp_size),
                               lambda sh, ctx: [torch.cat(sh, dim=0).t().contiguous()]),
    "conv1d_row": Transform(lambda ts, ctx: shard(ts[0].t(), 1, ctx.tp_rank, ctx.tp_size),
                            lambda sh, ctx: [torch.cat(sh, dim=1).t().contiguous()]),
    "conv1d_qkv_packed": Transform(lambda ts, ctx: _qkv_fwd(_split_packed(ts[0].t(), ctx), ctx),
                                   lambda sh, ctx: [torch.cat(_qkv_inv(sh, ctx), dim=0).t().contiguous()]),
}


def register_transform(name: str, transform: Transform) -> None:
    """For a family whose tensors need a transform of its own (kept in the family's module)."""
    if name in TRANSFORMS and TRANSFORMS[name] is not transform:
        raise ValueError(f"transform {name!r} is already registered")
    TRANSFORMS[name] = transform


@dataclasses.dataclass(frozen=True)
class WeightRule:
    """HF tensor name(s) -> one megatron parameter, through a named transform.

    ``te_ours`` is the same parameter's name under the Transformer Engine layer spec, where the norm
    before attention/MLP is fused into the following linear layer. ``when`` restricts the rule to
    tied or untied checkpoints.
    """

    hf: tuple[str, ...]
    ours: str
    transform: str
    te_ours: Optional[str] = None
    when: Optional[str] = None  # None | "tied" | "untied"

    @property
    def per_layer(self) -> bool:
        return "{i}" in self.ours

    @property
    def per_expert(self) -> bool:
        return "{e}" in self.ours

    def applies(self, tied: bool) -> bool:
        return self.when is None or (self.when == "tied") == tied


def name_regex(pattern: str) -> re.Pattern:
    """'model.layers.{i}.mlp.experts.{e}.w1.weight' -> a regex with groups 'i' and 'e'."""
    rx = re.escape(pattern)
    for key in ("i", "e"):
        rx = rx.replace(re.escape("{" + key + "}"), rf"(?P<{key}>\d+)")
    return re.compile("^" + rx + "$")


def experts(rule: WeightRule, num_experts: int) -> range:
    return range(num_experts) if rule.per_expert else range(1)


def classify_hf_name(name: str, rules, ignored, tied: bool, num_layers: int,
                     num_experts: int = 0) -> Optional[int | str]:
    """For a tensor name in an HF checkpoint: its layer index, 'global' (no layer), 'ignored', or None
    when the name is unknown. Raises ValueError for a layer or expert index beyond the model."""
    for pattern, when in ignored:
        if (when is None or (when == "tied") == tied) and name_regex(pattern).match(name):
            return "ignored"
    for rule in rules:
        if not rule.applies(tied):
            continue
        for pattern in rule.hf:
            m = name_regex(pattern).match(name)
            if m:
                groups = m.groupdict()
                if "e" in groups and int(groups["e"]) >= num_experts:
                    raise ValueError(f"HF tensor {name!r} belongs to expert {groups['e']}, but the model has "
                                     f"{num_experts} experts")
                if "i" not in groups:
                    return "global"
                layer = int(groups["i"])
                if layer >= num_layers:
                    raise ValueError(f"HF tensor {name!r} belongs to layer {layer}, but the model has "
                                     f"{num_layers} layers")
                return layer
    return None


def apply_transform(rule: WeightRule, tensors: list[torch.Tensor], ctx: ShardContext) -> torch.Tensor:
    return TRANSFORMS[rule.transform].forward(tensors, ctx)


def invert_transform(rule: WeightRule, shards: list[torch.Tensor], ctx: ShardContext) -> list[torch.Tensor]:
    return TRANSFORMS[rule.transform].inverse(shards, ctx)
