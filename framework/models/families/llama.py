"""Hugging Face Llama <-> our Llama-style GPTModel: the config mapping and the weight name table.

Config (HF ``config.json`` key -> ``ModelConfig`` field)::

    hidden_size -> hidden_size              intermediate_size -> ffn_hidden_size
    num_hidden_layers -> num_layers         num_attention_heads -> num_attention_heads
    num_key_value_heads -> num_query_groups head_dim -> kv_channels
    rope_theta -> rotary_base               rms_norm_eps -> norm_eps
    tie_word_embeddings, vocab_size, max_position_embeddings -> same names

transformers 5 writes ``rope_parameters = {rope_theta, rope_type}``; older files write ``rope_theta`` and
``rope_scaling``. Both are read, including the scaled RoPE of Llama 3.1+ (``rope_type: llama3``) and
linear scaling (framework/models/rope.py). What our model does not implement is refused with a ValueError
naming the key, never silently approximated.

Weights (:data:`WEIGHTS`, transforms in framework/models/weight_table.py): q/k/v fused by query group into
``linear_qkv``, gate/up fused per TP rank into ``linear_fc1``, o/down row-parallel, embedding and
lm_head vocab-parallel, norms replicated. Mistral and Qwen2 reuse this module's pieces.
"""

from __future__ import annotations

from framework.models import peft_names, rope
from framework.models.config import ModelConfig
from framework.models.weight_table import WeightRule

HF_MODEL_TYPES = ("llama",)


def rope_params(hf: dict) -> tuple[float, dict | None]:
    """(rope_theta, scaling) from either config format; scaling (framework/models/rope.py) is None for
    unscaled RoPE. Precedence as transformers 5 reads a config.json: ``rope_scaling`` over
    ``rope_parameters``, a ``rope_theta`` inside the dict over the top-level one, and for llama3 a top-level
    ``original_max_position_embeddings`` over the dict's, which defaults to ``max_position_embeddings``."""
    key = "rope_scaling" if hf.get("rope_scaling") else "rope_parameters"
    node = hf.get(key) or {}
    if not isinstance(node, dict):
        raise ValueError(f"config.json: {key} must be a mapping (rope_type and its parameters), got {node!r}")
    node = dict(node)
    theta = node.get("rope_theta", hf.get("rope_theta", 10000.0))
    if rope.rope_type(node) == "llama3":
        if hf.get("original_max_position_embeddings") is not None:
            node["original_max_position_embeddings"] = hf["original_max_position_embeddings"]
        elif node.get("original_max_position_embeddings") is None:
            node["original_max_position_embeddings"] = hf.get("max_position_embeddings")
    return float(theta), rope.normalize_scaling(node, f"config.json: {key}")


def require(hf: dict, keys) -> None:
    missing = [k for k in keys if k not in hf]
    if missing:
        raise ValueError(f"config.json: missing required key(s) {missing}")


def check_model_type(hf: dict, allowed: tuple[str, ...], default: str) -> None:
    model_type = hf.get("model_type", default)
    if model_type not in allowed:
        raise ValueError(f"config.json: model_type={model_type!r} is not one of {list(allowed)}")


