"""IA3 (Liu et al. 2022): learned scaling vectors on keys, values and the MLP intermediate activation, as
HF PEFT's IA3 for Llama (``target_modules=[k_proj, v_proj, down_proj]``, ``feedforward_modules=[down_proj]``):

    k = l_k * (W_k x)        v = l_v * (W_v x)        (HF: k_proj / v_proj output scaled, ia3_l [out, 1])
    mlp_out = W_down (l_ff * a)                       (HF: down_proj's *input* scaled, ia3_l [1, in])

Every vector starts at one, so a fresh IA3 model computes exactly its base.

Targets: ``k``, ``v`` (the key and value rows of megatron's fused ``linear_qkv`` output) and ``fc2`` (the
input of ``linear_fc2``, i.e. the activation after the gated MLP's silu(gate) * up).

The fused qkv output is in query-group order (framework/models/fused_layout.py): per group
``[q heads of the group, k, v]``, each head ``kv_channels`` wide, and a TP rank holds whole groups. So on
each rank the scale of the local qkv output is built per local group as ``[1 ... 1, l_k[group], l_v[group]]``.
The vectors are sharded like the activations they scale:

* l_k, l_v: [groups/TP * d] each, this rank's groups in order (partition dim 0); concatenated over TP ranks
  they are HF's k_proj / v_proj ``ia3_l`` in HF row order.
* l_ff: [ffn/TP], sharded like fc2's input (partition dim 0).

No communication at all; every gradient is complete on its rank (qkv's output and fc2's input cover the
full sequence even under sequence parallelism). Merging multiplies the k/v rows of this rank's qkv shard,
or the columns of its fc2 shard, by the vectors; unmerging divides.
"""

from __future__ import annotations

import torch
from torch import nn

from framework.peft.lora import targets_problems
from framework.peft.wrapping import PeftWrapper, Piece, check_targets, mark, param_like, wrap_targets

IA3_TARGETS = ("k", "v", "fc2")
_DESCRIBE = "k: keys, v: values (the k and v rows of the fused qkv output), fc2: the MLP intermediate activation"


class IA3QKV(PeftWrapper):
    """linear_qkv with its key and/or value rows scaled by learned vectors."""

    method = "ia3"
    TARGET_ORDER = IA3_TARGETS

    def __init__(self, base: nn.Module, parts=("k", "v")):
        super().__init__(base)
        if self.parallel_mode != "column":
            raise TypeError(f"IA3 on keys/values wraps the fused qkv ColumnParallelLinear, got {type(base).__name__}")
        cfg = base.config
        groups = cfg.num_query_groups or cfg.num_attention_heads
        if groups % self.tp_size:
            raise ValueError(f"IA3: {groups} query groups do not split over TP={self.tp_size}")
        self.groups_local = groups // self.tp_size
        self.q_per_group = cfg.num_attention_heads // groups
        self.head_dim = cfg.kv_channels
        self.parts = tuple(parts)
        width = self.groups_local * self.head_dim
        if self.groups_local * (self.q_per_group + 2) * self.head_dim != base.output_size_per_partition:
            raise ValueError("IA3: linear_qkv's output does not have megatron's query-group layout")
        for p in self.parts:
            param = param_like(base, (width,), fill=1.0)
            mark(param, 0, partial_grad=False)
            setattr(self, f"ia3_{p}", param)

    def scale(self) -> torch.Tensor:
        """[(heads + 2 groups)/TP * d]: 1 on query rows, l_k / l_v on key / value rows of each local group."""
        g, d = self.groups_local, self.head_dim
        ref = getattr(self, f"ia3_{self.parts[0]}")
        ones = torch.ones(g, d, dtype=ref.dtype, device=ref.device)
        k = self.ia3_k.view(g, d) if "k" in self.parts else ones
        v = self.ia3_v.view(g, d) if "v" in self.parts else ones
        q = torch.ones(g, self.q_per_group * d, dtype=ref.dtype, device=ref.device)
        return torch.cat([q, k, v], dim=1).reshape(-1)

    def forward(self, input_: torch.Tensor, *args, **kwargs):
        output, bias = self.base_layer(input_, *args, **kwargs)
        if self.merged:
            return output, bias
        if self.base_layer.gather_output or kwargs.get("runtime_gather_output"):
            raise ValueError("IA3 on a qkv layer that gathers its output is not supported")
        s = self.scale()
        return output * s.to(output.dtype), (None if bias is None else bias * s.to(bias.dtype))

    def _scale_weight(self, factor: torch.Tensor) -> None:
        base = self.base_layer
        base.weight.mul_(factor.unsqueeze(1).to(base.weight.dtype))
        if getattr(base, "bias", None) is not None:
            base.bias.mul_(factor.to(base.bias.dtype))

    def merge_refusal(self) -> str | None:
        return None

    @torch.no_grad()
    def merge(self) -> None:
        self._check_mergeable(True)
        self._scale_weight(self.scale())
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        self._check_mergeable(False)
        self._scale_weight(1.0 / self.scale())
        self.merged = False

    def covers(self) -> tuple[str, ...]:
        return self.parts

    def pieces(self) -> list[Piece]:
        return [Piece(f"ia3_{p}", "ia3_l", "out", 0, part=p, hf_unsqueeze=1) for p in self.parts]

    def settings(self) -> dict:
        return {}

    def extra_repr(self) -> str:
        return f"parts={self.parts}, groups/rank={self.groups_local}, tp={self.tp_size}"


