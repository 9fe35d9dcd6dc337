"""Our adapter directory (adapter.safetensors + adapter.yaml, see adapter.py) -> a Hugging Face PEFT directory.

    OUT/adapter_config.json         peft_type LORA (LoRA, rsLoRA, DoRA: use_dora) or IA3, task_type CAUSAL_LM,
                                    r, lora_alpha, lora_dropout, target_modules, use_rslora, fan_in_fan_out, ...
    OUT/adapter_model.safetensors   base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight, ...

Our adapters are already unsharded with the family's HF module names and PEFT's shapes (A [r, in], B [out, r],
rows in HF's order: adapter.py) and our scaling is PEFT's (alpha / r, or alpha / sqrt(r) with rslora), so the
export renames keys and checks them: every key the adapter's config implies must be present exactly once with
its shape, and nothing else. ``target_modules``, ``fan_in_fan_out`` (GPT-2's Conv1D) and IA3's
``feedforward_modules`` and ``task_type`` come from the family's HF PEFT names (framework/models/peft_names.py,
through the registry); Mixtral's adapters have no fc1/fc2 (its experts are not wrapped).
``peft.PeftModel.from_pretrained(hf_model, OUT)`` loads the result.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from safetensors.torch import save_file
from tqdm import tqdm

from framework.checkpoint.adapter import (CONFIG_NAME, WEIGHTS_NAME, AdapterError, feedforward_modules, peft_names,
                                          read_adapter_config, shapes_for, target_modules)
from framework.checkpoint import prefix_tuning_hf
from framework.checkpoint.hf_export import DTYPES
from framework.checkpoint.peft_layout import KEY as LAYOUT_KEY
from framework.checkpoint.peft_layout import fold_column_scales, hf_layout
from framework.checkpoint.saved_tensors import KEY as SAVED
from framework.checkpoint.safetensors_files import open_safetensors
from framework.models.config import ModelConfig
from framework.runtime.atomic import atomic_directory

PEFT_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."


class PeftExportError(AdapterError):
    """An adapter that cannot be exported as it stands (names the key at fault)."""


def peft_config_dict(meta: dict, base_model_name_or_path: str | None) -> dict:
    """adapter_config.json for our adapter.yaml: LORA (use_dora for DoRA) or IA3."""
    method = meta.get("method", "lora")
    model = meta.get("model") or {}
    family = model.get("family", "llama")
    names = peft_names(family)
    modules = target_modules(method, meta["targets"], model.get("gated_linear_unit", True), family)
    common = {"task_type": names.task_type, "base_model_name_or_path": base_model_name_or_path,
              "target_modules": sorted(modules), "inference_mode": True, "modules_to_save": None}
    if method == "ia3":
        return {"peft_type": "IA3", **common, "feedforward_modules": feedforward_modules(meta["targets"], family),
                "fan_in_fan_out": names.fan_in_fan_out, "init_ia3_weights": True}
    if method not in ("lora", "dora"):
        raise PeftExportError(f"{method!r} adapters have no Hugging Face PEFT equivalent to export to")
    return {
        "peft_type": "LORA",
        **common,
        "r": int(meta["rank"]),
        "lora_alpha": float(meta["alpha"]),
        "lora_dropout": float(meta.get("dropout") or 0.0),
        "use_rslora": bool(meta.get("rslora", False)),
        "bias": "none",
        "fan_in_fan_out": names.fan_in_fan_out,
        "init_lora_weights": True,
        "layers_to_transform": None,
        "layers_pattern": None,
        "rank_pattern": {},
        "alpha_pattern": {},
        "use_dora": method == "dora",
    }


def export_peft(adapter_dir, out_dir, base_model_name_or_path: str | None = None, dtype: str | None = None,
                progress: bool = False) -> dict:
    """Convert ``adapter_dir`` to an HF PEFT directory ``out_dir`` (written atomically).

    ``base_model_name_or_path`` defaults to the adapter's recorded base (``base.name`` or ``base.source``).
    Returns {'tensors', 'bytes', 'seconds'}.
    """
    t0 = time.perf_counter()
    adapter_dir, out_dir = Path(adapter_dir), Path(out_dir).absolute()
    if prefix_tuning_hf.is_prefix_tuning(adapter_dir):  # one table, not per-module tensors: its own module
        return prefix_tuning_hf.export_prefix_tuning(adapter_dir, out_dir, base_model_name_or_path, dtype)
    meta = read_adapter_config(adapter_dir)
    if meta["method"] not in ("lora", "dora", "ia3"):
        raise PeftExportError(f"{adapter_dir}: {meta['method']!r} adapters have no Hugging Face PEFT equivalent "
                              f"to export to")
    required = {"ia3": ()}.get(meta["method"], ("rank", "alpha"))
    for key in (*required, "targets", "target_modules", "model"):
        if key not in meta:
            raise PeftExportError(f"{adapter_dir / CONFIG_NAME} lacks {key!r}")
    try:
        model_cfg = ModelConfig.from_dict(meta["model"])
    except (TypeError, ValueError) as e:
        raise PeftExportError(f"{adapter_dir / CONFIG_NAME}: bad 'model' section: {e}") from None
    try:
        peft_names(model_cfg.family)
        want = shapes_for(meta, model_cfg)
    except AdapterError as e:
        raise PeftExportError(f"{adapter_dir}: cannot export: {e}") from None
    weights = adapter_dir / WEIGHTS_NAME
    if not weights.is_file():
        raise PeftExportError(f"{weights} not found")
    if dtype is not None and dtype not in DTYPES:
        raise PeftExportError(f"dtype {dtype!r} is not one of {sorted(DTYPES)}")

    bar = None
    if progress:
        bar = tqdm(total=len(want), unit="tensor", desc="adapter", dynamic_ncols=True)
    out, nbytes = {}, 0
    try:
        with open_safetensors(weights, PeftExportError) as f:
            keys = list(f.keys())
            for key in keys:
                name = key[len(PEFT_PREFIX):] if key.startswith(PEFT_PREFIX) else key
                if name not in want:
                    raise PeftExportError(f"{weights}: tensor {key!r} is not expected for {meta['method']} "
                                          f"{meta.get('rank', '')} and targets {meta['targets']} on this model")
                new = PEFT_PREFIX + name
                if new in out:
                    raise PeftExportError(f"{weights}: tensor {name!r} appears twice")
                try:
                    t = f.get_tensor(key)
                except Exception as e:
                    raise PeftExportError(f"{weights}: tensor {key!r} cannot be read: {e}") from None
                if tuple(t.shape) != want[name]:
                    raise PeftExportError(f"{weights}: tensor {key!r} has shape {tuple(t.shape)}, expected "
                                          f"{want[name]}")
                if not t.is_floating_point():
                    raise PeftExportError(f"{weights}: tensor {key!r} has dtype {t.dtype}, not a float type")
                out[new] = t.contiguous()
                if bar is not None:
                    bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    missing = sorted(n for n in want if PEFT_PREFIX + n not in out)
    if missing:
        raise PeftExportError(f"{weights} lacks {len(missing)} tensor(s), e.g. {missing[0]!r}")

    base = meta.get("base") or {}
    name = base_model_name_or_path or base.get("name") or base.get("source")
    if LAYOUT_KEY in meta:  # imported from HF PEFT: its modules, ranks and config back (peft_layout.py)
        try:
            hf, config = hf_layout({k[len(PEFT_PREFIX):]: v for k, v in out.items()}, meta, model_cfg)
        except (AdapterError, KeyError, TypeError, ValueError) as e:
            raise PeftExportError(f"{adapter_dir / CONFIG_NAME}: bad {LAYOUT_KEY!r} section: {e}") from None
        out = {PEFT_PREFIX + k: v.contiguous() for k, v in hf.items()}
        if base_model_name_or_path is not None:
            config["base_model_name_or_path"] = base_model_name_or_path
    else:
        if meta.get(SAVED):
            raise PeftExportError(f"{adapter_dir / CONFIG_NAME}: {SAVED} {meta[SAVED][:3]} without the HF PEFT "
                                  f"layout they came with ({LAYOUT_KEY!r}): only imported adapters carry base "
                                  f"tensors, and export them as they came")
        config = peft_config_dict(meta, name)
        folded = fold_column_scales({k[len(PEFT_PREFIX):]: v for k, v in out.items()}, meta, model_cfg)
        out = {PEFT_PREFIX + k: v for k, v in folded.items()}
    if dtype is not None:
        out = {k: v.to(DTYPES[dtype]) for k, v in out.items()}
    nbytes = sum(t.numel() * t.element_size() for t in out.values())
    with atomic_directory(out_dir) as tmp:
        save_file(out, str(tmp / PEFT_WEIGHTS), metadata={"format": "pt"})
        (tmp / PEFT_CONFIG).write_text(json.dumps(config, indent=2))
    return {"tensors": len(out), "bytes": nbytes, "seconds": time.perf_counter() - t0}