def llama_like_config(hf: dict, family: str, **overrides) -> ModelConfig:
    """The fields every Llama-shaped config.json shares (Llama, Mistral, Qwen2, Mixtral, ...)."""
    require(hf, ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size"))
    heads = int(hf["num_attention_heads"])
    theta, scaling = rope_params(hf)
    fields = dict(
        family=family,
        vocab_size=int(hf["vocab_size"]),
        hidden_size=int(hf["hidden_size"]),
        num_layers=int(hf["num_hidden_layers"]),
        num_attention_heads=heads,
        num_query_groups=int(hf.get("num_key_value_heads") or heads),
        ffn_hidden_size=int(hf["intermediate_size"]),
        kv_channels=int(hf.get("head_dim") or hf["hidden_size"] // heads),
        max_position_embeddings=int(hf.get("max_position_embeddings", 2048)),
        rotary_base=theta,
        rope_scaling=scaling,
        norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        init_method_std=float(hf.get("initializer_range", 0.02)),
    )
    fields.update(overrides)
    return ModelConfig(**fields)


def config_from_hf(hf: dict) -> ModelConfig:
    """ModelConfig of an HF Llama ``config.json`` (as a dict). Raises ValueError naming a bad key."""
    check_model_type(hf, HF_MODEL_TYPES, "llama")
    for key in ("attention_bias", "mlp_bias"):
        if hf.get(key):
            raise ValueError(f"config.json: {key}=true is not implemented (our Llama has no biases)")
    act = hf.get("hidden_act", "silu")
    if act != "silu":
        raise ValueError(f"config.json: hidden_act={act!r} is not implemented; only 'silu' (SwiGLU) is")
    return llama_like_config(hf, "llama")


def llama_like_hf_config(cfg: ModelConfig, dtype: str, architecture: str, model_type: str) -> dict:
    """config.json fields shared by the Llama-shaped families (transformers 4.x and 5.x read them)."""
    rope = {"rope_type": "default", "rope_theta": cfg.rotary_base}
    if cfg.rope_scaling:
        rope = {**cfg.rope_scaling, "rope_theta": cfg.rotary_base}
    return {
        "architectures": [architecture],
        "model_type": model_type,
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.ffn_hidden_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.num_query_groups,
        "head_dim": cfg.kv_channels,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.max_position_embeddings,
        "initializer_range": cfg.init_method_std,
        "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rotary_base,
        "rope_scaling": cfg.rope_scaling,
        "rope_parameters": rope,
        "attention_dropout": 0.0,
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "use_cache": True,
        "torch_dtype": dtype,
        "dtype": dtype,
    }


def hf_config(cfg: ModelConfig, dtype: str = "float32") -> dict:
    return {**llama_like_hf_config(cfg, dtype, "LlamaForCausalLM", "llama"),
            "attention_bias": False, "mlp_bias": False, "pretraining_tp": 1}


def attention_shapes(cfg: ModelConfig, prefix: str) -> dict:
    h, d, n, g = cfg.hidden_size, cfg.kv_channels, cfg.num_attention_heads, cfg.num_query_groups
    out = {prefix + "q_proj.weight": (n * d, h), prefix + "k_proj.weight": (g * d, h),
           prefix + "v_proj.weight": (g * d, h)}
    if cfg.add_qkv_bias:
        out.update({prefix + "q_proj.bias": (n * d,), prefix + "k_proj.bias": (g * d,),
                    prefix + "v_proj.bias": (g * d,)})
    out[prefix + "o_proj.weight"] = (h, n * d)
    return out


def hf_shapes(cfg: ModelConfig, mlp_shapes=None) -> dict[str, tuple[int, ...]]:
    """Every tensor name a Llama-shaped HF checkpoint of this config holds, with its shape, in HF order.
    ``mlp_shapes(cfg, prefix)`` replaces the dense gate/up/down MLP (Mixtral's experts)."""
    h, f, V = cfg.hidden_size, cfg.ffn_hidden_size, cfg.vocab_size
    out = {"model.embed_tokens.weight": (V, h)}
    for i in range(cfg.num_layers):
        p = f"model.layers.{i}."
        out[p + "input_layernorm.weight"] = (h,)
        out.update(attention_shapes(cfg, p + "self_attn."))
        out[p + "post_attention_layernorm.weight"] = (h,)
        if mlp_shapes is None:
            out.update({p + "mlp.gate_proj.weight": (f, h), p + "mlp.up_proj.weight": (f, h),
                        p + "mlp.down_proj.weight": (h, f)})
        else:
            out.update(mlp_shapes(cfg, p))
    out["model.norm.weight"] = (h,)
    if not cfg.tie_word_embeddings:
        out["lm_head.weight"] = (V, h)
    return out


L = "model.layers.{i}."
D = "decoder.layers.{i}."

EMBEDDING_AND_HEAD: tuple[WeightRule, ...] = (
    WeightRule(("model.embed_tokens.weight",), "embedding.word_embeddings.weight", "vocab"),
    WeightRule(("model.norm.weight",), "decoder.final_layernorm.weight", "replicate"),
    WeightRule(("lm_head.weight",), "output_layer.weight", "vocab", when="untied"),
    # Tied: megatron keeps a copy of the embedding on the last stage when it is not the first.
    WeightRule(("model.embed_tokens.weight",), "output_layer.weight", "vocab", when="tied"),
)

ATTENTION: tuple[WeightRule, ...] = (
    WeightRule((L + "input_layernorm.weight",), D + "input_layernorm.weight", "replicate",
               te_ours=D + "self_attention.linear_qkv.layer_norm_weight"),
    WeightRule((L + "self_attn.q_proj.weight", L + "self_attn.k_proj.weight", L + "self_attn.v_proj.weight"),
               D + "self_attention.linear_qkv.weight", "qkv"),
    WeightRule((L + "self_attn.o_proj.weight",), D + "self_attention.linear_proj.weight", "row"),
    WeightRule((L + "post_attention_layernorm.weight",), D + "pre_mlp_layernorm.weight", "replicate",
               te_ours=D + "mlp.linear_fc1.layer_norm_weight"),
)

QKV_BIAS = WeightRule((L + "self_attn.q_proj.bias", L + "self_attn.k_proj.bias", L + "self_attn.v_proj.bias"),
                      D + "self_attention.linear_qkv.bias", "qkv")

DENSE_MLP: tuple[WeightRule, ...] = (
    WeightRule((L + "mlp.gate_proj.weight", L + "mlp.up_proj.weight"), D + "mlp.linear_fc1.weight", "gate_up"),
    WeightRule((L + "mlp.down_proj.weight",), D + "mlp.linear_fc2.weight", "row"),
)

WEIGHTS: tuple[WeightRule, ...] = EMBEDDING_AND_HEAD[:1] + ATTENTION + DENSE_MLP + EMBEDDING_AND_HEAD[1:]

# HF PEFT module names of our LoRA/DoRA/IA3 targets (framework/models/peft_names.py): q/k/v split from the
# fused qkv rows as the "qkv" rule above splits the weight, gate/up as "gate_up".
PEFT = peft_names.llama_names()

# HF tensors that carry no weights of ours: RoPE caches of old checkpoints, and lm_head when it is a
# (redundant) copy of the tied embedding.
IGNORED: tuple[tuple[str, str | None], ...] = (
    (L + "self_attn.rotary_emb.inv_freq", None),
    ("model.rotary_emb.inv_freq", None),
    ("lm_head.weight", "tied"),
)