class IA3FC2(PeftWrapper):
    """linear_fc2 with its input (the MLP intermediate activation) scaled by a learned vector."""

    method = "ia3"
    TARGET_ORDER = IA3_TARGETS

    def __init__(self, base: nn.Module):
        super().__init__(base)
        if self.parallel_mode != "row":
            raise TypeError(f"IA3 on fc2 wraps a RowParallelLinear, got {type(base).__name__}")
        self.ia3_l = param_like(base, (base.input_size_per_partition,), fill=1.0)
        mark(self.ia3_l, 0, partial_grad=False)

    def forward(self, input_: torch.Tensor, *args, **kwargs):
        if self.merged:
            return self.base_layer(input_, *args, **kwargs)
        return self.base_layer(input_ * self.ia3_l.to(input_.dtype), *args, **kwargs)

    def merge_refusal(self) -> str | None:
        return None

    @torch.no_grad()
    def merge(self) -> None:
        self._check_mergeable(True)
        self.base_layer.weight.mul_(self.ia3_l.unsqueeze(0).to(self.base_layer.weight.dtype))
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        self._check_mergeable(False)
        self.base_layer.weight.div_(self.ia3_l.unsqueeze(0).to(self.base_layer.weight.dtype))
        self.merged = False

    def covers(self) -> tuple[str, ...]:
        return ("fc2",)

    def pieces(self) -> list[Piece]:
        return [Piece("ia3_l", "ia3_l", "in", 0, hf_unsqueeze=0)]

    def settings(self) -> dict:
        return {}


def apply_ia3(model: nn.Module, targets=IA3_TARGETS) -> list[str]:
    """Freeze this stage and add IA3 vectors (all ones) on the chosen targets."""
    targets = check_targets(targets, IA3_TARGETS, "IA3", _DESCRIBE)
    parts = tuple(t for t in ("k", "v") if t in targets)
    module_targets = (("qkv",) if parts else ()) + (("fc2",) if "fc2" in targets else ())

    def make(base, target, layer_number):
        return IA3QKV(base, parts) if target == "qkv" else IA3FC2(base)

    return wrap_targets(model, module_targets, make)


def config_problems(cfg, model_cfg) -> list[str]:
    """Checks of ``cfg.peft`` for IA3 (its targets)."""
    return targets_problems(cfg.peft, IA3_TARGETS, "IA3")


def apply_from_config(model, peft_cfg, model_cfg) -> list[str]:
    return apply_ia3(model, targets=tuple(peft_cfg.targets))
