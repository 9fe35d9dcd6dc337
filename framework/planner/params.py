"""Parameter counts of a ModelConfig, from the shapes alone (no model is built): of the whole model, or of
one tensor-parallel rank at TP = t.

Counted as megatron-core holds them (what tests/planner/test_planner.py checks against built models)::

    embedding       V h / t  (+ P h learned positions, whole on every rank)
    per layer       norms: h each (+ h bias for LayerNorm), whole on every rank; two, one for a parallel
                    attention/MLP block
                    qkv  h (n + 2g') d / t (+ (n + 2g') d / t bias)     proj  n d h / t (+ h bias, whole)
                    MLP  dense: (h F + f h) / t (F = 2f gated, else f) (+ F / t + h biases, the second whole)
                         MoE: E x dense weights / t (no biases) + router E h (whole)
    final norm      h (+ h), whole
    output layer    V h / t unless tied

n query heads, g KV heads, d head dim, f MLP width, E experts; g' = g, or t when TP exceeds the KV heads:
each KV head is then held by t / g ranks (framework/models/kv_replication.py), so one rank's qkv is
(n / t + 2) d rows and the ranks together hold 2 (t - g) d h K/V weights more than the model has. t = 1
gives the whole model.

Encoder-decoder (T5, ``num_decoder_layers`` set): the layers above are the encoder's (``per_layer``, final
norm in ``final``); ``decoder`` holds the decoder stack: each layer is an encoder layer plus cross-attention
(q h n d / t, kv 2 h g' d / t, proj n d h / t) and its norm, then the final norm; each stack has a
relative-position table of ``relative_attention_num_buckets`` x n, whole on every rank (the encoder's in
``embedding``, the decoder's in ``decoder``).
"""

from __future__ import annotations

import dataclasses

from framework.models.config import ModelConfig
from framework.models.kv_replication import built_groups
from framework.peft import moe


@dataclasses.dataclass(frozen=True)
class ParamCounts:
    embedding: int   # word (+ position) embeddings: first stage
    per_layer: int   # one transformer layer
    final: int       # final norm + output layer: last stage
    linear_per_layer: int  # weights of the layer's linear layers (what QLoRA quantises)
    decoder: int = 0  # encoder-decoder: the whole decoder stack (layers, final norm, relative table); else 0

    def total(self, num_layers: int) -> int:
        return self.embedding + num_layers * self.per_layer + self.final + self.decoder


def _norm(cfg: ModelConfig) -> int:
    return cfg.hidden_size * (2 if cfg.normalization == "LayerNorm" else 1)


def count(cfg: ModelConfig, tp: int = 1) -> ParamCounts:
    """The counts of one rank at TP = ``tp`` (the module docstring); ``tp=1``: the whole model."""
    h, d, f, V = cfg.hidden_size, cfg.kv_channels, cfg.ffn_hidden_size, cfg.vocab_size
    n, g, t = cfg.num_attention_heads, built_groups(cfg, tp), tp
    bias = cfg.add_bias_linear
    qkv_w, qkv_b = h * (n + 2 * g) * d // t, (n + 2 * g) * d // t if (bias or cfg.add_qkv_bias) else 0
    proj_w, proj_b = n * d * h // t, h if bias else 0
    F = 2 * f if cfg.gated_linear_unit else f
    mlp_w, mlp_b = (h * F + f * h) // t, (F // t + h) if bias else 0
    if cfg.num_experts:  # megatron's expert tensor parallelism defaults to TP: every expert is sharded like a dense MLP
        mlp_w, mlp_b = cfg.num_experts * mlp_w, 0
        router = cfg.num_experts * h
    else:
        router = 0
    norms = _norm(cfg) * (1 if cfg.parallel_attention_mlp else 2)
    linear = qkv_w + proj_w + mlp_w
    per_layer = linear + qkv_b + proj_b + mlp_b + router + norms
    embedding = V * h // t + (cfg.max_position_embeddings * h if cfg.position_embedding_type == "learned_absolute"
                              else 0)
    final = _norm(cfg) + (0 if cfg.tie_word_embeddings else V * h // t)
    decoder = 0
    if cfg.num_decoder_layers is not None:  # T5: see the module docstring
        table = cfg.relative_attention_num_buckets * n if cfg.position_embedding_type == "relative" else 0
        cross = (h * n * d + 2 * h * g * d + n * d * h) // t + _norm(cfg)  # q, kv, proj (T5 has no biases), norm
        embedding += table
        decoder = cfg.num_decoder_layers * (per_layer + cross) + _norm(cfg) + table
    return ParamCounts(embedding, per_layer, final, linear, decoder)


LORA_TARGETS = ("qkv", "proj", "fc1", "fc2")
#: the cross-attention targets of a T5 decoder layer (framework/peft/wrapping.py's CROSS_TARGETS)
CROSS_TARGETS = ("cross_q", "cross_kv", "cross_proj")


def lora_per_layer(cfg: ModelConfig, rank: int, targets=LORA_TARGETS, tp: int = 1, magnitude: bool = False,
                   decoder: bool = False) -> int:
    """Trainable LoRA elements of one layer on one rank at TP = ``tp``: r (in + out) per wrapped linear, fused
    qkv / gate-up wrapped once (one A shared by the fused outputs, as framework/peft/lora.py wraps them).
    A column-parallel base (qkv, fc1) shards B's out rows and keeps A whole, a row-parallel one (proj, fc2)
    shards A's in columns and keeps B whole; qkv's out rows include the KV copies (count's g').
    ``magnitude``: plus DoRA's magnitude, one per out row (sharded like B).

    ``decoder``: a T5 decoder layer, whose cross-attention targets count too: cross_q (h -> n d / t) and
    cross_kv (h -> 2 g' d / t, one A for keys and values) column-parallel, cross_proj (n d / t -> h)
    row-parallel. A GPT's or T5 encoder's layer has no cross-attention: cross targets add nothing there (the
    config check refuses them for a decoder-only model)."""
    if cfg.num_experts and set(targets) & {"fc1", "fc2"}:
        raise ValueError(moe.config_problems({"targets": list(targets)}, cfg, moe.MLP_TARGETS, ("qkv", "proj"))[0])
    h, d, f = cfg.hidden_size, cfg.kv_channels, cfg.ffn_hidden_size
    n, g = cfg.num_attention_heads, built_groups(cfg, tp)
    F = 2 * f if cfg.gated_linear_unit else f
    if decoder and cfg.num_decoder_layers is None:
        raise ValueError(f"a decoder layer's LoRA count needs an encoder-decoder model (T5); "
                         f"family {cfg.family!r} has no num_decoder_layers")
    column = {"qkv": (h, (n + 2 * g) * d // tp), "fc1": (h, F // tp)}  # (in, out) on one rank
    row = {"proj": (n * d // tp, h), "fc2": (f // tp, h)}
    cross = {"cross_q": (h, n * d // tp), "cross_kv": (h, 2 * g * d // tp), "cross_proj": (n * d // tp, h)}
    shapes = {**column, **row, **cross}
    return sum(rank * (i + o) + (o if magnitude else 0) for t in targets if decoder or t not in cross
               for i, o in [shapes[t]])
