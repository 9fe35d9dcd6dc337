"""LoRA adapters saved unsharded, with Hugging Face names, loadable at any TP/PP (DESIGN.md section 6).

    DIR/adapter.safetensors   model.layers.{i}.self_attn.{q,k,v,o}_proj.lora_{A,B}.weight
                              model.layers.{i}.mlp.{gate,up,down}_proj.lora_{A,B}.weight
    DIR/adapter.yaml          format_version, rank, alpha, dropout, rslora, targets, target_modules, base, model

``i`` is the global 0-based layer index; shapes are HF PEFT's: A [r, in], B [out, r]. Our fused layers map
to HF's separate ones as follows:

* ``linear_qkv``: one A, shared by q/k/v (stored three times, identical); B's rows are megatron's
  query-group order, split with :func:`~framework.models.fused_layout.split_qkv`.
* ``linear_fc1``: one A, shared by gate/up; B's rows are per TP rank ``cat(gate_r, up_r)``, split with
  :func:`~framework.models.fused_layout.unfuse_gate_up` over the TP shards.
* ``linear_proj`` -> ``o_proj``, ``linear_fc2`` -> ``down_proj``: A gathered along its input dim.

Saving gathers every TP shard and PP stage on global rank 0, which writes a temporary directory and moves
it into place. Loading reads the file on every rank and keeps this rank's shard; every expected key must
be present with the right shape.
"""

from __future__ import annotations

from pathlib import Path

import torch

from framework.models.fused_layout import fuse_gate_up, fuse_qkv, shard, split_qkv, unfuse_gate_up
from framework.peft.lora import TARGETS, check_targets, lora_modules

FORMAT_VERSION = 1
WEIGHTS_NAME = "adapter.safetensors"
CONFIG_NAME = "adapter.yaml"

#: our target -> HF modules (in the order a fused B is split into)
HF_MODULES = {
    "qkv": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    "proj": ("self_attn.o_proj",),
    "fc1": ("mlp.gate_proj", "mlp.up_proj"),
    "fc2": ("mlp.down_proj",),
}
_HF_PREFIXES = ("base_model.model.",)  # accepted on load, so HF PEFT files load as they are


class AdapterError(ValueError):
    """An adapter that does not fit the model (missing key, wrong shape, other rank or targets)."""


def _key(layer: int, module: str, factor: str) -> str:
    return f"model.layers.{layer}.{module}.lora_{factor}.weight"


def expected_shapes(model_cfg, targets, rank: int) -> dict[str, tuple[int, int]]:
    """Every key an adapter for this architecture, targets and rank must hold, with its HF shape."""
    h, d, f = model_cfg.hidden_size, model_cfg.kv_channels, model_cfg.ffn_hidden_size
    n, g = model_cfg.num_attention_heads, model_cfg.num_query_groups
    per_module = {  # HF module -> (in, out)
        "self_attn.q_proj": (h, n * d), "self_attn.k_proj": (h, g * d), "self_attn.v_proj": (h, g * d),
        "self_attn.o_proj": (n * d, h), "mlp.gate_proj": (h, f), "mlp.up_proj": (h, f), "mlp.down_proj": (f, h),
    }
    shapes = {}
    for i in range(model_cfg.num_layers):
        for t in targets:
            for m in HF_MODULES[t]:
                fan_in, fan_out = per_module[m]
                shapes[_key(i, m, "A")] = (rank, fan_in)
                shapes[_key(i, m, "B")] = (fan_out, rank)
    return shapes


# -- save -----------------------------------------------------------------------------------------------
def _local_shards(model) -> dict:
    """{(layer index, target): (A shard, B shard)} of this rank, on the CPU."""
    return {(layer_number - 1, target): (mod.lora_A.weight.detach().cpu().clone(),
                                         mod.lora_B.weight.detach().cpu().clone())
            for layer_number, target, mod in lora_modules(model)}


