"""Numeric precision and activation recomputation: the config keys -> megatron TransformerConfig fields,
and the checks that run before any process group starts.

    precision=fp32   fp32 everything (CPU and GPU)
    precision=bf16   GPU: bf16 weights/activations, fp32 main grads and optimizer state (megatron mixed
                     precision); CPU: fp32 weights under bf16 autocast
    precision=fp8    Transformer Engine fp8 GEMMs on a Hopper (sm_90) or newer GPU, bf16 elsewhere;
                     fp8.recipe delayed (amax history) or current (per-tensor scaling from the current
                     tensors, megatron's "tensorwise"); refused without TE or without such a GPU
    trainer.recompute  none | selective (core attention) | full (every layer's input kept, the layer
                       recomputed in backward)
"""

from __future__ import annotations

import torch

from framework.config.precision import FP8_RECIPES
from framework.models.gpt import te_available


def fp8_available() -> tuple[bool, str]:
    """(usable, why not) for Transformer Engine fp8 on this machine."""
    if not torch.cuda.is_available():
        return False, "this machine has no CUDA GPU"
    major, minor = torch.cuda.get_device_capability()
    if (major, minor) < (8, 9):
        return False, f"the GPU ({torch.cuda.get_device_name()}) is sm_{major}{minor}; fp8 needs sm_89/sm_90 or newer"
    if not te_available():
        return False, "Transformer Engine is not installed (pip install .[gpu], or use the NGC container)"
    return True, ""


def precision_problems(cfg) -> list[str]:
    """What this machine cannot do of the job's precision (the values themselves are checked by
    framework/config/precision.py): fp8 needs Transformer Engine on a Hopper-class GPU."""
    if cfg.get("precision") != "fp8":
        return []
    ok, why = fp8_available()
    return [] if ok else [f"precision=fp8 needs Transformer Engine on a Hopper-class GPU, but {why}; use precision=bf16"]


def transformer_settings(precision: str = "fp32", fp8=None, trainer=None, parallel=None) -> dict:
    """The TransformerConfig fields the job's sections set: the fp8 recipe (``precision``, the ``fp8``
    section), activation recompute (``trainer.recompute``), and an explicit uneven pipeline split
    (``parallel.first_stage_layers`` / ``last_stage_layers``; framework/models/layout.py). A section left out
    sets nothing."""
    out = {}
    first = None if parallel is None else parallel.get("first_stage_layers")
    last = None if parallel is None else parallel.get("last_stage_layers")
    if first is not None or last is not None:
        out.update(num_layers_in_first_pipeline_stage=first, num_layers_in_last_pipeline_stage=last)
    if precision == "fp8":
        fp8 = fp8 or {}
        out.update(fp8=fp8.get("format", "hybrid"), fp8_recipe=FP8_RECIPES[fp8.get("recipe", "delayed")],
                   fp8_amax_history_len=int(fp8.get("amax_history_len", 1024)),
                   fp8_amax_compute_algo=fp8.get("amax_compute_algo", "max"))
    recompute = "none" if trainer is None else trainer.get("recompute", "none")
    if recompute == "selective":
        out.update(recompute_granularity="selective")
    elif recompute == "full":
        out.update(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1)
    return out
