"""Adapters saved unsharded, with Hugging Face PEFT names, loadable at any TP/PP (DESIGN.md section 6).

    DIR/adapter.safetensors   HF PEFT's keys (without its ``base_model.model.`` prefix) and shapes, named after
                              the family's HF modules (framework/models/peft_names.py; Llama's shown):
        lora      model.layers.{i}.self_attn.{q,k,v,o}_proj.lora_{A,B}.weight       A [r, in], B [out, r]
                  model.layers.{i}.mlp.{gate,up,down}_proj.lora_{A,B}.weight
                  model.embed_tokens.lora_embedding_{A,B}                         A [r, vocab], B [hidden, r]
                  lm_head.lora_{A,B}.weight
        dora      lora's keys + {module}.lora_magnitude_vector                       [out]
        ia3       model.layers.{i}.self_attn.{k,v}_proj.ia3_l [out, 1], model.layers.{i}.mlp.down_proj.ia3_l [1, in]
        adapter   model.layers.{i}.{self_attn,mlp}.adapter.{down,up}.{weight,bias}  (ours, every family; HF PEFT
                  has none)
    DIR/adapter.yaml          format_version, method, the method's settings (rank, alpha, dropout, rslora;
                              bottleneck, activation), targets, target_modules, base, model; for an adapter
                              imported from HF PEFT also ``column_scales`` (the wrappers whose rank columns
                              scale differently: mixed ranks/alphas), ``hf_peft`` (HF's layout,
                              framework/checkpoint/peft_layout.py) and ``saved_tensors`` (whole base tensors
                              the adapter carries: a trained embedding, head or biases, saved_tensors.py)

``i`` is the global 0-based layer index. Other families name their modules otherwise (GPT-2:
``transformer.h.{i}.attn.c_attn``, ``attn.c_proj``, ``mlp.c_fc``, ``mlp.c_proj``, ``transformer.wte``;
Falcon: ``self_attention.query_key_value``, ...); the family registry holds them (``Family.peft``). How
each wrapper's TP shards become HF tensors follows from its :class:`~framework.peft.wrapping.Piece` s: a
tensor running along the side its base shards (a column base's output, a row base's input, the embedding's
vocabulary) is concatenated over TP ranks along that dimension; every other tensor is replicated and must
be equal on every TP rank. The output rows of a column-parallel layer (LoRA's B, DoRA's magnitude) go
through the transform the family's weight table applies to that layer's base weight
(framework/models/weight_table.py, named by ``PeftModule.rows``), which splits and reorders them as HF
names them:

* ``qkv`` (Llama's q/k/v): megatron's query-group order split with
  :func:`~framework.models.fused_layout.split_qkv`; GPT-2's packed ``c_attn``: ``qkv_packed``, the same rows
  as one [q; k; v] tensor; Falcon's ``query_key_value`` and GPTBigCode's ``c_attn`` are megatron's order.
* ``gate_up`` (Llama's gated ``linear_fc1``): per TP rank ``cat(gate_r, up_r)``, split with
  :func:`~framework.models.fused_layout.unfuse_gate_up` over the shards.
* input-side tensors (A) of a fused layer split into several HF modules are shared by them and stored once
  per HF module (identical).
* IA3's l_k / l_v cover only the k / v rows: separate ``k_proj``/``v_proj`` vectors, or, where keys and
  values live in one fused HF module (GPT-2, GPTBigCode, Falcon), one vector over that module's rows with
  ones on the query rows.

Saving gathers every TP shard and PP stage on global rank 0, which writes a temporary directory and moves
it into place. Loading reads the file on every rank and keeps this rank's shard; every expected key must
be present with the right shape, and nothing else. ``column_scales``, ``hf_peft`` and ``saved_tensors``
travel with the loaded model (each LoRA wrapper's ``set_column_scales``, each wrapper's ``hf_peft_layout``
and ``saved_tensors``; the saved tensors themselves are put over the base weights), so whatever saves it
again (a training checkpoint, a named adapter, a re-save at another layout) writes them back.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
import torch.distributed as dist
import yaml
from safetensors.torch import load_file, save_file

from framework.checkpoint.hf_import import shard_context
from framework.checkpoint.saved_tensors import KEY as SAVED
from framework.checkpoint.saved_tensors import assemble_saved, base_shapes, load_saved, local_saved
from framework.models import kv_replication
from framework.models import weight_table as wt
from framework.models.fused_layout import shard
from framework.models.registry import get_family
from framework.models.unwrap import unwrap_model
from framework.peft.wrapping import peft_modules
from framework.runtime.atomic import atomic_directory

FORMAT_VERSION = 1
WEIGHTS_NAME = "adapter.safetensors"
CONFIG_NAME = "adapter.yaml"

#: Houlsby adapter target -> the block its tensors are named after (ours: the same for every family)
ADAPTER_BLOCKS = {"attention": "self_attn", "mlp": "mlp"}
_BLOCKS = {"qkv": "self_attn", "proj": "self_attn", "fc1": "mlp", "fc2": "mlp"}
_MODEL_LEVEL = ("embedding", "output")
_HF_PREFIXES = ("base_model.model.",)  # accepted on load, so HF PEFT files load as they are
_NAMED_METHODS = ("lora", "dora", "ia3")  # methods whose keys carry the family's HF module names
#: adapter.yaml: {wrapper key: [a scale per rank column]} for LoRA wrappers whose columns scale differently
COLUMN_SCALES = "column_scales"
#: adapter.yaml: where an imported HF PEFT adapter's modules sit (framework/checkpoint/peft_layout.py)
HF_LAYOUT = "hf_peft"


class AdapterError(ValueError):
    """An adapter that does not fit the model (missing key, wrong shape, other rank, method or targets)."""


def peft_names(family: str, stack: str | None = None):
    """The family's HF PEFT module names (framework/models/peft_names.py ``PeftNames``), through the registry;
    ``stack``: those of one stack of an encoder-decoder model (T5: 'encoder' / 'decoder')."""
    names = get_family(family).peft
    if names is None:
        raise AdapterError(f"family {family!r} declares no HF PEFT module names (PEFT in "
                           f"framework/models/families/{family}.py)")
    return names.for_stack(stack)


def _stacks(model_cfg) -> list[tuple[str | None, int]]:
    """(stack, layers) of the model: [(None, num_layers)], or a T5's encoder and decoder stacks."""
    if not peft_names(model_cfg.family).stacks:
        return [(None, model_cfg.num_layers)]
    return [("encoder", model_cfg.num_layers), ("decoder", model_cfg.layers_of("decoder"))]


