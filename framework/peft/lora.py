"""LoRA for megatron-core's tensor-parallel linear layers and the vocab-parallel embedding, wrapped in place.

    y = W x + s * B A dropout(x),   s = alpha / r   (rsLoRA: s = alpha / sqrt(r), HF PEFT's ``use_rslora``)

W is the frozen base weight; A (r x in) starts kaiming-uniform (HF PEFT's ``init_lora_weights=True``) or
normal(0, 1/r) (``"gaussian"``), B (out x r) starts at zero, so a freshly wrapped layer computes exactly what
its base computed. PiSSA and OLoRA start A and B from the base weight and replace W by the residual
(framework/peft/lora_init.py).

Under tensor parallelism the big side of each factor is sharded like the base and the small side is
replicated, so the LoRA branch only ever communicates r-wide activations (DESIGN.md section 5):

Column-parallel base (input x full on every rank, output sharded; fused QKV, fc1, the output layer)::

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

Vocab-parallel embedding (rows of the table sharded over the vocabulary), HF PEFT's ``Embedding`` LoRA::

    A (r x V/TP)     ``lora_embedding_A``, sharded like the table (partition dim 1); starts at zero
    B (h x r)        ``lora_embedding_B``, whole on every rank; starts normal(0, 1) (as HF PEFT)
    u = A[:, token]  for tokens in this rank's vocabulary range, 0 elsewhere; summed over TP like the base
                     embedding (all-reduce r-wide, or reduce-scatter along the sequence under SP)
    y_lora = s * B u

The output layer is a column-parallel base like fc1 (its output is the vocab-parallel logits); with tied
embeddings it owns no weight and LoRA still works (the merge is refused, it would change the embedding).

A replicated factor whose gradient is only partial on each rank (A of a column base under SP: each rank
saw its own tokens; B of a row base or of the embedding under SP, likewise) carries
``param.sequence_parallel = True``, so megatron's ``finalize_model_grads`` all-reduces its gradient over TP
as it does for norm weights. Sharded factors carry ``tensor_model_parallel / partition_dim /
partition_stride``. Nothing requires TP to divide r.

Merging (framework/peft/merge.py) adds ``s B A`` to this rank's shard of W (each factor's local shard gives
exactly the local block of B A, no communication) and subtracts it again to unmerge.

The wrapper keeps the base's state-dict keys (``...linear_qkv.weight`` stays that key; the factors add
``...linear_qkv.lora_A.weight`` / ``lora_B.weight``); see framework/peft/wrapping.py for its sharded state
dict.
"""

from __future__ import annotations

import math
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from framework.models.unwrap import unwrap_model
from framework.peft.lora_init import hf_modules_in, init_from_base, init_problem, modifies_base
from framework.peft.wrapping import CROSS_TARGETS, LAYER_TARGETS, MODEL_TARGETS, PeftWrapper, Piece
from framework.peft.wrapping import check_targets as _check_targets
from framework.peft.wrapping import (init_seed, mark, param_like, peft_modules, seeded_generator, trainable_parameters,
                                     wrap_targets)

#: every LoRA target, in canonical order (the order also seeds A's initialisation: do not reorder)
TARGETS = {**LAYER_TARGETS, **MODEL_TARGETS, **CROSS_TARGETS}
_DESCRIBE = ("qkv: fused q/k/v projection, proj: attention output, fc1: gate/up, fc2: down, "
             "embedding: token embedding, output: output layer / lm_head; encoder-decoder models (T5) only: "
             "cross_q, cross_kv, cross_proj: the decoder's cross-attention query, key/value and output")

__all__ = ["TARGETS", "LoRALinear", "LoRAEmbedding", "apply_lora", "lora_modules", "check_targets",
           "trainable_parameters"]


def check_targets(targets, valid=TARGETS, method: str = "LoRA") -> tuple[str, ...]:
    return _check_targets(targets, valid, method, _DESCRIBE)


def lora_scaling(alpha: float, rank: int, rslora: bool) -> float:
    """HF PEFT's scaling: alpha / r, or alpha / sqrt(r) with ``use_rslora``."""
    return float(alpha) / (math.sqrt(rank) if rslora else rank)


def _scaling_repr(scaling) -> str:
    """``scaling`` for a module's repr: the one scale, or the distinct scales of its rank columns."""
    if isinstance(scaling, torch.Tensor):
        return "per-column " + "/".join(f"{v:g}" for v in sorted(set(scaling.tolist())))
    return f"{scaling:g}"


