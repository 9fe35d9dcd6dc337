"""Model FLOPs of a training step, counted as Megatron counts them, and the GPU's peak for MFU.

Per token of a sequence of ``s`` positions (megatron/training ``num_floating_point_operations``; NeMo's
``flops_formulas.llama2`` is the same), forward:

    F_gemm = 2 (N_layers + V h)     every linear weight a token passes through, once (multiply + add):
                                    qkv, proj and the MLP of every layer (MoE: the router and the top-k
                                    experts the token is routed to), and the output layer (V h)
    F_attn = 4 s n d L              Q K^T and (attention) V over all s keys (no causal halving)
    F_peft = 2 N_peft               the PEFT method's own GEMMs: LoRA/DoRA/QLoRA r (in + out) per wrapped
                                    linear (r h for the embedding, whose A is a lookup); Houlsby adapters
                                    2 h b per adapter; IA3 and the prompt methods have none

A training step is forward + backward. Backward of a GEMM is the input gradient and the weight gradient,
each as large as the forward, so a trained GEMM costs 3x its forward and a frozen one 2x (input gradient
only); attention has no weights and costs 3x either way:

    full fine-tuning (peft.method=none):  3 (F_gemm + F_attn)
    frozen base (every PEFT method):      2 F_gemm + 3 F_attn + 3 F_peft

Not counted: embedding lookups, norms, activations, softmax, the loss (elementwise), DoRA's per-step
weight norms, the prompt methods' virtual positions. A step's FLOPs are rows x s x the per-token count,
over the padded rows as they are computed (Megatron counts global batch x sequence length). Encoder-decoder
models (T5) are not counted here (:func:`step_flops` returns None for them).

TFLOP/s per GPU = step FLOPs / (seconds x world size); MFU = that / the GPU's peak. The peak is
``trainer.peak_tflops`` or, on a GPU, the bf16 dense tensor-core peak of its name (:data:`BF16_DENSE_PEAK`;
fp32 and fp8 runs are divided by the same bf16 figure); on a CPU without ``trainer.peak_tflops`` there is
no MFU.
"""

from __future__ import annotations

import torch

from framework.peft.registry import get_method

#: bf16 dense tensor-core peak TFLOP/s per GPU (NVIDIA datasheets, without sparsity), matched in this order
#: against ``torch.cuda.get_device_name()`` (case-insensitive substring); GH200 matches "H200".
BF16_DENSE_PEAK = (("H200 NVL", 835.0), ("H200", 989.0), ("H100 NVL", 835.0), ("H100 PCIe", 756.0),
                   ("H100", 989.0), ("A100", 312.0))

_LORA_METHODS = ("lora", "dora", "qlora")


def _mlp_gemm(cfg) -> int:
    """Weights of the MLP a token passes through (MoE: the router and its top-k experts)."""
    h, f = cfg.hidden_size, cfg.ffn_hidden_size
    dense = h * (2 * f if cfg.gated_linear_unit else f) + f * h
    if cfg.num_experts:
        return cfg.moe_router_topk * dense + cfg.num_experts * h
    return dense


def _layer_gemm(cfg) -> int:
    """Weights of one transformer layer's linears a token passes through."""
    h, d, n, g = cfg.hidden_size, cfg.kv_channels, cfg.num_attention_heads, cfg.num_query_groups
    return h * (n + 2 * g) * d + n * d * h + _mlp_gemm(cfg)


def peft_gemm_per_token(cfg, peft) -> int:
    """Weights of the PEFT method's own GEMMs a token passes through, over all layers (``peft``: the
    ``peft`` config node or a dict with its keys)."""
    method = peft.get("method")
    h, d, n, g, f = (cfg.hidden_size, cfg.kv_channels, cfg.num_attention_heads, cfg.num_query_groups,
                     cfg.ffn_hidden_size)
    if method in _LORA_METHODS:
        r = int(peft.get("rank"))
        experts = cfg.moe_router_topk if cfg.num_experts else 1
        per_layer = {"qkv": r * (h + (n + 2 * g) * d), "proj": r * (n * d + h),
                     "fc1": experts * r * (h + (2 * f if cfg.gated_linear_unit else f)), "fc2": experts * r * (f + h)}
        whole = {"embedding": r * h, "output": r * (h + cfg.vocab_size)}
        targets = list(peft.get("targets") or [])
        return (cfg.num_layers * sum(per_layer.get(t, 0) for t in targets)
                + sum(whole.get(t, 0) for t in targets))
    if method == "adapter":
        return cfg.num_layers * len(list(peft.get("targets") or [])) * 2 * h * int(peft.get("bottleneck"))
    return 0