def hf_module(target: str, gated: bool = True, family: str = "llama", stack: str | None = None):
    """The HF module(s) one of our layer targets stands for (``PeftModule``: names in split order, rows
    transform). A non-gated MLP's fc1 is one module (Llama: up_proj), never split into gate/up halves."""
    names = peft_names(family, stack)
    module = names.module(target, gated)
    if module is None:
        why = names.refused.get(target) or (f"its fc1 is {names.targets['fc1'].names}, a "
                                            f"{'non-' if gated else ''}gated MLP has no HF module")
        raise AdapterError(f"{family}: target {target!r} has no HF module: {why}")
    return module


def hf_modules(target: str, gated: bool = True, family: str = "llama", stack: str | None = None) -> tuple[str, ...]:
    """HF module names of a target (layer targets under a layer; embedding / output whole)."""
    if target in _MODEL_LEVEL:
        names = peft_names(family)
        return (names.embedding if target == "embedding" else names.output,)
    return hf_module(target, gated, family, stack).names


def ia3_module(target: str, family: str = "llama") -> str:
    names = peft_names(family)
    if target not in names.ia3:
        raise AdapterError(f"{family}: IA3 target {target!r} has no HF module: "
                           f"{names.refused.get(target, 'not declared')}")
    return names.ia3[target]


def _module_path(family: str, layer_number: int | None, target: str, module: str, stack: str | None = None) -> str:
    if target in _MODEL_LEVEL:
        return module
    return peft_names(family, stack).layer.format(i=layer_number - 1) + module


def wrapper_key(stack: str | None, i: int, target: str) -> str:
    """Name of our wrapper of ``target`` in layer ``i`` (0-based) of ``stack`` in an adapter.yaml's
    ``hf_peft.column_scales`` (framework/checkpoint/peft_layout.py)."""
    return f"{stack + '.' if stack else ''}{i}.{target}"


def _module_key(mod) -> str:
    return wrapper_key(getattr(mod, "stack", None), (mod.layer_number or 0) - 1, mod.target)


def _column_scales(model) -> dict[str, list[float]]:
    """{wrapper key: its rank columns' scales} of this stage's wrappers that scale columns differently."""
    return {_module_key(m): list(m.column_scales) for m in peft_modules(model)
            if getattr(m, "column_scales", None) is not None}


