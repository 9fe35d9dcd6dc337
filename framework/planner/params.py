"""Parameter counts of a ModelConfig, from the shapes alone (no model is built).

Counted as megatron-core holds them (what tests/test_planner.py checks against built models)::

    embedding       V h  (+ P h learned positions)
    per layer       norms: h each (+ h bias for LayerNorm); two, one for a parallel attention/MLP block
                    qkv  h (n + 2g) d (+ (n + 2g) d bias)      proj  n d h (+ h bias)
                    MLP  dense: h F + f h (F = 2f gated, else f) (+ F + h biases)
                         MoE: E x dense (no biases) + router E h
    final norm      h (+ h)
    output layer    V h unless tied

n query heads, g KV heads, d head dim, f MLP width, E experts.

Encoder-decoder (T5, ``num_decoder_layers`` set): the layers above are the encoder's (``per_layer``, final
norm in ``final``); ``decoder`` holds the decoder stack: each layer is an encoder layer plus cross-attention
(q h n d, kv 2 h n d, proj n d h) and its norm, then the final norm; each stack has a relative-position
table of ``relative_attention_num_buckets`` x n (the encoder's in ``embedding``, the decoder's in ``decoder``).
"""

from __future__ import annotations

import dataclasses

from framework.models.config import ModelConfig


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


def count(cfg: ModelConfig) -> ParamCounts:
    h, d, f, V = cfg.hidden_size, cfg.kv_channels, cfg.ffn_hidden_size, cfg.vocab_size
    n, g = cfg.num_attention_heads, cfg.num_query_groups
    bias = cfg.add_bias_linear
    qkv_w, qkv_b = h * (n + 2 * g) * d, (n + 2 * g) * d if (bias or cfg.add_qkv_bias) else 0
    proj_w, proj_b = n * d * h, h if bias else 0
    F = 2 * f if cfg.gated_linear_unit else f
    mlp_w, mlp_b = h * F + f * h, (F + h) if bias else 0
    if cfg.num_experts:
        mlp_w, mlp_b = cfg.num_experts * mlp_w, 0
        router = cfg.num_experts * h
    else:
        router = 0
    norms = _norm(cfg) * (1 if cfg.parallel_attention_mlp else 2)
    linear = qkv_w + proj_w + mlp_w
    per_layer = linear + qkv_b + proj_b + mlp_b + router + norms
    embedding = V * h + (cfg.max_position_embeddings * h if cfg.position_embedding_type == "learned_absolute" else 0)
    final = _norm(cfg) + (0 if cfg.tie_word_embeddings else V * h)
    decoder = 0
    if cfg.num_decoder_layers is not None:  # T5: see the module docstring
        table = cfg.relative_attention_num_buckets * n if cfg.position_embedding_type == "relative" else 0
        cross = h * n * d + 2 * h * g * d + n * d * h + _norm(cfg)  # q, kv, proj (T5 has no biases), norm
        embedding += table
        decoder = cfg.num_decoder_layers * (per_layer + cross) + _norm(cfg) + table
    return ParamCounts(embedding, per_layer, final, linear, decoder)


LORA_TARGETS = ("qkv", "proj", "fc1", "fc2")


def lora_per_layer(cfg: ModelConfig, rank: int, targets=LORA_TARGETS) -> int:
    """Trainable LoRA elements of one layer: r (in + out) per wrapped linear, fused qkv / gate-up wrapped once
    (one A shared by the fused outputs, as framework/peft/lora.py wraps them)."""
    h, d, f = cfg.hidden_size, cfg.kv_channels, cfg.ffn_hidden_size
    n, g = cfg.num_attention_heads, cfg.num_query_groups
    F = 2 * f if cfg.gated_linear_unit else f
    experts = max(1, cfg.num_experts)
    shapes = {"qkv": (h, (n + 2 * g) * d, 1), "proj": (n * d, h, 1), "fc1": (h, F, experts), "fc2": (f, h, experts)}
    return sum(rank * (i + o) * k for t in targets for i, o, k in [shapes[t]])
