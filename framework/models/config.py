"""The architecture of a model, independent of how it is parallelised."""

from __future__ import annotations

import dataclasses
from typing import Optional


@dataclasses.dataclass
class ModelConfig:
    """Architecture hyper-parameters. Field names follow megatron-core; `family` picks the registry entry."""

    family: str = "llama"
    vocab_size: int = 256
    hidden_size: int = 64
    num_layers: int = 2
    num_attention_heads: int = 4
    num_query_groups: Optional[int] = None  # None: multi-head attention (one KV head per query head)
    ffn_hidden_size: int = 128
    kv_channels: Optional[int] = None  # head dim; None: hidden_size // num_attention_heads
    max_position_embeddings: int = 2048
    rotary_base: float = 10000.0
    norm_eps: float = 1e-5
    tie_word_embeddings: bool = False
    init_method_std: float = 0.02

    def __post_init__(self):
        if self.num_query_groups is None:
            self.num_query_groups = self.num_attention_heads
        if self.kv_channels is None:
            self.kv_channels = self.hidden_size // self.num_attention_heads

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown model config keys {unknown}; expected some of {sorted(names)}")
        return cls(**d)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def num_parameters(self) -> int:
        """Parameter count of a Llama-style model with these shapes (embeddings counted once if tied)."""
        h, d = self.hidden_size, self.kv_channels
        attn = h * d * (self.num_attention_heads + 2 * self.num_query_groups) + d * self.num_attention_heads * h
        mlp = 3 * h * self.ffn_hidden_size
        per_layer = attn + mlp + 2 * h
        emb = self.vocab_size * h
        return self.num_layers * per_layer + h + emb * (1 if self.tie_word_embeddings else 2)