def flops_per_token(cfg, seq: int, *, trains_base: bool, peft_gemm: int = 0) -> float:
    """Model FLOPs of one training step per token of a ``seq``-position row (module docstring)."""
    L = cfg.num_layers
    gemm = 2 * (L * _layer_gemm(cfg) + cfg.vocab_size * cfg.hidden_size)
    attn = 4 * seq * cfg.num_attention_heads * cfg.kv_channels * L
    return (3 if trains_base else 2) * gemm + 3 * attn + 3 * 2 * peft_gemm


def step_flops(cfg, peft, rows: int, seq: int) -> float | None:
    """Model FLOPs of a training step over ``rows`` rows of ``seq`` positions (None: not counted, T5)."""
    if cfg.num_decoder_layers is not None:
        return None
    trains_base = get_method(peft.get("method")).trains_base
    return rows * seq * flops_per_token(cfg, seq, trains_base=trains_base, peft_gemm=peft_gemm_per_token(cfg, peft))


def peak_tflops(configured, device) -> float | None:
    """The peak per GPU to divide by for MFU: ``trainer.peak_tflops`` if set, else a CUDA device's bf16 dense
    peak looked up by its name, else None."""
    if configured is not None:
        return float(configured)
    if getattr(device, "type", None) != "cuda":
        return None
    return peak_for_name(torch.cuda.get_device_name(device))


def peak_for_name(name: str) -> float | None:
    name = name.lower()
    return next((peak for key, peak in BF16_DENSE_PEAK if key.lower() in name), None)


class Throughput:
    """Model FLOPs done by this invocation, as TFLOP/s per GPU and MFU (the job logs them each step)."""

    def __init__(self, model_cfg, peft, world_size: int, peak: float | None):
        self.model_cfg, self.peft, self.world, self.peak = model_cfg, peft, world_size, peak
        countable = model_cfg.num_decoder_layers is None
        self.flops: float | None = 0.0 if countable else None  # None: not counted (encoder-decoder)

    def add_step(self, rows: int, micro_batches: list[dict]) -> None:
        """A training step over ``rows`` global rows, padded as this rank's ``micro_batches`` are (without
        pipeline parallelism each micro-batch has its own length; the other data-parallel ranks' rows are
        counted at this rank's lengths)."""
        if self.flops is not None:
            here = sum(mb["tokens"].shape[0] for mb in micro_batches)
            self.flops += sum(step_flops(self.model_cfg, self.peft, mb["tokens"].shape[0] * rows / here,
                                         mb["tokens"].shape[1]) for mb in micro_batches)

    def scalars(self, seconds: float) -> dict[str, float | None]:
        """{'train/tflops_per_gpu': ..., 'train/mfu': ...} over ``seconds`` of training (None: unknown)."""
        if self.flops is None or seconds <= 0:
            return {"train/tflops_per_gpu": None, "train/mfu": None}
        tflops = self.flops / seconds / self.world / 1e12
        return {"train/tflops_per_gpu": tflops, "train/mfu": None if self.peak is None else tflops / self.peak}

    @staticmethod
    def describe(scalars: dict) -> str:
        """' TFLOP/s/GPU 1.23 MFU 45.6%' for a log line ('' for what is unknown)."""
        tflops, mfu = scalars.get("train/tflops_per_gpu"), scalars.get("train/mfu")
        out = "" if tflops is None else f" TFLOP/s/GPU {tflops:.3g}"
        return out + ("" if mfu is None else f" MFU {100 * mfu:.1f}%")
