"""Hugging Face Falcon <-> our GPTModel: the parallel attention/MLP block, multi-query or grouped attention.

Falcon's decoder layer comes in three shapes, chosen by ``new_decoder_architecture``, ``parallel_attn``
and ``num_ln_in_parallel_attn`` (transformers' ``FalconDecoderLayer``)::

    Falcon-7B       old architecture, parallel_attn       y = x + attn(ln(x)) + mlp(ln(x)), one norm
                                                          (input_layernorm), multi-query (1 KV head)
    Falcon-40B/180B new_decoder_architecture               y = x + attn(ln_attn(x)) + mlp(ln_mlp(x)), GQA
                                                          (num_kv_heads); num_ln_in_parallel_attn=1 shares
                                                          input_layernorm instead
    sequential      old architecture, parallel_attn=false  h = x + attn(ln(x)); y = h + mlp(ln2(h))

-> ``parallel_attention_mlp`` with ``parallel_attention_mlp_norms`` 1 or 2 (framework/models/
parallel_block.py), or megatron's ordinary layer. Heads: ``num_kv_heads`` with the new architecture,
else 1 with ``multi_query`` (Falcon-7B) or one per query head without.

``query_key_value`` needs no reordering in any shape (transformers' ``FalconAttention._split_heads``):
new architecture: rows viewed as [groups, n/g + 2, d], i.e. per KV group its n/g query heads, then k, v;
multi-query: [q_0 .. q_{n-1}, k, v], one group; multi-head: [q_h, k_h, v_h] per head. Each is exactly
megatron's fused ``linear_qkv`` layout (query-group major), so the weight (and bias) is sharded like any
column-parallel weight. At more TP ranks than KV heads (multi-query) each KV head is replicated over
the ranks that use it (framework/models/kv_replication.py).

Other config: ``hidden_size``, ``num_hidden_layers``, ``num_attention_heads``, ``ffn_hidden_size`` (null:
4 x hidden), ``layer_norm_epsilon``, ``activation`` (gelu; a non-gated MLP dense_h_to_4h -> dense_4h_to_h),
``bias`` (biases on every linear layer), RoPE as Llama's, ``tie_word_embeddings`` (default true).
Refused by key: ``alibi: true`` (ALiBi position bias instead of RoPE), ``new_decoder_architecture`` without
``parallel_attn`` and ``num_ln_in_parallel_attn: 2`` without ``new_decoder_architecture`` (transformers
cannot run either), ``num_kv_heads`` other than the head count in the old multi-head shape.
"""

from __future__ import annotations

from framework.models.config import ModelConfig
from framework.models.families import gpt2, llama
from framework.models.peft_names import PeftModule, PeftNames
from framework.models.weight_table import WeightRule

HF_MODEL_TYPES = ("falcon",)
H, D = "transformer.h.{i}.", llama.D


def _heads_and_block(hf: dict, heads: int) -> tuple[int, bool, int]:
    """(KV heads, parallel block?, norms in front of the parallel block) of a Falcon config.json."""
    new, parallel = bool(hf.get("new_decoder_architecture", False)), bool(hf.get("parallel_attn", True))
    num_ln = hf.get("num_ln_in_parallel_attn")
    kv = hf.get("num_kv_heads")
    if new:
        if not parallel:
            raise ValueError("config.json: parallel_attn=false with new_decoder_architecture=true is not a "
                             "Falcon layer transformers can run")
        if num_ln not in (None, 1, 2):
            raise ValueError(f"config.json: num_ln_in_parallel_attn={num_ln!r} must be 1, 2 or null")
        return int(kv or heads), True, int(num_ln or 2)
    if parallel and num_ln not in (None, 1):
        raise ValueError(f"config.json: num_ln_in_parallel_attn={num_ln!r} needs new_decoder_architecture=true "
                         f"(the old architecture has one input_layernorm)")
    if hf.get("multi_query", True):
        return 1, parallel, 1
    if kv not in (None, heads):
        raise ValueError(f"config.json: num_kv_heads={kv} with multi_query=false and the old architecture: "
                         f"its attention has one KV head per query head ({heads})")
    return heads, parallel, 1


