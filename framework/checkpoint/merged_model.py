"""A trained adapter merged into its base model and written as a model of its own: an HF directory that
transformers loads, or our checkpoint directory (framework/checkpoint/ckpt_format.py).

Adapters are stored unsharded (framework/checkpoint/adapter.py), so one trained at any TP/PP merges at any
layout: every rank builds its stage of the base model (the ``model`` node the job had: HF directory, our
checkpoint or the bundled SmolLM2), applies the adapter's method with the settings of its adapter.yaml,
loads the adapter, and folds it into its shard of each base weight (framework/peft/merge.py: LoRA and rsLoRA
W += s B A, DoRA, IA3). The merge runs in float32 whatever the base's dtype; the result is written in the
base's dtype (config.json's, or the checkpoint's recorded HF dtype) unless asked otherwise, through the
same writers the converters use (framework/checkpoint/hf_export.py, ckpt_format.py), so the output is
exactly what converting a model with those weights would give.

What has no weight update to merge is refused before any process group starts, with the reason: prompt
tuning and P-tuning (virtual tokens in front of the input), Houlsby adapters (extra layers), full
fine-tuning (already whole weights: convert them instead), a LoRA/DoRA on an output layer tied to the
embedding, and a base drawn at random (model.source=random: its weights were never saved). A QLoRA
adapter is a LoRA adapter; it merges into the full-precision base, as HF PEFT's merge does.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.distributed as dist
import yaml
from omegaconf import OmegaConf

from framework.checkpoint import hub
from framework.checkpoint.adapter import read_adapter_config
from framework.checkpoint.ckpt_format import CONFIG_NAME, config_mismatches, read_config, save_checkpoint
from framework.checkpoint.hf_export import DTYPES, export_hf
from framework.checkpoint.model_loading import build_pretrained
from framework.checkpoint.trained import load_trained
from framework.models.config import ModelConfig
from framework.models.unwrap import unwrap_model
from framework.peft.merge import merge_adapter
from framework.peft.wrapping import is_adapter_key
from framework.runtime.distributed import initialize
from framework.runtime.errors import ConfigError

FORMATS = ("hf", "ckpt")
MERGEABLE = ("lora", "dora", "ia3")
ADAPTER_FILE = "adapter.yaml"
# adapter.yaml keys that describe the file, not the method's settings
_NOT_SETTINGS = ("format_version", "model", "base", "target_modules")
_NOTHING_TO_MERGE = {
    "prompt_tuning": "a prompt-tuning adapter is a table of virtual-token embeddings put in front of every "
                     "input; it changes no weight of the model",
    "ptuning": "a P-tuning adapter is a prompt encoder whose virtual tokens are put in front of every input; "
               "it changes no weight of the model",
    "adapter": "Houlsby adapters add bottleneck layers inside every block; no weight of the base model can "
               "hold them",
}


class MergeError(ConfigError):
    """An adapter, base model or output that cannot be merged or written; the message names the option."""


def adapter_settings(adapter_dir, model_cfg: ModelConfig, key: str = "adapter") -> dict:
    """The PEFT settings to apply before loading the mergeable adapter in ``adapter_dir`` (its adapter.yaml:
    method, rank, alpha, rslora, targets, ...). Raises MergeError, naming ``key`` (the option that gave the
    directory) and why, for what cannot be merged or was trained on another architecture."""
    d = Path(adapter_dir)
    if not (d / ADAPTER_FILE).is_file():
        if (d / CONFIG_NAME).is_file() and (d / "weights").is_dir():
            raise MergeError(f"{key}={d} holds full fine-tuned weights (peft.method=none): they are already a "
                             f"whole model, there is no adapter to merge; write them as an HF directory with "
                             f"`mft convert ckpt-to-hf {d} OUT`")
        raise MergeError(f"{key}={d} has no {ADAPTER_FILE}: give a run directory or its adapters/NAME")
    try:
        method = (yaml.safe_load((d / ADAPTER_FILE).read_text()) or {}).get("method", "lora")
    except yaml.YAMLError as e:
        raise MergeError(f"{key}={d}: {d / ADAPTER_FILE} is not valid YAML: {e}") from None
    if method in _NOTHING_TO_MERGE:
        raise MergeError(f"{key}={d} is a {method} adapter (peft.method={method}): nothing to merge, "
                         f"{_NOTHING_TO_MERGE[method]}; use it as it is: mft generate input=FILE adapter={d}")
    if method not in MERGEABLE:
        raise MergeError(f"{key}={d}: adapter method {method!r} cannot be merged; mergeable: {list(MERGEABLE)}")
    meta = read_adapter_config(d)
    if meta.get("model"):
        trained_on = ModelConfig.from_dict(meta["model"])
        bad = [m.replace("checkpoint has", "adapter has") for m in config_mismatches(model_cfg, trained_on)]
        if bad:
            raise MergeError(f"{key}={d} was trained on another architecture than the base model given "
                             f"(model.*):\n  " + "\n  ".join(bad))
    if method in ("lora", "dora") and "output" in meta.get("targets", ()) and model_cfg.tie_word_embeddings:
        raise MergeError(f"{key}={d} adapts the output layer, which shares the embedding's weight "
                         f"(tie_word_embeddings): merging it would change the embedding too")
    return {k: v for k, v in meta.items() if k not in _NOT_SETTINGS}


def check_base(model_node) -> None:
    """A base model whose weights can be read again (model.source hf, ckpt or smollm2)."""
    if model_node.get("source") == "random":
        raise MergeError("model.source=random: the base weights the adapter was trained on were drawn from a "
                         "seed and never saved, so there is nothing to merge into; merge onto a saved base "
                         "(model.source=hf|ckpt with model.path=...)")


def base_dtype(model_node) -> str:
    """The dtype the base model's weights are stored in: config.json's (torch_dtype / dtype), or our
    checkpoint's recorded HF dtype; float32 when neither says."""
    directory = hub.model_dir(model_node)
    if model_node.get("source") == "ckpt":
        found = read_config(directory).get("hf_dtype")
    else:
        config = json.loads((Path(directory) / "config.json").read_text())
        found = config.get("torch_dtype") or config.get("dtype")
    return found if found in DTYPES else "float32"


