"""Adapters saved unsharded, with Hugging Face PEFT names, loadable at any TP/PP (DESIGN.md section 6).

    DIR/adapter.safetensors   HF PEFT's keys (without its ``base_model.model.`` prefix) and shapes:
        lora      model.layers.{i}.self_attn.{q,k,v,o}_proj.lora_{A,B}.weight       A [r, in], B [out, r]
                  model.layers.{i}.mlp.{gate,up,down}_proj.lora_{A,B}.weight
                  model.embed_tokens.lora_embedding_{A,B}                         A [r, vocab], B [hidden, r]
                  lm_head.lora_{A,B}.weight
        dora      lora's keys + {module}.lora_magnitude_vector                       [out]
        ia3       model.layers.{i}.self_attn.{k,v}_proj.ia3_l [out, 1], model.layers.{i}.mlp.down_proj.ia3_l [1, in]
        adapter   model.layers.{i}.{self_attn,mlp}.adapter.{down,up}.{weight,bias}  (ours; HF PEFT has none)
    DIR/adapter.yaml          format_version, method, the method's settings (rank, alpha, dropout, rslora;
                              bottleneck, activation), targets, target_modules, base, model

``i`` is the global 0-based layer index. How each wrapper's TP shards become HF tensors follows from its
:class:`~framework.peft.wrapping.Piece` s: a tensor running along the side its base shards (a column base's
output, a row base's input, the embedding's vocabulary) is concatenated over TP ranks along that
dimension; every other tensor is replicated and must be equal on every TP rank. Fused layers split as HF
names them:

* ``linear_qkv``: output-side tensors (B, DoRA's magnitude) are in megatron's query-group order, split
  with :func:`~framework.models.fused_layout.split_qkv`; input-side ones (A) are shared by q/k/v and
  stored once per HF module (identical); IA3's l_k / l_v cover only the k / v rows.
* ``linear_fc1``: output-side tensors are per TP rank ``cat(gate_r, up_r)``, split with
  :func:`~framework.models.fused_layout.unfuse_gate_up` over the shards; A is shared by gate/up.
* ``linear_proj`` -> ``o_proj``, ``linear_fc2`` -> ``down_proj``; ``embedding`` -> ``model.embed_tokens``,
  ``output`` -> ``lm_head``.

Saving gathers every TP shard and PP stage on global rank 0, which writes a temporary directory and moves
it into place. Loading reads the file on every rank and keeps this rank's shard; every expected key must
be present with the right shape, and nothing else.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from framework.models.fused_layout import fuse_gate_up, fuse_qkv, shard, split_qkv, unfuse_gate_up
from framework.peft.wrapping import peft_modules, unwrap

FORMAT_VERSION = 1
WEIGHTS_NAME = "adapter.safetensors"
CONFIG_NAME = "adapter.yaml"

#: our target -> HF modules (in the order a fused tensor is split into)
HF_MODULES = {
    "qkv": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    "proj": ("self_attn.o_proj",),
    "fc1": ("mlp.gate_proj", "mlp.up_proj"),
    "fc2": ("mlp.down_proj",),
    "embedding": ("embed_tokens",),
    "output": ("lm_head",),
}
_BLOCKS = {"qkv": "self_attn", "proj": "self_attn", "fc1": "mlp", "fc2": "mlp"}
#: IA3 target -> HF module; Houlsby adapter target -> HF block
IA3_MODULES = {"k": "self_attn.k_proj", "v": "self_attn.v_proj", "fc2": "mlp.down_proj"}
ADAPTER_BLOCKS = {"attention": "self_attn", "mlp": "mlp"}
_MODEL_LEVEL = ("embedding", "output")
_HF_PREFIXES = ("base_model.model.",)  # accepted on load, so HF PEFT files load as they are


class AdapterError(ValueError):
    """An adapter that does not fit the model (missing key, wrong shape, other rank, method or targets)."""


def hf_modules(target: str, gated: bool = True) -> tuple[str, ...]:
    """The HF modules one of our targets stands for; a non-gated MLP's fc1 is one module (up_proj), which
    must not be split into gate/up halves (they would be reshuffled when loaded at another TP)."""
    return ("mlp.up_proj",) if target == "fc1" and not gated else HF_MODULES[target]


def _module_path(layer_number: int | None, target: str, module: str) -> str:
    if target == "embedding":
        return "model.embed_tokens"
    if target == "output":
        return "lm_head"
    return f"model.layers.{layer_number - 1}.{module}"


# -- what the file must hold, from the config alone ------------------------------------------------------
def expected_shapes(model_cfg, targets, rank: int | None = None, method: str = "lora") -> dict[str, tuple]:
    """Every key an adapter of ``method`` for this architecture and targets must hold, with its HF shape.
    ``rank``: LoRA/DoRA rank, or the bottleneck width of Houlsby adapters (unused by IA3)."""
    h, d, f = model_cfg.hidden_size, model_cfg.kv_channels, model_cfg.ffn_hidden_size
    n, g, V, L = model_cfg.num_attention_heads, model_cfg.num_query_groups, model_cfg.vocab_size, model_cfg.num_layers
    features = {  # HF module -> (in, out)
        "self_attn.q_proj": (h, n * d), "self_attn.k_proj": (h, g * d), "self_attn.v_proj": (h, g * d),
        "self_attn.o_proj": (n * d, h), "mlp.gate_proj": (h, f), "mlp.up_proj": (h, f), "mlp.down_proj": (f, h),
        "embed_tokens": (V, h), "lm_head": (h, V),
    }
    layers = range(L)
    shapes: dict[str, tuple] = {}
    for t in targets:
        if method in ("lora", "dora"):
            for m in hf_modules(t, model_cfg.gated_linear_unit):
                fan_in, fan_out = features[m]
                for i in ([None] if t in _MODEL_LEVEL else [i + 1 for i in layers]):
                    p = _module_path(i, t, m)
                    if t == "embedding":
                        shapes[f"{p}.lora_embedding_A"] = (rank, fan_in)
                        shapes[f"{p}.lora_embedding_B"] = (fan_out, rank)
                        continue
                    shapes[f"{p}.lora_A.weight"] = (rank, fan_in)
                    shapes[f"{p}.lora_B.weight"] = (fan_out, rank)
                    if method == "dora":
                        shapes[f"{p}.lora_magnitude_vector"] = (fan_out,)
        elif method == "ia3":
            m = IA3_MODULES[t]
            fan_in, fan_out = features[m]
            for i in layers:
                shapes[f"model.layers.{i}.{m}.ia3_l"] = (1, fan_in) if t == "fc2" else (fan_out, 1)
        elif method == "adapter":
            for i in layers:
                p = f"model.layers.{i}.{ADAPTER_BLOCKS[t]}.adapter"
                shapes.update({f"{p}.down.weight": (rank, h), f"{p}.down.bias": (rank,),
                               f"{p}.up.weight": (h, rank), f"{p}.up.bias": (h,)})
        else:
            raise AdapterError(f"adapter method {method!r} is not one of lora, dora, ia3, adapter")
    return shapes


def shapes_for(meta: dict, model_cfg) -> dict[str, tuple]:
    """expected_shapes for an adapter.yaml's contents."""
    method = meta.get("method", "lora")
    return expected_shapes(model_cfg, meta["targets"], meta.get("rank", meta.get("bottleneck")), method)


