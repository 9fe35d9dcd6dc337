"""Reward models in Hugging Face's format and in our checkpoints: ``...ForSequenceClassification`` with
``num_labels=1`` (Llama, Qwen2/3, Mistral, Gemma: the backbone of the family's causal LM under the same names,
no ``lm_head``, and ``score.weight`` [1, hidden]) imported into and exported from a model whose output layer
is a score head (framework/models/score_head.py).

Import (:func:`load_hf_score_model`) reads the backbone through the family's table
(framework/checkpoint/hf_import.py, the head's tensor and parameter left outside its checks) and the head from
``score.weight``; a causal-LM directory (a reward model started from a base or SFT model) has no
``score.weight``: the head keeps its initialisation and the ``lm_head`` is not read. Export
(:func:`export_hf_score`) writes the backbone with framework/checkpoint/hf_export.py (as a tied model, which
has no ``lm_head``), ``score.weight`` in a file of its own listed in ``model.safetensors.index.json`` (a
backbone of one file renamed to the first of two, as transformers reads a ``model.safetensors`` alone), and
config.json with the ``...ForSequenceClassification`` architecture, ``num_labels`` 1 and ``pad_token_id``
(transformers scores the last token that is not padding). A training job keeps the head beside its adapter
or weights as ``score_head.safetensors`` (:func:`save_score_head` / :func:`load_score_head`).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file

from framework.checkpoint.hf_export import base_params, export_hf, hf_config_dict
from framework.checkpoint.hf_import import HFWeights, safetensors_index
from framework.models.config import ModelConfig
from framework.models.score_head import HEAD_PARAM, score_head_of
from framework.models.unwrap import unwrap_model
from framework.runtime.atomic import publish, temp_dir_beside
from framework.runtime.errors import CheckpointError

HF_NAME = "score.weight"
HEAD_FILE = "score_head.safetensors"
SCORE_FILE = "score.safetensors"  # the exported head beside the backbone's files
INDEX_FILE = "model.safetensors.index.json"
SUFFIX = "ForSequenceClassification"


def _hf_config(hf_dir: Path) -> dict:
    path = Path(hf_dir) / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{hf_dir} has no config.json")
    return json.loads(path.read_text())


def is_sequence_classifier(hf_dir) -> bool:
    """Whether config.json names a ``...ForSequenceClassification`` architecture; one with other than one
    label is refused (a reward model gives one score)."""
    config = _hf_config(hf_dir)
    if not any(a.endswith(SUFFIX) for a in config.get("architectures") or []):
        return False
    labels = len(config["id2label"]) if config.get("id2label") else config.get("num_labels", 2)
    if labels != 1:
        raise CheckpointError(f"{Path(hf_dir) / 'config.json'}: num_labels={labels} (id2label); a reward model "
                              "has num_labels=1 (one score per sequence)")
    return True


def load_hf_score_model(model, hf_dir, model_cfg: ModelConfig) -> bool:
    """Fill this rank's stage of ``model`` (its output layer already a score head) from the HF directory:
    the backbone always, the head from ``score.weight`` when the checkpoint has one (returns whether it did)."""
    gpt = unwrap_model(model)
    head = score_head_of(gpt)
    with HFWeights(gpt, hf_dir, model_cfg, outside={HF_NAME: HEAD_PARAM}) as weights:
        with torch.no_grad():
            for ours in weights.plan:
                weights.params[ours].copy_(weights.value(ours))
        found = HF_NAME in weights.index
        if found and head is not None:
            value = weights.reader.read(weights.index[HF_NAME], weights.stored[HF_NAME])
            if tuple(value.shape) != tuple(head.weight.shape):
                raise CheckpointError(f"{hf_dir}: {HF_NAME} has shape {tuple(value.shape)}, the score head is "
                                      f"{tuple(head.weight.shape)} (num_labels=1, hidden_size)")
            with torch.no_grad():
                head.weight.copy_(value)
    return found


def _is_writer() -> bool:
    """The one rank that writes the head: last pipeline stage, TP and DP rank 0 (every rank when alone)."""
    if not (dist.is_available() and dist.is_initialized()):
        return True
    from megatron.core import parallel_state as ps

    return (ps.is_pipeline_last_stage() and ps.get_tensor_model_parallel_rank() == 0
            and ps.get_data_parallel_rank() == 0)


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def save_score_head(model, directory) -> Path:
    """Write the head's weight as ``directory/score_head.safetensors`` (all ranks call)."""
    path = Path(directory) / HEAD_FILE
    head = score_head_of(unwrap_model(model))
    if head is not None and _is_writer():
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file({HF_NAME: head.weight.detach().float().cpu().contiguous()}, str(path))
    _barrier()
    return path


