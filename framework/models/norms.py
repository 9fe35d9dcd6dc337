"""Normalisation layers for the local (non-Transformer-Engine) layer spec.

megatron-core's torch fallback (``WrappedTorchNorm``) refuses sequence parallelism. Under SP each TP rank
normalises a different slice of the sequence, so the gradient of the (replicated) norm weight is partial
per rank; marking the weight ``sequence_parallel`` makes megatron's gradient finalisation all-reduce it
over the tensor-parallel group, exactly as it does for Transformer Engine's norms.

    RMSNorm(x)   = x / sqrt(mean(x^2) + eps) * w
    LayerNorm(x) = (x - mean(x)) / sqrt(var(x) + eps) * w + b
"""

from __future__ import annotations

import torch
from torch import nn


class RMSNorm(nn.Module):
    def __init__(self, config, hidden_size: int, eps: float = 1e-5, **_unused):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size, dtype=config.params_dtype))
        setattr(self.weight, "sequence_parallel", config.sequence_parallel)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32 as HF Llama does, then cast back before the weight multiply.
        dtype = x.dtype
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(dtype)


class LayerNorm(nn.Module):
    def __init__(self, config, hidden_size: int, eps: float = 1e-5, **_unused):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size, dtype=config.params_dtype))
        self.bias = nn.Parameter(torch.zeros(hidden_size, dtype=config.params_dtype))
        for p in (self.weight, self.bias):
            setattr(p, "sequence_parallel", config.sequence_parallel)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.layer_norm(x, x.shape[-1:], self.weight, self.bias, self.eps)


def norm_class(normalization: str):
    return {"RMSNorm": RMSNorm, "LayerNorm": LayerNorm}[normalization]
