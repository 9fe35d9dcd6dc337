"""The architecture of a model, independent of how it is parallelised."""

from __future__ import annotations

import dataclasses
from typing import Optional

from framework.models.rope import normalize_scaling

NORMALIZATIONS = ("RMSNorm", "LayerNorm")
ACTIVATIONS = ("silu", "gelu", "gelu_tanh", "relu", "squared_relu")
POSITION_EMBEDDINGS = ("rope", "learned_absolute", "relative")


@dataclasses.dataclass
class ModelConfig:
    """Architecture hyper-parameters. Field names follow megatron-core; `family` picks the registry entry.

    The defaults describe a Llama: RMSNorm, SwiGLU MLP (``activation=silu`` with ``gated_linear_unit``),
    no biases, RoPE. Other families set the fields that differ (GPT-2: LayerNorm, GELU, biases, learned
    positions; Gemma: zero-centred norm weights and a scaled embedding; ...).
    """

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
    # -- what differs between families -------------------------------------------------------------
    normalization: str = "RMSNorm"           # RMSNorm | LayerNorm
    zero_centered_gamma: bool = False        # norm computes x_hat * (1 + w): Gemma RMSNorm, Nemotron LayerNorm1p
    activation: str = "silu"                 # silu | gelu | gelu_tanh | relu | squared_relu
    gated_linear_unit: bool = True           # MLP = act(gate x) * (up x), else act(fc1 x)
    add_bias_linear: bool = False            # biases on every linear layer
    add_qkv_bias: bool = False               # biases on the q/k/v projection only (Qwen2)
    position_embedding_type: str = "rope"    # rope | learned_absolute
    rotary_percent: float = 1.0              # fraction of each head's dims that RoPE rotates
    rope_scaling: Optional[dict] = None      # HF rope_scaling/rope_parameters of a scaled RoPE (llama3, linear)
    sliding_window: Optional[int] = None     # attend to at most this many previous tokens (Mistral)
    parallel_attention_mlp: bool = False     # x + attn(ln(x)) + mlp(ln(x)) in one residual step (Falcon)
    parallel_attention_mlp_norms: int = 1    # 1: one norm feeds both branches (Falcon-7B); 2: one each (Falcon-40B)
    embedding_multiplier: Optional[float] = None  # scale word embeddings by this (Gemma: sqrt(hidden_size))
    num_experts: int = 0                     # mixture-of-experts MLP with this many experts (0: dense)
    moe_router_topk: int = 2                 # experts per token
    # -- encoder-decoder (T5) ---------------------------------------------------------------------------
    num_decoder_layers: Optional[int] = None  # layers of the decoder stack; None: decoder-only (num_layers)
    relative_attention_num_buckets: int = 32   # position_embedding_type=relative: buckets of the T5 bias
    relative_attention_max_distance: int = 128  # relative distances >= this share the last bucket

    def __post_init__(self):
        if self.num_query_groups is None:
            self.num_query_groups = self.num_attention_heads
        if self.kv_channels is None:
            self.kv_channels = self.hidden_size // self.num_attention_heads
        for name, allowed in (("normalization", NORMALIZATIONS), ("activation", ACTIVATIONS),
                              ("position_embedding_type", POSITION_EMBEDDINGS)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name}={getattr(self, name)!r} is not one of {list(allowed)}")
        if self.parallel_attention_mlp_norms not in (1, 2):
            raise ValueError(f"parallel_attention_mlp_norms={self.parallel_attention_mlp_norms!r} must be 1 or 2")
        self.rope_scaling = normalize_scaling(self.rope_scaling, "rope_scaling")
        for name in ("sliding_window", "embedding_multiplier"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0):
                raise ValueError(f"{name}={value!r} must be a positive number or null")
        if isinstance(self.sliding_window, float):
            raise ValueError(f"sliding_window={self.sliding_window!r} must be a whole number of tokens")

    def layers_of(self, stack: str) -> int:
        """Layers in a stack: 'decoder' (a GPT's only stack, T5's decoder) or 'encoder' (T5's encoder)."""
        if stack == "decoder" and self.num_decoder_layers is not None:
            return self.num_decoder_layers
        return self.num_layers

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown model config keys {unknown}; expected some of {sorted(names)}")
        return cls(**d)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# Fields that do not decide the weights' shapes or the model's numerics: max_position_embeddings only sizes
# the RoPE cache (or, for learned positions, is checked through the tensor's shape), init_method_std only
# matters for random initialisation.
NON_ARCH_FIELDS = ("family", "max_position_embeddings", "init_method_std")


def arch_mismatches(expected: ModelConfig, found: ModelConfig) -> list[str]:
    """['field: configured X, checkpoint has Y', ...] over every architecture field."""
    out = []
    for f in dataclasses.fields(ModelConfig):
        if f.name in NON_ARCH_FIELDS:
            continue
        a, b = getattr(expected, f.name), getattr(found, f.name)
        # Floats compare to float32 precision: GGUF-derived configs store e.g. eps 1e-5 as 9.9999997e-06.
        same = abs(float(a) - float(b)) <= 1e-6 * abs(float(a)) if isinstance(a, float) and b is not None else a == b
        if not same:
            out.append(f"{f.name}: configured {a!r}, checkpoint has {b!r}")
    return out
