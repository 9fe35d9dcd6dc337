"""Hugging Face T5 (T5ForConditionalGeneration) <-> our encoder-decoder model (framework/models/t5.py).

Config (HF ``config.json`` key -> ``ModelConfig`` field)::

    d_model -> hidden_size                  d_ff -> ffn_hidden_size
    num_layers -> num_layers (encoder)      num_decoder_layers -> num_decoder_layers (default num_layers)
    num_heads -> num_attention_heads        d_kv -> kv_channels (independent of d_model / num_heads)
    layer_norm_epsilon -> norm_eps          relative_attention_num_buckets / _max_distance -> same names
    feed_forward_proj -> activation, gated_linear_unit:
        relu -> relu (t5 v1.0)              gated-gelu -> gelu_tanh, gated (t5 v1.1, flan-t5: HF's gelu_new)
        gelu -> gelu (exact)                gelu_new / gelu_pytorch_tanh -> gelu_tanh     silu -> silu
        gated-<one of those> -> the same, gated

Tied word embeddings (v1.0: ``lm_head`` is ``shared``) come with the decoder output scaled by
``d_model ** -0.5`` before the output layer; v1.1 and flan-t5 have a separate ``lm_head`` and no scaling.
transformers 5 writes ``tie_word_embeddings: true`` for *every* T5 and records the difference in
``scale_decoder_outputs`` (the untied ``lm_head`` is recognised from the weights); transformers 4 and the
released configs write ``tie_word_embeddings: false`` for v1.1. So: tied = ``tie_word_embeddings`` and,
when present, ``scale_decoder_outputs``. A transformers-5 model created with ``tie_word_embeddings=False``
but never given its own ``lm_head`` (tied *and* unscaled, no released model is) is therefore read as
untied, and its import stops at the missing ``lm_head.weight``, naming it.

Weights (:func:`weights_for`, transforms in framework/models/weight_table.py, plus ``cross_kv`` here)::

    shared                                   -> embedding.word_embeddings (vocab-parallel)
    {encoder,decoder}.block.0.layer.0.SelfAttention.relative_attention_bias
                                             -> {encoder,decoder}_relative_pos_emb.relative_attention_bias
    <stack>.block.{i}.layer.0: layer_norm, SelfAttention.q/k/v, o
                                             -> <stack>.layers.{i}.input_layernorm, self_attention.linear_qkv, linear_proj
    decoder.block.{i}.layer.1: layer_norm, EncDecAttention.q, k/v, o
                                             -> decoder.layers.{i}.pre_cross_attn_layernorm, cross_attention.linear_q,
                                                linear_kv (k, v interleaved per head), linear_proj
    <stack>.block.{i}.layer.-1: layer_norm, DenseReluDense.wi (or wi_0, wi_1 gated), wo
                                             -> <stack>.layers.{i}.pre_mlp_layernorm, mlp.linear_fc1, mlp.linear_fc2
    <stack>.final_layer_norm                 -> <stack>.final_layernorm
    lm_head (untied)                         -> output_layer

LoRA adapters (framework/checkpoint/adapter.py) carry HF PEFT's names of the same modules (``PEFT`` below,
per stack): our fused ``linear_qkv`` is SelfAttention q/k/v, ``linear_kv`` EncDecAttention k/v (split as
``cross_kv``), ``linear_fc1`` wi (wi_0/wi_1 gated); their export is an HF PEFT SEQ_2_SEQ_LM adapter.
"""

from __future__ import annotations

import torch

from framework.models import peft_names, weight_table as wt
from framework.models.config import ModelConfig
from framework.models.families import llama
from framework.models.fused_layout import shard
from framework.models.peft_names import PeftModule
from framework.models.weight_table import Transform, WeightRule

HF_MODEL_TYPES = ("t5",)

# HF activation name (ACT2FN key in feed_forward_proj) -> ModelConfig.activation
_ACTIVATIONS = {"relu": "relu", "gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh",
                "silu": "silu"}


def _activation(hf: dict) -> tuple[str, bool]:
    proj = hf.get("feed_forward_proj", "relu")
    parts = str(proj).split("-")
    gated = len(parts) == 2 and parts[0] == "gated"
    if len(parts) > 2 or (len(parts) == 2 and not gated):
        raise ValueError(f"config.json: feed_forward_proj={proj!r} is not 'ACT' or 'gated-ACT'")
    act = "gelu_new" if proj == "gated-gelu" else parts[-1]  # transformers' own special case
    if act not in _ACTIVATIONS:
        raise ValueError(f"config.json: feed_forward_proj={proj!r}: activation {act!r} is not implemented; "
                         f"implemented: {sorted(_ACTIVATIONS)} (optionally 'gated-')")
    return _ACTIVATIONS[act], gated


