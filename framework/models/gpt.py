"""ModelConfig -> megatron-core TransformerConfig + GPTModel (one pipeline stage of it)."""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from framework.models import kv_replication, rope
from framework.models.config import ModelConfig
from framework.models.layout import pipeline_split
from framework.models.norms import norm_class
from framework.runtime import cpu_compat


def activation(name: str):
    """ModelConfig.activation -> the function megatron's MLP applies (to the gate, with a GLU)."""
    from megatron.core.activations import squared_relu

    return {"silu": F.silu, "gelu": F.gelu, "gelu_tanh": functools.partial(F.gelu, approximate="tanh"),
            "relu": F.relu, "squared_relu": squared_relu}[name]


def transformer_config(model: ModelConfig, tp: int = 1, pp: int = 1, sp: bool = False,
                       params_dtype: torch.dtype = torch.float32, on_gpu: bool = False, **settings):
    """``settings``: further TransformerConfig fields of the job (fp8 recipe, activation recompute:
    framework/models/precision.py)."""
    from megatron.core.transformer.transformer_config import TransformerConfig

    if "num_layers_in_first_pipeline_stage" in settings or "num_layers_in_last_pipeline_stage" in settings:
        first = settings.pop("num_layers_in_first_pipeline_stage", None)  # the job's explicit split
        last = settings.pop("num_layers_in_last_pipeline_stage", None)
    else:
        first, last = pipeline_split(model.num_layers, pp)
    return TransformerConfig(
        num_layers_in_first_pipeline_stage=first,
        num_layers_in_last_pipeline_stage=last,
        num_layers=model.num_layers,
        hidden_size=model.hidden_size,
        ffn_hidden_size=model.ffn_hidden_size,
        num_attention_heads=model.num_attention_heads,
        num_query_groups=kv_replication.built_groups(model, tp),  # KV heads replicated when TP exceeds them
        kv_channels=model.kv_channels,
        layernorm_epsilon=model.norm_eps,
        normalization=model.normalization,
        layernorm_zero_centered_gamma=model.zero_centered_gamma,
        gated_linear_unit=model.gated_linear_unit,
        activation_func=activation(model.activation),
        add_bias_linear=model.add_bias_linear,
        add_qkv_bias=model.add_qkv_bias or model.add_bias_linear,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        init_method_std=model.init_method_std,
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        sequence_parallel=sp,
        params_dtype=params_dtype,
        pipeline_dtype=params_dtype,
        bf16=params_dtype == torch.bfloat16,
        use_cpu_initialization=not on_gpu,
        # The fusions below need CUDA kernels; off everywhere keeps CPU and GPU numerics identical.
        gradient_accumulation_fusion=False,
        apply_rope_fusion=False,
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
        masked_softmax_fusion=False,
        persist_layer_norm=False,
        calculate_per_token_loss=True,
        # megatron's (left, right) window: key j is visible to query i when i - left <= j <= i + right;
        # HF's sliding_window w counts the query itself (j > i - w), hence left = w - 1.
        window_size=(model.sliding_window - 1, 0) if model.sliding_window else None,
        **_moe_fields(model),
        **settings,
    )


def _moe_fields(model: ModelConfig) -> dict:
    """Mixture-of-experts settings of megatron-core's MoE layer (router + SequentialMLP experts).

    Routing as Mixtral: softmax over the router logits, keep the top-k, renormalise them; megatron's
    default (top-k of the logits, then softmax over those k) is the same function. No auxiliary
    load-balancing loss and no capacity limit (no token is dropped), as HF Mixtral computes its forward
    when ``output_router_logits`` is off; experts are not split across ranks (expert parallel size 1),
    each expert's linears are tensor-parallel like a dense MLP's.
    """
    if not model.num_experts:
        return {}
    return dict(num_moe_experts=model.num_experts, moe_router_topk=model.moe_router_topk,
                moe_ffn_hidden_size=model.ffn_hidden_size, moe_router_load_balancing_type="none",
                moe_aux_loss_coeff=0.0, moe_token_dispatcher_type="allgather", moe_grouped_gemm=False,
                moe_router_pre_softmax=False, moe_router_score_function="softmax",
                moe_router_dtype="fp32")


def layer_spec(config, use_te: bool, parallel_norms: int = 0):
    """Transformer Engine spec on a GPU with TE; otherwise megatron's local spec with SP-capable norms and
    fused (SDPA) core attention. ``parallel_norms`` 1 or 2: Falcon's parallel attention/MLP block with that
    many norms (framework/models/parallel_block.py); 0: the sequential layer."""
    from megatron.core.models.gpt.gpt_layer_specs import (get_gpt_layer_local_spec,
                                                          get_gpt_layer_with_transformer_engine_spec)
    from megatron.core.transformer.spec_utils import ModuleSpec
    from megatron.core.transformer.transformer_block import TransformerBlockSubmodules, get_num_layers_to_build

    from framework.models.parallel_block import parallel_layer_spec
    if use_te:
        spec = get_gpt_layer_with_transformer_engine_spec()
        return parallel_layer_spec(spec, parallel_norms, use_te=True) if parallel_norms else spec
    from framework.models.attention import SDPAttention

    spec = get_gpt_layer_local_spec(num_experts=config.num_moe_experts, moe_grouped_gemm=False,
                                    normalization=config.normalization)
    spec.submodules.self_attention.submodules.core_attention = SDPAttention
    norm = ModuleSpec(module=norm_class(config.normalization))
    spec.submodules.input_layernorm = norm
    spec.submodules.pre_mlp_layernorm = norm
    if parallel_norms:
        spec = parallel_layer_spec(spec, parallel_norms, use_te=False)
    return TransformerBlockSubmodules(layer_specs=[spec] * get_num_layers_to_build(config), layer_norm=norm)


