"""Hugging Face Gemma (1) <-> our GPTModel: a Llama with four differences, all of them config.

    embeddings   x sqrt(hidden_size) on the first stage (HF multiplies by that value as a float32 tensor
                 cast to the hidden dtype)                          -> embedding_multiplier
    MLP          GeGLU: gelu_tanh(gate x) * (up x)                  -> activation gelu_tanh, gated
    RMSNorm      x_hat * (1 + w), the product in fp32               -> zero_centered_gamma
    head_dim     its own key (256 in the released models, != hidden/heads) -> kv_channels

plus tied embeddings by default, MQA in gemma-2b (one KV head) and MHA in gemma-7b. The weight names are
Llama's, so is the table (the zero-centred norm weights are stored as HF stores them, w, not 1 + w).

``hidden_act`` 'gelu' (what the released config.json files say) is the tanh approximation in
transformers, which rewrites it to 'gelu_pytorch_tanh'; we read both as gelu_tanh. Gemma 2 (soft-capping,
extra norms, alternating windows) is a different ``model_type`` and not covered here.
"""

from __future__ import annotations

from framework.models.config import ModelConfig
from framework.models.families import llama

HF_MODEL_TYPES = ("gemma",)

_TANH_GELU = ("gelu", "gelu_pytorch_tanh")  # transformers runs both as the tanh approximation


def config_from_hf(hf: dict) -> ModelConfig:
    llama.check_model_type(hf, HF_MODEL_TYPES, "gemma")
    if hf.get("attention_bias"):
        raise ValueError("config.json: attention_bias=true is not implemented (our Gemma has no biases)")
    act = hf.get("hidden_act", "gelu_pytorch_tanh")
    if act not in _TANH_GELU:
        raise ValueError(f"config.json: hidden_act={act!r} is not implemented; Gemma's MLP is GeGLU with "
                         f"{list(_TANH_GELU)} (the tanh approximation)")
    legacy = hf.get("hidden_activation")
    if legacy not in (None, "gelu_pytorch_tanh"):
        raise ValueError(f"config.json: hidden_activation={legacy!r} is not implemented; "
                         f"only 'gelu_pytorch_tanh' (or null) is")
    if hf.get("use_bidirectional_attention"):
        raise ValueError("config.json: use_bidirectional_attention=true is not implemented (causal only)")
    llama.require(hf, ("hidden_size",))
    return llama.llama_like_config(
        hf, "gemma",
        kv_channels=int(hf.get("head_dim") or 256),  # HF's default when the key is absent
        norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", True)),
        activation="gelu_tanh", gated_linear_unit=True, zero_centered_gamma=True,
        embedding_multiplier=float(hf["hidden_size"]) ** 0.5)


def hf_config(cfg: ModelConfig, dtype: str = "float32") -> dict:
    return {**llama.llama_like_hf_config(cfg, dtype, "GemmaForCausalLM", "gemma"),
            "hidden_act": "gelu_pytorch_tanh", "attention_bias": False}


def hf_shapes(cfg: ModelConfig) -> dict:
    return llama.hf_shapes(cfg)


WEIGHTS = llama.WEIGHTS
IGNORED = llama.IGNORED
PEFT = llama.PEFT