def layer_prefix(family: str, i: int, stack: str | None = None) -> str:
    """HF prefix of layer ``i`` (0-based) in the family's PEFT keys (of ``stack``'s layers, for T5)."""
    return peft_names(family, stack).layer.format(i=i)


# -- what the file must hold, from the config alone ------------------------------------------------------
def _features(model_cfg, target: str, n_modules: int) -> list[tuple[int, int]]:
    """(in, out) of each HF module a target splits into (q/k/v, gate/up, or the whole fused layer)."""
    h, d, f = model_cfg.hidden_size, model_cfg.kv_channels, model_cfg.ffn_hidden_size
    n, g, V = model_cfg.num_attention_heads, model_cfg.num_query_groups, model_cfg.vocab_size
    if target == "qkv":
        return [(h, n * d), (h, g * d), (h, g * d)] if n_modules == 3 else [(h, (n + 2 * g) * d)]
    if target == "fc1":
        return [(h, f)] * n_modules
    if target == "cross_kv":  # T5's EncDecAttention k and v
        return [(h, n * d)] * n_modules
    return [{"proj": (n * d, h), "fc2": (f, h), "embedding": (V, h), "output": (h, V), "cross_q": (h, n * d),
             "cross_proj": (n * d, h)}[target]]


def _ia3_shape(model_cfg, target: str, fused: bool) -> tuple[int, int]:
    d, g, n = model_cfg.kv_channels, model_cfg.num_query_groups, model_cfg.num_attention_heads
    if target == "fc2":
        return (1, model_cfg.ffn_hidden_size)
    return (((n + 2 * g) if fused else g) * d, 1)


def _lora_shapes(shapes: dict, model_cfg, t: str, rank: int, method: str, stack: str | None, layers: int) -> None:
    """LoRA/DoRA keys of target ``t`` in one stack (a model-level target: once), into ``shapes``; a target the
    stack does not have (T5's cross-attention in the encoder) adds none."""
    fam = model_cfg.family
    if stack is not None and t not in peft_names(fam, stack).targets:
        return
    modules = hf_modules(t, model_cfg.gated_linear_unit, fam, stack)
    for m, (fan_in, fan_out) in zip(modules, _features(model_cfg, t, len(modules))):
        for i in ([None] if t in _MODEL_LEVEL else [i + 1 for i in range(layers)]):
            p = _module_path(fam, i, t, m, stack)
            if t == "embedding":
                shapes[f"{p}.lora_embedding_A"] = (rank, fan_in)
                shapes[f"{p}.lora_embedding_B"] = (fan_out, rank)
                continue
            shapes[f"{p}.lora_A.weight"] = (rank, fan_in)
            shapes[f"{p}.lora_B.weight"] = (fan_out, rank)
            if method == "dora":
                shapes[f"{p}.lora_magnitude_vector"] = (fan_out,)


def expected_shapes(model_cfg, targets, rank: int | None = None, method: str = "lora") -> dict[str, tuple]:
    """Every key an adapter of ``method`` for this architecture and targets must hold, with its HF shape.
    ``rank``: LoRA/DoRA rank, or the bottleneck width of Houlsby adapters (unused by IA3)."""
    h, L, fam = model_cfg.hidden_size, model_cfg.num_layers, model_cfg.family
    layers = range(L)
    shapes: dict[str, tuple] = {}
    for t in targets:
        if method in ("lora", "dora"):
            for stack, stack_layers in ([(None, 0)] if t in _MODEL_LEVEL else _stacks(model_cfg)):
                _lora_shapes(shapes, model_cfg, t, rank, method, stack, stack_layers)
        elif method == "ia3":
            m = ia3_module(t, fam)
            for i in layers:  # a fused qkv module holds k and v in one key (set twice, same shape)
                shapes[f"{layer_prefix(fam, i)}{m}.ia3_l"] = _ia3_shape(model_cfg, t, peft_names(fam).ia3_fused())
        elif method == "adapter":
            for i in layers:
                p = f"model.layers.{i}.{ADAPTER_BLOCKS[t]}.adapter"
                shapes.update({f"{p}.down.weight": (rank, h), f"{p}.down.bias": (rank,),
                               f"{p}.up.weight": (h, rank), f"{p}.up.bias": (h,)})
        else:
            raise AdapterError(f"adapter method {method!r} is not one of lora, dora, ia3, adapter")
    return shapes