def _check_hparams(rank, dropout) -> None:
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
        raise ValueError(f"LoRA rank must be a positive integer, got {rank!r}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"LoRA dropout must be in [0, 1), got {dropout!r}")


class _Factor(nn.Module):
    """One LoRA factor, kept as a module so its key is ``lora_A.weight`` / ``lora_B.weight`` as in HF PEFT."""

    def __init__(self, shape: tuple[int, int], base: nn.Module):
        super().__init__()
        self.weight = param_like(base, shape)

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}"


class _LoRAWrapper(PeftWrapper):
    """What LoRA on a linear layer and on the embedding share: hyper-parameters, and merging
    ``delta_weight()`` (this rank's block of s B A in the base weight's layout) into the base weight."""

    method = "lora"
    TARGET_ORDER = tuple(TARGETS)

    def __init__(self, base: nn.Module, rank: int, alpha: float, dropout: float, rslora: bool):
        _check_hparams(rank, dropout)
        super().__init__(base)
        self.rank, self.alpha, self.dropout_p, self.rslora = rank, float(alpha), float(dropout), bool(rslora)
        self.scaling = lora_scaling(alpha, rank, rslora)

    def settings(self) -> dict:
        return {"rank": self.rank, "alpha": self.alpha, "dropout": self.dropout_p, "rslora": self.rslora}

    def delta_weight(self) -> torch.Tensor:
        raise NotImplementedError

    def merge_refusal(self) -> str | None:
        return None

    def _merged_weight(self) -> torch.Tensor:
        reason = self.merge_refusal()
        if reason:
            raise ValueError(reason)
        return self.base_layer.weight

    @torch.no_grad()
    def merge(self) -> None:
        self._check_mergeable(True)
        w = self._merged_weight()
        w.add_(self.delta_weight().to(w.dtype))
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        self._check_mergeable(False)
        w = self._merged_weight()
        w.sub_(self.delta_weight().to(w.dtype))
        self.merged = False