def config_from_hf(hf: dict) -> ModelConfig:
    llama.check_model_type(hf, HF_MODEL_TYPES, "falcon")
    if hf.get("alibi"):
        raise ValueError("config.json: alibi=true (ALiBi attention bias instead of RoPE) is not implemented")
    h = int(gpt2.first(hf, "hidden_size", "n_embed"))
    heads = int(gpt2.first(hf, "num_attention_heads", "n_head"))
    if h % heads:
        raise ValueError(f"config.json: hidden_size={h} is not a multiple of num_attention_heads={heads}")
    groups, parallel, norms = _heads_and_block(hf, heads)
    theta, scaling = llama.rope_params(hf)
    return ModelConfig(
        family="falcon",
        vocab_size=int(gpt2.first(hf, "vocab_size")),
        hidden_size=h,
        num_layers=int(gpt2.first(hf, "num_hidden_layers", "n_layer")),
        num_attention_heads=heads,
        num_query_groups=groups,
        ffn_hidden_size=int(hf.get("ffn_hidden_size") or 4 * h),
        kv_channels=h // heads,
        max_position_embeddings=int(hf.get("max_position_embeddings", 2048)),
        rotary_base=theta,
        rope_scaling=scaling,
        norm_eps=float(hf.get("layer_norm_epsilon", 1e-5)),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", True)),
        init_method_std=float(hf.get("initializer_range", 0.02)),
        normalization="LayerNorm",
        activation=gpt2.hf_activation(hf, "activation", "gelu"),
        gated_linear_unit=False,
        add_bias_linear=bool(hf.get("bias", False)),
        parallel_attention_mlp=parallel,
        parallel_attention_mlp_norms=norms,
    )


def _layer_shape(cfg: ModelConfig) -> dict:
    """config.json keys that select the decoder layer (the inverse of :func:`_heads_and_block`)."""
    n, g = cfg.num_attention_heads, cfg.num_query_groups
    if cfg.parallel_attention_mlp and (cfg.parallel_attention_mlp_norms == 2 or g not in (1, n)):
        return {"new_decoder_architecture": True, "parallel_attn": True, "multi_query": g == 1,
                "num_ln_in_parallel_attn": cfg.parallel_attention_mlp_norms, "num_kv_heads": g}
    if g not in (1, n):
        raise ValueError(f"falcon: a sequential layer (parallel_attention_mlp=false) has multi-query or "
                         f"multi-head attention; num_query_groups={g} with {n} heads is neither")
    return {"new_decoder_architecture": False, "parallel_attn": cfg.parallel_attention_mlp, "multi_query": g == 1,
            "num_ln_in_parallel_attn": None, "num_kv_heads": n if g == n else 1}


def hf_config(cfg: ModelConfig, dtype: str = "float32") -> dict:
    rope = {"rope_type": "default", "rope_theta": cfg.rotary_base}
    if cfg.rope_scaling:
        rope = {**cfg.rope_scaling, "rope_theta": cfg.rotary_base}
    return {
        "architectures": ["FalconForCausalLM"],
        "model_type": "falcon",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_attention_heads,
        **_layer_shape(cfg),
        "ffn_hidden_size": cfg.ffn_hidden_size,
        "activation": gpt2.activation_name(cfg, "gelu_pytorch_tanh"),
        "bias": cfg.add_bias_linear,
        "alibi": False,
        "layer_norm_epsilon": cfg.norm_eps,
        "max_position_embeddings": cfg.max_position_embeddings,
        "rope_theta": cfg.rotary_base,
        "rope_scaling": cfg.rope_scaling,
        "rope_parameters": rope,
        "hidden_dropout": 0.0,
        "attention_dropout": 0.0,
        "initializer_range": cfg.init_method_std,
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "use_cache": True,
        "torch_dtype": dtype,
        "dtype": dtype,
    }


