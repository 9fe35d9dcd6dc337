"""Base-model tensors an adapter carries whole: HF PEFT's ``modules_to_save`` (a fully trained
``embed_tokens`` / ``lm_head``) and its trained biases (``bias="lora_only"`` / ``"all"``).

    adapter.safetensors   beside the adapter's own tensors, whole tensors under the HF base model's names
                          (``model.embed_tokens.weight``, ``lm_head.weight``,
                          ``model.layers.{i}.self_attn.q_proj.bias``)
    adapter.yaml          saved_tensors: [those names]

Loading an adapter puts them over the base weights (:func:`load_saved`): this rank's shard of each parameter,
through the family's weight table (framework/models/families/), so at any TP/PP layout: the embedding's and
output layer's vocabulary-parallel rows, fused qkv rows (KV heads replicated over TP where TP exceeds them),
the tied output layer's copy on the last stage. Saving gathers them back (:func:`local_saved` on each rank,
:func:`assemble_saved` on the writer). A parameter of ours fed by several HF tensors (q/k/v biases into
``linear_qkv.bias``) is carried with all of them (:func:`complete_groups`: the import reads the members the
adapter did not train from the HF base model).
"""

from __future__ import annotations

import dataclasses

import torch

from framework.checkpoint.hf_import import layer_offset, shard_context, stack_of
from framework.models import kv_replication
from framework.models import weight_table as wt
from framework.models.registry import get_family
from framework.models.unwrap import unwrap_model

KEY = "saved_tensors"


def base_shapes(model_cfg) -> dict[str, tuple[int, ...]]:
    """Every HF base tensor of the architecture with its shape."""
    return get_family(model_cfg.family).hf_shapes(model_cfg)


def _groups(model_cfg):
    """(rule, global layer or None, expert, HF names) of every parameter the family's table fills."""
    rules = get_family(model_cfg.family).rules(model_cfg.tie_word_embeddings, model_cfg)
    for rule in rules:
        layers = range(model_cfg.layers_of(stack_of(rule))) if rule.per_layer else [None]
        for i in layers:
            for e in wt.experts(rule, model_cfg.num_experts):
                yield rule, i, e, tuple(n.format(i=i, e=e) for n in rule.hf)


def complete_groups(names, model_cfg) -> list[str]:
    """The HF names that ``names`` need beside them: the other sources of every parameter they feed."""
    names = set(names)
    return sorted({n for *_, hf in _groups(model_cfg) if names & set(hf) for n in hf} - names)


def _stage_groups(model, names, model_cfg):
    """(our parameter on this stage, rule, HF names) for every parameter the saved ``names`` fill."""
    gpt = unwrap_model(model)
    params = gpt.state_dict(keep_vars=True)  # the wrappers keep the base's keys
    names = set(names)
    for rule, i, e, hf in _groups(model_cfg):
        if not names & set(hf):
            continue
        missing = set(hf) - names
        if missing:
            raise ValueError(f"{KEY} has {sorted(names & set(hf))} without {sorted(missing)}: they fill one "
                             f"parameter of ours together")
        local = None
        if rule.per_layer:
            offset, n_local = layer_offset(gpt, stack_of(rule))
            local = i - offset
            if not 0 <= local < n_local:
                continue
        ours = rule.ours.format(i=local, e=e)
        if ours not in params and rule.te_ours is not None:
            ours = rule.te_ours.format(i=local, e=e)
        if ours in params:  # else not on this stage (the embedding off the first, the output layer off the last)
            yield ours, params[ours], rule, hf


def _tp():
    from megatron.core import parallel_state as ps

    return ps.get_tensor_model_parallel_rank(), ps.get_tensor_model_parallel_world_size()


@torch.no_grad()
def load_saved(model, tensors: dict, names, model_cfg) -> None:
    """Put this rank's shards of the saved HF tensors over the base parameters of this stage."""
    tp_rank, tp_size = _tp()
    ctx = shard_context(model_cfg, tp_rank, tp_size)
    for ours, param, rule, hf in _stage_groups(model, names, model_cfg):
        parts = [tensors[n] for n in hf]
        if kv_replication.is_fused_qkv(ours) and tp_size > ctx.num_groups:
            full = wt.apply_transform(rule, parts, dataclasses.replace(ctx, tp_rank=0, tp_size=1))
            value = kv_replication.replicate_rows(full, ctx.num_heads, ctx.num_groups, tp_size, tp_rank)
        else:
            value = wt.apply_transform(rule, parts, ctx)
        if tuple(value.shape) != tuple(param.shape):
            raise ValueError(f"{list(hf)} give {tuple(value.shape)} on TP rank {tp_rank} of {tp_size}, but "
                             f"parameter {ours!r} is {tuple(param.shape)}")
        param.copy_(value.to(param.dtype))


def local_saved(model, names, model_cfg) -> dict[tuple[str, ...], tuple[str, torch.Tensor]]:
    """{HF names: (our parameter, this rank's shard)} of the saved tensors on this stage."""
    if not names:
        return {}
    return {hf: (ours, param.detach().cpu().clone()) for ours, param, _, hf in _stage_groups(model, names, model_cfg)}


def assemble_saved(per_tp_rank: list[dict], model_cfg) -> dict[str, torch.Tensor]:
    """The whole HF tensors from every TP rank's :func:`local_saved` of one or more stages (a group held by
    two stages, the tied embedding, is taken from the first)."""
    rules = {hf: rule for rule, _, _, hf in _groups(model_cfg)}
    ctx = shard_context(model_cfg, 0, 1)
    out = {}
    for hf in dict.fromkeys(k for local in per_tp_rank for k in local):
        if all(n in out for n in hf):
            continue
        ours = per_tp_rank[0][hf][0]
        shards = [local[hf][1] for local in per_tp_rank]
        if kv_replication.is_fused_qkv(ours):
            shards = kv_replication.dereplicate_rows(shards, ctx.num_heads, ctx.num_groups)
        values = wt.invert_transform(rules[hf], shards, dataclasses.replace(ctx, tp_size=len(shards)))
        out.update({n: v.clone().contiguous() for n, v in zip(hf, values)})
    return out
