"""Where PEFT methods attach to megatron's GPT model, and the base class of every layer wrapper.

Targets (the names PEFT configs use)::

    qkv        decoder.layers.i.self_attention.linear_qkv   ColumnParallelLinear (fused q/k/v, query-group order)
    proj       decoder.layers.i.self_attention.linear_proj  RowParallelLinear    (attention output)
    fc1        decoder.layers.i.mlp.linear_fc1              ColumnParallelLinear (fused gate/up, per TP rank)
    fc2        decoder.layers.i.mlp.linear_fc2              RowParallelLinear    (down)
    embedding  embedding.word_embeddings                    VocabParallelEmbedding (first pipeline stage)
    output     output_layer                                 ColumnParallelLinear (vocab-parallel; last stage)

In an encoder-decoder model (megatron's T5Model) the layer targets wrap the layers of both stacks
(``encoder.layers.i`` and ``decoder.layers.i``), and the decoder layers' cross-attention has targets of its
own: ``cross_q`` (``cross_attention.linear_q``), ``cross_kv`` (``cross_attention.linear_kv``, keys and values
interleaved per head) and ``cross_proj`` (``cross_attention.linear_proj``).

A wrapper replaces its base module in place and keeps the base's state-dict keys (``...linear_qkv.weight``
stays that key; the wrapper's own tensors add keys next to it), so HF import/export and megatron
dist_checkpointing of base weights are the same with or without PEFT. Its ``sharded_state_dict`` is the
base's plus the adapter tensors, sharded as they are (the optimizer state of train_state checkpoints maps
onto it); :func:`is_adapter_key` keeps them out of base-weight checkpoints, and adapters themselves are
saved unsharded by framework/checkpoint/adapter.py. Every wrapper describes its trainable tensors as
:class:`Piece` s: which side of the base each tensor runs along (input or output features), from which
the adapter writer derives how TP shards are gathered into Hugging Face's unsharded tensors and split back
on load.

Parameter marking, as megatron expects it: a tensor sharded over TP carries
``tensor_model_parallel / partition_dim / partition_stride`` (the grad norm counts it on every rank); a
replicated tensor whose gradient is only partial on each TP rank (it saw only this rank's sequence slice
under sequence parallelism) carries ``sequence_parallel = True``, so ``finalize_model_grads`` all-reduces
its gradient over TP, as it does for norm weights.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Callable, Iterator

import torch
from torch import nn

from framework.models.unwrap import unwrap_model
from framework.peft.moe import check_dense_mlp

#: layer target -> (submodule of a TransformerLayer, attribute)
LAYER_TARGETS = {
    "qkv": ("self_attention", "linear_qkv"),
    "proj": ("self_attention", "linear_proj"),
    "fc1": ("mlp", "linear_fc1"),
    "fc2": ("mlp", "linear_fc2"),
}
#: model target -> (submodule of the GPTModel or None for the model itself, attribute)
MODEL_TARGETS = {
    "embedding": ("embedding", "word_embeddings"),
    "output": (None, "output_layer"),
}
#: cross-attention target -> (submodule, attribute) of an encoder-decoder model's decoder layers (T5); the
#: layer targets above wrap the self-attention and MLP of both stacks there
CROSS_TARGETS = {
    "cross_q": ("cross_attention", "linear_q"),    # ColumnParallelLinear (queries from the decoder)
    "cross_kv": ("cross_attention", "linear_kv"),  # ColumnParallelLinear (keys/values from the encoder, per head)
    "cross_proj": ("cross_attention", "linear_proj"),  # RowParallelLinear (cross-attention output)
}



def parallel_mode(base: nn.Module) -> str:
    """'column', 'row' or 'vocab' (VocabParallelEmbedding): which side of the base TP shards."""
    from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding

    for cls, mode in ((ColumnParallelLinear, "column"), (RowParallelLinear, "row"), (VocabParallelEmbedding, "vocab")):
        if isinstance(base, cls):
            return mode
    raise TypeError(
        f"PEFT wraps megatron-core's ColumnParallelLinear, RowParallelLinear or VocabParallelEmbedding, got "
        f"{type(base).__name__}. Transformer Engine layers (e.g. TELayerNormColumnParallelLinear, which fuses "
        f"the input norm) are not supported yet: build the model with the local layer spec.")


def mark(param: nn.Parameter, sharded_dim: int | None, partial_grad: bool) -> None:
    """Megatron's TP attributes (see the module docstring)."""
    from megatron.core.tensor_parallel.layers import set_tensor_model_parallel_attributes

    set_tensor_model_parallel_attributes(param, sharded_dim is not None,
                                         -1 if sharded_dim is None else sharded_dim, 1)
    if partial_grad:
        param.sequence_parallel = True


