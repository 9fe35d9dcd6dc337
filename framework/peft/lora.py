"""LoRA for megatron-core's tensor-parallel linear layers, wrapped in place.

    y = W x + s * B A dropout(x),   s = alpha / r   (rsLoRA: s = alpha / sqrt(r))

W is the frozen base weight; A (r x in) starts kaiming-uniform, B (out x r) starts at zero, so a freshly
wrapped layer computes exactly what its base computed.

Under tensor parallelism the big side of each factor is sharded like the base and the small side is
replicated, so the LoRA branch only ever communicates r-wide activations (DESIGN.md section 5):

Column-parallel base (input x full on every rank, output sharded; fused QKV, fc1)::

    A (r x in)       whole on every rank
    B (out/TP x r)   sharded like the base output (partition dim 0)
    u = A x          -> copy-to-tensor-parallel-region        (backward: all-reduce du, r-wide)
    SP: x is the local sequence slice [s/TP, b, in]
    u = A x_local    -> gather-from-sequence-parallel-region  (all-gather u forward, reduce-scatter du back)
    y_lora = s * B_shard u                                     [s, b, out/TP]

Row-parallel base (input sharded on the hidden dim; proj, fc2)::

    A (r x in/TP)    sharded like the base input (partition dim 1)
    B (out x r)      whole on every rank
    u = sum_TP A_shard x_shard   reduce-from-tensor-parallel-region (all-reduce u, r-wide)
    SP:                          reduce-scatter-to-sequence-parallel-region (u for the local sequence slice)
    y_lora = s * B u

A replicated factor whose gradient is only partial on each rank (A of a column base under SP: each rank
saw its own tokens; B of a row base under SP, likewise) carries ``param.sequence_parallel = True``, so
megatron's ``finalize_model_grads`` all-reduces its gradient over TP as it does for norm weights. Sharded
factors carry ``tensor_model_parallel / partition_dim / partition_stride`` so the grad norm counts them on
every rank, while replicated ones are counted on TP rank 0 only. Nothing requires TP to divide r.

The wrapper keeps the base's state-dict keys (``...linear_qkv.weight`` stays that key; the factors add
``...linear_qkv.lora_A.weight`` / ``lora_B.weight``), and its ``sharded_state_dict`` delegates to the base,
so megatron dist_checkpointing of base weights is the same with or without LoRA.
"""

from __future__ import annotations

import math
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn

#: target name -> (submodule of a TransformerLayer, attribute), for megatron's GPT layer.
TARGETS = {
    "qkv": ("self_attention", "linear_qkv"),
    "proj": ("self_attention", "linear_proj"),
    "fc1": ("mlp", "linear_fc1"),
    "fc2": ("mlp", "linear_fc2"),
}


def _parallel_mode(base: nn.Module) -> str:
    from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear

    if isinstance(base, ColumnParallelLinear):
        return "column"
    if isinstance(base, RowParallelLinear):
        return "row"
    raise TypeError(
        f"LoRA wraps megatron-core's ColumnParallelLinear or RowParallelLinear, got {type(base).__name__}. "
        f"Transformer Engine layers (e.g. TELayerNormColumnParallelLinear, which fuses the input norm) are "
        f"not supported yet: build the model with the local layer spec.")


def _mark(param: nn.Parameter, sharded_dim: int | None, partial_grad: bool) -> None:
    from megatron.core.tensor_parallel.layers import set_tensor_model_parallel_attributes

    set_tensor_model_parallel_attributes(param, sharded_dim is not None,
                                         -1 if sharded_dim is None else sharded_dim, 1)
    if partial_grad:
        param.sequence_parallel = True


class _Factor(nn.Module):
    """One LoRA factor, kept as a module so its key is ``lora_A.weight`` / ``lora_B.weight`` as in HF PEFT."""

    def __init__(self, shape: tuple[int, int], like: torch.Tensor):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(shape, device=like.device, dtype=like.dtype))

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}"


