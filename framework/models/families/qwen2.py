"""Hugging Face Qwen2 <-> our GPTModel: a Llama with biases on the q/k/v projections.

Config as Llama (framework/models/families/llama.py), plus ``add_qkv_bias``. Qwen2's sliding window is
per layer (``max_window_layers`` and ``layer_types``) and off in the released models
(``use_sliding_window: false``); a config that turns it on is refused, not approximated.
"""

from __future__ import annotations

from framework.models.config import ModelConfig
from framework.models.families import llama

HF_MODEL_TYPES = ("qwen2",)


def config_from_hf(hf: dict) -> ModelConfig:
    llama.check_model_type(hf, HF_MODEL_TYPES, "qwen2")
    if hf.get("use_sliding_window"):
        raise ValueError("config.json: use_sliding_window=true (per-layer sliding window) is not implemented "
                         "for qwen2")
    layer_types = hf.get("layer_types") or []
    if any(t != "full_attention" for t in layer_types):
        raise ValueError(f"config.json: layer_types {sorted(set(layer_types))}: only full_attention is implemented")
    act = hf.get("hidden_act", "silu")
    if act != "silu":
        raise ValueError(f"config.json: hidden_act={act!r} is not implemented; only 'silu' (SwiGLU) is")
    return llama.llama_like_config(hf, "qwen2", add_qkv_bias=True)


def hf_config(cfg: ModelConfig, dtype: str = "float32") -> dict:
    return {**llama.llama_like_hf_config(cfg, dtype, "Qwen2ForCausalLM", "qwen2"),
            "use_sliding_window": False, "sliding_window": None, "max_window_layers": cfg.num_layers,
            "layer_types": ["full_attention"] * cfg.num_layers}


def hf_shapes(cfg: ModelConfig) -> dict:
    return llama.hf_shapes(cfg)


WEIGHTS = llama.EMBEDDING_AND_HEAD[:1] + llama.ATTENTION + (llama.QKV_BIAS,) + llama.DENSE_MLP \
    + llama.EMBEDDING_AND_HEAD[1:]
IGNORED = llama.IGNORED
PEFT = llama.PEFT
