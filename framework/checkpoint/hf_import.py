"""Load a Hugging Face safetensors checkpoint of any registered family into this rank's model stage.

Every rank reads only what its pipeline stage needs, one tensor at a time with plain file reads
(framework/checkpoint/safetensors_stream.py; no memory map, so the resident set holds the tensors in
flight, never the file), and keeps its own tensor-parallel shard (the family's table,
framework/models/families/, through the shared transforms of framework/models/weight_table.py; with more TP
ranks than KV heads, fused qkv rows with each KV head replicated: framework/models/kv_replication.py).
:class:`HFWeights` computes one parameter on demand (the streaming converter writes each straight to
the checkpoint); :func:`load_hf_into_gpt` fills a whole model stage with it. Strict in both directions:

* every parameter of the stage is assigned exactly once, with the parameter's shape (the HF tensor
  is cast to the parameter's dtype);
* every HF tensor is known to the name table (or explicitly ignorable), its layer index exists, and
  every tensor this stage needs is present.

Any violation raises :class:`HFImportError` naming the tensor and the parameter; nothing is loaded
partially without an error. A checkpoint of the bare base model (GPT-2's ``GPT2Model``, tensors without
the ``transformer.`` prefix) is read through :func:`table_names`.

Tied embeddings: with ``tie_word_embeddings`` and one pipeline stage, megatron's output layer has no
weight of its own (it multiplies by ``embedding.word_embeddings.weight``). With several stages the last
stage holds a separate ``output_layer.weight`` (megatron zeroes it and all-reduces it with the first
stage's embedding over the embedding group at construction, then keeps the two in step by
all-reducing their gradients); here both copies are filled from ``model.embed_tokens.weight``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

import torch

from framework.checkpoint.safetensors_files import open_safetensors
from framework.checkpoint.safetensors_stream import SafetensorsReader
from framework.models import kv_replication
from framework.models import weight_table as wt
from framework.models.config import ModelConfig, arch_mismatches
from framework.models.registry import family_for_hf
from framework.models.unwrap import unwrap_model

log = logging.getLogger(__name__)

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


class HFImportError(ValueError):
    """A checkpoint that does not fit the model: names the tensor or parameter at fault."""


def safetensors_index(hf_dir: str | Path) -> dict[str, Path]:
    """{tensor name: file holding it} for a single-file or sharded safetensors checkpoint."""
    hf_dir = Path(hf_dir)
    index = hf_dir / INDEX_FILE
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        files = {f: hf_dir / f for f in set(weight_map.values())}
        absent = sorted(f for f, p in files.items() if not p.is_file())
        if absent:
            raise HFImportError(f"{index} names shard file(s) {absent} that do not exist")
        return {name: files[f] for name, f in weight_map.items()}
    single = hf_dir / SINGLE_FILE
    if single.is_file():
        with open_safetensors(single, HFImportError) as f:
            return {name: single for name in f.keys()}
    raise HFImportError(f"{hf_dir} has neither {SINGLE_FILE} nor {INDEX_FILE} (only safetensors "
                        f"checkpoints are read)")



def stack_of(rule: wt.WeightRule) -> str:
    """The attribute holding the layer stack a per-layer rule belongs to: 'decoder' (GPT), 'encoder' (T5)."""
    return rule.ours.split(".layers.{i}")[0]


def deepest_stack(cfg: ModelConfig, rules) -> int:
    """Layers of the deepest stack the per-layer rules name (T5's decoder may be deeper than its encoder);
    a layer index at or beyond it is an error, one beyond its own stack is unexpected by ``hf_shapes``."""
    return max([cfg.layers_of(stack_of(r)) for r in rules if r.per_layer] or [cfg.num_layers])


def layer_offset(model, stack: str = "decoder") -> tuple[int, int]:
    """(global index of this stage's first layer, number of layers on this stage) of a layer stack."""
    block = model
    for part in stack.split("."):
        block = getattr(block, part, None)
    layers = block.layers if block is not None else []
    if len(layers) == 0:
        return 0, 0
    offset = layers[0].layer_number - 1  # megatron numbers layers from 1, globally
    numbers = [layer.layer_number - 1 for layer in layers]
    if numbers != list(range(offset, offset + len(layers))):
        raise HFImportError(f"this stage's layers are not contiguous (global numbers {numbers}); "
                            f"virtual pipeline stages are not supported by the HF import")
    return offset, len(layers)


def _check_config(hf_dir: Path, model_cfg: ModelConfig):
    """The family of the checkpoint, after checking its config.json describes ``model_cfg``."""
    config = hf_dir / "config.json"
    if not config.is_file():
        raise HFImportError(f"{hf_dir} has no config.json")
    try:
        hf = json.loads(config.read_text())
    except json.JSONDecodeError as e:
        raise HFImportError(f"{config} is not valid JSON: {e}") from None
    family = family_for_hf(hf)
    found = family.config_from_hf(hf)
    bad = arch_mismatches(model_cfg, found)
    if found.family != model_cfg.family:
        bad.insert(0, f"family: configured {model_cfg.family!r}, checkpoint has {found.family!r}")
    if bad:
        raise HFImportError(f"{config} does not match the model being loaded:\n  " + "\n  ".join(bad))
    return family


def table_names(index: dict, family) -> dict[str, str]:
    """{tensor name as the family's table spells it: name as stored} for the names of ``index``. A save of
    the bare base model (transformers' ``GPT2Model``: no LM head, tied) names every tensor without the
    family's ``base_prefix`` (``transformer.``); such a checkpoint is read as if it had it."""
    prefix = family.base_prefix
    if prefix and index and not any(name.startswith(prefix) for name in index):
        return {prefix + name: name for name in index}
    return {name: name for name in index}


def shard_context(model_cfg: ModelConfig, tp_rank: int, tp_size: int) -> wt.ShardContext:
    return wt.ShardContext(tp_rank=tp_rank, tp_size=tp_size, num_heads=model_cfg.num_attention_heads,
                           num_groups=model_cfg.num_query_groups, head_dim=model_cfg.kv_channels)


class HFWeights:
    """This rank's parameters computed from an HF checkpoint, one at a time, through the family's table.

    Construction checks everything that can be checked without reading data: config.json describes
    ``model_cfg``; every HF tensor name is known (or ignorable), its layer exists and config.json expects
    it; every parameter of the stage has exactly one rule and its HF sources are present. ``value(name)``
    then reads that parameter's HF tensor(s) (plain reads, :class:`SafetensorsReader`: never a memory map),
    applies the transform for this TP rank, checks the shape and casts to the parameter's dtype. Only the
    parameters' names, shapes and dtypes are used, so ``gpt_model`` may live on the meta device.
    ``value`` may be called from several threads at once. Use as a context manager (closes the files).
    ``outside``: {HF tensor name: our parameter name} that the caller loads itself, left out of both checks
    (a sequence-classification head: framework/checkpoint/score_head.py).
    """

    def __init__(self, gpt_model, hf_dir: str | Path, model_cfg: ModelConfig, outside: dict | None = None):
        from megatron.core import parallel_state

        self.hf_dir = hf_dir = Path(hf_dir)
        family = _check_config(hf_dir, model_cfg)
        gpt = unwrap_model(gpt_model)
        stored = safetensors_index(hf_dir)
        self.stored = table_names(stored, family)  # a bare base-model save lacks the table's prefix
        self.index = index = {name: stored[as_stored] for name, as_stored in self.stored.items()}
        tied = model_cfg.tie_word_embeddings
        rules = family.rules(tied, model_cfg)
        self.offsets = offsets = {stack_of(r): layer_offset(gpt, stack_of(r)) for r in rules if r.per_layer}
        expected = family.hf_shapes(model_cfg)

        # The HF side: every name must be known, and its layer must exist.
        outside = outside or {}
        for name in index:
            if name in outside:
                continue
            try:
                kind = wt.classify_hf_name(name, rules, family.ignored, tied, deepest_stack(model_cfg, rules),
                                           model_cfg.num_experts)
            except ValueError as e:  # a layer or expert index beyond the model
                raise HFImportError(f"{e} (in {index[name].name})") from None
            if kind is None:
                raise HFImportError(f"HF tensor {name!r} in {index[name].name} is not a {family.name} weight "
                                    f"known to framework/models/families/{family.name}.py (WEIGHTS)")
            if kind != "ignored" and name not in expected:
                raise HFImportError(f"HF tensor {name!r} in {index[name].name} is not expected by config.json "
                                    f"(e.g. a layer beyond its stack's depth)")

        self.params = params = dict(gpt.named_parameters())
        self.ctx = shard_context(model_cfg, parallel_state.get_tensor_model_parallel_rank(),
                                 parallel_state.get_tensor_model_parallel_world_size())
        # our parameter -> (rule, its HF tensor names), in the table's order
        self.plan: dict[str, tuple[wt.WeightRule, list[str]]] = {}
        for rule in rules:
            offset, n_local = offsets[stack_of(rule)] if rule.per_layer else (0, 0)
            layers = range(n_local) if rule.per_layer else [None]
            for local, e in ((i, e) for i in layers for e in wt.experts(rule, model_cfg.num_experts)):
                fmt = ({} if local is None else {"i": local}) | {"e": e}
                hf_fmt = ({} if local is None else {"i": local + offset}) | {"e": e}
                ours = rule.ours.format(**fmt)
                if ours not in params and rule.te_ours is not None:
                    ours = rule.te_ours.format(**fmt)
                if ours not in params or ours in outside.values():
                    continue  # not on this stage (embedding off the first stage, output layer off the last)
                hf_names = [p.format(**hf_fmt) for p in rule.hf]
                if ours in self.plan:
                    raise HFImportError(f"parameter {ours!r} assigned twice (from {self.plan[ours][1]} and "
                                        f"{hf_names}); the name table has overlapping rules")
                for n in hf_names:
                    if n not in index:
                        raise HFImportError(f"HF tensor {n!r} (needed for parameter {ours!r}) is missing "
                                            f"from the checkpoint in {hf_dir}")
                self.plan[ours] = (rule, hf_names)
        unassigned = sorted(set(params) - set(self.plan) - set(outside.values()))
        if unassigned:
            raise HFImportError(f"parameter(s) {unassigned} of this stage have no source in the HF name table; "
                                f"the model would keep random weights there")
        self.reader = SafetensorsReader(HFImportError)
        self.hf_tensors_read = 0

    def value(self, ours: str) -> torch.Tensor:
        """Parameter ``ours`` of this rank (its TP shard), in the parameter's dtype and shape."""
        rule, hf_names = self.plan[ours]
        param = self.params[ours]
        tensors = [self.reader.read(self.index[n], self.stored[n]) for n in hf_names]
        self.hf_tensors_read += len(tensors)
        try:
            value = self._transform(ours, rule, tensors)
        except Exception as e:
            shapes = [tuple(t.shape) for t in tensors]
            raise HFImportError(f"cannot convert HF tensor(s) {hf_names} with shapes {shapes} into "
                                f"parameter {ours!r}: {e}") from e
        if tuple(value.shape) != tuple(param.shape):
            shapes = [tuple(t.shape) for t in tensors]
            raise HFImportError(
                f"shape mismatch: HF tensor(s) {hf_names} with shapes {shapes} give "
                f"{tuple(value.shape)} on TP rank {self.ctx.tp_rank}/{self.ctx.tp_size}, but parameter {ours!r} "
                f"is {tuple(param.shape)}")
        return value.to(dtype=param.dtype)

    def _transform(self, ours: str, rule: wt.WeightRule, tensors: list) -> torch.Tensor:
        """This rank's shard; fused qkv rows with KV heads replicated over TP are cut from the whole tensor."""
        ctx = self.ctx
        if not (kv_replication.is_fused_qkv(ours) and ctx.tp_size > ctx.num_groups):
            return wt.apply_transform(rule, tensors, ctx)
        full = wt.apply_transform(rule, tensors, dataclasses.replace(ctx, tp_rank=0, tp_size=1))
        return kv_replication.replicate_rows(full, ctx.num_heads, ctx.num_groups, ctx.tp_size, ctx.tp_rank)

    def close(self) -> None:
        self.reader.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def load_hf_into_gpt(gpt_model, hf_dir: str | Path, model_cfg: ModelConfig) -> dict:
    """Fill this rank's stage of ``gpt_model`` from the HF checkpoint in ``hf_dir``.

    Process groups must exist (TP rank/size come from megatron's parallel_state). Call it before PEFT
    wraps the model: adapter parameters have no HF source and would be reported as unassigned.
    Returns a small report: {'assigned': [our parameter names], 'hf_tensors_read': n}.
    """
    with HFWeights(gpt_model, hf_dir, model_cfg) as weights:
        for ours in weights.plan:
            with torch.no_grad():
                weights.params[ours].copy_(weights.value(ours))
        log.info("loaded %d parameters (layers %s) from %s (%d HF tensors read)", len(weights.plan),
                 ", ".join(f"{k} {o}..{o + n - 1}" for k, (o, n) in weights.offsets.items()), weights.hf_dir,
                 weights.hf_tensors_read)
        return {"assigned": sorted(weights.plan), "hf_tensors_read": weights.hf_tensors_read}