class LoRALinear(nn.Module):
    """A megatron Column/RowParallelLinear plus a low-rank update; same forward signature and return.

    Args:
        base: the layer to wrap; its parameters are frozen.
        rank, alpha: r and alpha of ``y = W x + (alpha / r) B A x``.
        dropout: dropout on the LoRA branch's input only.
        rslora: scale by ``alpha / sqrt(r)`` (rank-stabilised LoRA) instead of ``alpha / r``.
        init_seed: seed of A's initialisation. A is drawn on its full (r x in) shape and then sliced, so
            the same seed gives the same A at every TP size. Default: ``torch.initial_seed()``.
    """

    def __init__(self, base: nn.Module, rank: int, alpha: float, dropout: float = 0.0, rslora: bool = False,
                 init_seed: int | None = None):
        super().__init__()
        from megatron.core.parallel_state import get_tensor_model_parallel_group

        if not isinstance(rank, int) or rank < 1:
            raise ValueError(f"LoRA rank must be a positive integer, got {rank!r}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"LoRA dropout must be in [0, 1), got {dropout!r}")
        mode = _parallel_mode(base)
        if getattr(base, "weight", None) is None:
            raise ValueError("LoRA needs a base layer that owns its weight (skip_weight_param_allocation=False)")
        if getattr(base, "explicit_expert_comm", False):
            raise ValueError("LoRA on expert-parallel (MoE) linear layers is not supported")
        if mode == "row" and not base.input_is_parallel:
            raise ValueError("LoRA on a RowParallelLinear needs input_is_parallel=True")

        self.base_layer = base
        for p in base.parameters():
            p.requires_grad_(False)
        self.parallel_mode = mode
        self.rank, self.alpha, self.dropout_p, self.rslora = rank, float(alpha), float(dropout), bool(rslora)
        self.scaling = self.alpha / (math.sqrt(rank) if rslora else rank)
        self.tp_group = getattr(base, "tp_group", None) or get_tensor_model_parallel_group()
        self.tp_size, self.tp_rank = self.tp_group.size(), self.tp_group.rank()
        self.sequence_parallel = bool(base.sequence_parallel) and self.tp_size > 1
        # Set by apply_lora: which target this is, its global 1-based layer number, and (fc1) that the
        # output rows are megatron's per-rank cat(gate_r, up_r).
        self.target: str | None = None
        self.layer_number: int | None = None
        self.glu_fused = False

        weight = base.weight
        out_local, in_local = weight.shape
        in_full = in_local * self.tp_size if mode == "row" else in_local
        self.in_features, self.out_features = in_full, (out_local * self.tp_size if mode == "column" else out_local)
        a_shape = (rank, in_local)
        b_shape = (out_local, rank)
        self.lora_A = _Factor(a_shape, weight)
        self.lora_B = _Factor(b_shape, weight)
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        # Replicated input (column base without SP): every TP rank must draw the same mask -> default RNG.
        # Sharded input (row base: hidden shards; column under SP: sequence shards) -> per-rank TP stream.
        self._dropout_in_tp_stream = mode == "row" or self.sequence_parallel

        if mode == "column":
            _mark(self.lora_A.weight, None, partial_grad=self.sequence_parallel)
            _mark(self.lora_B.weight, 0, partial_grad=False)
        else:
            _mark(self.lora_A.weight, 1, partial_grad=False)
            _mark(self.lora_B.weight, None, partial_grad=self.sequence_parallel)
        self.reset_parameters(torch.initial_seed() if init_seed is None else init_seed)

        self.register_state_dict_post_hook(LoRALinear._drop_base_prefix)
        self.register_load_state_dict_pre_hook(LoRALinear._add_base_prefix)

    # -- initialisation ---------------------------------------------------------------------------
    @torch.no_grad()
    def reset_parameters(self, init_seed: int) -> None:
        """A ~ kaiming-uniform(a=sqrt(5)) on the full (r x in) shape, then this rank's slice; B = 0."""
        gen = torch.Generator(device="cpu").manual_seed(int(init_seed) % (2 ** 63))
        full = torch.empty(self.rank, self.in_features, dtype=torch.float32)
        nn.init.kaiming_uniform_(full, a=math.sqrt(5), generator=gen)
        if self.parallel_mode == "row":
            full = full.chunk(self.tp_size, dim=1)[self.tp_rank]
        self.lora_A.weight.copy_(full)
        self.lora_B.weight.zero_()

    # -- forward ----------------------------------------------------------------------------------
    def _dropped(self, x: torch.Tensor) -> torch.Tensor:
        if self.dropout_p == 0 or not self.training:
            return x
        if self._dropout_in_tp_stream:
            from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

            with get_cuda_rng_tracker().fork():
                return self.lora_dropout(x)
        return self.lora_dropout(x)

    def lora_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The LoRA branch alone, laid out like the base's output (before any gather_output)."""
        from megatron.core.tensor_parallel.mappings import (
            copy_to_tensor_model_parallel_region, gather_from_sequence_parallel_region,
            reduce_from_tensor_model_parallel_region, reduce_scatter_to_sequence_parallel_region)

        u = F.linear(self._dropped(x), self.lora_A.weight) * self.scaling  # [s(/TP), b, r]
        g = self.tp_group
        if self.parallel_mode == "column":
            if self.sequence_parallel:
                u = gather_from_sequence_parallel_region(u, tensor_parallel_output_grad=True, group=g)
            else:
                u = copy_to_tensor_model_parallel_region(u, group=g)
        else:
            if self.sequence_parallel:
                u = reduce_scatter_to_sequence_parallel_region(u, group=g)
            else:
                u = reduce_from_tensor_model_parallel_region(u, group=g)
        return F.linear(u, self.lora_B.weight)

    def forward(self, input_: torch.Tensor, *args, **kwargs):
        output, bias = self.base_layer(input_, *args, **kwargs)
        lora = self.lora_forward(input_)
        if self.parallel_mode == "column":
            gather = kwargs.get("runtime_gather_output")
            if gather is None:
                gather = self.base_layer.gather_output
            if gather:
                from megatron.core.tensor_parallel.mappings import gather_from_tensor_model_parallel_region

                lora = gather_from_tensor_model_parallel_region(lora, group=self.tp_group)
        return output + lora.to(output.dtype), bias

    # -- megatron / torch plumbing ----------------------------------------------------------------
    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_layer":
                raise
            return getattr(self.base_layer, name)  # config, weight, sequence_parallel, backward_dw, ...

    @staticmethod
    def _drop_base_prefix(module, state_dict, prefix, local_metadata):
        inner = prefix + "base_layer."
        for key in [k for k in state_dict if k.startswith(inner)]:
            state_dict[prefix + key[len(inner):]] = state_dict.pop(key)

    @staticmethod
    def _add_base_prefix(module, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                         error_msgs):
        for key in [k for k in state_dict if k.startswith(prefix)]:
            rest = key[len(prefix):]
            if not rest.startswith(("lora_A.", "lora_B.", "base_layer.")):
                state_dict[prefix + "base_layer." + rest] = state_dict.pop(key)

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata: dict | None = None):
        """Base keys unchanged; lora_A/lora_B sharded like the factors (fc1's B split as gate/up)."""
        from megatron.core.transformer.utils import make_sharded_tensors_for_checkpoint

        sd = self.base_layer.sharded_state_dict(prefix, sharded_offsets, metadata)
        factors = {"lora_A.weight": self.lora_A.weight, "lora_B.weight": self.lora_B.weight}
        axis = {"lora_B.weight": 0} if self.parallel_mode == "column" else {"lora_A.weight": 1}
        lora_sd = make_sharded_tensors_for_checkpoint(
            factors, prefix, axis, sharded_offsets, tp_group=self.tp_group,
            dp_cp_group=(metadata or {}).get("dp_cp_group"))
        if self.glu_fused:
            from megatron.core.transformer.mlp import apply_swiglu_sharded_factory

            key = f"{prefix}lora_B.weight"
            lora_sd[key] = apply_swiglu_sharded_factory(
                lora_sd[key], sharded_offsets, (metadata or {}).get("singleton_local_shards", False))
        sd.update(lora_sd)
        return sd

    def extra_repr(self) -> str:
        return (f"{self.parallel_mode}-parallel, rank={self.rank}, alpha={self.alpha:g}, scaling={self.scaling:g}, "
                f"dropout={self.dropout_p:g}, tp={self.tp_size}, sp={self.sequence_parallel}")