def _feed_forward_proj(cfg: ModelConfig) -> str:
    if cfg.gated_linear_unit:
        names = {"gelu_tanh": "gated-gelu", "relu": "gated-relu", "silu": "gated-silu"}
    else:
        names = {"gelu_tanh": "gelu_new", "gelu": "gelu", "relu": "relu", "silu": "silu"}
    if cfg.activation not in names:
        raise ValueError(f"activation={cfg.activation!r} with gated_linear_unit={cfg.gated_linear_unit} has no "
                         f"Hugging Face T5 feed_forward_proj")
    return names[cfg.activation]


def _tied(hf: dict) -> bool:
    tie = bool(hf.get("tie_word_embeddings", True))
    scale = hf.get("scale_decoder_outputs")
    if scale is None:  # transformers 4 and the released configs
        return tie
    if bool(scale) and not tie:
        raise ValueError("config.json: scale_decoder_outputs=true with tie_word_embeddings=false (a separate "
                         "lm_head on scaled decoder outputs) is not implemented")
    return bool(scale)


def config_from_hf(hf: dict) -> ModelConfig:
    """ModelConfig of an HF T5 ``config.json`` (as a dict). Raises ValueError naming a bad key."""
    llama.check_model_type(hf, HF_MODEL_TYPES, "t5")
    llama.require(hf, ("vocab_size", "d_model", "d_kv", "d_ff", "num_layers", "num_heads"))
    if hf.get("is_encoder_decoder", True) is False or hf.get("is_decoder"):
        raise ValueError("config.json: is_encoder_decoder=false / is_decoder=true: only the encoder-decoder "
                         "T5ForConditionalGeneration is implemented")
    activation, gated = _activation(hf)
    heads = int(hf["num_heads"])
    layers = int(hf["num_layers"])
    decoder_layers = hf.get("num_decoder_layers")
    return ModelConfig(
        family="t5",
        vocab_size=int(hf["vocab_size"]),
        hidden_size=int(hf["d_model"]),
        num_layers=layers,
        num_decoder_layers=layers if decoder_layers is None else int(decoder_layers),
        num_attention_heads=heads,
        num_query_groups=heads,
        ffn_hidden_size=int(hf["d_ff"]),
        kv_channels=int(hf["d_kv"]),
        max_position_embeddings=int(hf.get("n_positions", 512)),
        norm_eps=float(hf.get("layer_norm_epsilon", 1e-6)),
        tie_word_embeddings=_tied(hf),
        init_method_std=float(hf.get("initializer_factor", 1.0)) * int(hf["d_model"]) ** -0.5,
        normalization="RMSNorm",
        activation=activation,
        gated_linear_unit=gated,
        add_bias_linear=False,
        position_embedding_type="relative",
        relative_attention_num_buckets=int(hf.get("relative_attention_num_buckets", 32)),
        relative_attention_max_distance=int(hf.get("relative_attention_max_distance", 128)),
    )


def hf_config(cfg: ModelConfig, dtype: str = "float32") -> dict:
    """config.json that transformers 4 and 5 read as this model (tied: scaled outputs, no lm_head)."""
    tied = cfg.tie_word_embeddings
    return {
        "architectures": ["T5ForConditionalGeneration"],
        "model_type": "t5",
        "vocab_size": cfg.vocab_size,
        "d_model": cfg.hidden_size,
        "d_kv": cfg.kv_channels,
        "d_ff": cfg.ffn_hidden_size,
        "num_layers": cfg.num_layers,
        "num_decoder_layers": cfg.layers_of("decoder"),
        "num_heads": cfg.num_attention_heads,
        "relative_attention_num_buckets": cfg.relative_attention_num_buckets,
        "relative_attention_max_distance": cfg.relative_attention_max_distance,
        "dropout_rate": 0.1,
        "layer_norm_epsilon": cfg.norm_eps,
        "initializer_factor": 1.0,
        "feed_forward_proj": _feed_forward_proj(cfg),
        "is_encoder_decoder": True,
        "use_cache": True,
        "pad_token_id": 0,
        "eos_token_id": 1,
        "decoder_start_token_id": 0,
        "tie_word_embeddings": tied,
        "scale_decoder_outputs": tied,
        "torch_dtype": dtype,
        "dtype": dtype,
    }


def _stacks(cfg: ModelConfig):
    return (("encoder", cfg.num_layers, False), ("decoder", cfg.layers_of("decoder"), True))


