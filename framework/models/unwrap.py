"""The megatron model inside its wrappers: DDP, Float16Module and our own (anything with a ``.module``)."""

from __future__ import annotations

from torch import nn


def unwrap_model(model: nn.Module) -> nn.Module:
    """The GPTModel / T5Model (the module with a ``.decoder``) inside ``model``'s wrappers."""
    m = model
    while not hasattr(m, "decoder") and hasattr(m, "module"):
        m = m.module
    if not hasattr(m, "decoder"):
        raise TypeError(f"expected a megatron GPTModel or T5Model (with .decoder), got {type(model).__name__}")
    return m