def target_modules(method: str, targets, gated: bool = True) -> list[str]:
    """HF PEFT's ``target_modules`` for our targets (empty for Houlsby adapters)."""
    if method == "adapter":
        return []
    if method == "ia3":
        return [IA3_MODULES[t].split(".")[-1] for t in targets]
    return [m.split(".")[-1] for t in targets for m in hf_modules(t, gated)]


# -- from wrapper pieces to HF keys ---------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class _Layout:
    keys: tuple[str, ...]     # the HF keys one wrapper tensor becomes, in split order
    split: str                # one | same (each key the whole tensor) | qkv | gate_up
    shard_dim: int | None     # TP shards concatenated along this dim; None: replicated
    hf_unsqueeze: int | None


def _layout(mod, piece) -> _Layout:
    t = mod.target
    if piece.at_block:
        paths = (f"model.layers.{mod.layer_number - 1}.{_BLOCKS[t]}",)
    else:
        modules = hf_modules(t, gated=t != "fc1" or getattr(mod, "glu_fused", True))
        if piece.part is not None:
            modules = (modules["qkv".index(piece.part)],)
        paths = tuple(_module_path(mod.layer_number, t, m) for m in modules)
    if len(paths) == 1:
        split = "one"
    elif piece.side == "out":
        split = "qkv" if t == "qkv" else "gate_up"
    else:
        split = "same"
    return _Layout(tuple(f"{p}.{piece.suffix}" for p in paths), split, mod.shard_dim(piece), piece.hf_unsqueeze)


def _local_pieces(model) -> list[tuple[_Layout, torch.Tensor]]:
    return [(_layout(mod, piece), mod.get_parameter(piece.name).detach().cpu().clone())
            for mod in peft_modules(model) for piece in mod.pieces()]