def seeded_generator(seed: int) -> torch.Generator:
    return torch.Generator(device="cpu").manual_seed(int(seed) % (2 ** 63))


def init_seed(base_seed: int, layer_number: int | None, target_index: int) -> int:
    """One seed per (run seed, global layer, target): the same at every TP/PP layout."""
    return (int(base_seed) * 1_000_003 + (layer_number or 0) * 1_009 + target_index) % (2 ** 63)


def param_like(base: nn.Module, shape, fill: float | None = None) -> nn.Parameter:
    """A new parameter on the base's device in its parameter dtype (the base may own no weight: tied output)."""
    ref = getattr(base, "weight", None)
    if ref is None:
        ref = torch.empty(0, dtype=base.config.params_dtype,
                          device=torch.cuda.current_device() if torch.cuda.is_available() else "cpu")
    t = torch.empty(shape, device=ref.device, dtype=ref.dtype)
    if fill is not None:
        t.fill_(fill)
    return nn.Parameter(t)


@dataclasses.dataclass(frozen=True)
class Piece:
    """One trainable tensor of a wrapper, as the unsharded adapter file holds it.

    ``side``/``dim``: dimension ``dim`` of the tensor runs along the base's input ('in') or output ('out')
    features, or neither (None, e.g. a bottleneck MLP): a tensor whose side is the one TP shards is
    sharded along ``dim``, every other tensor is replicated. ``part``: the tensor covers only the 'q', 'k'
    or 'v' rows of a fused qkv output (IA3). ``hf_unsqueeze``: HF PEFT keeps a singleton dimension there.
    ``at_block``: the tensor is named after the block the target sits in (``self_attn`` / ``mlp``), not
    after the HF module (Houlsby adapters, which HF PEFT does not have).
    """
    name: str                 # parameter path inside the wrapper, e.g. "lora_A.weight"
    suffix: str               # HF PEFT key suffix, e.g. "lora_A.weight", "lora_magnitude_vector", "ia3_l"
    side: str | None
    dim: int = 0
    part: str | None = None
    hf_unsqueeze: int | None = None
    at_block: bool = False


