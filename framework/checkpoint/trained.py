"""What a PEFT method trained, written and read back: the artefact its registry entry names
(framework/peft/registry.py).

    adapter        a small unsharded adapter directory (framework/checkpoint/adapter.py)
    prompt_table   the prompt methods' table, saved by the method's own module (framework/peft/virtual_tokens.py)
    weights        every weight (full fine-tuning), through megatron dist_checkpointing (framework/checkpoint/
                   ckpt_format.py), so it reshards on load
    base_and_adapter   ReLoRA (framework/peft/relora.py): DIR/base, the base weights its restarts merged
                   into (as ``weights``), and DIR/adapter, the current cycle's LoRA adapter (as ``adapter``)

All ranks call both functions (saving gathers to rank 0 and writes atomically).
"""

from __future__ import annotations

import importlib
from pathlib import Path

from omegaconf import OmegaConf

from framework.checkpoint.adapter import load_adapter, save_adapter
from framework.checkpoint.ckpt_format import load_checkpoint_into, save_checkpoint
from framework.peft.registry import get_method


def save_trained(model, directory: str | Path, peft_cfg, model_cfg, base: dict | None = None) -> Path:
    """Write what ``peft_cfg.method`` trained (an adapter directory, a prompt table, or full weights)."""
    method = get_method(peft_cfg.method)
    directory = Path(directory)
    if method.artefact == "weights":
        return save_checkpoint(model, directory, model_cfg)
    if method.artefact == "prompt_table":
        return importlib.import_module(method.module).save(model, directory, peft_cfg, model_cfg, base)
    if method.artefact == "base_and_adapter":
        save_checkpoint(model, directory / "base", model_cfg)
        save_adapter(model, directory / "adapter", _as_lora(peft_cfg), model_cfg, base=base)
        return directory
    cfg = peft_cfg if isinstance(peft_cfg, dict) else OmegaConf.to_container(peft_cfg, resolve=True)
    return save_adapter(model, directory, cfg, model_cfg, base=base)


def load_trained(model, directory: str | Path, peft_cfg, model_cfg):
    """Read what ``save_trained`` wrote into ``model``, already built with the same method at any layout."""
    method = get_method(peft_cfg.method)
    directory = Path(directory)
    if method.artefact == "weights":
        return load_checkpoint_into(model, directory, model_cfg)
    if method.artefact == "prompt_table":
        return importlib.import_module(method.module).load(model, directory, model_cfg)
    if method.artefact == "base_and_adapter":
        load_checkpoint_into(model, directory / "base", model_cfg)
        return load_adapter(model, directory / "adapter", model_cfg)
    return load_adapter(model, directory, model_cfg)


def _as_lora(peft_cfg) -> dict:
    """ReLoRA's adapter as the plain LoRA adapter it is (its layers are LoRA's), without the restart keys."""
    cfg = peft_cfg if isinstance(peft_cfg, dict) else OmegaConf.to_container(peft_cfg, resolve=True)
    restarts = ("merge_every", "restart_warmup_steps", "reset", "prune_ratio")
    return {**{k: v for k, v in cfg.items() if k not in restarts}, "method": "lora"}