class LoRALinear(_LoRAWrapper):
    """A megatron Column/RowParallelLinear plus a low-rank update; same forward signature and return.

    Args:
        base: the layer to wrap; its parameters are frozen.
        rank, alpha: r and alpha of ``y = W x + (alpha / r) B A x``.
        dropout: dropout on the LoRA branch's input only.
        rslora: scale by ``alpha / sqrt(r)`` (rank-stabilised LoRA) instead of ``alpha / r``.
        init_seed: seed of A's initialisation. A is drawn on its full (r x in) shape and then sliced, so
            the same seed gives the same A at every TP size. Default: ``torch.initial_seed()``.
        init: A's distribution, ``"kaiming"`` (HF PEFT's True) or ``"gaussian"`` (normal, std 1/r).
    """

    def __init__(self, base: nn.Module, rank: int, alpha: float, dropout: float = 0.0, rslora: bool = False,
                 init_seed: int | None = None, init: str = "kaiming"):
        super().__init__(base, rank, alpha, dropout, rslora)
        mode = self.parallel_mode
        if mode == "vocab":
            raise TypeError("LoRALinear wraps linear layers; use LoRAEmbedding for the embedding")
        if getattr(base, "explicit_expert_comm", False):
            raise ValueError("LoRA on expert-parallel (MoE) linear layers is not supported")
        if mode == "row" and not base.input_is_parallel:
            raise ValueError("LoRA on a RowParallelLinear needs input_is_parallel=True")

        self.sequence_parallel = bool(base.sequence_parallel) and self.tp_size > 1
        # Set by apply_lora: (fc1) the output rows are megatron's per-rank cat(gate_r, up_r).
        self.glu_fused = False

        if mode == "column":
            in_local, out_local = base.input_size, base.output_size_per_partition
            self.in_features, self.out_features = in_local, out_local * self.tp_size
        else:
            in_local, out_local = base.input_size_per_partition, base.output_size
            self.in_features, self.out_features = in_local * self.tp_size, out_local
        self.lora_A = _Factor((rank, in_local), base)
        self.lora_B = _Factor((out_local, rank), base)
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        # Replicated input (column base without SP): every TP rank must draw the same mask -> default RNG.
        # Sharded input (row base: hidden shards; column under SP: sequence shards) -> per-rank TP stream.
        self._dropout_in_tp_stream = mode == "row" or self.sequence_parallel

        if mode == "column":
            mark(self.lora_A.weight, None, partial_grad=self.sequence_parallel)
            mark(self.lora_B.weight, 0, partial_grad=False)
        else:
            mark(self.lora_A.weight, 1, partial_grad=False)
            mark(self.lora_B.weight, None, partial_grad=self.sequence_parallel)
        self.reset_parameters(torch.initial_seed() if init_seed is None else init_seed, init)

    # -- initialisation ---------------------------------------------------------------------------
    @torch.no_grad()
    def reset_parameters(self, init_seed: int, init: str = "kaiming") -> None:
        """A ~ kaiming-uniform(a=sqrt(5)) (or, ``init="gaussian"``, normal(0, 1/r)) on the full (r x in) shape,
        then this rank's slice; B = 0."""
        full = torch.empty(self.rank, self.in_features, dtype=torch.float32)
        if init == "gaussian":
            nn.init.normal_(full, std=1 / self.rank, generator=seeded_generator(init_seed))
        else:
            nn.init.kaiming_uniform_(full, a=math.sqrt(5), generator=seeded_generator(init_seed))
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

    def lora_branch(self, x_dropped: torch.Tensor) -> torch.Tensor:
        """s * B A x for an input that already went through the LoRA dropout, laid out like the base's
        output (before any gather_output)."""
        from megatron.core.tensor_parallel.mappings import (copy_to_tensor_model_parallel_region,
                                                            gather_from_sequence_parallel_region,
                                                            reduce_from_tensor_model_parallel_region,
                                                            reduce_scatter_to_sequence_parallel_region)

        u = F.linear(x_dropped, self.lora_A.weight) * self.scaling  # [s(/TP), b, r]
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

    def lora_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The LoRA branch alone (dropout included), laid out like the base's output."""
        return self.lora_branch(self._dropped(x))

    def _gather_output(self, kwargs) -> bool:
        if self.parallel_mode != "column":
            return False
        gather = kwargs.get("runtime_gather_output")
        return self.base_layer.gather_output if gather is None else bool(gather)

    def forward(self, input_: torch.Tensor, *args, **kwargs):
        output, bias = self.base_layer(input_, *args, **kwargs)
        if self.merged:
            return output, bias
        lora = self.lora_forward(input_)
        if self._gather_output(kwargs):
            from megatron.core.tensor_parallel.mappings import gather_from_tensor_model_parallel_region

            lora = gather_from_tensor_model_parallel_region(lora, group=self.tp_group)
        return output + lora.to(output.dtype), bias

    # -- one scale per rank column ---------------------------------------------------------------
    #: the exact scale of each rank column when they differ (set_column_scales), else None
    column_scales: list[float] | None = None

    def set_column_scales(self, scales) -> None:
        """Scale each rank column by its own factor instead of the one alpha / r (None: back to alpha / r).

        An HF PEFT adapter of mixed ranks or alphas (``rank_pattern`` / ``alpha_pattern``) imports as wrappers
        whose rank columns hold several HF modules, each keeping its alpha / r (framework/checkpoint/
        peft_layout.py). The exact values stay in ``column_scales``, which saving the adapter writes back;
        ``scaling`` becomes a non-persistent buffer in the factors' dtype, so it follows the module to another
        device or dtype and stays out of the state dict."""
        delattr(self, "scaling")
        if scales is None:
            self.column_scales = None
            self.scaling = lora_scaling(self.alpha, self.rank, self.rslora)
            return
        values = [float(v) for v in scales]
        if len(values) != self.rank:
            raise ValueError(f"{self.where()}: {len(values)} column scales for rank {self.rank}")
        self.column_scales = values
        w = self.lora_A.weight
        self.register_buffer("scaling", torch.tensor(values, dtype=w.dtype, device=w.device), persistent=False)

    # -- merging ----------------------------------------------------------------------------------
    def delta_weight(self) -> torch.Tensor:
        """s * B A for this rank's shard: exactly the local block of the full update, in W's layout."""
        if isinstance(self.scaling, torch.Tensor):  # one scale per rank column (set_column_scales)
            return (self.lora_B.weight * self.scaling) @ self.lora_A.weight
        return self.scaling * (self.lora_B.weight @ self.lora_A.weight)

    def merge_refusal(self) -> str | None:
        if self.base_layer.weight is None:
            return (f"{self.where()}: the output layer shares the embedding's weight (tie_word_embeddings); "
                    f"merging into it would change the embedding too")
        return None

    # -- what gets saved --------------------------------------------------------------------------
    def pieces(self) -> list[Piece]:
        return [Piece("lora_A.weight", "lora_A.weight", "in", 1), Piece("lora_B.weight", "lora_B.weight", "out", 0)]

    def extra_repr(self) -> str:
        return (f"{self.parallel_mode}-parallel, rank={self.rank}, alpha={self.alpha:g}, "
                f"scaling={_scaling_repr(self.scaling)}, dropout={self.dropout_p:g}, tp={self.tp_size}, "
                f"sp={self.sequence_parallel}")


