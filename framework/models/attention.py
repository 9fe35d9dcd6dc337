"""Core attention on torch's fused ``scaled_dot_product_attention``, for the local (non-TE) layer spec.

    context = softmax(q k^T * scale + mask) v        per head; with grouped-query attention each of the
                                                      g KV heads serves n/g consecutive query heads

megatron's local ``DotProductAttention`` computes the same thing by materialising the [b*n, s, s] score
matrix (baddbmm, masked_fill, softmax, bmm) after repeating K and V per query head. The fused kernel
avoids the repeat and the score matrix's round trips, which is most of the gap to Hugging Face's LoRA
step on CPU (bench/lora_step.py). Everything else (heads per TP partition, softmax scale, dropout on the
tensor-parallel RNG stream) is inherited from megatron's class; sliding windows and non-vanilla softmax
fall back to it.
"""

from __future__ import annotations

import contextlib

import torch.nn.functional as F
from megatron.core.tensor_parallel import get_cuda_rng_tracker
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.enums import AttnMaskType


class SDPAttention(DotProductAttention):
    def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None):
        if self.config.window_size is not None or self.config.softmax_type != "vanilla":
            return super().forward(query, key, value, attention_mask, attn_mask_type, attention_bias,
                                   packed_seq_params)
        if packed_seq_params is not None or attention_bias is not None:
            raise ValueError("SDPAttention takes no packed_seq_params or attention_bias; use the TE layer spec")
        sq, b = query.shape[0], query.shape[1]
        # [s, b, heads, d] -> [b, heads, s, d]
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
        mask_type = attn_mask_type if attn_mask_type is not None else self.attn_mask_type
        causal = attention_mask is None and mask_type == AttnMaskType.causal
        # megatron masks are True where attention is *forbidden*; SDPA's boolean masks are True where allowed.
        mask = None if attention_mask is None else ~attention_mask
        scale = self.softmax_scale * (self.layer_number if self.config.apply_query_key_layer_scaling else 1)
        p = self.attention_dropout.p if self.training else 0.0
        # As megatron: without SP, heads are split over TP ranks, so dropout draws from the TP stream.
        rng = get_cuda_rng_tracker().fork() if p > 0 and not self.config.sequence_parallel else contextlib.nullcontext()
        with rng:
            context = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, dropout_p=p, is_causal=causal, scale=scale,
                enable_gqa=q.shape[1] != k.shape[1])
        return context.permute(2, 0, 1, 3).reshape(sq, b, self.hidden_size_per_partition)
