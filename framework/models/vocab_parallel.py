"""Logits split over the vocabulary by tensor parallelism, made whole on every rank."""

from __future__ import annotations

import torch


def gather_vocab_parallel(logits: torch.Tensor) -> torch.Tensor:
    """[..., V/tp] on each TP rank -> [..., V] on every TP rank (differentiable: its backward keeps
    this rank's slice of the gradient)."""
    from megatron.core import parallel_state, tensor_parallel

    if parallel_state.get_tensor_model_parallel_world_size() == 1:
        return logits
    return tensor_parallel.gather_from_tensor_model_parallel_region(logits)
