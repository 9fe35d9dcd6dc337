"""Our model (any TP/PP, LoRA-wrapped or not: base weights only) -> a Hugging Face directory of its family.

    OUT/model.safetensors               (or model-0000k-of-0000n.safetensors + model.safetensors.index.json)
    OUT/config.json                     LlamaConfig-compatible, written with plain json
    OUT/tokenizer files                 copied from a tokenizer directory when given

One tensor at a time, in HF order (embedding, layers 0..L-1, final norm, lm_head): every rank offers its
local shard of the parameter (None if its stage does not hold it); global rank 0 gathers them, undoes the
TP sharding and the fusions with the inverse of the name table's transforms (framework/models/families/,
weight_table.py), checks the shape against the HF shape the config implies, and appends its bytes to the
current output file (names, dtypes and shapes are known from the config, so each file's safetensors
header is written first and the tensors follow as they come; a file ends before ``max_shard_bytes``).
Peak memory on rank 0 is one parameter (all TP shards) and the HF tensor(s) made of it, beyond the
model stage itself -- or beyond nothing, with ``params`` reading each parameter from a checkpoint when
asked. Every HF tensor of the table is written exactly once and every base parameter of every stage is
consumed; otherwise :class:`HFExportError`.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

from framework.checkpoint.hf_import import layer_offset, shard_context, stack_of
from framework.checkpoint.safetensors_stream import SafetensorsStreamWriter
from framework.models import kv_replication
from framework.models import weight_table as wt
from framework.models.config import ModelConfig
from framework.models.registry import get_family
from framework.models.unwrap import unwrap_model
from framework.runtime.atomic import publish, temp_dir_beside

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class HFExportError(ValueError):
    """A model that cannot be written as the HF checkpoint its config describes (names the tensor)."""


def _family(cfg: ModelConfig):
    return get_family(cfg.family)


def hf_config_dict(cfg: ModelConfig, dtype: str = "float32") -> dict:
    """config.json for transformers' model class of the family (4.x and 5.x read it)."""
    return _family(cfg).hf_config(cfg, dtype)