class PeftWrapper(nn.Module):
    """A PEFT module in place of one of megatron's layers; same forward signature and return as the base.

    Subclasses set ``method`` (adapter.yaml's method), ``TARGET_ORDER`` (the config's target names in
    canonical order) and implement ``pieces``, ``settings`` and, where the method allows it,
    ``merge``/``unmerge`` (folding the adapter into this rank's shard of the base weight and back).
    """

    method = "?"
    TARGET_ORDER: tuple[str, ...] = ()

    def __init__(self, base: nn.Module):
        super().__init__()
        from megatron.core.parallel_state import get_tensor_model_parallel_group

        self.base_layer = base
        for p in base.parameters():
            p.requires_grad_(False)
        self.parallel_mode = parallel_mode(base)
        self.tp_group = getattr(base, "tp_group", None) or get_tensor_model_parallel_group()
        self.tp_size, self.tp_rank = self.tp_group.size(), self.tp_group.rank()
        # Set by wrap_targets: the target name, its global 1-based layer number (None: model-level target)
        # and, in an encoder-decoder model, the stack ('encoder' / 'decoder') that number counts in.
        self.target: str | None = None
        self.layer_number: int | None = None
        self.stack: str | None = None
        self.merged = False
        self.register_state_dict_post_hook(PeftWrapper._drop_base_prefix)
        self.register_load_state_dict_pre_hook(PeftWrapper._add_base_prefix)

    # -- what subclasses describe ----------------------------------------------------------------
    def pieces(self) -> list[Piece]:
        raise NotImplementedError

    def settings(self) -> dict:
        """The method's hyper-parameters this wrapper was built with (adapter.yaml), targets excluded."""
        raise NotImplementedError

    def covers(self) -> tuple[str, ...]:
        """The config target names this wrapper implements (IA3's one qkv wrapper covers 'k' and 'v')."""
        return (self.target,)

    def merge_refusal(self) -> str | None:
        """Why this wrapper cannot be merged into its base weight (None: it can)."""
        return (f"{self.method} adapters cannot be merged into the base weights ({type(self).__name__} is not "
                f"an update of the weight)")

    def merge(self) -> None:
        raise ValueError(self.merge_refusal())

    def unmerge(self) -> None:
        raise ValueError(f"{type(self).__name__} is not merged")

    def where(self) -> str:
        return _where(self.target, self.layer_number, self.stack)

    def _check_mergeable(self, merging: bool) -> None:
        if merging and self.merged:
            raise ValueError(f"{self.where()}: the adapter is already merged")
        if not merging and not self.merged:
            raise ValueError(f"{self.where()}: the adapter is not merged, nothing to unmerge")

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
        submodules = tuple(f"{n}." for n in module._modules)  # base_layer. and the wrapper's own
        for key in [k for k in state_dict if k.startswith(prefix)]:
            rest = key[len(prefix):]
            if not (rest.startswith(submodules) or rest in module._parameters or rest in module._buffers):
                state_dict[prefix + "base_layer." + rest] = state_dict.pop(key)

    def shard_dim(self, piece: Piece) -> int | None:
        """The dimension along which ``piece`` is split over TP ranks (None: replicated)."""
        sharded_side = {"column": "out", "row": "in", "vocab": "in"}[self.parallel_mode]
        return piece.dim if piece.side is not None and piece.side == sharded_side else None

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata: dict | None = None):
        """The base's keys unchanged, plus the adapter tensors sharded as they are (fc1's output-side
        tensors split as gate/up, like the base weight), so the optimizer state of a train_state
        checkpoint reshards. framework/checkpoint/ckpt_format.py keeps them out of base weights."""
        from megatron.core.transformer.utils import make_sharded_tensors_for_checkpoint

        sd = self.base_layer.sharded_state_dict(prefix, sharded_offsets, metadata)
        pieces = self.pieces()
        tensors = {p.name: self.get_parameter(p.name) for p in pieces}
        axes = {p.name: self.shard_dim(p) for p in pieces if self.shard_dim(p) is not None}
        own = make_sharded_tensors_for_checkpoint(tensors, prefix, axes, sharded_offsets, tp_group=self.tp_group,
                                                  dp_cp_group=(metadata or {}).get("dp_cp_group"))
        if getattr(self, "glu_fused", False):
            from megatron.core.transformer.mlp import apply_swiglu_sharded_factory

            for p in pieces:
                if p.side == "out":
                    key = f"{prefix}{p.name}"
                    own[key] = apply_swiglu_sharded_factory(
                        own[key], sharded_offsets, (metadata or {}).get("singleton_local_shards", False))
        sd.update(own)
        return sd


#: substrings that mark a state-dict key as an adapter tensor of some wrapper, never a base weight
ADAPTER_KEY_MARKERS = (".lora_A.", ".lora_B.", ".lora_embedding_A", ".lora_embedding_B", ".lora_magnitude_vector",
                       ".ia3_", ".adapter.")


def is_adapter_key(key: str) -> bool:
    return any(m in key for m in ADAPTER_KEY_MARKERS)


def base_sharded_state_dict(model) -> dict:
    """The model's sharded state dict without adapter tensors (LoRA, DoRA, IA3, bottleneck adapters): the
    base weights that a checkpoint's weights/ holds."""
    sd = unwrap_model(model).sharded_state_dict()
    return {k: v for k, v in sd.items() if not is_adapter_key(k)}


# -- finding and replacing modules -------------------------------------------------------------------------
def check_targets(targets, valid, method: str = "LoRA", describe: str = "") -> tuple[str, ...]:
    if isinstance(targets, str):
        targets = (targets,)
    targets = tuple(targets)
    unknown = [t for t in targets if t not in valid]
    if unknown or not targets:
        raise ValueError(f"unknown {method} target(s) {unknown or targets!r}; valid targets are {list(valid)}"
                         + (f" ({describe})" if describe else ""))
    if len(set(targets)) != len(targets):
        raise ValueError(f"{method} targets repeat a name: {list(targets)}")
    return targets


@dataclasses.dataclass(frozen=True)
class Slot:
    """Where one target sits: ``getattr(parent, attr)``. ``layer_number`` is megatron's global 1-based
    number within its stack, ``stack`` 'encoder' / 'decoder' in an encoder-decoder model (T5; None in a
    GPT), ``seed_number`` the layer's number across both stacks (the encoder's layers first), which seeds
    initialisation so that no two layers of a T5 draw the same factors."""
    parent: nn.Module
    attr: str
    target: str
    layer_number: int | None
    stack: str | None = None
    seed_number: int | None = None