class LoRAEmbedding(_LoRAWrapper):
    """megatron's VocabParallelEmbedding plus HF PEFT's embedding LoRA (see the module docstring).

    ``dropout`` is recorded but not applied, as in HF PEFT (token ids cannot be dropped out).
    """

    def __init__(self, base: nn.Module, rank: int, alpha: float, dropout: float = 0.0, rslora: bool = False,
                 init_seed: int | None = None):
        super().__init__(base, rank, alpha, dropout, rslora)
        if self.parallel_mode != "vocab":
            raise TypeError(f"LoRAEmbedding wraps a VocabParallelEmbedding, got {type(base).__name__}")
        self.reduce_scatter = bool(base.reduce_scatter_embeddings)
        vocab_local, hidden = base.weight.shape
        self.num_embeddings = vocab_local * self.tp_size
        self.lora_embedding_A = param_like(base, (rank, vocab_local))
        self.lora_embedding_B = param_like(base, (hidden, rank))
        mark(self.lora_embedding_A, 1, partial_grad=False)
        mark(self.lora_embedding_B, None, partial_grad=self.reduce_scatter and self.tp_size > 1)
        self.reset_parameters(torch.initial_seed() if init_seed is None else init_seed)

    @torch.no_grad()
    def reset_parameters(self, init_seed: int) -> None:
        """HF PEFT's embedding init: A = 0, B ~ normal(0, 1) (drawn whole, the same on every TP rank)."""
        self.lora_embedding_A.zero_()
        self.lora_embedding_B.copy_(torch.randn(self.lora_embedding_B.shape, generator=seeded_generator(init_seed)))

    def lora_forward(self, input_: torch.Tensor) -> torch.Tensor:
        """s * B A[:, tokens], laid out like the base embedding's output ([b, s, h], or [s/TP, b, h] when
        the base reduce-scatters along the sequence)."""
        from megatron.core.tensor_parallel.mappings import (reduce_from_tensor_model_parallel_region,
                                                            reduce_scatter_to_sequence_parallel_region)

        base = self.base_layer
        if self.tp_size > 1:
            outside = (input_ < base.vocab_start_index) | (input_ >= base.vocab_end_index)
            local = (input_ - base.vocab_start_index).masked_fill(outside, 0)
        else:
            outside, local = None, input_
        u = F.embedding(local, self.lora_embedding_A.t())  # [b, s, r]
        if outside is not None:
            u = u.masked_fill(outside.unsqueeze(-1), 0.0)
        if self.reduce_scatter:
            u = reduce_scatter_to_sequence_parallel_region(u.transpose(0, 1).contiguous(), group=self.tp_group)
        else:
            u = reduce_from_tensor_model_parallel_region(u, group=self.tp_group)
        return F.linear(u * self.scaling, self.lora_embedding_B)

    def forward(self, input_: torch.Tensor):
        output = self.base_layer(input_)
        if self.merged:
            return output
        return output + self.lora_forward(input_).to(output.dtype)

    def delta_weight(self) -> torch.Tensor:
        """s (B A)^T for this rank's rows of the table: [V/TP, h]."""
        return self.scaling * (self.lora_embedding_B @ self.lora_embedding_A).t()

    def pieces(self) -> list[Piece]:
        return [Piece("lora_embedding_A", "lora_embedding_A", "in", 1),
                Piece("lora_embedding_B", "lora_embedding_B", "out", 0)]

    def extra_repr(self) -> str:
        return (f"vocab-parallel, rank={self.rank}, alpha={self.alpha:g}, scaling={_scaling_repr(self.scaling)}, "
                f"tp={self.tp_size}, reduce_scatter={self.reduce_scatter}")


# -- applying to a model ------------------------------------------------------------------------------
def lora_modules(model: nn.Module) -> Iterator[tuple[int | None, str, nn.Module]]:
    """(global 1-based layer number or None for embedding/output, target, module) for every LoRA (and
    DoRA) module of this stage."""
    for mod in peft_modules(model):
        if isinstance(mod, (LoRALinear, LoRAEmbedding)):
            yield mod.layer_number, mod.target, mod