def te_available() -> bool:
    if not torch.cuda.is_available():
        return False
    try:
        import transformer_engine  # noqa: F401
    except Exception:  # TE raises assorted errors when cuDNN or its libraries are missing
        return False
    return True


def rope_from_position_ids(rotary, position_ids: torch.Tensor) -> torch.Tensor:
    """megatron's rotary frequencies [s, b, 1, dim] at the given per-row ``position_ids`` [b, s].

    Same arithmetic as ``RotaryEmbedding.get_emb`` (position x inv_freq, halves concatenated), but the
    position of each token comes from ``position_ids`` instead of ``arange(s)`` shared by all rows; with
    ``position_ids = arange(s)`` it is bitwise the same tensor, broadcast over the batch.
    """
    inv_freq = rotary.inv_freq.to(position_ids.device)
    pos = position_ids.t().to(inv_freq.dtype)  # [s, b]
    if rotary.seq_len_interpolation_factor is not None:
        pos = pos * (1 / rotary.seq_len_interpolation_factor)
    freqs = pos[..., None] * inv_freq  # [s, b, dim/2]
    if rotary.rotary_interleaved:
        emb = torch.stack((freqs, freqs), dim=-1).flatten(-2)
    else:
        emb = torch.cat((freqs, freqs), dim=-1)
    return emb[:, :, None, :]


@functools.lru_cache(maxsize=None)
def _gpt_class():
    """GPTModel whose RoPE follows ``position_ids``.

    megatron-core 0.16.1's GPTModel computes rotary embeddings from the sequence length only
    (``rotary_pos_emb(seq_len)`` = positions 0..s-1 for every row) and ignores ``position_ids`` for
    ``rope``. Packed rows (framework/data/packing.py) restart positions at every sample, so training and
    validation forwards (no inference context, no THD ``packed_seq_params``) take the rotary angles from
    ``position_ids`` instead. Inference with a KV cache keeps megatron's own path.
    """
    from megatron.core.models.gpt import GPTModel

    class PositionRoPEGPTModel(GPTModel):
        def _preprocess(self, input_ids, position_ids, decoder_input=None, inference_context=None,
                        packed_seq_params=None, padding_mask=None):
            out = super()._preprocess(input_ids, position_ids, decoder_input=decoder_input,
                                      inference_context=inference_context, packed_seq_params=packed_seq_params,
                                      padding_mask=padding_mask)
            if (self.position_embedding_type == "rope" and out[1] is not None and position_ids is not None
                    and inference_context is None and packed_seq_params is None
                    and position_ids.shape[-1] == out[1].shape[0]):
                out = (out[0], rope_from_position_ids(self.rotary_pos_emb, position_ids)) + tuple(out[2:])
            return out

    return PositionRoPEGPTModel


def scale_embeddings(embedding, multiplier: float) -> None:
    """Gemma: the embedding output times ``multiplier`` (sqrt(hidden_size)), on the first stage only, before
    the first layer. As HF's ``GemmaTextScaledWordEmbedding``, the factor is a float32 tensor cast to the
    hidden dtype (under bf16, sqrt(3072) = 55.43 becomes 55.5).

    A forward hook on megatron's ``LanguageModelEmbedding`` (output [s, b, h], this rank's sequence slice
    under SP). Hooks registered later, such as the virtual tokens' (framework/peft/virtual_tokens.py), see
    the scaled output and insert their prompt embeddings unscaled, as HF PEFT concatenates prompts after the
    scaled embedding; an embedding LoRA's delta is scaled with the base, as HF PEFT's is.
    """
    scale = torch.tensor(multiplier, dtype=torch.float32)
    embedding.register_forward_hook(lambda module, args, out: out * scale.to(out.device, out.dtype))


def build_gpt(model: ModelConfig, tp: int = 1, pp: int = 1, sp: bool = False,
              params_dtype: torch.dtype = torch.float32, **settings):
    """Build this rank's pipeline stage of a decoder-only GPTModel. Process groups must exist.
    ``settings`` go to the TransformerConfig (fp8, recompute: framework/models/precision.py)."""
    from megatron.core import parallel_state

    cpu_compat.refresh()
    on_gpu = torch.cuda.is_available()
    config = transformer_config(model, tp, pp, sp, params_dtype, on_gpu, **settings)
    spec = layer_spec(config, use_te=te_available(),
                      parallel_norms=model.parallel_attention_mlp_norms if model.parallel_attention_mlp else 0)
    kv_replication.init_as_unreplicated(spec, model, tp)  # random weights as at TP=1 with KV heads replicated
    gpt = _gpt_class()(
        config=config,
        transformer_layer_spec=spec,
        vocab_size=model.vocab_size,
        max_sequence_length=model.max_position_embeddings,
        pre_process=parallel_state.is_pipeline_first_stage(),
        post_process=parallel_state.is_pipeline_last_stage(),
        share_embeddings_and_output_weights=model.tie_word_embeddings,
        position_embedding_type=model.position_embedding_type,
        rotary_percent=model.rotary_percent,
        rotary_base=int(model.rotary_base),
        parallel_output=True,
    )
    if model.position_embedding_type == "rope":
        rope.install(gpt.rotary_pos_emb, model)
    if model.embedding_multiplier is not None and gpt.pre_process:
        scale_embeddings(gpt.embedding, model.embedding_multiplier)
    if on_gpu:
        gpt.cuda(torch.cuda.current_device())
    kv_replication.install(gpt, model, tp, parallel_state.get_tensor_model_parallel_rank())
    return gpt