def _assemble(per_tp_rank: list[dict], model_cfg) -> dict[str, torch.Tensor]:
    """Full HF tensors from every TP rank's shards (each a dict as from _local_shards)."""
    n, g = model_cfg.num_attention_heads, model_cfg.num_query_groups
    out = {}
    for (i, target) in sorted(per_tp_rank[0]):
        A_sh = [s[(i, target)][0] for s in per_tp_rank]
        B_sh = [s[(i, target)][1] for s in per_tp_rank]
        replicated = A_sh if target in ("qkv", "fc1") else B_sh
        if any(not torch.equal(t, replicated[0]) for t in replicated[1:]):
            raise AdapterError(f"layer {i} {target}: the replicated LoRA factor differs across TP ranks "
                               f"(were its gradients finalised over TP?)")
        if target in ("qkv", "fc1"):  # column-parallel: A replicated, B sharded on rows
            A = A_sh[0]
            Bs = split_qkv(torch.cat(B_sh, dim=0), n, g) if target == "qkv" else unfuse_gate_up(B_sh)
        else:  # row-parallel: A sharded on columns, B replicated
            A = torch.cat(A_sh, dim=1)
            Bs = (B_sh[0],)
        for m, Bpart in zip(HF_MODULES[target], Bs):
            out[_key(i, m, "A")] = A.clone().contiguous()  # one copy per key: safetensors refuses shared storage
            out[_key(i, m, "B")] = Bpart.clone().contiguous()
    return out


def _config_of(model) -> dict:
    mods = list(lora_modules(model))
    if not mods:
        raise AdapterError("the model has no LoRA layers on this stage; call apply_lora first")
    m = mods[0][2]
    targets = [t for t in TARGETS if any(t == tt for _, tt, _ in mods)]
    return {"rank": m.rank, "alpha": m.alpha, "dropout": m.dropout_p, "rslora": m.rslora, "targets": targets}


