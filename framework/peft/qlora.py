"""QLoRA: LoRA on top of base linear weights stored in 4-bit NF4 (framework/peft/nf4.py).

    y = deq(W_nf4) x + s * B A dropout(x)

``apply_qlora`` first wraps the targets with :class:`~framework.peft.lora.LoRALinear` exactly as LoRA does
(same TP/SP layout of A and B, same initialisation, same adapter files), then replaces each wrapped base
layer's ``weight`` parameter by an :class:`~framework.peft.nf4.NF4Weight` holding this rank's shard. The
blocks are those of the Hugging Face tensors (q, k, v; gate, up; the others whole), quantised on the full
matrix -- gathered over TP one layer at a time -- exactly as bitsandbytes quantises a checkpoint; each rank
keeps its elements' codes and the constants of the blocks they touch. So every TP/PP layout trains the same
quantised model (a row-parallel shard narrower than a block keeps the constants of every block of its
rows' span: a little more than 1/64 byte per element of the full matrix). The base layer
stays megatron's Column/RowParallelLinear with all its communication; only its matmul changes:
``_forward_impl`` becomes :func:`nf4_frozen_linear`, which dequantises the weight in forward and again in
backward (for the input gradient), keeping no full-precision copy between the two. The dequantised
weight exists only for the duration of one matmul.

Only the transformer layers' linears (qkv, proj, fc1, fc2) are quantised; an ``embedding`` or ``output``
target gets plain LoRA over its full-precision weight. Merging into an NF4 base is refused.

Memory: the base linear weights of this rank go from ``numel x bytes(dtype)`` to
:func:`~framework.peft.nf4.nf4_bytes` (about 4.13 bits per element); ``apply_qlora`` logs both (this rank's
bytes, so with KV heads replicated over TP ranks the copies it holds). Parameter counts take
:func:`quantized_numel`, which counts each replicated KV head once.
Embeddings, norms and the output layer stay in full precision, as in the paper.

Saving: a QLoRA adapter *is* a LoRA adapter (the factors, with HF names), written by the LoRA writer; it
loads onto a quantised or a full-precision base.
"""

from __future__ import annotations

import logging

import torch

from framework.models.kv_replication import extra_copies
from framework.models.unwrap import unwrap_model
from framework.peft.hf_sources import source_layout
from framework.peft.lora import TARGETS, LoRALinear, apply_lora, lora_modules, targets_problems
from framework.peft.nf4 import NF4Weight

log = logging.getLogger(__name__)


class _NF4FrozenLinear(torch.autograd.Function):
    """megatron's LinearWithFrozenWeight with the weight dequantised from NF4 in forward and backward."""

    @staticmethod
    def forward(ctx, input, nf4: NF4Weight, bias, allreduce_dgrad: bool, tp_group):
        ctx.nf4, ctx.allreduce_dgrad, ctx.tp_group = nf4, allreduce_dgrad, tp_group
        output = torch.matmul(input, nf4.dequantize().t())
        return output + bias if bias is not None else output

    @staticmethod
    def backward(ctx, grad_output):
        grad_input = grad_output.matmul(ctx.nf4.dequantize(grad_output.dtype))
        if ctx.allreduce_dgrad:
            torch.distributed.all_reduce(grad_input, group=ctx.tp_group)
        return grad_input, None, None, None, None


def nf4_frozen_linear(input, weight, bias, gradient_accumulation_fusion=False, allreduce_dgrad=False,
                      sequence_parallel=False, tp_group=None, grad_output_buffer=None, wgrad_deferral_limit=None):
    """Drop-in for megatron's ``linear_with_frozen_weight`` (same arguments) with an :class:`NF4Weight`."""
    from megatron.core.tensor_parallel.mappings import gather_from_sequence_parallel_region
    from megatron.core.utils import get_tensor_model_parallel_group_if_none

    tp_group = get_tensor_model_parallel_group_if_none(tp_group)
    if sequence_parallel:
        input = gather_from_sequence_parallel_region(input, tensor_parallel_output_grad=True, group=tp_group)
    return _NF4FrozenLinear.apply(input, weight, bias, allreduce_dgrad, tp_group)


