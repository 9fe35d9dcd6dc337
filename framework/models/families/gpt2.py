"""Hugging Face GPT-2 <-> our GPTModel: the "GPT-3 style" architecture.

Learned absolute positions, LayerNorm (with bias) before attention and MLP, a non-gated GELU MLP, biases
on every linear layer, tied lm_head by default, multi-head attention.

Config (HF ``config.json`` key -> ``ModelConfig`` field)::

    n_embd -> hidden_size          n_layer -> num_layers        n_head -> num_attention_heads (= query groups)
    n_inner (null: 4 n_embd) -> ffn_hidden_size               n_positions -> max_position_embeddings
    layer_norm_epsilon -> norm_eps activation_function -> activation (gelu_new: tanh approximation)
    tie_word_embeddings, vocab_size, initializer_range -> same / init_method_std

Refused (ValueError naming the key): ``scale_attn_weights: false``, ``scale_attn_by_inverse_layer_idx:
true``, ``add_cross_attention: true``, an activation we do not have. ``reorder_and_upcast_attn`` only
changes how bf16/fp16 scores are upcast, not the function, and is accepted.

Weights: GPT-2's ``Conv1D`` stores weights [in, out] (transposed against ``nn.Linear``), hence the
``conv1d_*`` transforms; ``c_attn`` is a packed [q; k; v] of the whole hidden size each, fused into
megatron's per-head order (``conv1d_qkv_packed``, its bias ``qkv_packed``). Row-parallel biases
(``attn.c_proj``, ``mlp.c_proj``) are whole on every TP rank, column-parallel ones sharded with their
weight. ``attn.bias``/``attn.masked_bias`` of old checkpoints are causal-mask buffers, not weights.

StarCoder (``gpt_bigcode``) has the same layout with ``nn.Linear`` weights and reuses this module's
pieces; :func:`layer_norm_rules` serves every LayerNorm family.
"""

from __future__ import annotations

from framework.models.config import ModelConfig
from framework.models.peft_names import PeftModule, PeftNames
from framework.models.families import llama
from framework.models.weight_table import WeightRule

HF_MODEL_TYPES = ("gpt2",)

# HF activation name -> ModelConfig.activation (gelu_new, gelu_fast and gelu_pytorch_tanh are all the tanh
# approximation of GELU, computed by different expressions)
ACTIVATIONS = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu_fast": "gelu_tanh",
               "gelu": "gelu", "relu": "relu"}


def hf_activation(hf: dict, key: str, default: str) -> str:
    act = hf.get(key) or default
    if act not in ACTIVATIONS:
        raise ValueError(f"config.json: {key}={act!r} is not implemented; supported: {sorted(ACTIVATIONS)}")
    return ACTIVATIONS[act]


def activation_name(cfg: ModelConfig, tanh_name: str) -> str:
    """The HF name of ``cfg.activation`` (``tanh_name``: how this family spells the tanh approximation)."""
    return {"gelu_tanh": tanh_name, "gelu": "gelu", "relu": "relu"}[cfg.activation]


def first(hf: dict, *keys, default=None):
    """The value of the first key present (GPT-2 style configs spell hidden_size n_embd, and so on)."""
    for k in keys:
        if hf.get(k) is not None:
            return hf[k]
    if default is None:
        raise ValueError(f"config.json: missing required key {keys[0]!r}")
    return default


def refuse(hf: dict, **wrong) -> None:
    """ValueError naming the first key whose value is the one given (a feature we do not implement)."""
    for key, value in wrong.items():
        if key in hf and hf[key] == value:
            raise ValueError(f"config.json: {key}={value!r} is not implemented")


def gpt2_like_config(hf: dict, family: str, default_act: str, **overrides) -> ModelConfig:
    """The fields GPT-2 and GPTBigCode share (learned positions, LayerNorm, biases everywhere)."""
    refuse(hf, scale_attn_weights=False, add_cross_attention=True)
    h = int(first(hf, "n_embd", "hidden_size"))
    heads = int(first(hf, "n_head", "num_attention_heads"))
    if h % heads:
        raise ValueError(f"config.json: n_embd={h} is not a multiple of n_head={heads}")
    fields = dict(
        family=family,
        vocab_size=int(first(hf, "vocab_size")),
        hidden_size=h,
        num_layers=int(first(hf, "n_layer", "num_hidden_layers")),
        num_attention_heads=heads,
        num_query_groups=heads,
        ffn_hidden_size=int(hf.get("n_inner") or 4 * h),
        kv_channels=h // heads,
        max_position_embeddings=int(first(hf, "n_positions", "max_position_embeddings", default=1024)),
        norm_eps=float(hf.get("layer_norm_epsilon", 1e-5)),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", True)),
        init_method_std=float(hf.get("initializer_range", 0.02)),
        normalization="LayerNorm",
        activation=hf_activation(hf, "activation_function", default_act),
        gated_linear_unit=False,
        add_bias_linear=True,
        position_embedding_type="learned_absolute",
    )
    fields.update(overrides)
    return ModelConfig(**fields)