def _norm_names(cfg: ModelConfig) -> tuple[str, ...]:
    """The HF norms of a layer: in front of attention, then (if any) in front of the MLP."""
    if not cfg.parallel_attention_mlp:
        return "input_layernorm", "post_attention_layernorm"
    return ("ln_attn", "ln_mlp") if cfg.parallel_attention_mlp_norms == 2 else ("input_layernorm",)


_LINEARS = ("self_attention.query_key_value", "self_attention.dense", "mlp.dense_h_to_4h", "mlp.dense_4h_to_h")


def hf_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    h, f, d = cfg.hidden_size, cfg.ffn_hidden_size, cfg.kv_channels
    qkv = (cfg.num_attention_heads + 2 * cfg.num_query_groups) * d
    linears = dict(zip(_LINEARS, ((qkv, h), (h, cfg.num_attention_heads * d), (f, h), (h, f))))
    return gpt2.layernorm_model_shapes(cfg, "transformer.word_embeddings", H, _norm_names(cfg), linears,
                                       "transformer.ln_f")



def weights_for(cfg: ModelConfig) -> tuple[WeightRule, ...]:
    names = _norm_names(cfg)
    # Under Transformer Engine a norm in front of one branch only is fused into that branch's first linear;
    # the shared norm of the one-norm parallel block stays a separate TENorm of the same name.
    shared = len(names) == 1
    norms = gpt2.layer_norm_rules(H + names[0], D + "input_layernorm", None if shared else gpt2.ATTN_NORM)
    if not shared:
        norms += gpt2.layer_norm_rules(H + names[1], D + "pre_mlp_layernorm", gpt2.MLP_NORM)
    bias = cfg.add_bias_linear
    return (
        WeightRule(("transformer.word_embeddings.weight",), "embedding.word_embeddings.weight", "vocab"),
        *norms,
        *gpt2.linear_rules(H + _LINEARS[0], D + "self_attention.linear_qkv", "column", "column" if bias else None),
        *gpt2.linear_rules(H + _LINEARS[1], D + "self_attention.linear_proj", "row", "replicate" if bias else None),
        *gpt2.linear_rules(H + _LINEARS[2], D + "mlp.linear_fc1", "column", "column" if bias else None),
        *gpt2.linear_rules(H + _LINEARS[3], D + "mlp.linear_fc2", "row", "replicate" if bias else None),
        *gpt2.layer_norm_rules("transformer.ln_f", "decoder.final_layernorm"),
        WeightRule(("lm_head.weight",), "output_layer.weight", "vocab", when="untied"),
        WeightRule(("transformer.word_embeddings.weight",), "output_layer.weight", "vocab", when="tied"),
    )


# Every layer shape's rules (with biases); the registry takes a config's own from weights_for.
WEIGHTS = tuple(dict.fromkeys(
    rule for shape in ({"parallel_attention_mlp": False}, {"parallel_attention_mlp": True},
                       {"parallel_attention_mlp": True, "parallel_attention_mlp_norms": 2})
    for rule in weights_for(ModelConfig(family="falcon", add_bias_linear=True, **shape))))
IGNORED: tuple[tuple[str, str | None], ...] = (("lm_head.weight", "tied"),)

# HF PEFT names (framework/models/peft_names.py): query_key_value is megatron's fused order, so LoRA's B rows
# shard like its weight ("column"); IA3 on keys/values scales query_key_value whole (query rows one).
PEFT = PeftNames(
    layer=H,
    targets={"qkv": PeftModule((_LINEARS[0],), "column"), "proj": PeftModule((_LINEARS[1],)),
             "fc1": PeftModule((_LINEARS[2],), "column"), "fc2": PeftModule((_LINEARS[3],))},
    ia3={"k": _LINEARS[0], "v": _LINEARS[0], "fc2": _LINEARS[3]},
    embedding="transformer.word_embeddings")