# -- applying to a model ------------------------------------------------------------------------------
def unwrap(model: nn.Module) -> nn.Module:
    """The GPTModel inside DDP / Float16Module wrappers (anything with a ``.module``)."""
    m = model
    while not hasattr(m, "decoder") and hasattr(m, "module"):
        m = m.module
    if not hasattr(m, "decoder"):
        raise TypeError(f"expected a megatron GPTModel (with .decoder), got {type(model).__name__}")
    return m


def lora_modules(model: nn.Module) -> Iterator[tuple[int, str, LoRALinear]]:
    """(global 1-based layer number, target name, module) for every LoRA layer of this stage."""
    for layer in unwrap(model).decoder.layers:
        for target, (sub, attr) in TARGETS.items():
            mod = getattr(getattr(layer, sub, None), attr, None)
            if isinstance(mod, LoRALinear):
                yield layer.layer_number, target, mod


def check_targets(targets) -> tuple[str, ...]:
    if isinstance(targets, str):
        targets = (targets,)
    targets = tuple(targets)
    unknown = [t for t in targets if t not in TARGETS]
    if unknown or not targets:
        raise ValueError(f"unknown LoRA target(s) {unknown or targets!r}; valid targets are {list(TARGETS)} "
                         f"(qkv: fused q/k/v projection, proj: attention output, fc1: gate/up, fc2: down)")
    if len(set(targets)) != len(targets):
        raise ValueError(f"LoRA targets repeat a name: {list(targets)}")
    return targets


