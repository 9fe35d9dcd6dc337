"""Hugging Face Llama <-> our Llama-style GPTModel: the config mapping and the weight name table.

Config (HF ``config.json`` key -> ``ModelConfig`` field)::

    hidden_size -> hidden_size              intermediate_size -> ffn_hidden_size
    num_hidden_layers -> num_layers         num_attention_heads -> num_attention_heads
    num_key_value_heads -> num_query_groups head_dim -> kv_channels
    rope_theta -> rotary_base               rms_norm_eps -> norm_eps
    tie_word_embeddings, vocab_size, max_position_embeddings -> same names

transformers 5 writes ``rope_parameters = {rope_theta, rope_type}``; older files write ``rope_theta`` and
``rope_scaling``. Both are read. What our model does not implement is refused with a ValueError naming
the key, never silently approximated: RoPE scaling (llama3, linear, yarn, ...), attention/MLP biases and
activations other than SiLU.

Weights (:data:`LLAMA_WEIGHTS`): one row per megatron parameter, ``{i}`` standing for the layer index
(global in HF names, local to the pipeline stage in ours). The transforms name how HF tensors become
this TP rank's shard (see fused_layout.py for the fused layouts)::

    replicate  W                                     norms
    vocab      rows [r*V/tp, (r+1)*V/tp) of W        embedding, output layer (vocab-parallel)
    row        columns [r*I/tp, (r+1)*I/tp) of W     linear_proj, linear_fc2 (row-parallel)
    qkv        shard_0(fuse_qkv(q, k, v))            linear_qkv, grouped by query group
    gate_up    cat(shard_0(gate), shard_0(up))       linear_fc1 (fused per rank)
"""

from __future__ import annotations

import dataclasses
import re
from typing import Callable, Optional

import torch

from framework.models.config import ModelConfig
from framework.models.fused_layout import fuse_gate_up, fuse_qkv, shard

# ---------------------------------------------------------------------------------------------------
# config.json -> ModelConfig
# ---------------------------------------------------------------------------------------------------

SUPPORTED_MODEL_TYPES = ("llama",)


def _rope(hf: dict) -> float:
    """rope_theta from either config format; refuse any RoPE scaling."""
    params = hf.get("rope_parameters") or {}
    scaling = hf.get("rope_scaling")
    for key, node in (("rope_parameters", params), ("rope_scaling", scaling)):
        if node:
            kind = node.get("rope_type", node.get("type", "default"))
            if kind not in (None, "default"):
                raise ValueError(f"config.json: {key}.rope_type={kind!r} (RoPE scaling) is not implemented; "
                                 f"only unscaled RoPE (rope_type 'default' or rope_scaling null) is supported")
    theta = params.get("rope_theta", hf.get("rope_theta", 10000.0))
    return float(theta)