def apply_lora(model: nn.Module, targets=("qkv", "proj", "fc1", "fc2"), rank: int = 8, alpha: float = 16,
               dropout: float = 0.0, rslora: bool = False, seed: int | None = None, linear_cls=None,
               init_lora_weights: str = "kaiming") -> list[str]:
    """Freeze every parameter of this stage and wrap the chosen modules (see TARGETS) in place.

    ``seed`` (default ``torch.initial_seed()``, the run's seed) is mixed with the global layer number and
    the target, so A's initialisation is the same at any TP/PP layout. ``linear_cls`` replaces
    LoRALinear for linear targets (DoRA). ``init_lora_weights``: HF PEFT's name of the initialisation,
    ``kaiming`` (its True), ``gaussian``, or from the base weight ``pissa``, ``pissa_niter_<n>``, ``olora``
    (framework/peft/lora_init.py: the base weights become the residual; a fused layer gets rank k x ``rank``,
    one block per HF module; the embedding keeps HF's embedding initialisation, as in HF PEFT).
    Returns the wrapped module names of this stage.
    """
    targets = check_targets(targets)
    problem = init_problem(init_lora_weights)
    if problem:
        raise ValueError(f"init_lora_weights={init_lora_weights!r}: {problem}")
    from_base = modifies_base(init_lora_weights)
    if from_base and linear_cls not in (None, LoRALinear):
        raise ValueError(f"init_lora_weights={init_lora_weights!r} initialises LoRA from the base weight; "
                         f"{linear_cls.__name__} layers are not supported (use peft.method=lora)")
    if from_base and any(t in CROSS_TARGETS for t in targets):
        raise ValueError(f"init_lora_weights={init_lora_weights!r} is not supported on cross-attention targets")
    linear_cls = linear_cls or LoRALinear
    gpt = unwrap_model(model)
    base_seed = torch.initial_seed() if seed is None else int(seed)
    glu = bool(getattr(gpt.config, "gated_linear_unit", False))
    plain = "kaiming" if from_base else init_lora_weights

    def make(base, target, layer_number):
        s = init_seed(base_seed, layer_number, list(TARGETS).index(target))
        if target == "embedding":
            return LoRAEmbedding(base, rank=rank, alpha=alpha, dropout=dropout, rslora=rslora, init_seed=s)
        k = hf_modules_in(target, target == "fc1" and glu) if from_base else 1
        extra = {} if plain == "kaiming" else {"init": plain}  # DoRA's layers take the default only
        wrapped = linear_cls(base, rank=k * rank, alpha=alpha, dropout=dropout, rslora=rslora, init_seed=s, **extra)
        wrapped.glu_fused = target == "fc1" and glu
        if k > 1:  # one rank-r block per HF module, each scaled as a rank-r LoRA
            wrapped.scaling = lora_scaling(alpha, rank, rslora)
        return wrapped

    names = wrap_targets(model, targets, make)
    if from_base:
        kv_spec = getattr(gpt, "kv_replication", None)
        for layer_number, target, mod in lora_modules(model):
            if target != "embedding":
                s = init_seed(base_seed, layer_number, list(TARGETS).index(target))
                init_from_base(mod, rank, init_lora_weights, kv_spec, seed=s)
    return names


# -- the job's configuration ----------------------------------------------------------------------------
def targets_problems(peft, valid_targets, method: str) -> list[str]:
    targets = peft.get("targets")
    if isinstance(targets, str) or not hasattr(targets, "__iter__"):
        return [f"peft.targets={targets!r}: expected a list of {method} targets from {list(valid_targets)}"]
    try:
        _check_targets(list(targets), valid_targets, method)
    except ValueError as e:
        return [f"peft.targets: {e}"]
    return []


def config_problems(cfg, model_cfg) -> list[str]:
    """Checks of ``cfg.peft`` for LoRA that need the method or the model (its targets, the initialisation,
    cross-attention), before any process group starts; the keys' values are checked by
    framework/config/peft.py's section."""
    problems = targets_problems(cfg.peft, TARGETS, "LoRA")  # rank, alpha, ...: framework/config/peft.py
    init = cfg.peft.get("init_lora_weights", "kaiming")
    problem = init_problem(init)
    if problem:
        problems.append(f"peft.init_lora_weights={init!r}: {problem}")
    elif modifies_base(init):
        problems.append(f"peft.init_lora_weights={init}: PiSSA/OLoRA replace the base weights by a residual, and a "
                        f"job cannot save such an adapter yet (it needs the residual base, or HF PEFT's conversion "
                        f"to a plain LoRA of twice the rank at export); use kaiming or gaussian, or call "
                        f"framework.peft.lora.apply_lora(init_lora_weights=...) in code")
    cross = [t for t in (cfg.peft.get("targets") or []) if t in CROSS_TARGETS]
    if cross and model_cfg.num_decoder_layers is None:
        problems.append(f"peft.targets={list(cfg.peft.targets)}: {cross} are cross-attention targets of "
                        f"encoder-decoder models (T5); model.arch.family={model_cfg.family!r} has no cross-attention")
    return problems
