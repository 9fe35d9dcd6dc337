"""ModelConfig (family ``t5``) -> megatron-core's T5Model, and its forward to full-vocabulary logits.

What megatron-core 0.16.1 expresses of Hugging Face's T5 (transformers' modeling_t5.py), and where it
falls short (each gap is filled here by a small megatron-style piece, named below):

* Relative position bias: megatron's ``RelativePositionEmbedding`` buckets exactly as HF's
  ``T5Attention._relative_position_bucket`` (the same code: bidirectional in the encoder, causal in the
  decoder, ``relative_attention_num_buckets`` and ``_max_distance``), one table per stack. ``T5Model``
  computes the bias [1, heads, sq, sk] once per stack and forward and hands it to every layer's
  self-attention, as HF computes it in each stack's first layer and passes it on; cross-attention gets
  none in both. The table is replicated on every TP rank and ``T5Model`` scatters the bias's head
  dimension over TP, the same contiguous head blocks the fused QKV shards hold.
  GAP: megatron's local core attention (``DotProductAttention``) asserts ``attention_bias is None``; only
  Transformer Engine's takes a bias. -> :class:`BiasedSDPAttention`.
* No 1/sqrt(d) scaling of the scores: ``TransformerConfig.softmax_scale = 1.0``.
* T5LayerNorm (no mean subtraction, no bias, variance in fp32): our RMSNorm (framework/models/norms.py).
  GAP: megatron's local T5 block spec (``models/T5/t5_spec.py``) uses ``WrappedTorchNorm`` in the layers
  and ``TENorm`` (Transformer Engine) as the final norm even in the "local" spec. -> our block specs
  below, with our norms and SDPA-based core attention (also on GPUs: no TE path for T5).
* No biases (``add_bias_linear=False``); ReLU (v1.0) or gated-GELU (v1.1, tanh GELU) MLP: megatron's
  MLP. ``d_kv`` independent of d_model / heads: ``kv_channels``. No position embeddings:
  ``position_embedding_type='relative'`` (``LanguageModelEmbedding`` adds none). Different encoder and
  decoder depths: ``T5Model`` takes an ``encoder_config`` of its own. Dropout: 0 (as the GPT build).
* Output layer. GAP: megatron's ``T5LMHead`` gives the output layer a bias when the embeddings are tied
  (``bias=share_embeddings_and_output_weights``; HF has none) and has no ``d_model ** -0.5`` scaling of
  the decoder output, which HF applies when tied (v1.0). -> :class:`T5Model` replaces it with a bias-free
  column-parallel ``output_layer`` and :meth:`T5Model.scaled_output`.
* Pipeline parallelism: megatron-core 0.16.1's schedules no longer split an encoder-decoder model between
  stages (no encoder/decoder split rank), so PP > 1 is refused with a ConfigError.

Fine-tuning (framework/models/kinds.py) calls ``T5Model.forward`` with ``lm_labels`` for megatron's
vocab-parallel cross entropy per decoder position; :func:`t5_encode` runs the encoder alone, :func:`t5_logits`
gives full logits (from token ids, or from encoder states computed once); generation is in
framework/inference/encoder_decoder.py.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools

import torch
import torch.nn.functional as F

from framework.models.config import ModelConfig
from framework.models.gpt import transformer_config
from framework.models.norms import norm_class
from framework.models.unwrap import unwrap_model
from framework.models.vocab_parallel import gather_vocab_parallel
from framework.runtime import cpu_compat
from framework.runtime.errors import ConfigError


@functools.lru_cache(maxsize=None)
def _attention_class():
    from megatron.core.tensor_parallel import get_cuda_rng_tracker
    from megatron.core.transformer.enums import AttnMaskType

    from framework.models.attention import SDPAttention

    class BiasedSDPAttention(SDPAttention):
        """SDPA core attention that adds T5's relative position bias to the scores:

            context = softmax(q k^T * softmax_scale + bias + mask) v      bias: [1, heads/tp, sq, sk]

        where mask is -inf-like (dtype's min, as HF) at forbidden positions: megatron's boolean mask (True
        where forbidden), or the causal mask when none is given and the layer is causal. Without a bias
        (cross-attention) it is :class:`SDPAttention`.
        """

        def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                    packed_seq_params=None):
            if attention_bias is None:
                return super().forward(query, key, value, attention_mask, attn_mask_type, None, packed_seq_params)
            if packed_seq_params is not None:
                raise ValueError("BiasedSDPAttention takes no packed_seq_params")
            sq, b = query.shape[0], query.shape[1]
            q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))  # [b, heads, s, d]
            bias = attention_bias.to(q.dtype)
            mask_type = attn_mask_type if attn_mask_type is not None else self.attn_mask_type
            if attention_mask is None and mask_type == AttnMaskType.causal:
                attention_mask = torch.ones(sq, k.shape[2], dtype=torch.bool, device=q.device).triu(1)
            if attention_mask is not None:
                bias = bias.masked_fill(attention_mask, torch.finfo(bias.dtype).min)
            p = self.attention_dropout.p if self.training else 0.0
            rng = (get_cuda_rng_tracker().fork() if p > 0 and not self.config.sequence_parallel
                   else contextlib.nullcontext())
            with rng:
                context = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=p,
                                                         scale=self.softmax_scale)
            return context.permute(2, 0, 1, 3).reshape(sq, b, self.hidden_size_per_partition)

    return BiasedSDPAttention


def block_specs(config, encoder_config):
    """(encoder, decoder) TransformerBlockSubmodules: megatron's local T5 layer specs with our norms and
    :class:`BiasedSDPAttention` (cross-attention included: without a bias it is plain SDPA)."""
    from megatron.core.models.T5.t5_spec import decoder_model_with_local_spec, encoder_model_with_local_spec
    from megatron.core.transformer.spec_utils import ModuleSpec
    from megatron.core.transformer.transformer_block import TransformerBlockSubmodules

    norm = ModuleSpec(module=norm_class(config.normalization))
    attention = _attention_class()
    out = []
    for spec, cfg, decoder in ((encoder_model_with_local_spec(), encoder_config, False),
                               (decoder_model_with_local_spec(), config, True)):
        sub = spec.submodules
        sub.input_layernorm = sub.pre_mlp_layernorm = norm
        sub.self_attention.submodules.core_attention = attention
        if decoder:
            sub.pre_cross_attn_layernorm = norm
            sub.cross_attention.submodules.core_attention = attention
        out.append(TransformerBlockSubmodules(layer_specs=[spec] * cfg.num_layers, layer_norm=norm))
    return tuple(out)


@functools.lru_cache(maxsize=None)
def _model_class():
    from megatron.core import tensor_parallel
    from megatron.core.models.T5.t5_model import T5Model as MegatronT5Model

    class T5Model(MegatronT5Model):
        """megatron-core's T5Model with HF T5's output layer: no bias, and the decoder output scaled by
        ``hidden_size ** -0.5`` when the embeddings are tied (see the module docstring)."""

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            tied = self.share_embeddings_and_output_weights
            self.output_scale = self.config.hidden_size ** -0.5 if tied else None
            if self.post_process:
                del self.lm_head  # megatron's T5LMHead (a bias when tied); T5Model.forward calls self.lm_head
                self.output_layer = tensor_parallel.ColumnParallelLinear(
                    self.config.hidden_size, self.vocab_size, config=self.config, init_method=self.config.init_method,
                    bias=False, skip_bias_add=False, gather_output=not self.parallel_output,
                    skip_weight_param_allocation=self.pre_process and tied, tp_group=self.tp_group)
                self.lm_head = self.scaled_output
                self.setup_embeddings_and_output_layer()

        def scaled_output(self, hidden_states, word_embeddings_weight=None):
            """Vocab-parallel logits [s, b, V/tp] of the final decoder states [s, b, h]."""
            if self.output_scale is not None:
                hidden_states = hidden_states * self.output_scale
            logits, _ = self.output_layer(hidden_states, weight=word_embeddings_weight)
            return logits

        def shared_embedding_or_output_weight(self):
            if self.pre_process:
                return self.embedding.word_embeddings.weight
            return self.output_layer.weight if self.post_process else None

    return T5Model


# ModelConfig fields a T5 must have, and the value it needs, checked before anything is built.
_T5_ARCH = {"normalization": "RMSNorm", "position_embedding_type": "relative", "add_bias_linear": False,
            "add_qkv_bias": False, "zero_centered_gamma": False, "parallel_attention_mlp": False,
            "num_experts": 0, "rope_scaling": None, "sliding_window": None, "embedding_multiplier": None}


def check_t5(model: ModelConfig, pp: int = 1) -> None:
    """Raise ConfigError naming the key when ``model`` or the layout is not a T5 this build makes."""
    problems = t5_problems(model, pp)
    if problems:
        raise ConfigError("cannot build this T5:\n  - " + "\n  - ".join(problems))


def t5_problems(model: ModelConfig, pp: int = 1) -> list[str]:
    """What :func:`check_t5` refuses, one line per problem, each naming its key."""
    problems = [f"model.arch.{k}={getattr(model, k)!r} (a T5 needs {v!r})"
                for k, v in _T5_ARCH.items() if getattr(model, k) != v]
    if model.num_query_groups != model.num_attention_heads:
        problems.append(f"model.arch.num_query_groups={model.num_query_groups} (megatron's cross-attention "
                        f"needs one KV head per query head: {model.num_attention_heads})")
    if model.layers_of("decoder") < 1 or model.num_layers < 1:
        problems.append(f"model.arch.num_layers={model.num_layers}, num_decoder_layers={model.num_decoder_layers} "
                        f"(each stack needs at least one layer)")
    if model.relative_attention_num_buckets < 2 or model.relative_attention_max_distance < 2:
        problems.append(f"model.arch.relative_attention_num_buckets={model.relative_attention_num_buckets}, "
                        f"relative_attention_max_distance={model.relative_attention_max_distance} (need >= 2)")
    if pp > 1:
        problems.append(f"parallel.pipeline={pp}: pipeline parallelism is not supported for the encoder-decoder "
                        f"T5 (megatron-core 0.16.1's schedules cannot split it into stages); use "
                        f"parallel.pipeline=1 with tensor/data parallelism")
    return problems


def build_t5(model: ModelConfig, tp: int = 1, pp: int = 1, sp: bool = False,
             params_dtype: torch.dtype = torch.float32):
    """This rank's T5Model (encoder + decoder; no pipeline stages). Process groups must exist."""
    check_t5(model, pp)
    cpu_compat.refresh()
    on_gpu = torch.cuda.is_available()
    base = transformer_config(model, tp, pp, sp, params_dtype, on_gpu)
    config = dataclasses.replace(base, num_layers=model.layers_of("decoder"), softmax_scale=1.0)
    encoder_config = dataclasses.replace(base, num_layers=model.num_layers, softmax_scale=1.0)
    encoder_spec, decoder_spec = block_specs(config, encoder_config)
    cpu_compat.refresh()  # the T5 modules imported just now
    t5 = _model_class()(
        config=config,
        encoder_config=encoder_config,
        transformer_encoder_layer_spec=encoder_spec,
        transformer_decoder_layer_spec=decoder_spec,
        vocab_size=model.vocab_size,
        max_sequence_length=model.max_position_embeddings,
        parallel_output=True,
        share_embeddings_and_output_weights=model.tie_word_embeddings,
        position_embedding_type="relative",
        relative_attention_num_buckets=model.relative_attention_num_buckets,
        relative_attention_max_distance=model.relative_attention_max_distance,
    )
    for table in (t5.encoder_relative_pos_emb, t5.decoder_relative_pos_emb):
        table.to(dtype=params_dtype)  # torch.nn.Embedding defaults to float32
    if on_gpu:
        t5.cuda(torch.cuda.current_device())
    return t5


def _cross_mask(encoder_ids: torch.Tensor, encoder_mask: torch.Tensor | None, where: str) -> torch.Tensor | None:
    """megatron's boolean mask [b, 1, 1, s_enc] (True = hidden) of HF's ``attention_mask`` (1 = token)."""
    if encoder_mask is None:
        return None
    if tuple(encoder_mask.shape) != tuple(encoder_ids.shape):
        raise ValueError(f"{where}: encoder_mask shape {tuple(encoder_mask.shape)} != encoder_ids shape "
                         f"{tuple(encoder_ids.shape)}")
    return (encoder_mask == 0)[:, None, None, :]


def t5_encode(model, encoder_ids: torch.Tensor, encoder_mask: torch.Tensor | None = None) -> torch.Tensor:
    """The encoder's final states [s_enc, b, h] (sequence-parallel: this rank's [s_enc/tp, b, h] slice) of
    ``encoder_ids`` [b, s_enc], padding (``encoder_mask`` 0) hidden from its self-attention: what
    :func:`t5_logits` takes as ``encoder_hidden`` to run the decoder without the encoder."""
    if encoder_ids.dim() != 2:
        raise ValueError(f"t5_encode: encoder_ids must be [batch, seq], got {tuple(encoder_ids.shape)}")
    masked = _cross_mask(encoder_ids, encoder_mask, "t5_encode")
    return unwrap_model(model)(encoder_ids, None, masked, None, None, output_encoder_hidden_only=True)


def t5_logits(model, encoder_ids: torch.Tensor, decoder_ids: torch.Tensor,
              encoder_mask: torch.Tensor | None = None, encoder_hidden: torch.Tensor | None = None) -> torch.Tensor:
    """Full-vocabulary float32 logits [b, s_dec, V] of a T5Model, identical on every TP rank.

    ``encoder_ids`` [b, s_enc], ``decoder_ids`` [b, s_dec] (HF's ``input_ids`` and ``decoder_input_ids``);
    ``encoder_mask`` [b, s_enc] is HF's ``attention_mask`` (1 = token, 0 = padding): padded encoder
    positions are hidden from the encoder's self-attention and from the decoder's cross-attention. The
    decoder is causal. ``encoder_hidden``: the encoder's states of these rows (:func:`t5_encode`), so only
    the decoder runs. Differentiable; call under ``torch.no_grad()`` for inference.
    """
    if encoder_ids.dim() != 2 or decoder_ids.dim() != 2 or encoder_ids.shape[0] != decoder_ids.shape[0]:
        raise ValueError(f"t5_logits: encoder_ids and decoder_ids must be [batch, seq] with one batch size, got "
                         f"{tuple(encoder_ids.shape)} and {tuple(decoder_ids.shape)}")
    masked = _cross_mask(encoder_ids, encoder_mask, "t5_logits")
    t5 = unwrap_model(model)
    logits = t5(encoder_ids, decoder_ids, masked, None, masked, encoder_hidden_states=encoder_hidden)  # [b, s, V/tp]
    return gather_vocab_parallel(logits).float()