def config_from_hf(hf: dict) -> ModelConfig:
    """ModelConfig of an HF Llama ``config.json`` (as a dict). Raises ValueError naming a bad key."""
    model_type = hf.get("model_type", "llama")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(f"config.json: model_type={model_type!r} is not a Llama model; "
                         f"supported: {list(SUPPORTED_MODEL_TYPES)}")
    for key in ("attention_bias", "mlp_bias"):
        if hf.get(key):
            raise ValueError(f"config.json: {key}=true is not implemented (our Llama has no biases)")
    act = hf.get("hidden_act", "silu")
    if act != "silu":
        raise ValueError(f"config.json: hidden_act={act!r} is not implemented; only 'silu' (SwiGLU) is")
    missing = [k for k in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                           "vocab_size") if k not in hf]
    if missing:
        raise ValueError(f"config.json: missing required key(s) {missing}")
    heads = int(hf["num_attention_heads"])
    return ModelConfig(
        family="llama",
        vocab_size=int(hf["vocab_size"]),
        hidden_size=int(hf["hidden_size"]),
        num_layers=int(hf["num_hidden_layers"]),
        num_attention_heads=heads,
        num_query_groups=int(hf.get("num_key_value_heads") or heads),
        ffn_hidden_size=int(hf["intermediate_size"]),
        kv_channels=int(hf.get("head_dim") or hf["hidden_size"] // heads),
        max_position_embeddings=int(hf.get("max_position_embeddings", 2048)),
        rotary_base=_rope(hf),
        norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        init_method_std=float(hf.get("initializer_range", 0.02)),
    )


# Fields that decide the weights' shapes or the model's numerics: a checkpoint and a configured
# architecture must agree on these (max_position_embeddings only sizes the RoPE cache).
ARCH_FIELDS = ("vocab_size", "hidden_size", "num_layers", "num_attention_heads", "num_query_groups",
               "ffn_hidden_size", "kv_channels", "rotary_base", "norm_eps", "tie_word_embeddings")


def arch_mismatches(expected: ModelConfig, found: ModelConfig) -> list[str]:
    """['field: expected X, checkpoint has Y', ...] over :data:`ARCH_FIELDS`."""
    out = []
    for name in ARCH_FIELDS:
        a, b = getattr(expected, name), getattr(found, name)
        # Floats compare to float32 precision: GGUF-derived configs store e.g. eps 1e-5 as 9.9999997e-06.
        same = abs(float(a) - float(b)) <= 1e-6 * abs(float(a)) if isinstance(a, float) else a == b
        if not same:
            out.append(f"{name}: configured {a!r}, checkpoint has {b!r}")
    return out


# ---------------------------------------------------------------------------------------------------
# weight name table
# ---------------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class ShardContext:
    """What a transform needs to know about the layout: this TP rank and the attention shapes."""

    tp_rank: int
    tp_size: int
    num_heads: int
    num_groups: int


def _replicate(ts, ctx):
    return ts[0]


def _vocab(ts, ctx):
    return shard(ts[0], 0, ctx.tp_rank, ctx.tp_size)


def _row(ts, ctx):
    return shard(ts[0], 1, ctx.tp_rank, ctx.tp_size)


def _qkv(ts, ctx):
    q, k, v = ts
    return shard(fuse_qkv(q, k, v, ctx.num_heads, ctx.num_groups), 0, ctx.tp_rank, ctx.tp_size)


def _gate_up(ts, ctx):
    gate, up = ts
    return fuse_gate_up(gate, up, ctx.tp_rank, ctx.tp_size)


TRANSFORMS: dict[str, Callable] = {
    "replicate": _replicate, "vocab": _vocab, "row": _row, "qkv": _qkv, "gate_up": _gate_up,
}


@dataclasses.dataclass(frozen=True)
class WeightRule:
    """HF tensor name(s) -> one megatron parameter, through a named transform.

    ``te_ours`` is the same parameter's name under the Transformer Engine layer spec, where the norm
    before attention/MLP is fused into the following linear layer. ``when`` restricts the rule to
    tied or untied checkpoints.
    """

    hf: tuple[str, ...]
    ours: str
    transform: str
    te_ours: Optional[str] = None
    when: Optional[str] = None  # None | "tied" | "untied"

    @property
    def per_layer(self) -> bool:
        return "{i}" in self.ours

    def applies(self, tied: bool) -> bool:
        return self.when is None or (self.when == "tied") == tied


_L = "model.layers.{i}."
_D = "decoder.layers.{i}."

LLAMA_WEIGHTS: tuple[WeightRule, ...] = (
    WeightRule(("model.embed_tokens.weight",), "embedding.word_embeddings.weight", "vocab"),
    WeightRule((_L + "input_layernorm.weight",), _D + "input_layernorm.weight", "replicate",
               te_ours=_D + "self_attention.linear_qkv.layer_norm_weight"),
    WeightRule((_L + "self_attn.q_proj.weight", _L + "self_attn.k_proj.weight", _L + "self_attn.v_proj.weight"),
               _D + "self_attention.linear_qkv.weight", "qkv"),
    WeightRule((_L + "self_attn.o_proj.weight",), _D + "self_attention.linear_proj.weight", "row"),
    WeightRule((_L + "post_attention_layernorm.weight",), _D + "pre_mlp_layernorm.weight", "replicate",
               te_ours=_D + "mlp.linear_fc1.layer_norm_weight"),
    WeightRule((_L + "mlp.gate_proj.weight", _L + "mlp.up_proj.weight"), _D + "mlp.linear_fc1.weight", "gate_up"),
    WeightRule((_L + "mlp.down_proj.weight",), _D + "mlp.linear_fc2.weight", "row"),
    WeightRule(("model.norm.weight",), "decoder.final_layernorm.weight", "replicate"),
    WeightRule(("lm_head.weight",), "output_layer.weight", "vocab", when="untied"),
    # Tied: megatron keeps a copy of the embedding on the last stage when it is not the first.
    WeightRule(("model.embed_tokens.weight",), "output_layer.weight", "vocab", when="tied"),
)

# HF tensors that carry no weights of ours: RoPE caches of old checkpoints, and lm_head when it is a
# (redundant) copy of the tied embedding.
LLAMA_IGNORED: tuple[tuple[str, Optional[str]], ...] = (
    (_L + "self_attn.rotary_emb.inv_freq", None),
    ("model.rotary_emb.inv_freq", None),
    ("lm_head.weight", "tied"),
)


def name_regex(pattern: str) -> re.Pattern:
    """'model.layers.{i}.mlp.up_proj.weight' -> a regex whose group 'i' is the layer index."""
    return re.compile("^" + re.escape(pattern).replace(re.escape("{i}"), r"(?P<i>\d+)") + "$")


def classify_hf_name(name: str, tied: bool, num_layers: int) -> Optional[int | str]:
    """For a tensor name in an HF checkpoint: its layer index, 'global' (no layer), 'ignored', or None
    when the name is unknown. Raises ValueError for a layer index >= num_layers."""
    for pattern, when in LLAMA_IGNORED:
        if (when is None or (when == "tied") == tied) and name_regex(pattern).match(name):
            return "ignored"
    for rule in LLAMA_WEIGHTS:
        if not rule.applies(tied):
            continue
        for pattern in rule.hf:
            m = name_regex(pattern).match(name)
            if m:
                if "i" not in m.groupdict():
                    return "global"
                layer = int(m.group("i"))
                if layer >= num_layers:
                    raise ValueError(f"HF tensor {name!r} belongs to layer {layer}, but the model has "
                                     f"{num_layers} layers")
                return layer
    return None


def apply_transform(rule: WeightRule, tensors: list[torch.Tensor], ctx: ShardContext) -> torch.Tensor:
    return TRANSFORMS[rule.transform](tensors, ctx)