def _assemble(per_tp_rank: list[list], model_cfg) -> dict[str, torch.Tensor]:
    """Full HF tensors from every TP rank's pieces (each a list as from _local_pieces, same order)."""
    n, g = model_cfg.num_attention_heads, model_cfg.num_query_groups
    out = {}
    for j, (lay, _) in enumerate(per_tp_rank[0]):
        shards = [pieces[j][1] for pieces in per_tp_rank]
        if lay.shard_dim is None:
            if any(not torch.equal(s, shards[0]) for s in shards[1:]):
                raise AdapterError(f"{lay.keys[0]}: the replicated tensor differs across TP ranks "
                                   f"(were its gradients finalised over TP?)")
            full = shards[0]
        else:
            full = torch.cat(shards, dim=lay.shard_dim)
        if lay.split == "gate_up":
            parts = unfuse_gate_up(shards)
        elif lay.split == "qkv":
            parts = split_qkv(full, n, g)
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
    if lay.split == "gate_up":
        return fuse_gate_up(parts[0], parts[1], mod.tp_rank, mod.tp_size)
    if lay.split == "qkv":
        full = fuse_qkv(*parts, model_cfg.num_attention_heads, model_cfg.num_query_groups)
    else:
        if lay.split == "same":
            for k, p in zip(lay.keys[1:], parts[1:]):
                if not torch.equal(p, parts[0]):
                    names = "/".join(key.split(".")[-3] for key in lay.keys)
                    raise AdapterError(
                        f"{k} differs from {lay.keys[0]}: separate {names} adapters (as HF PEFT trains them) are "
                        f"not supported by the fused layout yet; our fused {mod.target} layer shares one tensor")
        full = parts[0]
    return full if lay.shard_dim is None else shard(full, lay.shard_dim, mod.tp_rank, mod.tp_size)


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
    gpt = unwrap(model)
    absent = {t for t, here in (("embedding", gpt.pre_process), ("output", gpt.post_process)) if not here}
    return [t for t in targets if t not in absent]


def _write_atomically(directory: Path, tensors: dict, meta: dict) -> None:
    import yaml
    from safetensors.torch import save_file

    from framework.checkpoint.atomic import atomic_directory

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
    import torch.distributed as dist

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

    local = _local_pieces(model)
    distributed = dist.is_available() and dist.is_initialized()
    if distributed:
        from megatron.core import parallel_state as ps

        payload = None
        if ps.get_data_parallel_rank(with_context_parallel=True) == 0:
            payload = (ps.get_pipeline_model_parallel_rank(), ps.get_tensor_model_parallel_rank(),
                       actual["targets"], local)
        gathered = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
        dist.gather_object(payload, gathered, dst=0)
        is_writer = dist.get_rank() == 0
    else:
        gathered, is_writer = [(0, 0, actual["targets"], local)], True

    if is_writer:
        payloads = [p for p in gathered if p is not None]
        tp = max(p[1] for p in payloads) + 1
        stages: dict[int, list] = {}
        covered = set()
        for pp_rank, tp_rank, targets, pieces in payloads:
            stages.setdefault(pp_rank, [None] * tp)[tp_rank] = pieces
            covered.update(targets)
        tensors = {}
        for pp_rank in sorted(stages):
            tensors.update(_assemble(stages[pp_rank], model_cfg))
        targets = [t for t in order if t in covered]
        meta_cfg = {**actual, "targets": targets}
        want = shapes_for(meta_cfg, model_cfg)
        missing = sorted(set(want) - set(tensors))
        if missing:
            raise AdapterError(f"gathered adapter lacks {len(missing)} keys, e.g. {missing[0]} "
                               f"(does model_cfg describe this model?)")
        meta = {
            "format_version": FORMAT_VERSION,
            **{k: v for k, v in peft_cfg.items() if k not in meta_cfg},
            **meta_cfg,
            "target_modules": target_modules(actual["method"], targets, model_cfg.gated_linear_unit),
            "base": dict(base or {}),
            "model": model_cfg.to_dict(),
        }
        _write_atomically(directory, {k: tensors[k] for k in sorted(tensors)}, meta)
    if distributed:
        dist.barrier()
    return directory


# -- load -----------------------------------------------------------------------------------------------
def read_adapter_config(directory) -> dict:
    """The adapter.yaml of DIR (its method, settings and targets are what to apply before loading)."""
    import yaml

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
    from safetensors.torch import load_file

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

    with torch.no_grad():
        for mod in peft_modules(model):
            for piece in mod.pieces():
                lay = _layout(mod, piece)
                value = _local_from_hf(lay, tensors, mod, model_cfg)
                param = mod.get_parameter(piece.name)
                if tuple(param.shape) != tuple(value.shape):
                    raise AdapterError(
                        f"{lay.keys[0]}: this rank's shard has shape {tuple(value.shape)} but {mod.where()} "
                        f"{piece.name} is {tuple(param.shape)} (TP rank {mod.tp_rank} of {mod.tp_size}); does "
                        f"model_cfg match the model?")
                param.copy_(value.to(param.dtype))
    return meta
