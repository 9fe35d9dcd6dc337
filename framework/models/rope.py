"""Rotary position embedding frequencies, unscaled and in the scaled variants HF checkpoints declare.

With d the rotary dimensions of a head (``kv_channels * rotary_percent``) and theta the base::

    default  f_k = 1 / theta^(2k/d)                       k = 0 .. d/2 - 1
    linear   f_k / factor                                  (positions divided by factor)
    llama3   with L = original_max_position_embeddings and wavelength w_k = 2 pi / f_k:
             w_k < L / high_freq_factor   ->  f_k                       high frequencies kept
             w_k > L / low_freq_factor    ->  f_k / factor              low frequencies scaled
             otherwise, s = (L / w_k - low_freq_factor) / (high_freq_factor - low_freq_factor):
                                              (1 - s) f_k / factor + s f_k

The arithmetic (float32, same operations in the same order) is transformers'
``_compute_default_rope_parameters`` / ``_compute_linear_scaling_rope_parameters`` /
``_compute_llama3_parameters`` (modeling_rope_utils.py), so the frequencies are bitwise HF's.

megatron's ``RotaryEmbedding`` has a Llama 3 switch, but it hard-codes low_freq_factor=1,
high_freq_factor=4 and original_max_position_embeddings=8192 and takes only the factor, and it truncates a
non-integer theta. :func:`install` therefore overwrites the module's ``inv_freq`` after construction; every
path that turns positions into angles reads that attribute: megatron's own forward (including the KV-cache
inference path and flash decoding's ``get_cos_sin``) and ``rope_from_position_ids`` in gpt.py.

``ModelConfig.rope_scaling`` holds the normalised dict of :func:`normalize_scaling` (None: unscaled).
Other HF rope types (yarn, dynamic, longrope, ...) are refused by name, never approximated.
"""

from __future__ import annotations

import math

import torch

# rope_type -> the keys its parameters need (all of them required, as transformers requires them).
SCALINGS: dict[str, tuple[str, ...]] = {
    "linear": ("factor",),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
}
# Keys an HF rope dict may hold besides the parameters: the type (old and new spelling) and the base.
_NOT_PARAMETERS = ("rope_type", "type", "rope_theta")


def rope_type(node: dict) -> str:
    return node.get("rope_type") or node.get("type") or "default"


def normalize_scaling(node: dict | None, where: str) -> dict | None:
    """``{'rope_type': ..., parameter: value}`` of an HF-style rope dict, or None for unscaled RoPE.

    Raises ValueError naming ``where.key`` for an unsupported type, a missing, unknown or invalid
    parameter."""
    if not node:
        return None
    if not isinstance(node, dict):
        raise ValueError(f"{where} must be a mapping with rope_type and its parameters, got {node!r}")
    kind = rope_type(node)
    if kind == "default":
        return None
    if kind not in SCALINGS:
        raise ValueError(f"{where}.rope_type={kind!r} is not implemented; supported: 'default' (unscaled), "
                         f"{', '.join(repr(k) for k in SCALINGS)}")
    keys = SCALINGS[kind]
    missing = [k for k in keys if node.get(k) is None]
    if missing:
        raise ValueError(f"{where}: rope_type {kind!r} needs {list(keys)}; missing {missing}")
    unknown = sorted(k for k in node if k not in keys and k not in _NOT_PARAMETERS)
    if unknown:
        raise ValueError(f"{where}: {unknown} are not parameters of rope_type {kind!r} (expected {list(keys)})")
    out = {"rope_type": kind}
    for k in keys:
        value = node[k]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
            raise ValueError(f"{where}.{k}={value!r} must be a positive number")
        out[k] = int(value) if k == "original_max_position_embeddings" else float(value)
    if kind == "llama3" and not out["high_freq_factor"] > out["low_freq_factor"]:
        raise ValueError(f"{where}: high_freq_factor={out['high_freq_factor']} must be greater than "
                         f"low_freq_factor={out['low_freq_factor']}")
    return out


def inv_freq(kv_channels: int, rotary_percent: float, base: float, scaling: dict | None) -> torch.Tensor:
    """float32 [d/2] inverse frequencies, as transformers computes them (see the module docstring)."""
    dim = int(kv_channels * rotary_percent)
    freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64, device="cpu").to(dtype=torch.float) / dim))
    if not scaling:
        return freq
    factor = scaling["factor"]
    if scaling["rope_type"] == "linear":
        return freq / factor
    low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_context_len = scaling["original_max_position_embeddings"]
    low_freq_wavelen, high_freq_wavelen = old_context_len / low, old_context_len / high
    wavelen = 2 * math.pi / freq
    scaled = torch.where(wavelen > low_freq_wavelen, freq / factor, freq)
    smooth = (old_context_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


def install(rotary, model) -> None:
    """Put the frequencies of ``model`` (a ModelConfig) into megatron's RotaryEmbedding ``rotary``.
    Call before the first forward: megatron caches the embeddings per sequence length."""
    freq = inv_freq(model.kv_channels, model.rotary_percent, model.rotary_base, model.rope_scaling)
    rotary.inv_freq = freq.to(rotary.inv_freq.device)
