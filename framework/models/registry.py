"""Model families: how each maps a Hugging Face config and weights onto a megatron-core model.

A family is data plus two functions: its HF ``model_type`` names, ``config_from_hf`` (config.json ->
ModelConfig), its weight table (HF name pattern -> our name, shared transform), and ``build`` (ModelConfig +
layout -> this rank's megatron model stage). New families add an entry here; nothing else dispatches on
family names.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

from framework.config.errors import ConfigError
from framework.models import hf_llama
from framework.models.gpt import build_gpt


@dataclasses.dataclass(frozen=True)
class Family:
    name: str
    hf_model_types: tuple[str, ...]
    config_from_hf: Callable
    weight_table: tuple
    build: Callable


FAMILIES: dict[str, Family] = {
    "llama": Family("llama", ("llama",), hf_llama.config_from_hf, hf_llama.LLAMA_WEIGHTS, build_gpt),
}


def get_family(name: str) -> Family:
    try:
        return FAMILIES[name]
    except KeyError:
        raise ConfigError(f"model.arch.family={name!r} is not a known family; known: {sorted(FAMILIES)}") from None


def family_for_hf(config: dict) -> Family:
    model_type = config.get("model_type")
    for family in FAMILIES.values():
        if model_type in family.hf_model_types:
            return family
    known = sorted(t for f in FAMILIES.values() for t in f.hf_model_types)
    raise ConfigError(f"config.json model_type={model_type!r} is not supported yet; supported: {known}")
