"""The per-token loss of one micro-batch, for any model kind: what training, validation and scoring share.

A micro-batch is a dict of tensors (framework/data). A decoder-only batch (``tokens``, ``position_ids``,
``labels``, and for packed rows a block-diagonal ``attention_mask``) goes through the GPT forward with
labels; an encoder-decoder batch (framework/data/seq2seq.py: ``encoder_tokens``, ``encoder_mask``, decoder
input ``tokens``, ``labels``) through the T5 forward with ``lm_labels``. Either way the model returns
megatron's vocab-parallel cross entropy per label position, [b, s] (s: the decoder length for T5), computed
from the TP-sharded logits without gathering them; the caller masks it with ``loss_mask`` and normalises
(framework/training/step.py: the mean over all target tokens of a global batch).

Encoder padding is hidden from the encoder's self-attention and the decoder's cross-attention (megatron's
boolean mask, True = hidden, [b, 1, 1, s_enc]); the decoder is causal, so its right padding is never seen.
Transformers' ``T5ForConditionalGeneration(labels=...)`` computes the same mean over the labels that are
not -100 (tests/test_t5_job.py checks loss and LoRA gradients against it).
"""

from __future__ import annotations

import torch


def model_loss(model, batch: dict) -> torch.Tensor:
    """Per-token loss [b, s] of one micro-batch (this stage's output tensor under PP)."""
    if "encoder_tokens" in batch:
        return seq2seq_loss(model, batch)
    # attention_mask: only packed batches carry one (block-diagonal causal, True = masked out); without it
    # the core attention is plain causal.
    return model(batch["tokens"], batch["position_ids"], batch.get("attention_mask"), labels=batch["labels"])


def seq2seq_loss(model, batch: dict) -> torch.Tensor:
    """Per-token loss [b, s_dec] of a seq2seq micro-batch (a T5Model, possibly DDP-wrapped)."""
    hidden = (batch["encoder_mask"] == 0)[:, None, None, :]
    return model(batch["encoder_tokens"], batch["tokens"], hidden, None, hidden, lm_labels=batch["labels"])
