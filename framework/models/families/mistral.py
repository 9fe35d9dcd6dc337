"""Hugging Face Mistral <-> our GPTModel: a Llama whose every layer attends over a sliding window.

Config as Llama (framework/models/families/llama.py), plus ``sliding_window -> sliding_window``: a query
sees itself and the ``sliding_window - 1`` tokens before it (transformers' ``sliding_window_causal``
mask; framework/models/attention.py). ``sliding_window: null`` (Mistral 7B v0.2 and later) is plain causal
attention. Weights: Llama's table, unchanged.

A ``layer_types`` list with anything but sliding attention on every layer describes Ministral's
alternating layers, which HF's Mistral ignores with a warning; it is refused here rather than guessed.
"""

from __future__ import annotations

from framework.models.config import ModelConfig
from framework.models.families import llama

HF_MODEL_TYPES = ("mistral",)


def config_from_hf(hf: dict) -> ModelConfig:
    llama.check_model_type(hf, HF_MODEL_TYPES, "mistral")
    act = hf.get("hidden_act", "silu")
    if act != "silu":
        raise ValueError(f"config.json: hidden_act={act!r} is not implemented; only 'silu' (SwiGLU) is")
    window = hf.get("sliding_window")
    if window is not None and (isinstance(window, bool) or not isinstance(window, int) or window < 1):
        raise ValueError(f"config.json: sliding_window={window!r} must be a positive integer or null")
    expected = "sliding_attention" if window is not None else "full_attention"
    layer_types = hf.get("layer_types") or []
    if any(t != expected for t in layer_types):
        raise ValueError(f"config.json: layer_types {sorted(set(layer_types))} mixes attention kinds "
                         f"(Ministral); mistral implements {expected!r} on every layer only")
    return llama.llama_like_config(hf, "mistral", sliding_window=window)


def hf_config(cfg: ModelConfig, dtype: str = "float32") -> dict:
    return {**llama.llama_like_hf_config(cfg, dtype, "MistralForCausalLM", "mistral"),
            "sliding_window": cfg.sliding_window}


def hf_shapes(cfg: ModelConfig) -> dict:
    return llama.hf_shapes(cfg)


WEIGHTS = llama.WEIGHTS
IGNORED = llama.IGNORED
PEFT = llama.PEFT
