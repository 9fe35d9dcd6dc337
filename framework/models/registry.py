"""Model families: how each maps a Hugging Face config and weights onto a megatron-core model.

A family is a module of data and small functions (framework/models/families/: its HF ``model_type``
names, ``config_from_hf``, ``hf_config``, ``hf_shapes``, the weight table, its HF PEFT names) plus
``build`` (ModelConfig + layout -> this rank's megatron model stage). New families add an entry here; nothing else dispatches on
family names.
"""

from __future__ import annotations

import dataclasses
import types
from typing import Callable

from framework.runtime.errors import ConfigError
from framework.models.config import ModelConfig
from framework.models.families import llama, mixtral, qwen2
from framework.models.families import gemma, mistral
from framework.models.families import t5
from framework.models.families import falcon, gpt2, gpt_bigcode, nemotron, starcoder2
from framework.models.gpt import build_gpt
from framework.models.kinds import DECODER_ONLY, ENCODER_DECODER, ModelKind
from framework.models.t5 import build_t5


@dataclasses.dataclass(frozen=True)
class Family:
    name: str
    hf_model_types: tuple[str, ...]
    config_from_hf: Callable[[dict], ModelConfig]
    hf_config: Callable[..., dict]
    hf_shapes: Callable[[ModelConfig], dict]
    weights: tuple
    ignored: tuple
    build: Callable
    weights_for: Callable[[ModelConfig], tuple] | None = None  # a table that depends on more than tying (T5)
    peft: object = None  # PEFT: HF PEFT module names (framework/models/peft_names.py PeftNames)
    base_prefix: str | None = None  # BASE_MODEL_PREFIX: tensor names of a bare base-model save lack it
    kind: ModelKind = DECODER_ONLY  # decoder-only or encoder-decoder: framework/models/kinds.py

    @classmethod
    def of(cls, name: str, module: types.ModuleType, build: Callable = build_gpt,
           kind: ModelKind = DECODER_ONLY) -> "Family":
        return cls(name, module.HF_MODEL_TYPES, module.config_from_hf, module.hf_config, module.hf_shapes,
                   module.WEIGHTS, module.IGNORED, build, getattr(module, "weights_for", None),
                   getattr(module, "PEFT", None), getattr(module, "BASE_MODEL_PREFIX", None), kind)

    def rules(self, tied: bool, cfg: ModelConfig | None = None) -> list:
        """The rules of a (tied or untied) checkpoint; a family with ``weights_for`` needs ``cfg``."""
        weights = self.weights
        if self.weights_for is not None:
            if cfg is None:
                raise ValueError(f"family {self.name!r} chooses its weight rules by the model config; pass cfg")
            weights = self.weights_for(cfg)
        return [r for r in weights if r.applies(tied)]


FAMILIES: dict[str, Family] = {
    "llama": Family.of("llama", llama),
    "qwen2": Family.of("qwen2", qwen2),
    "mistral": Family.of("mistral", mistral),
    "gemma": Family.of("gemma", gemma),
    "mixtral": Family.of("mixtral", mixtral),
    "t5": Family.of("t5", t5, build_t5, ENCODER_DECODER),
    "gpt2": Family.of("gpt2", gpt2),
    "gpt_bigcode": Family.of("gpt_bigcode", gpt_bigcode),
    "starcoder2": Family.of("starcoder2", starcoder2),
    "nemotron": Family.of("nemotron", nemotron),
    "falcon": Family.of("falcon", falcon),
}


def get_family(name: str) -> Family:
    try:
        return FAMILIES[name]
    except KeyError:
        raise ConfigError(f"model.arch.family={name!r} is not a known family; known: {sorted(FAMILIES)}") from None


def kind_of(model: ModelConfig) -> ModelKind:
    """The kind of model ``model``'s family builds (decoder-only, encoder-decoder)."""
    return get_family(model.family).kind


def family_for_hf(config: dict) -> Family:
    model_type = config.get("model_type")
    for family in FAMILIES.values():
        if model_type in family.hf_model_types:
            return family
    known = sorted(t for f in FAMILIES.values() for t in f.hf_model_types)
    raise ConfigError(f"config.json model_type={model_type!r} is not supported yet; supported: {known}")


def config_from_hf(config: dict) -> ModelConfig:
    """The ModelConfig of any supported HF ``config.json`` (as a dict); ValueError/ConfigError name the key."""
    return family_for_hf(config).config_from_hf(config)


def build_model(model: ModelConfig, tp: int = 1, pp: int = 1, sp: bool = False, **kwargs):
    """This rank's stage of ``model``, built by its family (process groups must exist)."""
    return get_family(model.family).build(model, tp, pp, sp, **kwargs)