def config_from_hf(hf: dict) -> ModelConfig:
    """ModelConfig of an HF GPT-2 ``config.json`` (as a dict). Raises ValueError naming a bad key."""
    llama.check_model_type(hf, HF_MODEL_TYPES, "gpt2")
    refuse(hf, scale_attn_by_inverse_layer_idx=True)
    return gpt2_like_config(hf, "gpt2", "gelu_new")


def gpt2_like_hf_config(cfg: ModelConfig, dtype: str, architecture: str, model_type: str, tanh_name: str) -> dict:
    return {
        "architectures": [architecture],
        "model_type": model_type,
        "vocab_size": cfg.vocab_size,
        "n_positions": cfg.max_position_embeddings,
        "n_embd": cfg.hidden_size,
        "n_layer": cfg.num_layers,
        "n_head": cfg.num_attention_heads,
        "n_inner": cfg.ffn_hidden_size,
        "activation_function": activation_name(cfg, tanh_name),
        "resid_pdrop": 0.0,
        "embd_pdrop": 0.0,
        "attn_pdrop": 0.0,
        "layer_norm_epsilon": cfg.norm_eps,
        "initializer_range": cfg.init_method_std,
        "scale_attn_weights": True,
        "add_cross_attention": False,
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "use_cache": True,
        "torch_dtype": dtype,
        "dtype": dtype,
    }


def hf_config(cfg: ModelConfig, dtype: str = "float32") -> dict:
    return {**gpt2_like_hf_config(cfg, dtype, "GPT2LMHeadModel", "gpt2", "gelu_new"),
            "scale_attn_by_inverse_layer_idx": False, "reorder_and_upcast_attn": False}


def gpt2_like_shapes(cfg: ModelConfig, conv1d: bool) -> dict[str, tuple[int, ...]]:
    """Every tensor of a GPT-2 style checkpoint; ``conv1d``: weights stored [in, out] (GPT-2) rather than
    [out, in] (GPTBigCode)."""
    h, f, V = cfg.hidden_size, cfg.ffn_hidden_size, cfg.vocab_size
    qkv = (cfg.num_attention_heads + 2 * cfg.num_query_groups) * cfg.kv_channels

    def w(out_features, in_features):
        return (in_features, out_features) if conv1d else (out_features, in_features)

    out = {"transformer.wte.weight": (V, h), "transformer.wpe.weight": (cfg.max_position_embeddings, h)}
    for i in range(cfg.num_layers):
        p = f"transformer.h.{i}."
        out.update({p + "ln_1.weight": (h,), p + "ln_1.bias": (h,),
                    p + "attn.c_attn.weight": w(qkv, h), p + "attn.c_attn.bias": (qkv,),
                    p + "attn.c_proj.weight": w(h, h), p + "attn.c_proj.bias": (h,),
                    p + "ln_2.weight": (h,), p + "ln_2.bias": (h,),
                    p + "mlp.c_fc.weight": w(f, h), p + "mlp.c_fc.bias": (f,),
                    p + "mlp.c_proj.weight": w(h, f), p + "mlp.c_proj.bias": (h,)})
    out.update({"transformer.ln_f.weight": (h,), "transformer.ln_f.bias": (h,)})
    if not cfg.tie_word_embeddings:
        out["lm_head.weight"] = (V, h)
    return out


def hf_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    return gpt2_like_shapes(cfg, conv1d=True)


def layernorm_model_shapes(cfg: ModelConfig, embedding: str, layer: str, norms, linears: dict,
                           final_norm: str) -> dict[str, tuple[int, ...]]:
    """Tensor shapes of a LayerNorm model's checkpoint: ``embedding`` [V, h]; in each layer (``layer``, a
    prefix with ``{i}``) the ``norms`` (weight and bias [h]) and ``linears`` (name -> weight shape, plus a
    bias [out] with ``add_bias_linear``); ``final_norm``; ``lm_head`` [V, h] when untied (Starcoder2,
    Nemotron, Falcon)."""
    h, V = cfg.hidden_size, cfg.vocab_size
    out = {f"{embedding}.weight": (V, h)}
    for i in range(cfg.num_layers):
        p = layer.format(i=i)
        for norm in norms:
            out.update({f"{p}{norm}.weight": (h,), f"{p}{norm}.bias": (h,)})
        for name, shape in linears.items():
            out[f"{p}{name}.weight"] = shape
            if cfg.add_bias_linear:
                out[f"{p}{name}.bias"] = shape[:1]
    out.update({f"{final_norm}.weight": (h,), f"{final_norm}.bias": (h,)})
    if not cfg.tie_word_embeddings:
        out["lm_head.weight"] = (V, h)
    return out


