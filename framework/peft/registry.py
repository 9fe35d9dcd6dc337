"""The PEFT methods the job knows, behind one interface: apply, save what was trained, load it back.

A method is three functions over this rank's model stage (all ranks call them; saving gathers to rank 0):

    apply(model, peft_cfg, model_cfg)          freeze what the method freezes, add its parameters
    save(model, directory, peft_cfg, model_cfg, base)   write what was trained (atomically)
    load(model, directory, model_cfg)          read it back into a model already ``apply``-ed

``peft.method=none`` is full-parameter fine-tuning: nothing frozen, and "what was trained" is every
weight, saved through megatron dist_checkpointing (framework/checkpoint/ckpt_format.py) so it reshards on
load. Every other method saves a small unsharded adapter directory (framework/checkpoint/adapter.py).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Callable


@dataclasses.dataclass(frozen=True)
class Method:
    name: str
    apply: Callable
    save: Callable
    load: Callable
    trains_base: bool = False  # True: every base weight is trained (full SFT); the saved artefact is a checkpoint


def _apply_lora(model, peft_cfg, model_cfg):
    from framework.peft.lora import apply_lora

    apply_lora(model, targets=tuple(peft_cfg.targets), rank=int(peft_cfg.rank), alpha=float(peft_cfg.alpha),
               dropout=float(peft_cfg.dropout), rslora=bool(peft_cfg.get("rslora", False)))


def _save_adapter(model, directory, peft_cfg, model_cfg, base=None):
    from omegaconf import OmegaConf

    from framework.checkpoint.adapter import save_adapter

    cfg = OmegaConf.to_container(peft_cfg, resolve=True) if not isinstance(peft_cfg, dict) else peft_cfg
    return save_adapter(model, directory, cfg, model_cfg, base=base)


def _load_adapter(model, directory, model_cfg):
    from framework.checkpoint.adapter import load_adapter

    return load_adapter(model, directory, model_cfg)


def _apply_none(model, peft_cfg, model_cfg):
    for p in model.parameters():
        p.requires_grad_(True)


def _save_full(model, directory, peft_cfg, model_cfg, base=None):
    from framework.checkpoint.ckpt_format import save_checkpoint

    return save_checkpoint(model, directory, model_cfg)


def _load_full(model, directory, model_cfg):
    from framework.checkpoint.ckpt_format import load_checkpoint_into

    return load_checkpoint_into(model, directory, model_cfg)


METHODS: dict[str, Method] = {
    "lora": Method("lora", _apply_lora, _save_adapter, _load_adapter),
    "none": Method("none", _apply_none, _save_full, _load_full, trains_base=True),
}


def get_method(name: str) -> Method:
    from framework.config.errors import ConfigError

    try:
        return METHODS[name]
    except KeyError:
        raise ConfigError(f"peft.method={name!r} is not one of {sorted(METHODS)}") from None


def apply_peft(model, peft_cfg, model_cfg) -> Method:
    method = get_method(peft_cfg.method)
    method.apply(model, peft_cfg, model_cfg)
    return method


def save_trained(model, directory: str | Path, peft_cfg, model_cfg, base: dict | None = None) -> Path:
    """Write what ``peft_cfg.method`` trained (an adapter directory, or full weights) to ``directory``."""
    return get_method(peft_cfg.method).save(model, Path(directory), peft_cfg, model_cfg, base)


def load_trained(model, directory: str | Path, peft_cfg, model_cfg):
    return get_method(peft_cfg.method).load(model, Path(directory), model_cfg)