def shapes_for(meta: dict, model_cfg) -> dict[str, tuple]:
    """expected_shapes for an adapter.yaml's contents, with the base tensors it carries (``saved_tensors``)."""
    method = meta.get("method", "lora")
    shapes = expected_shapes(model_cfg, meta["targets"], meta.get("rank", meta.get("bottleneck")), method)
    saved = meta.get(SAVED) or []
    if saved:
        base = base_shapes(model_cfg)
        unknown = [n for n in saved if n not in base]
        if unknown:
            raise AdapterError(f"{SAVED} names {unknown[0]!r}, not a tensor of the {model_cfg.family} base model")
        shapes.update({n: base[n] for n in saved})
    return shapes


def target_modules(method: str, targets, gated: bool = True, family: str = "llama") -> list[str]:
    """HF PEFT's ``target_modules`` for our targets (empty for Houlsby adapters): each module's shortest
    unambiguous name (Llama: ``q_proj``; GPT-2: ``attn.c_proj`` beside ``mlp.c_proj``)."""
    if method == "adapter":
        return []
    names = peft_names(family)
    if method == "ia3":
        modules = [ia3_module(t, family) for t in targets]
    elif names.stacks:  # T5: a module without its sub-layer index (SelfAttention.q, EncDecAttention.q, ...)
        return list(dict.fromkeys(m.split(".", 1)[1] for t in targets for stack, stack_names in names.stacks.items()
                                  if t in stack_names.targets for m in hf_modules(t, gated, family, stack)))
    else:
        modules = [m for t in targets for m in hf_modules(t, gated, family)]
    return [names.target_name(m) for m in dict.fromkeys(modules)]


def feedforward_modules(targets, family: str = "llama") -> list[str]:
    """HF PEFT IA3's ``feedforward_modules`` (the module whose input IA3 scales: fc2's)."""
    return [peft_names(family).target_name(ia3_module("fc2", family))] if "fc2" in targets else []


# -- from wrapper pieces to HF keys ---------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class _Layout:
    keys: tuple[str, ...]     # the HF keys one wrapper tensor becomes, in split order
    split: str                # one | same (each key the whole tensor) | rows (through the transform ``rows``)
    shard_dim: int | None     # TP shards concatenated along this dim; None: replicated
    hf_unsqueeze: int | None
    rows: str | None = None   # weight_table transform of a column-parallel layer's output rows
    parts: tuple[str, ...] = ()  # IA3 on a fused qkv module: the wrapper's k/v vectors this tensor covers
    kv_rows: str | None = None   # 'fused' qkv output rows / 'kv' rows only: KV heads replicated over TP repeat them


def _ia3_fused(mod, family: str) -> bool:
    return mod.method == "ia3" and mod.target == "qkv" and peft_names(family).ia3_fused()


def _layouts(mod, family: str) -> list[tuple[_Layout, tuple]]:
    """(layout, the wrapper's pieces it covers) for every tensor ``mod`` contributes to the file."""
    if _ia3_fused(mod, family):
        key = f"{layer_prefix(family, mod.layer_number - 1)}{ia3_module('k', family)}.ia3_l"
        rows = peft_names(family).targets["qkv"].rows
        pieces = tuple(mod.pieces())
        return [(_Layout((key,), "rows" if rows else "one", 0, 1, rows, tuple(p.part for p in pieces), "fused"),
                 pieces)]
    return [(_layout(mod, piece, family), (piece,)) for piece in mod.pieces()]


def _layout(mod, piece, family: str) -> _Layout:
    t = mod.target
    rows = None
    if piece.at_block:
        paths = (f"model.layers.{mod.layer_number - 1}.{_BLOCKS[t]}",)
    elif piece.part is not None:  # IA3 on k or v of separate k_proj / v_proj modules
        paths = (_module_path(family, mod.layer_number, t, ia3_module(piece.part, family)),)
    elif mod.method == "ia3":
        paths = (_module_path(family, mod.layer_number, t, ia3_module(t, family)),)
    else:
        gated = t != "fc1" or getattr(mod, "glu_fused", True)
        stack = getattr(mod, "stack", None)  # T5: the encoder's or the decoder's names
        modules = hf_modules(t, gated, family, stack)
        paths = tuple(_module_path(family, mod.layer_number, t, m, stack) for m in modules)
        if t not in _MODEL_LEVEL and piece.side == "out" and mod.parallel_mode == "column":
            rows = hf_module(t, gated, family, stack).rows
    if rows in (None, "column") and len(paths) == 1:
        split, rows = "one", None  # "column" concatenates the shards, as "one" does
    elif rows is not None:
        split = "rows"
    elif len(paths) == 1:
        split = "one"
    else:
        split = "same"
    return _Layout(tuple(f"{p}.{piece.suffix}" for p in paths), split, mod.shard_dim(piece), piece.hf_unsqueeze,
                   rows, kv_rows=kv_replication.piece_rows(mod, piece) if t == "qkv" else None)