def _write_atomically(directory: Path, tensors: dict, meta: dict) -> None:
    import yaml
    from safetensors.torch import save_file

    from framework.checkpoint.atomic import atomic_directory

    with atomic_directory(directory) as tmp:
        save_file(tensors, str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
        with open(tmp / CONFIG_NAME, "w") as f:
            yaml.safe_dump(meta, f, sort_keys=False)


def save_adapter(model, directory, lora_cfg: dict, model_cfg, base: dict | None = None) -> Path:
    """Gather the LoRA factors of every TP rank and PP stage on global rank 0 and write DIR (all ranks call).

    ``lora_cfg`` is the PEFT config that produced the adapter (rank, alpha, dropout, rslora, targets, ...):
    its values must agree with the model's LoRA layers and are stored as given otherwise. ``base``
    describes the base model (name, source, revision, ...), stored as is.
    """
    import torch.distributed as dist

    directory = Path(directory)
    actual = _config_of(model)
    lora_cfg = dict(lora_cfg or {})
    for k, v in actual.items():
        given = lora_cfg.get(k)
        if k == "targets" and given is not None:
            given = sorted(check_targets(given), key=list(TARGETS).index)
        if given is not None and given != v:
            raise AdapterError(f"lora_cfg[{k!r}]={given!r} but the model's LoRA layers have {k}={v!r}")

    local = _local_shards(model)
    distributed = dist.is_available() and dist.is_initialized()
    if distributed:
        from megatron.core import parallel_state as ps

        payload = None
        if ps.get_data_parallel_rank(with_context_parallel=True) == 0:
            payload = (ps.get_pipeline_model_parallel_rank(), ps.get_tensor_model_parallel_rank(), local)
        gathered = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
        dist.gather_object(payload, gathered, dst=0)
        is_writer = dist.get_rank() == 0
    else:
        gathered, is_writer = [(0, 0, local)], True

    if is_writer:
        tp = max(t for _, t, _ in (p for p in gathered if p is not None)) + 1
        stages: dict[int, list] = {}
        for p in gathered:
            if p is not None:
                stages.setdefault(p[0], [None] * tp)[p[1]] = p[2]
        tensors = {}
        for pp_rank in sorted(stages):
            tensors.update(_assemble(stages[pp_rank], model_cfg))
        want = expected_shapes(model_cfg, actual["targets"], actual["rank"])
        missing = sorted(set(want) - set(tensors))
        if missing:
            raise AdapterError(f"gathered adapter lacks {len(missing)} keys, e.g. {missing[0]} "
                               f"(does model_cfg describe this model?)")
        meta = {
            "format_version": FORMAT_VERSION,
            "method": "lora",
            **{k: v for k, v in lora_cfg.items() if k not in actual and k not in ("method",)},
            **actual,
            "target_modules": [m.split(".")[-1] for t in actual["targets"] for m in HF_MODULES[t]],
            "base": dict(base or {}),
            "model": model_cfg.to_dict(),
        }
        _write_atomically(directory, {k: tensors[k] for k in sorted(tensors)}, meta)
    if distributed:
        dist.barrier()
    return directory


# -- load -----------------------------------------------------------------------------------------------
def read_adapter_config(directory) -> dict:
    """The adapter.yaml of DIR (use its rank/alpha/dropout/rslora/targets for apply_lora)."""
    import yaml

    path = Path(directory) / CONFIG_NAME
    if not path.is_file():
        raise AdapterError(f"{path} not found: not an adapter directory")
    with open(path) as f:
        meta = yaml.safe_load(f)
    version = meta.get("format_version")
    if version != FORMAT_VERSION:
        raise AdapterError(f"{path}: format_version {version!r}, this code reads version {FORMAT_VERSION}")
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


def check_adapter_tensors(tensors: dict, model_cfg, targets, rank: int) -> None:
    """Every expected key present with its HF shape, nothing else, shared A factors identical."""
    want = expected_shapes(model_cfg, targets, rank)
    missing = [k for k in want if k not in tensors]
    if missing:
        raise AdapterError(f"adapter lacks {len(missing)} expected key(s), first {missing[0]} "
                           f"(shape {want[missing[0]]})")
    for k, shape in want.items():
        if tuple(tensors[k].shape) != shape:
            raise AdapterError(f"adapter key {k} has shape {tuple(tensors[k].shape)}, expected {shape} "
                               f"(rank {rank}, model {model_cfg.hidden_size=} {model_cfg.num_layers=})")
    extra = sorted(set(tensors) - set(want))
    if extra:
        raise AdapterError(f"adapter holds {len(extra)} key(s) the model's LoRA targets {list(targets)} do not "
                           f"use, first {extra[0]}")
    for i in range(model_cfg.num_layers):
        for t in ("qkv", "fc1"):
            if t not in targets:
                continue
            mods = HF_MODULES[t]
            first = tensors[_key(i, mods[0], "A")]
            for m in mods[1:]:
                if not torch.equal(first, tensors[_key(i, m, "A")]):
                    raise AdapterError(
                        f"{_key(i, m, 'A')} differs from {_key(i, mods[0], 'A')}: separate "
                        f"{'/'.join(x.split('.')[-1] for x in mods)} adapters (as HF PEFT trains them) are not "
                        f"supported by the fused layout yet; our fused {t} layer shares one A")


def load_adapter(model, directory, model_cfg) -> dict:
    """Load DIR into a model already wrapped by apply_lora with the same targets/rank (any TP/PP).

    Returns the adapter.yaml contents. Raises AdapterError naming what does not fit.
    """
    from megatron.core import parallel_state as ps

    meta = read_adapter_config(directory)
    actual = _config_of(model)
    saved_targets = check_targets(meta["targets"])
    if set(saved_targets) != set(actual["targets"]):
        raise AdapterError(f"adapter targets {list(saved_targets)} but the model was wrapped with "
                           f"{actual['targets']}; apply_lora with the adapter's targets")
    for k in ("rank", "alpha", "rslora"):
        if meta.get(k) != actual[k]:
            raise AdapterError(f"adapter {k}={meta.get(k)!r} but the model's LoRA layers have {k}={actual[k]!r}")
    tensors = read_adapter_tensors(directory)
    check_adapter_tensors(tensors, model_cfg, actual["targets"], actual["rank"])

    n, g = model_cfg.num_attention_heads, model_cfg.num_query_groups
    with torch.no_grad():
        for layer_number, target, mod in lora_modules(model):
            i, mods = layer_number - 1, HF_MODULES[target]
            tp, r = mod.tp_size, mod.tp_rank
            A = tensors[_key(i, mods[0], "A")]
            Bs = [tensors[_key(i, m, "B")] for m in mods]
            if target == "qkv":
                A_loc, B_loc = A, shard(fuse_qkv(*Bs, n, g), 0, r, tp)
            elif target == "fc1":
                A_loc, B_loc = A, fuse_gate_up(Bs[0], Bs[1], r, tp)
            else:
                A_loc, B_loc = shard(A, 1, r, tp), Bs[0]
            for name, param, value in (("A", mod.lora_A.weight, A_loc), ("B", mod.lora_B.weight, B_loc)):
                if tuple(param.shape) != tuple(value.shape):
                    raise AdapterError(
                        f"{_key(i, mods[0], name)}: this rank's shard has shape {tuple(value.shape)} but "
                        f"decoder layer {layer_number} {target} lora_{name} is {tuple(param.shape)} "
                        f"(TP rank {ps.get_tensor_model_parallel_rank()} of {tp}); does model_cfg match the model?")
                param.copy_(value.to(param.dtype))
    return meta
