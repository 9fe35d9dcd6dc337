"""The one parameter counter: (trainable, total) of a built model at any layout (:func:`count_parameters`,
what every job logs), and the counts of a PEFT method for a model configuration without allocating the
model (:func:`count_on_meta`, ``mft params``), counted by the same function. (The memory planner's
formula in framework/planner/params.py predicts these from the shapes before anything is built; its tests
check it against built models.)

Counting rule: every weight once, whatever the layout: tensor-parallel shards summed, replicated tensors
counted once (not once per TP rank), KV heads copied over TP ranks (framework/models/kv_replication.py)
counted once, pipeline stages summed, data-parallel replicas not added; quantised base weights (QLoRA's
NF4) are buffers, not parameters, and are counted in ``total`` by their element count.

For :func:`count_on_meta` the whole model (TP = PP = 1) is built inside ``torch.device("meta")``: every tensor megatron creates
without an explicit device is a meta tensor (shape and dtype, no storage), so an 8B-parameter model costs
a few MB of Python objects. The method is applied as the job applies it (framework/peft/registry.py), then
parameters are counted. Quantised base weights (QLoRA's NF4) are buffers, not parameters; they are counted
in ``total`` and their bytes reported. The one tensor megatron builds on an explicit CPU device is RoPE's
inverse-frequency vector (head_dim / 2 floats).

Needs megatron's process groups of a single process (``framework.runtime.initialize()``).
"""

from __future__ import annotations

import dataclasses

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps

from framework.models.kv_replication import extra_copies
from framework.models.registry import get_family
from framework.peft.nf4 import NF4Weight
from framework.peft.qlora import quantized_numel
from framework.peft.registry import apply_peft


@dataclasses.dataclass
class ParamCount:
    method: str
    trainable: int
    total: int               # every weight of the model, quantised ones included
    quantized: int = 0       # elements stored as NF4 (QLoRA), part of total
    nf4_bytes: int = 0       # their storage
    allocated: int = 0       # elements of real (non-meta) parameters and buffers: the price of counting

    @property
    def fraction(self) -> float:
        return self.trainable / self.total if self.total else 0.0


def count_parameters(model) -> tuple[int, int]:
    """(trainable, total) over the whole model (all ranks call): see the counting rule above."""
    copies = extra_copies(model)  # KV heads replicated over TP ranks count once

    def numel(p):  # replicated parameters would be counted once per TP rank
        if getattr(p, "tensor_model_parallel", False):
            return p.numel() - copies.get(id(p), 0)
        return p.numel() / ps.get_tensor_model_parallel_world_size()

    quantized = quantized_numel(model)  # QLoRA: TP shards (KV copies once), not params
    t = torch.tensor([sum(numel(p) for p in model.parameters() if p.requires_grad),
                      sum(numel(p) for p in model.parameters()) + quantized], dtype=torch.float64)
    if ps.get_data_parallel_rank() != 0:
        t.zero_()
    dist.all_reduce(t)
    return int(round(t[0].item())), int(round(t[1].item()))


def count_on_meta(model_cfg, peft_cfg, **build_kwargs) -> ParamCount:
    """Build ``model_cfg`` on the meta device, apply ``peft_cfg`` (an OmegaConf node with ``method``), count."""
    with torch.device("meta"):
        model = get_family(model_cfg.family).build(model_cfg, 1, 1, False, **build_kwargs)
        apply_peft(model, peft_cfg, model_cfg)
    nf4 = [m for m in model.modules() if isinstance(m, NF4Weight)]
    quantized = quantized_numel(model)
    tensors = list(model.parameters()) + list(model.buffers())
    trainable, total = count_parameters(model)
    return ParamCount(method=str(peft_cfg.method), trainable=trainable, total=total,
                      quantized=quantized, nf4_bytes=sum(m.nbytes() for m in nf4),
                      allocated=sum(t.numel() for t in tensors if not t.is_meta))


def format_table(counts: list[ParamCount], model_name: str) -> str:
    rows = [("method", "trainable", "total", "trainable %", "notes")]
    for c in counts:
        note = ""
        if c.quantized:
            note = (f"{c.quantized:,} base weights in NF4: {c.nf4_bytes / 2 ** 30:.2f} GiB "
                    f"(bf16: {2 * c.quantized / 2 ** 30:.2f} GiB)")
        rows.append((c.method, f"{c.trainable:,}", f"{c.total:,}", f"{100 * c.fraction:.4f}", note))
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    lines = [f"Trainable parameters for {model_name} (counted on the meta device, TP=PP=1)"]
    for i, r in enumerate(rows):
        lines.append("  ".join(v.rjust(w) if 0 < j < 4 else v.ljust(w) for j, (v, w) in enumerate(zip(r, widths))).rstrip())
        if i == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)
