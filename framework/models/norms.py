"""Normalisation layers for the local (non-Transformer-Engine) layer spec.

megatron-core's torch fallback (``WrappedTorchNorm``) refuses sequence parallelism. Under SP each TP rank
normalises a different slice of the sequence, so the gradient of the (replicated) norm weight is partial
per rank; marking the weight ``sequence_parallel`` makes megatron's gradient finalisation all-reduce it
over the tensor-parallel group, exactly as it does for Transformer Engine's norms.

    RMSNorm(x)   = x / sqrt(mean(x^2) + eps) * w
    LayerNorm(x) = (x - mean(x)) / sqrt(var(x) + eps) * w + b

With ``config.layernorm_zero_centered_gamma`` the stored weight is centred on zero and the scale is
``1 + w`` (Gemma's RMSNorm, Nemotron's LayerNorm1p). Storing ``w`` as the checkpoint does, rather than
``1 + w``, keeps conversions bitwise and computes the sum in the normalisation's precision, as HF does.
"""

from __future__ import annotations

import torch
from torch import nn


def _weight(config, hidden_size: int) -> nn.Parameter:
    centred = getattr(config, "layernorm_zero_centered_gamma", False)
    init = torch.zeros if centred else torch.ones
    w = nn.Parameter(init(hidden_size, dtype=config.params_dtype))
    setattr(w, "sequence_parallel", config.sequence_parallel)
    return w


class RMSNorm(nn.Module):
    def __init__(self, config, hidden_size: int, eps: float = 1e-5, **_unused):
        super().__init__()
        self.eps = eps
        self.zero_centered = bool(getattr(config, "layernorm_zero_centered_gamma", False))
        self.weight = _weight(config, hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.zero_centered:  # Gemma: the whole product in fp32, cast at the end
            return (x32 * (1.0 + self.weight.float())).to(dtype)
        # Llama: normalise in fp32, cast back before the weight multiply.
        return self.weight * x32.to(dtype)


class LayerNorm(nn.Module):
    def __init__(self, config, hidden_size: int, eps: float = 1e-5, **_unused):
        super().__init__()
        self.eps = eps
        self.zero_centered = bool(getattr(config, "layernorm_zero_centered_gamma", False))
        self.weight = _weight(config, hidden_size)
        self.bias = nn.Parameter(torch.zeros(hidden_size, dtype=config.params_dtype))
        setattr(self.bias, "sequence_parallel", config.sequence_parallel)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight + 1 if self.zero_centered else self.weight
        return nn.functional.layer_norm(x, x.shape[-1:], weight, self.bias, self.eps)


def norm_class(normalization: str):
    return {"RMSNorm": RMSNorm, "LayerNorm": LayerNorm}[normalization]