def layer_norm_rules(hf: str, ours: str, te_ours: str | None = None) -> tuple[WeightRule, ...]:
    """A LayerNorm's weight and bias (replicated). ``te_ours``: the linear layer the Transformer Engine spec
    fuses this norm into (its ``layer_norm_weight``/``layer_norm_bias``)."""
    return tuple(WeightRule((f"{hf}.{p}",), f"{ours}.{p}", "replicate",
                            te_ours=None if te_ours is None else f"{te_ours}.layer_norm_{p}")
                 for p in ("weight", "bias"))


def linear_rules(hf: str, ours: str, weight: str, bias: str | None, **kw) -> tuple[WeightRule, ...]:
    """A linear layer's weight (through ``weight``) and, with ``bias``, its bias."""
    rules = (WeightRule((f"{hf}.weight",), f"{ours}.weight", weight, **kw),)
    if bias is not None:
        rules += (WeightRule((f"{hf}.bias",), f"{ours}.bias", bias, **kw),)
    return rules


H = "transformer.h.{i}."
D = llama.D
ATTN_NORM = D + "self_attention.linear_qkv"  # where TE fuses the norm before attention
MLP_NORM = D + "mlp.linear_fc1"              # ... and the one before the MLP


def gpt2_like_table(qkv: str, qkv_bias: str, column: str, row: str) -> tuple[WeightRule, ...]:
    """GPT-2's name table with the given transforms for c_attn (weight, bias), column- and row-parallel
    weights (``conv1d_*`` for GPT-2, plain for GPTBigCode)."""
    return (
        WeightRule(("transformer.wte.weight",), "embedding.word_embeddings.weight", "vocab"),
        WeightRule(("transformer.wpe.weight",), "embedding.position_embeddings.weight", "replicate"),
        *layer_norm_rules(H + "ln_1", D + "input_layernorm", ATTN_NORM),
        WeightRule((H + "attn.c_attn.weight",), D + "self_attention.linear_qkv.weight", qkv),
        WeightRule((H + "attn.c_attn.bias",), D + "self_attention.linear_qkv.bias", qkv_bias),
        *linear_rules(H + "attn.c_proj", D + "self_attention.linear_proj", row, "replicate"),
        *layer_norm_rules(H + "ln_2", D + "pre_mlp_layernorm", MLP_NORM),
        *linear_rules(H + "mlp.c_fc", D + "mlp.linear_fc1", column, "column"),
        *linear_rules(H + "mlp.c_proj", D + "mlp.linear_fc2", row, "replicate"),
        *layer_norm_rules("transformer.ln_f", "decoder.final_layernorm"),
        WeightRule(("lm_head.weight",), "output_layer.weight", "vocab", when="untied"),
        WeightRule(("transformer.wte.weight",), "output_layer.weight", "vocab", when="tied"),
    )


WEIGHTS = gpt2_like_table("conv1d_qkv_packed", "qkv_packed", "conv1d_column", "conv1d_row")

# A checkpoint of the bare ``GPT2Model`` (no LM head: tied) has the same names without this prefix (HF's
# ``base_model_prefix``); framework/checkpoint/hf_import.py reads either.
BASE_MODEL_PREFIX = "transformer."


def gpt2_like_peft(qkv_rows: str, fan_in_fan_out: bool) -> PeftNames:
    """HF PEFT module names of GPT-2 style models (framework/models/peft_names.py): one module per target;
    ``qkv_rows``: the transform of c_attn's rows (its bias rule's), IA3 on keys/values scales c_attn whole."""
    return PeftNames(
        layer=H,
        targets={"qkv": PeftModule(("attn.c_attn",), qkv_rows), "proj": PeftModule(("attn.c_proj",)),
                 "fc1": PeftModule(("mlp.c_fc",), "column"), "fc2": PeftModule(("mlp.c_proj",))},
        ia3={"k": "attn.c_attn", "v": "attn.c_attn", "fc2": "mlp.c_proj"},
        embedding="transformer.wte", fan_in_fan_out=fan_in_fan_out)


# c_attn's LoRA B rows (and DoRA's magnitude) are packed [q; k; v] like the weight: "qkv_packed", as its bias.
PEFT = gpt2_like_peft("qkv_packed", fan_in_fan_out=True)

IGNORED: tuple[tuple[str, str | None], ...] = (
    (H + "attn.bias", None),         # causal-mask buffers saved by old transformers versions
    (H + "attn.masked_bias", None),
    ("lm_head.weight", "tied"),
)
