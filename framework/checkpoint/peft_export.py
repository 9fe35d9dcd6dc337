"""Our adapter directory (adapter.safetensors + adapter.yaml, see adapter.py) -> a Hugging Face PEFT directory.

    OUT/adapter_config.json         peft_type LORA, task_type CAUSAL_LM, r, lora_alpha, lora_dropout,
                                    target_modules, use_rslora, base_model_name_or_path, ...
    OUT/adapter_model.safetensors   base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight, ...

Our adapters are already unsharded with HF module names and PEFT's shapes (A [r, in], B [out, r]) and our
scaling is PEFT's (alpha / r, or alpha / sqrt(r) with rslora), so the export renames keys and checks them:
every key the adapter's config implies must be present exactly once with its shape, and nothing else.
``peft.PeftModel.from_pretrained(hf_model, OUT)`` loads the result.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from framework.checkpoint.adapter import (CONFIG_NAME, WEIGHTS_NAME, AdapterError, expected_shapes,
                                          read_adapter_config)
from framework.checkpoint.atomic import atomic_directory
from framework.models.config import ModelConfig

PEFT_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."


class PeftExportError(AdapterError):
    """An adapter that cannot be exported as it stands (names the key at fault)."""


def peft_config_dict(meta: dict, base_model_name_or_path: str | None) -> dict:
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path,
        "r": int(meta["rank"]),
        "lora_alpha": float(meta["alpha"]),
        "lora_dropout": float(meta.get("dropout") or 0.0),
        "target_modules": sorted(meta["target_modules"]),
        "use_rslora": bool(meta.get("rslora", False)),
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "init_lora_weights": True,
        "modules_to_save": None,
        "layers_to_transform": None,
        "layers_pattern": None,
        "rank_pattern": {},
        "alpha_pattern": {},
        "use_dora": False,
    }


def export_peft(adapter_dir, out_dir, base_model_name_or_path: str | None = None, dtype: str | None = None,
                progress: bool = False) -> dict:
    """Convert ``adapter_dir`` to an HF PEFT directory ``out_dir`` (written atomically).

    ``base_model_name_or_path`` defaults to the adapter's recorded base (``base.name`` or ``base.source``).
    Returns {'tensors', 'bytes', 'seconds'}.
    """
    from framework.checkpoint.safetensors_files import open_safetensors
    from safetensors.torch import save_file

    from framework.checkpoint.hf_export import DTYPES

    t0 = time.perf_counter()
    adapter_dir, out_dir = Path(adapter_dir), Path(out_dir).absolute()
    meta = read_adapter_config(adapter_dir)
    for key in ("rank", "alpha", "targets", "target_modules", "model"):
        if key not in meta:
            raise PeftExportError(f"{adapter_dir / CONFIG_NAME} lacks {key!r}")
    try:
        model_cfg = ModelConfig.from_dict(meta["model"])
    except (TypeError, ValueError) as e:
        raise PeftExportError(f"{adapter_dir / CONFIG_NAME}: bad 'model' section: {e}") from None
    want = expected_shapes(model_cfg, meta["targets"], int(meta["rank"]))
    weights = adapter_dir / WEIGHTS_NAME
    if not weights.is_file():
        raise PeftExportError(f"{weights} not found")
    if dtype is not None and dtype not in DTYPES:
        raise PeftExportError(f"dtype {dtype!r} is not one of {sorted(DTYPES)}")

    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(want), unit="tensor", desc="adapter", dynamic_ncols=True)
    out, nbytes = {}, 0
    try:
        with open_safetensors(weights, PeftExportError) as f:
            keys = list(f.keys())
            for key in keys:
                name = key[len(PEFT_PREFIX):] if key.startswith(PEFT_PREFIX) else key
                if name not in want:
                    raise PeftExportError(f"{weights}: tensor {key!r} is not expected for rank {meta['rank']} "
                                          f"and targets {meta['targets']} on this model")
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
                if dtype is not None:
                    t = t.to(DTYPES[dtype])
                out[new] = t.contiguous()
                nbytes += t.numel() * t.element_size()
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
    with atomic_directory(out_dir) as tmp:
        save_file(out, str(tmp / PEFT_WEIGHTS), metadata={"format": "pt"})
        (tmp / PEFT_CONFIG).write_text(json.dumps(peft_config_dict(meta, name), indent=2))
    return {"tensors": len(out), "bytes": nbytes, "seconds": time.perf_counter() - t0}