def hf_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor name an HF T5 checkpoint of this config holds, with its shape."""
    h, f, V, n = cfg.hidden_size, cfg.ffn_hidden_size, cfg.vocab_size, cfg.num_attention_heads
    inner = n * cfg.kv_channels
    attn = {"q.weight": (inner, h), "k.weight": (inner, h), "v.weight": (inner, h), "o.weight": (h, inner)}
    mlp = ({"wi_0.weight": (f, h), "wi_1.weight": (f, h)} if cfg.gated_linear_unit else {"wi.weight": (f, h)})
    mlp = {**mlp, "wo.weight": (h, f)}
    out = {"shared.weight": (V, h)}
    for stack, layers, is_decoder in _stacks(cfg):
        for i in range(layers):
            p = f"{stack}.block.{i}.layer."
            out.update({f"{p}0.SelfAttention.{k}": s for k, s in attn.items()})
            if i == 0:
                out[f"{p}0.SelfAttention.relative_attention_bias.weight"] = (cfg.relative_attention_num_buckets, n)
            out[f"{p}0.layer_norm.weight"] = (h,)
            ff = 1
            if is_decoder:
                out.update({f"{p}1.EncDecAttention.{k}": s for k, s in attn.items()})
                out[f"{p}1.layer_norm.weight"] = (h,)
                ff = 2
            out.update({f"{p}{ff}.DenseReluDense.{k}": s for k, s in mlp.items()})
            out[f"{p}{ff}.layer_norm.weight"] = (h,)
        out[f"{stack}.final_layer_norm.weight"] = (h,)
    if not cfg.tie_word_embeddings:
        out["lm_head.weight"] = (V, h)
    return out


def _kv_forward(ts, ctx):
    """HF k, v [n*d, h] -> this rank's shard of megatron's cross-attention ``linear_kv``, whose rows are
    [k_0; v_0; k_1; v_1; ...] per head (CrossAttention splits each head's 2d outputs into key, value)."""
    k, v = ts
    n = ctx.num_heads
    fused = torch.cat([k.reshape(n, -1, *k.shape[1:]), v.reshape(n, -1, *v.shape[1:])], dim=1)
    return shard(fused.reshape(-1, *k.shape[1:]), 0, ctx.tp_rank, ctx.tp_size)


def _kv_inverse(shards, ctx):
    fused = torch.cat(shards, dim=0)
    per_head = fused.reshape(ctx.num_heads, -1, *fused.shape[1:])
    k, v = per_head.chunk(2, dim=1)
    return [k.reshape(-1, *fused.shape[1:]).contiguous(), v.reshape(-1, *fused.shape[1:]).contiguous()]


CROSS_KV = Transform(_kv_forward, _kv_inverse, n_hf=2)
wt.register_transform("cross_kv", CROSS_KV)


def _attention(hf: str, ours: str) -> tuple[WeightRule, ...]:
    return (
        WeightRule((hf + "layer_norm.weight",), ours + "input_layernorm.weight", "replicate"),
        WeightRule(tuple(hf + f"SelfAttention.{x}.weight" for x in "qkv"), ours + "self_attention.linear_qkv.weight",
                   "qkv"),
        WeightRule((hf + "SelfAttention.o.weight",), ours + "self_attention.linear_proj.weight", "row"),
    )


def _cross_attention(hf: str, ours: str) -> tuple[WeightRule, ...]:
    return (
        WeightRule((hf + "layer_norm.weight",), ours + "pre_cross_attn_layernorm.weight", "replicate"),
        WeightRule((hf + "EncDecAttention.q.weight",), ours + "cross_attention.linear_q.weight", "column"),
        WeightRule((hf + "EncDecAttention.k.weight", hf + "EncDecAttention.v.weight"),
                   ours + "cross_attention.linear_kv.weight", "cross_kv"),
        WeightRule((hf + "EncDecAttention.o.weight",), ours + "cross_attention.linear_proj.weight", "row"),
    )


def _mlp(hf: str, ours: str, gated: bool) -> tuple[WeightRule, ...]:
    fc1 = (WeightRule((hf + "DenseReluDense.wi_0.weight", hf + "DenseReluDense.wi_1.weight"),
                      ours + "mlp.linear_fc1.weight", "gate_up") if gated else
           WeightRule((hf + "DenseReluDense.wi.weight",), ours + "mlp.linear_fc1.weight", "column"))
    return (
        WeightRule((hf + "layer_norm.weight",), ours + "pre_mlp_layernorm.weight", "replicate"),
        fc1,
        WeightRule((hf + "DenseReluDense.wo.weight",), ours + "mlp.linear_fc2.weight", "row"),
    )


_ENC, _DEC = "encoder.block.{i}.layer.", "decoder.block.{i}.layer."
_OURS_ENC, _OURS_DEC = "encoder.layers.{i}.", "decoder.layers.{i}."
_BIAS = "block.0.layer.0.SelfAttention.relative_attention_bias.weight"


def weights_for(cfg: ModelConfig) -> tuple[WeightRule, ...]:
    """The table of a T5 of this config: the MLP's tensors differ between plain (wi) and gated (wi_0, wi_1)."""
    gated = cfg.gated_linear_unit
    return (
        WeightRule(("shared.weight",), "embedding.word_embeddings.weight", "vocab"),
        WeightRule(("encoder." + _BIAS,), "encoder_relative_pos_emb.relative_attention_bias.weight", "replicate"),
        *_attention(_ENC + "0.", _OURS_ENC),
        *_mlp(_ENC + "1.", _OURS_ENC, gated),
        WeightRule(("encoder.final_layer_norm.weight",), "encoder.final_layernorm.weight", "replicate"),
        WeightRule(("decoder." + _BIAS,), "decoder_relative_pos_emb.relative_attention_bias.weight", "replicate"),
        *_attention(_DEC + "0.", _OURS_DEC),
        *_cross_attention(_DEC + "1.", _OURS_DEC),
        *_mlp(_DEC + "2.", _OURS_DEC, gated),
        WeightRule(("decoder.final_layer_norm.weight",), "decoder.final_layernorm.weight", "replicate"),
        WeightRule(("lm_head.weight",), "output_layer.weight", "vocab", when="untied"),
    )


# Both MLP variants; the registry takes the rules of a given config from weights_for.
WEIGHTS: tuple[WeightRule, ...] = tuple(dict.fromkeys(
    weights_for(ModelConfig(family="t5", gated_linear_unit=False))
    + weights_for(ModelConfig(family="t5", gated_linear_unit=True))))

# Copies of ``shared`` that transformers 4 checkpoints may hold, and lm_head when it is ``shared``.
IGNORED: tuple[tuple[str, str | None], ...] = (
    ("encoder.embed_tokens.weight", None),
    ("decoder.embed_tokens.weight", None),
    ("decoder.block.0.layer.1.EncDecAttention.relative_attention_bias.weight", None),  # unused by transformers too
    ("lm_head.weight", "tied"),
)

# HF PEFT module names (framework/models/peft_names.py) of T5ForConditionalGeneration, per stack under
# ``{stack}.block.{i}.layer.``: self-attention is sub-layer 0, the decoder's cross-attention (EncDecAttention)
# sub-layer 1, the MLP the last one (1 in the encoder, 2 in the decoder). Output rows split as the table
# above splits the base weights: qkv, gate_up (wi_0 / wi_1), cross_kv (k / v interleaved per head).
def _peft_stack(stack: str, mlp_sublayer: int) -> peft_names.PeftNames:
    mlp = f"{mlp_sublayer}.DenseReluDense."
    targets = {"qkv": PeftModule(("0.SelfAttention.q", "0.SelfAttention.k", "0.SelfAttention.v"), "qkv"),
               "proj": PeftModule(("0.SelfAttention.o",)),
               "fc1": PeftModule((mlp + "wi_0", mlp + "wi_1"), "gate_up"),
               "fc2": PeftModule((mlp + "wo",))}
    if stack == "decoder":
        targets.update({"cross_q": PeftModule(("1.EncDecAttention.q",)),
                        "cross_kv": PeftModule(("1.EncDecAttention.k", "1.EncDecAttention.v"), "cross_kv"),
                        "cross_proj": PeftModule(("1.EncDecAttention.o",))})
    return peft_names.PeftNames(layer=f"{stack}.block.{{i}}.layer.", targets=targets, ia3={}, embedding="shared",
                                plain_fc1=PeftModule((mlp + "wi",)), task_type="SEQ_2_SEQ_LM")


_SHARED_EMBEDDING = ("the shared embedding feeds both stacks and the fine-tuning job does not adapt it for T5; "
                     "LoRA targets of a T5: qkv, proj, fc1, fc2 (both stacks), cross_q, cross_kv, cross_proj")
PEFT = peft_names.PeftNames(
    layer="", targets={}, ia3={}, embedding="shared", task_type="SEQ_2_SEQ_LM",
    refused={"embedding": _SHARED_EMBEDDING, "output": _SHARED_EMBEDDING},
    stacks={"encoder": _peft_stack("encoder", 1), "decoder": _peft_stack("decoder", 2)})