def _local_value(mod, lay: _Layout, pieces) -> torch.Tensor:
    if lay.parts:  # IA3 over a fused qkv module: ones on query rows, l_k / l_v on key / value rows
        return mod.scale()
    return mod.get_parameter(pieces[0].name)


def _local_pieces(model, family: str) -> list[tuple[_Layout, torch.Tensor]]:
    return [(lay, _local_value(mod, lay, pieces).detach().cpu().clone())
            for mod in peft_modules(model) for lay, pieces in _layouts(mod, family)]


def _ctx(model_cfg, tp_rank: int, tp_size: int) -> wt.ShardContext:
    return shard_context(model_cfg, tp_rank, tp_size)


def _assemble(per_tp_rank: list[list], model_cfg) -> dict[str, torch.Tensor]:
    """Full HF tensors from every TP rank's pieces (each a list as from _local_pieces, same order)."""
    ctx = _ctx(model_cfg, 0, len(per_tp_rank))
    out = {}
    for j, (lay, _) in enumerate(per_tp_rank[0]):
        shards = [pieces[j][1] for pieces in per_tp_rank]
        if lay.kv_rows:  # KV heads replicated over TP (framework/models/kv_replication.py): one copy of each
            try:
                shards = kv_replication.dereplicate_rows(shards, ctx.num_heads, ctx.num_groups, lay.kv_rows == "kv")
            except ValueError as e:
                raise AdapterError(f"{lay.keys[0]}: {e}") from None
        if lay.shard_dim is None:
            if any(not torch.equal(s, shards[0]) for s in shards[1:]):
                raise AdapterError(f"{lay.keys[0]}: the replicated tensor differs across TP ranks "
                                   f"(were its gradients finalised over TP?)")
            full = shards[0]
        else:
            full = torch.cat(shards, dim=lay.shard_dim)
        if lay.split == "rows":
            parts = wt.TRANSFORMS[lay.rows].inverse(shards, ctx)
        else:
            parts = (full,) * len(lay.keys)
        for key, t in zip(lay.keys, parts):
            t = t if lay.hf_unsqueeze is None else t.unsqueeze(lay.hf_unsqueeze)
            out[key] = t.clone().contiguous()  # one copy per key: safetensors refuses shared storage
    return out


def _local_from_hf(lay: _Layout, tensors: dict, mod, model_cfg) -> torch.Tensor:
    """This rank's shard of one wrapper tensor from the HF tensors (the inverse of _assemble)."""
    parts = [tensors[k] for k in lay.keys]
    if lay.hf_unsqueeze is not None:
        parts = [p.squeeze(lay.hf_unsqueeze) for p in parts]
    if lay.kv_rows:  # this rank's rows, KV heads replicated when TP exceeds them
        full = wt.TRANSFORMS[lay.rows].forward(parts, _ctx(model_cfg, 0, 1)) if lay.split == "rows" else parts[0]
        return kv_replication.replicate_rows(full, model_cfg.num_attention_heads, model_cfg.num_query_groups,
                                             mod.tp_size, mod.tp_rank, lay.kv_rows == "kv")
    if lay.split == "rows":
        return wt.TRANSFORMS[lay.rows].forward(parts, _ctx(model_cfg, mod.tp_rank, mod.tp_size))
    if lay.split == "same":
        for k, p in zip(lay.keys[1:], parts[1:]):
            if not torch.equal(p, parts[0]):
                names = "/".join(key.split(".")[-3] for key in lay.keys)
                raise AdapterError(
                    f"{k} differs from {lay.keys[0]}: separate {names} adapters (as HF PEFT trains them) are "
                    f"not supported by the fused layout yet; our fused {mod.target} layer shares one tensor")
    full = parts[0]
    return full if lay.shard_dim is None else shard(full, lay.shard_dim, mod.tp_rank, mod.tp_size)


