"""The parallel attention/MLP block (Falcon, GPT-J) as a megatron-core transformer layer.

    sequential (megatron's TransformerLayer)   h = x + attn(ln_1(x));   y = h + mlp(ln_2(h))
    parallel (ParallelAttentionMLPLayer)       y = x + attn(ln_a(x)) + mlp(ln_m(x))
        one norm  (ModelConfig.parallel_attention_mlp_norms=1; Falcon-7B)   ln_a = ln_m, computed once
        two norms (=2; Falcon-40B/180B ``ln_attn``, ``ln_mlp``)             separate weights, both on x

What megatron-core 0.16.1 lacks: ``TransformerLayer.forward`` always runs ``_forward_attention`` and then
``_forward_mlp`` on the attention's residual output, so the MLP's input depends on the attention's
output; no TransformerConfig flag or layer submodule spec feeds both branches from the layer input
(nothing like GPT-NeoX's ``gpt_j_residual`` or HF's ``parallel_attn``/``use_parallel_residual`` exists in
megatron/core). This subclass keeps every submodule TransformerLayer builds
from the spec (norms, SelfAttention, MLP, the bias-dropout-add functions), so parameter names, TP
sharding, the sharded state dict (dist_checkpointing) and pipeline placement are megatron's own; only the
forward differs.

Parallel layouts need nothing extra. The layer's input and output are [s, b, h] ([s/TP, b, h] under
sequence parallelism), as TransformerLayer's: under SP each norm runs on the local slice, linear_qkv and
linear_fc1 each all-gather their (normed) input along the sequence and linear_proj and linear_fc2 each
reduce-scatter their output back to the slice, so the two branch outputs and the residual are all local
slices; without SP each row-parallel output is all-reduced. GPT-NeoX sums the two branches' partial
outputs before one shared all-reduce; keeping megatron's modules unchanged costs one extra collective per
layer and keeps LoRA's wrapping of linear_proj/linear_fc2 (framework/peft/lora.py) as it is. Pipeline
stages see an ordinary layer.

Under Transformer Engine the spec's norms are fused into the following linear layer
(``linear_qkv.layer_norm_weight``, ``linear_fc1.layer_norm_weight``): with two norms that is exactly
ln_attn and ln_mlp; with one shared norm it would be two copies that training lets drift apart, so the
norm is a separate ``TENorm`` and the linears are unfused.

Refused at construction (they assume the sequential order): recompute of the norms or the MLP
(``recompute_modules`` 'layernorm'/'mlp'; selective recompute of core attention, the default, and full-layer
recompute wrap code this class does not change), mixture-of-experts MLPs, cross attention, fused TP
inference communication.
"""

from __future__ import annotations

from megatron.core.extensions.transformer_engine import TEColumnParallelLinear, TENorm
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.transformer_layer import TransformerLayer
from megatron.core.utils import deprecate_inference_params, make_viewless_tensor


class ParallelAttentionMLPLayer(TransformerLayer):
    """``y = x + attn(ln_a(x)) + mlp(ln_m(x))``; ln_m is ln_a when the spec's pre_mlp_layernorm is IdentityOp."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        unsupported = [what for what, on in (
            ("selective recompute of norms/MLP", self.recompute_input_layernorm or self.recompute_pre_mlp_layernorm
             or self.recompute_mlp),
            ("a mixture-of-experts MLP", self.is_moe_layer),
            ("cross attention", not isinstance(self.cross_attention, IdentityOp)),
            ("fused TP inference communication", getattr(self.config, "inference_fuse_tp_communication", False)),
        ) if on]
        if unsupported:
            raise NotImplementedError(f"the parallel attention/MLP block (framework/models/parallel_block.py) does "
                                      f"not support {', '.join(unsupported)}")

    def forward(self, hidden_states, attention_mask=None, context=None, context_mask=None, rotary_pos_emb=None,
                rotary_pos_cos=None, rotary_pos_sin=None, rotary_pos_cos_sin=None, attention_bias=None,
                inference_context=None, packed_seq_params=None, sequence_len_offset=None, padding_mask=None, *,
                inference_params=None, dynamic_inference_decode_only=None):
        inference_context = deprecate_inference_params(inference_context, inference_params)
        residual = hidden_states
        attention_input = self.input_layernorm(hidden_states)
        if isinstance(self.pre_mlp_layernorm, IdentityOp):
            mlp_input = attention_input  # one shared norm (or, under TE, norms fused into both linears)
        else:
            mlp_input = self.pre_mlp_layernorm(hidden_states)

        attention_with_bias = self.self_attention(
            attention_input,
            attention_mask=attention_mask,
            inference_context=inference_context,
            rotary_pos_emb=rotary_pos_emb,
            rotary_pos_cos=rotary_pos_cos,
            rotary_pos_sin=rotary_pos_sin,
            rotary_pos_cos_sin=rotary_pos_cos_sin,
            attention_bias=attention_bias,
            packed_seq_params=packed_seq_params,
            sequence_len_offset=sequence_len_offset,
        )
        mlp_with_bias = self.mlp(mlp_input, padding_mask=padding_mask)

        # Both branches add onto the layer input: x + dropout(attn + b_attn) + dropout(mlp + b_mlp).
        with self.bias_dropout_add_exec_handler():
            hidden = self.self_attn_bda(self.training, self.config.bias_dropout_fusion)(
                attention_with_bias, residual, self.hidden_dropout)
            hidden = self.mlp_bda(self.training, self.config.bias_dropout_fusion)(
                mlp_with_bias, hidden, self.hidden_dropout)
        output = make_viewless_tensor(inp=hidden, requires_grad=hidden.requires_grad, keep_graph=True)
        return output, context


def parallel_layer_spec(spec, norms: int, use_te: bool):
    """Turn megatron's sequential layer ``spec`` (local or Transformer Engine; changed in place and
    returned) into the parallel block's, with ``norms`` (1 or 2) norms in front of the two branches."""
    if norms not in (1, 2):
        raise ValueError(f"parallel_attention_mlp_norms={norms!r} must be 1 or 2")
    spec.module = ParallelAttentionMLPLayer
    sub = spec.submodules
    if norms == 1:
        sub.pre_mlp_layernorm = IdentityOp
        if use_te:
            sub.input_layernorm = TENorm
            sub.self_attention.submodules.linear_qkv = TEColumnParallelLinear
            sub.mlp.submodules.linear_fc1 = TEColumnParallelLinear
    return spec
