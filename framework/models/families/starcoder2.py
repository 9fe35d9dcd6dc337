"""Hugging Face Starcoder2 <-> our GPTModel: Llama's names and RoPE/GQA attention, GPT-2's LayerNorm and
non-gated MLP.

Config (HF key -> ``ModelConfig``): Llama's (framework/models/families/llama.py: sizes, heads,
``num_key_value_heads``, ``head_dim``, RoPE), plus::

    norm_epsilon -> norm_eps (LayerNorm with bias)     hidden_act (gelu_pytorch_tanh) -> activation, not gated
    use_bias -> add_bias_linear (q/k/v/o, c_fc, c_proj) sliding_window -> sliding_window (as Mistral's:
    tie_word_embeddings (default true)                  a query sees itself and the w - 1 tokens before it)

Weights (:func:`weights_for`): q/k/v fused by query group (biases too), ``o_proj`` row-parallel with its
bias whole on every rank, ``mlp.c_fc`` column-parallel, ``mlp.c_proj`` row-parallel, LayerNorms
replicated. Without ``use_bias`` the bias rules drop out of the table.
"""

from __future__ import annotations

from framework.models.config import ModelConfig
from framework.models import peft_names
from framework.models.families import gpt2, llama
from framework.models.weight_table import WeightRule

HF_MODEL_TYPES = ("starcoder2",)
L, D = llama.L, llama.D


def config_from_hf(hf: dict) -> ModelConfig:
    llama.check_model_type(hf, HF_MODEL_TYPES, "starcoder2")
    window = hf.get("sliding_window")
    if window is not None and (isinstance(window, bool) or not isinstance(window, int) or window < 1):
        raise ValueError(f"config.json: sliding_window={window!r} must be a positive integer or null")
    return llama.llama_like_config(
        hf, "starcoder2",
        norm_eps=float(hf.get("norm_epsilon", 1e-5)),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", True)),
        normalization="LayerNorm",
        activation=gpt2.hf_activation(hf, "hidden_act", "gelu_pytorch_tanh"),
        gated_linear_unit=False,
        add_bias_linear=bool(hf.get("use_bias", True)),
        sliding_window=window,
    )


def hf_config(cfg: ModelConfig, dtype: str = "float32") -> dict:
    out = llama.llama_like_hf_config(cfg, dtype, "Starcoder2ForCausalLM", "starcoder2")
    del out["rms_norm_eps"]
    return {**out, "hidden_act": gpt2.activation_name(cfg, "gelu_pytorch_tanh"), "norm_epsilon": cfg.norm_eps,
            "use_bias": cfg.add_bias_linear, "sliding_window": cfg.sliding_window, "residual_dropout": 0.0,
            "embedding_dropout": 0.0}


def layernorm_llama_shapes(cfg: ModelConfig, fc1: str, fc2: str) -> dict[str, tuple[int, ...]]:
    """Every tensor of a checkpoint with Llama's names, LayerNorms with bias, a non-gated MLP ``fc1``/``fc2``
    and, with ``add_bias_linear``, biases on every linear layer (Starcoder2, Nemotron)."""
    h, f = cfg.hidden_size, cfg.ffn_hidden_size
    nd, gd = cfg.num_attention_heads * cfg.kv_channels, cfg.num_query_groups * cfg.kv_channels
    linears = {"self_attn.q_proj": (nd, h), "self_attn.k_proj": (gd, h), "self_attn.v_proj": (gd, h),
               "self_attn.o_proj": (h, nd), fc1: (f, h), fc2: (h, f)}
    return gpt2.layernorm_model_shapes(cfg, "model.embed_tokens", L, ("input_layernorm", "post_attention_layernorm"),
                                       linears, "model.norm")


def hf_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    return layernorm_llama_shapes(cfg, "mlp.c_fc", "mlp.c_proj")



def layernorm_llama_table(bias: bool, fc1: str, fc2: str) -> tuple[WeightRule, ...]:
    """The table of :func:`layernorm_llama_shapes`' checkpoints (``bias``: with the linear layers' biases)."""
    return (
        llama.EMBEDDING_AND_HEAD[0],
        *gpt2.layer_norm_rules(L + "input_layernorm", D + "input_layernorm", gpt2.ATTN_NORM),
        llama.ATTENTION[1],  # q/k/v -> linear_qkv
        *((llama.QKV_BIAS,) if bias else ()),
        *gpt2.linear_rules(L + "self_attn.o_proj", D + "self_attention.linear_proj", "row",
                           "replicate" if bias else None),
        *gpt2.layer_norm_rules(L + "post_attention_layernorm", D + "pre_mlp_layernorm", gpt2.MLP_NORM),
        *gpt2.linear_rules(L + fc1, D + "mlp.linear_fc1", "column", "column" if bias else None),
        *gpt2.linear_rules(L + fc2, D + "mlp.linear_fc2", "row", "replicate" if bias else None),
        *gpt2.layer_norm_rules("model.norm", "decoder.final_layernorm"),
        *llama.EMBEDDING_AND_HEAD[2:],
    )


def weights_for(cfg: ModelConfig) -> tuple[WeightRule, ...]:
    return layernorm_llama_table(cfg.add_bias_linear, "mlp.c_fc", "mlp.c_proj")


# Every rule (with biases); the registry takes a config's own from weights_for.
WEIGHTS = layernorm_llama_table(True, "mlp.c_fc", "mlp.c_proj")
IGNORED = llama.IGNORED


def layernorm_llama_peft(fc1: str, fc2: str) -> peft_names.PeftNames:
    """HF PEFT names of :func:`layernorm_llama_table` checkpoints: Llama's attention, the non-gated MLP's
    ``fc1``/``fc2``."""
    mlp = {"fc1": peft_names.PeftModule((fc1,), "column"), "fc2": peft_names.PeftModule((fc2,))}
    return peft_names.llama_names(targets={**llama.PEFT.targets, **mlp}, plain_fc1=None,
                                  ia3={**llama.PEFT.ia3, "fc2": fc2})


PEFT = layernorm_llama_peft("mlp.c_fc", "mlp.c_proj")
