"""Core attention on torch's fused ``scaled_dot_product_attention``, for the local (non-TE) layer spec.

    context = softmax(q k^T * scale + mask) v        per head; with grouped-query attention each of the
                                                      g KV heads serves n/g consecutive query heads

megatron's local ``DotProductAttention`` computes the same thing by materialising the [b*n, s, s] score
matrix (baddbmm, masked_fill, softmax, bmm) after repeating K and V per query head. The fused kernel
avoids the repeat and the score matrix's round trips, which is most of the gap to Hugging Face's LoRA
step on CPU (bench/lora_step.py). Everything else (heads per TP partition, softmax scale, dropout on the
tensor-parallel RNG stream) is inherited from megatron's class; non-vanilla softmax falls back to it.

Which keys a query sees (True = allowed), for query i of sq and key j of sk, the query's absolute
position being i + sk - sq (queries are the last sq of the sk positions, as with a KV cache):

    causal           j <= i + sk - sq
    sliding window   i + sk - sq - left <= j <= i + sk - sq + right   (config.window_size = (left, right);
                     Mistral's sliding_window w is (w - 1, 0): the query and the w - 1 keys before it,
                     transformers' ``sliding_window_causal_mask_function``: q - w < j <= q)
    explicit mask    not attention_mask[b, :, i, j]   (megatron's masks are True where forbidden)

and the window is intersected with the causal rule or with an explicit mask. A packed row's
block-diagonal mask (framework/data/packing.py) keeps a sample's tokens contiguous, so row index
differences are position differences within the sample and the window applies per sample. megatron's own
torch softmax builds its window mask and drops an explicit one; this class keeps both.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from megatron.core.tensor_parallel import get_cuda_rng_tracker
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.utils import is_layer_window_attention


def window_allowed(sq: int, sk: int, left: int, right: int, device=None) -> torch.Tensor:
    """[sq, sk] bool, True where key j is within (left, right) of query i (-1: unbounded on that side)."""
    q = torch.arange(sq, device=device)[:, None] + (sk - sq)
    k = torch.arange(sk, device=device)[None, :]
    allowed = torch.ones(sq, sk, dtype=torch.bool, device=device)
    if left >= 0:
        allowed &= k >= q - left
    if right >= 0:
        allowed &= k <= q + right
    return allowed


class SDPAttention(DotProductAttention):
    def __init__(self, config, layer_number, *args, **kwargs):
        super().__init__(config, layer_number, *args, **kwargs)
        # Which layers are windowed: megatron's rule (window_attn_skip_freq), as its own attention uses.
        self.window = (config.window_size if is_layer_window_attention(
            config.window_size, config.window_attn_skip_freq, layer_number) else None)

    def _band(self, sq: int, sk: int, causal: bool):
        """(left, right) still to apply as an explicit mask, or None when SDPA's ``is_causal`` (or no
        mask at all) already expresses the rule; a side that reaches every key is dropped (-1)."""
        left, right = self.window if self.window is not None else (-1, -1)
        if causal:
            right = 0
        left = -1 if left >= sk - 1 else left
        right = -1 if right >= sq - 1 else right  # the first query sits at sk - sq
        if left < 0 and (right < 0 or (causal and sq == sk)):
            return None
        return left, right

    def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None):
        if self.config.softmax_type != "vanilla":
            return super().forward(query, key, value, attention_mask, attn_mask_type, attention_bias,
                                   packed_seq_params)
        if packed_seq_params is not None or attention_bias is not None:
            raise ValueError("SDPAttention takes no packed_seq_params or attention_bias; use the TE layer spec")
        sq, b = query.shape[0], query.shape[1]
        sk = key.shape[0]
        # [s, b, heads, d] -> [b, heads, s, d]
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
        mask_type = attn_mask_type if attn_mask_type is not None else self.attn_mask_type
        causal = attention_mask is None and mask_type == AttnMaskType.causal
        # megatron masks are True where attention is *forbidden*; SDPA's boolean masks are True where allowed.
        mask = None if attention_mask is None else ~attention_mask
        band = self._band(sq, sk, causal)
        if band is not None:
            allowed = window_allowed(sq, sk, *band, device=q.device)
            mask = allowed if mask is None else mask & allowed
        # SDPA's is_causal aligns queries top-left: right only for sq == sk (else the band said it all).
        causal = causal and band is None and sq == sk
        scale = self.softmax_scale * (self.layer_number if self.config.apply_query_key_layer_scaling else 1)
        p = self.attention_dropout.p if self.training else 0.0
        # As megatron: without SP, heads are split over TP ranks, so dropout draws from the TP stream.
        rng = get_cuda_rng_tracker().fork() if p > 0 and not self.config.sequence_parallel else contextlib.nullcontext()
        with rng:
            context = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, dropout_p=p, is_causal=causal, scale=scale,
                enable_gqa=q.shape[1] != k.shape[1])
        return context.permute(2, 0, 1, 3).reshape(sq, b, self.hidden_size_per_partition)