def merged_model(model_node, adapter_dir, settings: dict, model_cfg: ModelConfig, tp: int = 1, pp: int = 1,
                 seed: int = 1234):
    """This rank's stage of the base model with the adapter merged into its weights (all ranks call; the
    process groups are started here at TP x PP, data parallel over the rest of the world)."""
    rt = initialize(tp=tp, pp=pp, seed=seed)
    # the job's way of loading a model, in float32 (precision=fp32) whatever the base's dtype
    job = OmegaConf.create({"model": model_node, "peft": settings, "precision": "fp32"})
    model = build_pretrained(job, model_cfg, rt)
    load_trained(model, adapter_dir, job.peft, model_cfg)
    merge_adapter(model)
    return model.eval()


def write_merged(model_node, adapter_dir, out_dir, to: str = "hf", dtype: str | None = None, tp: int = 1,
                 pp: int = 1, force: bool = False, progress: bool = False) -> dict | None:
    """Merge ``adapter_dir`` into the base model of ``model_node`` (a job's ``model`` config) and write it to
    ``out_dir`` as ``to`` ('hf': an HF directory; 'ckpt': our checkpoint), in ``dtype`` (default: the
    base's), with the base's tokenizer. All ranks call. Returns, on rank 0, {'tensors', 'bytes', 'dtype',
    'method'} ('tensors'/'bytes' for 'hf' only); None elsewhere."""
    if to not in FORMATS:
        raise MergeError(f"--to={to!r}: one of {list(FORMATS)}")
    if dtype is not None and dtype not in DTYPES:
        raise MergeError(f"--dtype={dtype!r}: one of {sorted(DTYPES)}")
    out_dir = Path(out_dir)
    if out_dir.exists() and not force:
        raise MergeError(f"--out={out_dir} exists; pass --force to replace it")
    check_base(model_node)
    model_cfg = hub.model_config_for(model_node)
    settings = adapter_settings(adapter_dir, model_cfg)
    dtype = dtype or base_dtype(model_node)
    tokenizer = hub.tokenizer_dir(model_node)
    model = merged_model(model_node, adapter_dir, settings, model_cfg, tp=tp, pp=pp)
    gpt = unwrap_model(model)
    if to == "hf":
        # base weights under their own names (the wrappers' state-dict hooks drop their prefix); the
        # adapter tensors, already folded in, stay behind
        params = {k: v for k, v in gpt.state_dict().items() if isinstance(v, torch.Tensor)
                  and not is_adapter_key(k) and not k.endswith("_extra_state")}
        r = export_hf(model, out_dir, model_cfg, tokenizer_dir=tokenizer, dtype=dtype, progress=progress,
                      params=params)
    else:
        gpt.to(DTYPES[dtype])  # our checkpoint stores each parameter in its own dtype
        save_checkpoint(model, out_dir, model_cfg, tokenizer_src=tokenizer, hf_dtype=dtype,
                        source=str(Path(adapter_dir).absolute()),
                        extra={"merged": {"adapter": str(Path(adapter_dir).absolute()),
                                          "method": settings["method"], "base": _base_name(model_node)}})
        r = {} if _is_rank_zero() else None
    if r is not None:
        r.update(dtype=dtype, method=settings["method"])
    return r


def _base_name(model_node) -> str:
    source = model_node.get("source")
    return f"{model_node.get('name')} ({source}{'' if source == 'smollm2' else ': ' + str(model_node.get('path'))})"


def _is_rank_zero() -> bool:
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0