def apply_lora(model: nn.Module, targets=("qkv", "proj", "fc1", "fc2"), rank: int = 8, alpha: float = 16,
               dropout: float = 0.0, rslora: bool = False, seed: int | None = None) -> list[str]:
    """Freeze every parameter of this stage and wrap the chosen linears of every transformer layer.

    ``seed`` (default ``torch.initial_seed()``, the run's seed) is mixed with the global layer number and
    the target, so A's initialisation is the same at any TP/PP layout. Returns the wrapped module names.
    """
    targets = check_targets(targets)
    gpt = unwrap(model)
    base_seed = torch.initial_seed() if seed is None else int(seed)
    for p in model.parameters():
        p.requires_grad_(False)
    names = []
    for idx, layer in enumerate(gpt.decoder.layers):
        for t in targets:
            sub, attr = TARGETS[t]
            parent = getattr(layer, sub)
            base = getattr(parent, attr)
            if isinstance(base, LoRALinear):
                raise ValueError(f"decoder.layers.{idx}.{sub}.{attr} already has LoRA")
            init_seed = (base_seed * 1_000_003 + layer.layer_number * 1_009 + list(TARGETS).index(t)) % (2 ** 63)
            wrapped = LoRALinear(base, rank=rank, alpha=alpha, dropout=dropout, rslora=rslora, init_seed=init_seed)
            wrapped.target, wrapped.layer_number = t, layer.layer_number
            wrapped.glu_fused = t == "fc1" and bool(getattr(gpt.config, "gated_linear_unit", False))
            setattr(parent, attr, wrapped)
            names.append(f"decoder.layers.{idx}.{sub}.{attr}")
    return names


def trainable_parameters(model: nn.Module) -> int:
    """Number of trainable elements on this rank (this stage, this rank's shards)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