def hf_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor name an HF checkpoint of this config holds, with its shape, in HF order."""
    return _family(cfg).hf_shapes(cfg)


def _export_plan(cfg: ModelConfig):
    """[(rule, global layer or None, expert or None, HF names, duplicate)] in HF order; each HF name
    appears once (tied: the output layer's copy of the embedding is a duplicate, checked not written)."""
    rules = _family(cfg).rules(cfg.tie_word_embeddings, cfg)
    globals_first = [r for r in rules if not r.per_layer and r.ours.startswith(("embedding", "encoder"))]
    per_layer = [r for r in rules if r.per_layer]
    globals_last = [r for r in rules if not r.per_layer and r not in globals_first]
    plan = [(r, None) for r in globals_first]
    for stack in dict.fromkeys(stack_of(r) for r in per_layer):  # encoder before decoder, as listed
        for i in range(cfg.layers_of(stack)):
            plan += [(r, i) for r in per_layer if stack_of(r) == stack]
    plan += [(r, None) for r in globals_last]
    out, seen = [], set()
    for rule, i in plan:
        for e in wt.experts(rule, cfg.num_experts):
            names = tuple(n.format(i=i, e=e) for n in rule.hf)
            duplicate = any(n in seen for n in names)
            seen.update(names)
            out.append((rule, i, e if rule.per_expert else None, names, duplicate))
    return out


def base_params(gpt) -> dict:
    """{our name: tensor} of base weights on this stage."""
    sd = gpt.state_dict()  # LoRALinear's hooks keep base keys unchanged
    return {k: v for k, v in sd.items() if isinstance(v, torch.Tensor) and ".lora_" not in k
            and not k.endswith("_extra_state") and not k.endswith("._extra_state")}


class _ShardWriter:
    """The output safetensors files, planned up front from ``entries`` [(HF name, dtype, shape)] in writing
    order (a file ends before the tensor that would take it past ``max_bytes``; one tensor may exceed it),
    and written one tensor at a time (framework/checkpoint/safetensors_stream.py)."""

    def __init__(self, directory: Path, entries: list, max_bytes: int):
        self.dir = directory
        files: list[list] = [[]]
        size = 0
        for name, dtype, shape in entries:
            n = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
            if files[-1] and size + n > max_bytes:
                files.append([])
                size = 0
            files[-1].append((name, dtype, shape))
            size += n
        k = len(files)
        self.names = ["model.safetensors"] if k == 1 else [f"model-{i + 1:05d}-of-{k:05d}.safetensors"
                                                           for i in range(k)]
        self.files = files
        self.file_of = {e[0]: i for i, entries_i in enumerate(files) for e in entries_i}
        self.open: tuple[int, object] | None = None
        self.total_bytes = 0

    def add(self, name: str, t: torch.Tensor) -> None:
        k = self.file_of[name]
        if self.open is None or self.open[0] != k:
            if self.open is not None:
                self.open[1].close()
            self.open = (k, SafetensorsStreamWriter(self.dir / self.names[k], self.files[k], {"format": "pt"}))
        self.open[1].write(name, t)
        self.total_bytes += t.numel() * t.element_size()

    def finish(self) -> list[str]:
        if self.open is not None:
            self.open[1].close()
            self.open = None
        if len(self.names) > 1:
            weight_map = {e[0]: self.names[k] for k, entries in enumerate(self.files) for e in entries}
            index = {"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map}
            (self.dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
        return list(self.names)

    def abort(self) -> None:
        if self.open is not None:
            self.open[1].abort()
            self.open = None


def export_hf(model, out_dir, model_cfg: ModelConfig, tokenizer_dir=None, dtype: str | None = None,
              max_shard_bytes: int = 5 * 2**30, progress: bool = False, params=None) -> dict | None:
    """Write the base weights of ``model`` (every rank calls with its stage) as an HF directory of its family.

    ``dtype``: 'float32' / 'bfloat16' / 'float16' for the written tensors (default: the parameters').
    ``params``: {our name: tensor} of this rank's base weights to use instead of the model's own, e.g. a
    mapping that reads each from a checkpoint when asked (framework/checkpoint/streaming.py
    CheckpointParams; ``model`` is then a skeleton that only gives the layer numbering).
    Rank 0 writes into a temporary sibling directory moved into place when complete. Returns, on rank 0,
    {'tensors', 'bytes', 'seconds', 'files'}; None on other ranks.
    """

    t0 = time.perf_counter()
    # one process needs no gathering (gather_object would pickle every tensor: three extra copies)
    distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    rank = dist.get_rank() if distributed else 0
    if distributed:
        from megatron.core import parallel_state as ps

        tp_rank = ps.get_tensor_model_parallel_rank()
        contributes = ps.get_data_parallel_rank(with_context_parallel=True) == 0
    else:
        tp_rank, contributes = 0, True
    gpt = unwrap_model(model)
    if params is None:
        params = base_params(gpt)
    ctx = shard_context(model_cfg, 0, 1)
    if dtype and dtype not in DTYPES:
        raise HFExportError(f"dtype {dtype!r} is not one of {sorted(DTYPES)}")
    if dtype is None:  # the parameters' (all alike: megatron builds every weight in params_dtype)
        first = next(iter(params.values()), None)
        dtype = str(first.dtype).replace("torch.", "") if first is not None else "float32"
    target_dtype = DTYPES[dtype]

    out_dir = Path(out_dir).absolute()
    expected = hf_shapes(model_cfg)
    plan = _export_plan(model_cfg)
    writer, tmp, bar = None, None, None
    if rank == 0:
        tmp = temp_dir_beside(out_dir)
        writer = _ShardWriter(tmp, [(n, target_dtype, expected[n]) for *_, names, dup in plan if not dup
                                    for n in names if n in expected], max_shard_bytes)
        if progress:
            bar = tqdm(total=len(expected), unit="tensor", desc="export", dynamic_ncols=True)
    consumed: set[str] = set()
    written: list[str] = []
    error = None
    try:
        kept: dict[str, torch.Tensor] = {}  # tensors a later duplicate is compared with (tied embedding)
        dup_names = {n for *_, names, dup in plan if dup for n in names}
        for rule, layer, expert, hf_names, duplicate in plan:
            offset, n_local = layer_offset(gpt, stack_of(rule)) if rule.per_layer else (0, 0)
            local = None if layer is None else layer - offset
            ours = rule.ours.format(i=local, e=expert)
            if ours not in params and rule.te_ours is not None:
                ours = rule.te_ours.format(i=local, e=expert)
            mine = None
            if contributes and (local is None or 0 <= local < n_local) and ours in params:
                consumed.add(ours)
                mine = (tp_rank, params[ours].detach().cpu())
            if distributed:
                gathered = [None] * dist.get_world_size() if rank == 0 else None
                dist.gather_object(mine, gathered, dst=0)
            else:
                gathered = [mine]
            if rank != 0 or error is not None:
                continue
            try:
                offered = {}
                for item in gathered:
                    if item is not None:
                        offered.setdefault(item[0], item[1])
                if not offered and duplicate:
                    continue  # tied with one stage: megatron has no separate output layer weight
                if not offered:
                    raise HFExportError(f"no rank holds parameter {ours!r} (for HF tensor(s) {list(hf_names)})")
                tp = max(offered) + 1
                if sorted(offered) != list(range(tp)):
                    raise HFExportError(f"parameter {ours!r}: TP shards {sorted(offered)} offered, not 0..{tp - 1}")
                try:
                    shards = [offered[r] for r in range(tp)]
                    if kv_replication.is_fused_qkv(ours):  # KV heads replicated over TP: one copy of each
                        shards = kv_replication.dereplicate_rows(shards, ctx.num_heads, ctx.num_groups)
                    values = wt.invert_transform(rule, shards, dataclasses.replace(ctx, tp_size=len(shards)))
                except ValueError as e:
                    raise HFExportError(f"parameter {ours!r}: {e}") from None
                if duplicate:
                    for name, value in zip(hf_names, values):
                        if not torch.equal(value, kept[name]):
                            raise HFExportError(f"parameter {ours!r} (tied to {name!r}) differs from the embedding: "
                                                f"the tied copies on the first and last stage are out of step")
                    continue
                for name, value in zip(hf_names, values):
                    if name in dup_names:
                        kept[name] = value.clone()
                    want = expected.get(name)
                    if want is None:
                        raise HFExportError(f"HF tensor {name!r} (from {ours!r}) is not expected by the config")
                    if tuple(value.shape) != want:
                        raise HFExportError(f"HF tensor {name!r} from parameter {ours!r} has shape "
                                            f"{tuple(value.shape)}, the config implies {want}")
                    writer.add(name, value.to(target_dtype))
                    written.append(name)
                    if bar is not None:
                        bar.update(1)
            except Exception as e:  # keep taking part in the collectives; raise after the loop
                error = e
        # every base parameter of every stage consumed?
        left = sorted(set(params) - consumed) if contributes else []
        if distributed:
            lefts = [None] * dist.get_world_size() if rank == 0 else None
            dist.gather_object(left, lefts, dst=0)
        else:
            lefts = [left]
        result = None
        if rank == 0:
            if error is not None:
                raise error
            unconsumed = sorted({k for lst in lefts for k in lst})
            if unconsumed:
                raise HFExportError(f"parameter(s) {unconsumed} have no HF name in the table and would be lost")
            missing = [n for n in expected if n not in set(written)]
            if missing or len(written) != len(set(written)):
                raise HFExportError(f"HF tensor(s) {missing} not written (or written twice)")
            files = writer.finish()
            (tmp / "config.json").write_text(json.dumps(hf_config_dict(model_cfg, dtype), indent=2))
            if tokenizer_dir is not None:
                from framework.checkpoint.ckpt_format import copy_tokenizer

                copy_tokenizer(tokenizer_dir, tmp)
            publish(tmp, out_dir)
            result = {"tensors": len(written), "bytes": writer.total_bytes,
                      "seconds": time.perf_counter() - t0, "files": files}
        if distributed:
            box = [None if rank != 0 else "ok"]
            dist.broadcast_object_list(box, src=0)
            if box[0] != "ok":
                raise HFExportError(f"the HF export failed on rank 0: {box[0]}")
        return result
    except BaseException as e:
        if distributed and rank == 0:
            box = [f"{type(e).__name__}: {e}"]
            try:
                dist.broadcast_object_list(box, src=0)
            except Exception:
                pass
        raise
    finally:
        if bar is not None:
            bar.close()
        if writer is not None:
            writer.abort()
        if tmp is not None and tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
