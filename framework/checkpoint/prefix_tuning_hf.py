"""Prefix-tuning adapters to and from Hugging Face PEFT's ``PREFIX_TUNING`` directories.

Both sides hold the same table: HF PEFT saves ``prompt_embeddings`` [n, L * 2 * token_dim] (the projection's
output when ``prefix_projection`` was on; ``token_dim`` = KV heads x head dim, ``num_attention_heads`` = the
KV heads, as HF PEFT rewrites them for grouped-query attention), and so does our adapter.safetensors
(framework/peft/prefix_tuning.py). An import writes that table as our adapter (it loads into a model without
the projection, HF's inference mode); an export writes it with ``prefix_projection: false`` and
``inference_mode: true``, which HF PEFT loads into ``PrefixEncoder.embedding``. The projection's own
weights (our prefix_encoder.safetensors) have no HF PEFT file to go to and are not exported.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import yaml
from safetensors.torch import load_file, save_file

from framework.checkpoint.hf_export import DTYPES
from framework.runtime.atomic import atomic_directory
from framework.runtime.errors import CheckpointError

HF_CONFIG, HF_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
OUR_CONFIG, OUR_TABLE = "adapter.yaml", "adapter.safetensors"
TABLE_KEY = "prompt_embeddings"
FORMAT_VERSION = 1  # framework/peft/prefix_tuning.py's


def is_hf_prefix_tuning(cfg: dict) -> bool:
    return cfg.get("peft_type") == "PREFIX_TUNING"


def is_prefix_tuning(adapter_dir) -> bool:
    """Whether ``adapter_dir`` is one of our prefix-tuning adapters (adapter.yaml's method)."""
    path = Path(adapter_dir) / OUR_CONFIG
    if not path.is_file():
        return False
    with open(path) as f:
        return (yaml.safe_load(f) or {}).get("method") == "prefix_tuning"


def _model_numbers(model_cfg) -> dict:
    return {"num_layers": model_cfg.num_layers, "num_attention_heads": model_cfg.num_query_groups,
            "token_dim": model_cfg.num_query_groups * model_cfg.kv_channels}


def import_prefix_tuning(peft_dir, out_dir, model_cfg, cfg: dict, base: dict | None = None) -> dict:
    """Write our prefix-tuning adapter for ``model_cfg`` from the HF PEFT directory ``peft_dir`` (its
    ``adapter_config.json`` already read as ``cfg``); returns the adapter.yaml contents."""
    peft_dir, out_dir = Path(peft_dir), Path(out_dir)
    path = peft_dir / HF_CONFIG
    if cfg.get("task_type") != "CAUSAL_LM":
        raise CheckpointError(f"{path}: task_type={cfg.get('task_type')!r}; prefix tuning imports for CAUSAL_LM")
    if cfg.get("num_transformer_submodules", 1) != 1:
        raise CheckpointError(f"{path}: num_transformer_submodules={cfg.get('num_transformer_submodules')!r}; "
                              f"a decoder-only model has 1")
    for key, want in _model_numbers(model_cfg).items():
        if cfg.get(key) != want:
            raise CheckpointError(f"{path}: {key}={cfg.get(key)!r}, the model has {want} (layers; KV heads; KV "
                                  f"heads x head_dim)")
    n = cfg.get("num_virtual_tokens")
    tensors = load_file(str(peft_dir / HF_WEIGHTS))
    if set(tensors) != {TABLE_KEY}:
        raise CheckpointError(f"{peft_dir / HF_WEIGHTS}: expected only {TABLE_KEY!r}, found {sorted(tensors)}")
    table = tensors[TABLE_KEY]
    want = (n, model_cfg.num_layers * 2 * _model_numbers(model_cfg)["token_dim"])
    if tuple(table.shape) != want:
        raise CheckpointError(f"{peft_dir / HF_WEIGHTS}: {TABLE_KEY} has shape {tuple(table.shape)}, expected {want}")
    meta = {"format_version": FORMAT_VERSION, "method": "prefix_tuning", "num_virtual_tokens": int(n),
            "prefix_projection": False, "encoder_hidden_size": None, "init_weights": None, "seed": None,
            "base": dict(base or {"name": cfg.get("base_model_name_or_path")}),
            "num_layers": model_cfg.num_layers, "num_key_value_heads": model_cfg.num_query_groups,
            "head_dim": model_cfg.kv_channels, "model": model_cfg.to_dict(), "imported_from": str(peft_dir),
            "hf_prefix_projection": bool(cfg.get("prefix_projection", False))}
    with atomic_directory(out_dir) as tmp:
        save_file({TABLE_KEY: table.float().contiguous()}, str(tmp / OUR_TABLE), metadata={"format": "pt"})
        with open(tmp / OUR_CONFIG, "w") as f:
            yaml.safe_dump(meta, f, sort_keys=False)
    return meta


def export_prefix_tuning(adapter_dir, out_dir, base_model_name_or_path: str | None = None,
                         dtype: str | None = None) -> dict:
    """Write HF PEFT's directory for our prefix-tuning adapter; returns {'tensors', 'bytes', 'seconds'}."""
    t0 = time.perf_counter()
    adapter_dir, out_dir = Path(adapter_dir), Path(out_dir).absolute()
    with open(adapter_dir / OUR_CONFIG) as f:
        meta = yaml.safe_load(f) or {}
    table = load_file(str(adapter_dir / OUR_TABLE)).get(TABLE_KEY)
    if table is None:
        raise CheckpointError(f"{adapter_dir / OUR_TABLE} has no {TABLE_KEY!r} tensor")
    layers, groups, head_dim = meta.get("num_layers"), meta.get("num_key_value_heads"), meta.get("head_dim")
    if None in (layers, groups, head_dim) or tuple(table.shape) != (meta.get("num_virtual_tokens"),
                                                                      layers * 2 * groups * head_dim):
        raise CheckpointError(f"{adapter_dir / OUR_CONFIG}: num_virtual_tokens/num_layers/num_key_value_heads/head_dim "
                              f"do not describe the table of shape {tuple(table.shape)}")
    if dtype is not None:
        if dtype not in DTYPES:
            raise CheckpointError(f"dtype {dtype!r} is not one of {sorted(DTYPES)}")
        table = table.to(DTYPES[dtype])
    base = meta.get("base") or {}
    config = {"peft_type": "PREFIX_TUNING", "task_type": "CAUSAL_LM", "inference_mode": True,
              "num_virtual_tokens": int(table.shape[0]), "token_dim": groups * head_dim,
              "num_transformer_submodules": 1, "num_attention_heads": groups, "num_layers": layers,
              "encoder_hidden_size": groups * head_dim, "prefix_projection": False, "init_weights": None,
              "base_model_name_or_path": base_model_name_or_path or base.get("name") or base.get("source"),
              "revision": None, "modules_to_save": None}
    with atomic_directory(out_dir) as tmp:
        save_file({TABLE_KEY: table.contiguous()}, str(tmp / HF_WEIGHTS), metadata={"format": "pt"})
        (tmp / HF_CONFIG).write_text(json.dumps(config, indent=2))
    return {"tensors": 1, "bytes": table.numel() * table.element_size(), "seconds": time.perf_counter() - t0}