def _ia3_fused_parts(lay: _Layout, scale: torch.Tensor, mod) -> dict[str, torch.Tensor]:
    """The wrapper's l_k / l_v from this rank's rows of a fused qkv IA3 vector (megatron's query-group order);
    rows the wrapper has no vector for (queries, an untargeted k or v) must be one."""
    g, q, d = mod.groups_local, mod.q_per_group, mod.head_dim
    rows = scale.reshape(g, (q + 2) * d)
    blocks = {"q": rows[:, :q * d], "k": rows[:, q * d:(q + 1) * d], "v": rows[:, (q + 1) * d:]}
    for name, block in blocks.items():
        if name not in lay.parts and not torch.all(block == 1):
            raise AdapterError(f"{lay.keys[0]}: IA3 scales the {name} rows of this fused module, but our IA3 "
                               f"{'has no query vector' if name == 'q' else f'was applied without {name!r}'} "
                               f"(rows other than the targeted keys/values must be 1)")
    return {p: blocks[p].reshape(-1) for p in lay.parts}


# -- the model's adapter configuration ------------------------------------------------------------------
def _stage_config(model) -> dict:
    """method, settings and targets of this stage's PEFT wrappers (targets: those on this stage)."""
    mods = list(peft_modules(model))
    if not mods:
        raise AdapterError("the model has no PEFT layers on this stage; apply a PEFT method first")
    first = mods[0]
    for m in mods[1:]:
        if m.method != first.method or m.settings() != first.settings():
            raise AdapterError(f"{m.where()} has {m.method} {m.settings()} but {first.where()} has "
                               f"{first.method} {first.settings()}: one adapter per model")
    covered = {t for m in mods for t in m.covers()}
    return {"method": first.method, **first.settings(),
            "targets": [t for t in first.TARGET_ORDER if t in covered]}


def _on_stage(model, targets) -> list[str]:
    """The targets this pipeline stage can hold (embedding: first stage; output: last stage)."""
    gpt = unwrap_model(model)
    absent = {t for t, here in (("embedding", gpt.pre_process), ("output", gpt.post_process)) if not here}
    return [t for t in targets if t not in absent]