#: the transformer-layer linears whose bases are quantised (the output layer and embedding stay as they are)
QUANTIZED_TARGETS = ("qkv", "proj", "fc1", "fc2")


class QLoRALinear(LoRALinear):
    """LoRALinear over a base whose weight may be NF4; same factors, files and forward."""

    def merge(self) -> None:
        if isinstance(self.base_layer.weight, NF4Weight):
            raise ValueError(f"{self.where()}: cannot merge a LoRA update into 4-bit NF4 base weights (the sum is "
                             f"not representable in NF4); load the base in full precision (peft=lora) and load "
                             f"this adapter -- a QLoRA adapter is a LoRA adapter -- then merge")
        super().merge()


def quantize_base(layer: LoRALinear, block_size: int = 64, scaler_block_size: int = 256,
                  kv_spec=None) -> tuple[int, int]:
    """Store ``layer.base_layer.weight`` (this rank's shard) as NF4 in place; return (bytes before, after).

    The blocks are those of the full source tensors (framework/peft/hf_sources.py): every layout holds the same
    quantised model, bit for bit the one bitsandbytes makes of the Hugging Face checkpoint. ``kv_spec``: the
    model's KV-head replication (``gpt.kv_replication``), None without.
    """
    base = layer.base_layer
    weight = base.weight
    if isinstance(weight, NF4Weight):
        raise ValueError(f"{layer.target} of layer {layer.layer_number} is already quantised")
    before = weight.numel() * weight.element_size()
    with torch.no_grad():
        sources, to_local = source_layout(layer, weight.detach(), kv_spec)
        nf4 = NF4Weight.from_sources(sources, to_local, tuple(weight.shape), weight.dtype, block_size,
                                     scaler_block_size)
    del sources
    del base.weight  # the full-precision parameter goes; the module attribute becomes the NF4 storage
    base.weight = nf4
    base._forward_impl = nf4_frozen_linear  # instance attribute: overrides the class's matmul dispatch
    return before, nf4.nbytes()


def apply_qlora(model, targets=("qkv", "proj", "fc1", "fc2"), rank: int = 8, alpha: float = 16,
                dropout: float = 0.0, rslora: bool = False, block_size: int = 64, scaler_block_size: int = 256,
                seed: int | None = None) -> dict:
    """LoRA on the targets (as :func:`apply_lora`), then their base weights to NF4.

    Returns ``{"bytes_before", "bytes_after", "layers"}`` for this rank's quantised base weights.
    """
    apply_lora(model, targets=targets, rank=rank, alpha=alpha, dropout=dropout, rslora=rslora, seed=seed,
               linear_cls=QLoRALinear)
    kv_spec = getattr(unwrap_model(model), "kv_replication", None)
    before = after = layers = 0
    for _, target, mod in lora_modules(model):
        if target not in QUANTIZED_TARGETS:
            continue
        b, a = quantize_base(mod, block_size, scaler_block_size, kv_spec)
        before, after, layers = before + b, after + a, layers + 1
    if before:
        log.info("QLoRA: %d base linear weights of this rank stored as NF4 (blocks %d, constants in blocks of "
                 "%d): %.2f MiB -> %.2f MiB, %.2f MiB saved (%.1fx smaller)", layers, block_size,
                 scaler_block_size, before / 2 ** 20, after / 2 ** 20, (before - after) / 2 ** 20, before / after)
    return {"bytes_before": before, "bytes_after": after, "layers": layers}


def quantized_numel(model) -> int:
    """Base-weight elements this rank stores as NF4 (they are buffers, not parameters), each KV head that is
    replicated over TP ranks counted on its first copy only (framework/models/kv_replication.py
    ``extra_copies``, as parameter counts do): summed over TP ranks, the model's own count."""
    copies = extra_copies(model)
    return sum(m.numel() - copies.get(id(m), 0) for m in model.modules() if isinstance(m, NF4Weight))


def config_problems(cfg, model_cfg) -> list[str]:
    """What is wrong with ``cfg.peft``'s targets for QLoRA (the keys' values, block sizes included, are
    checked by framework/config/peft.py's section)."""
    return targets_problems(cfg.peft, TARGETS, "QLoRA")