def load_score_head(model, directory) -> None:
    """Read ``directory/score_head.safetensors`` into the head (all ranks call; the last stage reads)."""
    path = Path(directory) / HEAD_FILE
    if not path.is_file():
        raise CheckpointError(f"{directory} has no {HEAD_FILE}: not saved by a reward-model job")
    head = score_head_of(unwrap_model(model))
    if head is not None:
        value = load_file(str(path)).get(HF_NAME)
        if value is None or tuple(value.shape) != tuple(head.weight.shape):
            raise CheckpointError(f"{path}: expected {HF_NAME} of shape {tuple(head.weight.shape)}")
        with torch.no_grad():
            head.weight.copy_(value)


def seq_cls_config(model_cfg: ModelConfig, dtype: str, pad_token_id: int | None) -> dict:
    """config.json of the family's ``...ForSequenceClassification`` with one label."""
    config = hf_config_dict(model_cfg, dtype)
    arch = config["architectures"][0]
    if not arch.endswith("ForCausalLM"):
        raise CheckpointError(f"family {model_cfg.family!r} exports {arch}; a sequence-classification export "
                              "needs a ...ForCausalLM family (Llama, Qwen2/3, Mistral, Gemma)")
    config["architectures"] = [arch[:-len("ForCausalLM")] + SUFFIX]
    config.update(num_labels=1, id2label={"0": "LABEL_0"}, label2id={"LABEL_0": 0})
    if pad_token_id is not None:
        config["pad_token_id"] = int(pad_token_id)
    return config


def export_hf_score(model, out_dir, model_cfg: ModelConfig, tokenizer_dir=None, dtype: str | None = None,
                    pad_token_id: int | None = None, params: dict | None = None) -> dict | None:
    """Write ``model`` (its output layer a score head; any TP/PP; base weights, LoRA not merged) as an HF
    ``...ForSequenceClassification`` directory (all ranks call). Returns export_hf's report on rank 0.
    ``params``: {our name: tensor} to write instead of the model's own (as export_hf takes them)."""
    gpt = unwrap_model(model)
    head = score_head_of(gpt)
    out_dir = Path(out_dir).absolute()
    rank0 = not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0
    stage = None
    if rank0:
        stage = temp_dir_beside(out_dir)
        stage.rmdir()  # export_hf publishes its own temporary directory under this name
    box = [str(stage) if stage else None]
    if dist.is_available() and dist.is_initialized():
        dist.broadcast_object_list(box, src=0)
    stage = Path(box[0])
    params = dict(base_params(gpt) if params is None else params)
    head_value = params.pop(HEAD_PARAM, None)
    # a tied model's table has no lm_head: the backbone alone
    report = export_hf(model, stage, dataclasses.replace(model_cfg, tie_word_embeddings=True), tokenizer_dir,
                       dtype, params=params)
    # the head, from the last stage to global rank 0
    if head_value is None and head is not None:
        head_value = head.weight
    weight = head_value.detach().float().cpu() if head_value is not None and _is_writer() else None
    if dist.is_available() and dist.is_initialized():
        got = [None] * dist.get_world_size() if rank0 else None
        dist.gather_object(weight, got, dst=0)
        weight = next((w for w in got if w is not None), None) if rank0 else None
    if rank0:
        if weight is None:
            raise CheckpointError("no rank holds the score head: the model's output layer is not a score head")
        written = report["files"]
        dtype_t = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
        first = next(iter(params.values()))
        dtype = dtype or str(first.dtype).replace("torch.", "")
        index = stage / INDEX_FILE
        if index.is_file():
            weight_map, score_file = json.loads(index.read_text())["weight_map"], SCORE_FILE
        else:  # transformers reads a model.safetensors before any index: two files of an index instead
            names = list(safetensors_index(stage))
            written, score_file = ["model-00001-of-00002.safetensors"], "model-00002-of-00002.safetensors"
            (stage / "model.safetensors").rename(stage / written[0])
            weight_map = {name: written[0] for name in names}
        save_file({HF_NAME: weight.to(dtype_t[dtype]).contiguous()}, str(stage / score_file), {"format": "pt"})
        weight_map[HF_NAME] = score_file
        total = sum((stage / f).stat().st_size for f in set(weight_map.values()))
        index.write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
        (stage / "config.json").write_text(json.dumps(seq_cls_config(model_cfg, dtype, pad_token_id), indent=2))
        publish(stage, out_dir)
        report["files"] = written + [score_file]
    _barrier()
    return report