def _write_atomically(directory: Path, tensors: dict, meta: dict) -> None:

    with atomic_directory(directory) as tmp:
        save_file(tensors, str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
        with open(tmp / CONFIG_NAME, "w") as f:
            yaml.safe_dump(meta, f, sort_keys=False)


def save_adapter(model, directory, peft_cfg: dict, model_cfg, base: dict | None = None) -> Path:
    """Gather the adapter tensors of every TP rank and PP stage on global rank 0 and write DIR (all ranks call).

    ``peft_cfg`` is the PEFT config that produced the adapter (method, rank, alpha, targets, ...): its values
    must agree with the model's wrappers and are stored as given otherwise. ``base`` describes the base
    model (name, source, revision, ...), stored as is.
    """
    directory = Path(directory)
    actual = _stage_config(model)
    peft_cfg = dict(peft_cfg or {})
    order = list(next(peft_modules(model)).TARGET_ORDER)
    for k, v in actual.items():
        # the wrappers name the saved method: a QLoRA model saves a LoRA adapter (framework/peft/qlora.py)
        given = None if k == "method" else peft_cfg.get(k)
        if k == "targets" and given is not None:
            unknown = [t for t in given if t not in order]
            if unknown:
                raise AdapterError(f"peft_cfg['targets'] has {unknown}, not {actual['method']} targets {order}")
            given = _on_stage(model, sorted(given, key=order.index))
        if given is not None and given != v:
            raise AdapterError(f"peft_cfg[{k!r}]={given!r} but the model's PEFT layers have {k}={v!r}")

    local = _local_pieces(model, model_cfg.family)
    saved = getattr(next(peft_modules(model)), "saved_tensors", None) or []  # set by load_adapter
    distributed = dist.is_available() and dist.is_initialized()
    if distributed:
        from megatron.core import parallel_state as ps

        payload = None
        if ps.get_data_parallel_rank(with_context_parallel=True) == 0:
            payload = (ps.get_pipeline_model_parallel_rank(), ps.get_tensor_model_parallel_rank(),
                       actual["targets"], local, _column_scales(model), local_saved(model, saved, model_cfg))
        gathered = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
        dist.gather_object(payload, gathered, dst=0)
        is_writer = dist.get_rank() == 0
    else:
        gathered = [(0, 0, actual["targets"], local, _column_scales(model), local_saved(model, saved, model_cfg))]
        is_writer = True

    if is_writer:
        payloads = [p for p in gathered if p is not None]
        tp = max(p[1] for p in payloads) + 1
        stages: dict[int, list] = {}
        saved_stages: dict[int, list] = {}
        covered, scales = set(), {}
        for pp_rank, tp_rank, targets, pieces, stage_scales, stage_saved in payloads:
            stages.setdefault(pp_rank, [None] * tp)[tp_rank] = pieces
            saved_stages.setdefault(pp_rank, [None] * tp)[tp_rank] = stage_saved
            covered.update(targets)
            scales.update(stage_scales)  # the rank columns are not sharded: every TP rank holds the same
        tensors = {}
        for pp_rank in sorted(stages):
            tensors.update(_assemble(stages[pp_rank], model_cfg))
            for name, value in assemble_saved(saved_stages[pp_rank], model_cfg).items():
                tensors.setdefault(name, value)  # the tied embedding's copy on the last stage: the first's
        if sorted(n for n in tensors if n in saved) != sorted(saved):
            raise AdapterError(f"gathered {SAVED} lack {sorted(set(saved) - set(tensors))}")
        targets = [t for t in order if t in covered]
        meta_cfg = {**actual, "targets": targets}
        want = shapes_for(meta_cfg, model_cfg)
        missing = sorted(set(want) - set(tensors))
        if missing:
            raise AdapterError(f"gathered adapter lacks {len(missing)} keys, e.g. {missing[0]} "
                               f"(does model_cfg describe this model?)")
        meta = {
            "format_version": FORMAT_VERSION,
            **{k: v for k, v in peft_cfg.items() if k not in meta_cfg and k != COLUMN_SCALES},
            **meta_cfg,
            "target_modules": target_modules(actual["method"], targets, model_cfg.gated_linear_unit,
                                             model_cfg.family),
            "base": dict(base or {}),
            "model": model_cfg.to_dict(),
        }
        # what the loaded adapter brought and the wrappers hold (load_adapter), whatever peft_cfg says
        meta.pop(SAVED, None)
        if scales:
            meta[COLUMN_SCALES] = {k: scales[k] for k in sorted(scales)}
        if saved:
            meta[SAVED] = sorted(saved)
        layout = getattr(next(peft_modules(model)), "hf_peft_layout", None)
        if layout is not None:
            meta[HF_LAYOUT] = layout
        _write_atomically(directory, {k: tensors[k] for k in sorted(tensors)}, meta)
    if distributed:
        dist.barrier()
    return directory


# -- load -----------------------------------------------------------------------------------------------
def read_adapter_config(directory) -> dict:
    """The adapter.yaml of DIR (its method, settings and targets are what to apply before loading)."""
    path = Path(directory) / CONFIG_NAME
    if not path.is_file():
        raise AdapterError(f"{path} not found: not an adapter directory")
    with open(path) as f:
        meta = yaml.safe_load(f)
    version = meta.get("format_version")
    if version != FORMAT_VERSION:
        raise AdapterError(f"{path}: format_version {version!r}, this code reads version {FORMAT_VERSION}")
    meta.setdefault("method", "lora")
    return meta


def read_adapter_tensors(directory) -> dict[str, torch.Tensor]:
    path = Path(directory) / WEIGHTS_NAME
    if not path.is_file():
        raise AdapterError(f"{path} not found")
    tensors = {}
    for k, v in load_file(str(path)).items():
        for p in _HF_PREFIXES:
            if k.startswith(p):
                k = k[len(p):]
        tensors[k] = v
    return tensors


def check_adapter_tensors(tensors: dict, model_cfg, meta: dict) -> None:
    """Every key the adapter's method and targets imply is present with its HF shape, and nothing else."""
    want = shapes_for(meta, model_cfg)
    missing = [k for k in want if k not in tensors]
    if missing:
        raise AdapterError(f"adapter lacks {len(missing)} expected key(s), first {missing[0]} "
                           f"(shape {want[missing[0]]})")
    for k, shape in want.items():
        if tuple(tensors[k].shape) != shape:
            raise AdapterError(f"adapter key {k} has shape {tuple(tensors[k].shape)}, expected {shape} "
                               f"({meta['method']} {meta.get('rank', meta.get('bottleneck', ''))}, model "
                               f"{model_cfg.hidden_size=} {model_cfg.num_layers=})")
    extra = sorted(set(tensors) - set(want))
    if extra:
        raise AdapterError(f"adapter holds {len(extra)} key(s) the {meta['method']} targets {list(meta['targets'])} "
                           f"do not use, first {extra[0]}")


def load_adapter(model, directory, model_cfg) -> dict:
    """Load DIR into a model already wrapped with the adapter's method, settings and targets (any TP/PP).

    Returns the adapter.yaml contents. Raises AdapterError naming what does not fit.
    """
    meta = read_adapter_config(directory)
    actual = _stage_config(model)
    if meta["method"] != actual["method"]:
        raise AdapterError(f"adapter method {meta['method']!r} but the model was wrapped with {actual['method']!r}")
    saved_targets = list(meta.get("targets") or [])
    if set(_on_stage(model, saved_targets)) != set(actual["targets"]):
        raise AdapterError(f"adapter targets {saved_targets} but the model was wrapped with "
                           f"{actual['targets']}; apply {actual['method']} with the adapter's targets")
    for k, v in actual.items():
        if k not in ("method", "targets", "dropout") and meta.get(k) != v:
            raise AdapterError(f"adapter {k}={meta.get(k)!r} but the model's PEFT layers have {k}={v!r}")
    tensors = read_adapter_tensors(directory)
    check_adapter_tensors(tensors, model_cfg, meta)
    _check_column_scales(meta, model_cfg, Path(directory) / CONFIG_NAME)
    saved = meta.get(SAVED) or []

    with torch.no_grad():
        for mod in peft_modules(model):
            for lay, pieces in _layouts(mod, model_cfg.family):
                value = _local_from_hf(lay, tensors, mod, model_cfg)
                values = _ia3_fused_parts(lay, value, mod) if lay.parts else {pieces[0].part: value}
                for piece in pieces:
                    param, value = mod.get_parameter(piece.name), values[piece.part]
                    if tuple(param.shape) != tuple(value.shape):
                        raise AdapterError(
                            f"{lay.keys[0]}: this rank's shard has shape {tuple(value.shape)} but {mod.where()} "
                            f"{piece.name} is {tuple(param.shape)} (TP rank {mod.tp_rank} of {mod.tp_size}); "
                            f"does model_cfg match the model?")
                    param.copy_(value.to(param.dtype))
        if saved:
            try:
                load_saved(model, tensors, saved, model_cfg)
            except ValueError as e:
                raise AdapterError(f"{Path(directory) / WEIGHTS_NAME}: {e}") from None
    set_adapter_extras(model, meta)
    return meta


def set_adapter_extras(model, meta: dict) -> None:
    """Put what an adapter.yaml holds beyond the tensors on the model's wrappers: each LoRA wrapper's column
    scales (an imported HF PEFT adapter of mixed ranks/alphas; the one alpha / r where none are given), the
    HF PEFT layout it came in and the names of the base tensors it carries, so that saving the model again
    writes them back."""
    scales = meta.get(COLUMN_SCALES) or {}
    layout, saved = meta.get(HF_LAYOUT), list(meta.get(SAVED) or [])
    for mod in peft_modules(model):
        mod.hf_peft_layout, mod.saved_tensors = layout, saved
        if hasattr(mod, "set_column_scales"):
            mod.set_column_scales(scales.get(_module_key(mod)))


def _check_column_scales(meta: dict, model_cfg, path: Path) -> None:
    """``column_scales`` names layer wrappers of the adapter's targets, each with ``rank`` numbers."""
    scales = meta.get(COLUMN_SCALES)
    if scales is None:
        return
    if not isinstance(scales, dict) or meta.get("method") not in ("lora", "dora"):
        raise AdapterError(f"{path}: {COLUMN_SCALES} must be a mapping of LoRA/DoRA wrappers to their rank "
                           f"columns' scales, got {type(scales).__name__} for method {meta.get('method')!r}")
    known = {wrapper_key(stack, i, t) for t in meta["targets"] if t not in _MODEL_LEVEL
             for stack, layers in _stacks(model_cfg) for i in range(layers)}
    for key, values in scales.items():
        if key not in known:
            raise AdapterError(f"{path}: {COLUMN_SCALES} names {key!r}, not a layer wrapper of targets "
                               f"{list(meta['targets'])} (e.g. {sorted(known)[0]!r})")
        if (not isinstance(values, list) or len(values) != meta.get("rank")
                or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)):
            raise AdapterError(f"{path}: {COLUMN_SCALES}[{key!r}] must be {meta.get('rank')} numbers (one per "
                               f"rank column), got {values!r}")