def _slots(gpt) -> Iterator[Slot]:
    """Every target slot on this stage: embedding, the layers' targets (T5: encoder, then decoder with its
    cross-attention targets), output."""
    if getattr(gpt, "pre_process", False):
        yield Slot(gpt.embedding, "word_embeddings", "embedding", None)
    encoder = getattr(gpt, "encoder", None)  # megatron's T5Model; PP=1, so this rank holds every encoder layer
    stacks = [(None, gpt.decoder.layers, 0)] if encoder is None else \
        [("encoder", encoder.layers, 0), ("decoder", gpt.decoder.layers, len(encoder.layers))]
    for stack, layers, offset in stacks:
        for layer in layers:
            targets = {**LAYER_TARGETS, **(CROSS_TARGETS if stack == "decoder" else {})}
            for target, (sub, attr) in targets.items():
                n = layer.layer_number
                yield Slot(getattr(layer, sub), attr, target, n, stack, n + offset)
    if getattr(gpt, "post_process", False):
        yield Slot(gpt, "output_layer", "output", None)


def wrap_targets(model: nn.Module, targets, make: Callable[[nn.Module, str, int | None], nn.Module]) -> list[str]:
    """Freeze every parameter of this stage and replace each targeted module by ``make(base, target,
    layer_number)``. Returns the wrapped modules' names (this stage's)."""
    gpt = unwrap_model(model)
    cross = [t for t in targets if t in CROSS_TARGETS]
    if cross and getattr(gpt, "encoder", None) is None:
        raise ValueError(f"{cross}: cross-attention targets need an encoder-decoder model (T5); "
                         f"{type(gpt).__name__} has none")
    check_dense_mlp(gpt, targets)  # a mixture-of-experts MLP has no linear_fc1 / linear_fc2 to wrap
    for p in model.parameters():
        p.requires_grad_(False)
    names = []
    for slot in _slots(gpt):
        if slot.target not in targets:
            continue
        base = getattr(slot.parent, slot.attr)
        where = _where(slot.target, slot.layer_number, slot.stack)
        if isinstance(base, PeftWrapper):
            raise ValueError(f"{where} already has a {base.method} adapter; remove_peft first")
        # make() seeds by the layer number it gets: across both stacks in a T5, megatron's own in a GPT
        wrapped = make(base, slot.target, slot.layer_number if slot.stack is None else slot.seed_number)
        wrapped.target, wrapped.layer_number, wrapped.stack = slot.target, slot.layer_number, slot.stack
        setattr(slot.parent, slot.attr, wrapped)
        names.append(where)
    return names


def _where(target: str, layer_number: int | None, stack: str | None) -> str:
    if layer_number is None:
        return target
    return f"{stack + ' ' if stack else ''}layer {layer_number} {target}"


def peft_modules(model: nn.Module) -> Iterator[PeftWrapper]:
    """Every PEFT wrapper of this stage, embedding first, output last."""
    for slot in _slots(unwrap_model(model)):
        mod = getattr(slot.parent, slot.attr, None)
        if isinstance(mod, PeftWrapper):
            yield mod


def remove_peft(model: nn.Module) -> int:
    """Put every wrapped base module back in place (the base weights are untouched; they stay frozen).
    Refuses while an adapter is merged. Returns how many wrappers were removed."""
    gpt = unwrap_model(model)
    n = 0
    for slot in list(_slots(gpt)):
        mod = getattr(slot.parent, slot.attr)
        if isinstance(mod, PeftWrapper):
            if mod.merged:
                raise ValueError(f"{mod.where()}: unmerge the adapter before removing it")
            setattr(slot.parent, slot.attr, mod.base_layer)
            n += 1
    return n


@contextlib.contextmanager
def adapters_disabled(model: nn.Module):
    """Inside the block the stage computes its base model: each PEFT wrapper is taken out of the module tree
    (its base module put back, as :func:`remove_peft` does) and put back on exit. Nothing is copied or
    changed, so the adapters' parameters, gradients and optimizer state are untouched (DPO's reference model
    without a second copy of the weights). Refused while an adapter is merged into its base weight."""
    slots = [(s.parent, s.attr, getattr(s.parent, s.attr)) for s in _slots(unwrap_model(model))
             if isinstance(getattr(s.parent, s.attr), PeftWrapper)]
    for _parent, _attr, mod in slots:
        if mod.merged:
            raise ValueError(f"{mod.where()}: the adapter is merged into the base weight; unmerge it first")
    try:
        for parent, attr, mod in slots:
            setattr(parent, attr, mod.base_layer)
        yield
    finally:
        for parent, attr, mod in slots:
            setattr(parent, attr, mod)


def trainable_parameters(model: nn.Module) -> int:
    """Number of trainable elements on this rank (this stage, this rank's shards)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
