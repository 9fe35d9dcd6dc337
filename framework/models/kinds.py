"""The two kinds of model the families build, and what differs between them, in one place.

    decoder_only      GPT-style: one stack, causal; a batch is ``tokens``/``labels``/``position_ids`` (packed
                      rows add a block-diagonal ``attention_mask``); the prompt and completion share one row
    encoder_decoder   T5: an encoder over the prompt (+ eos), a causal decoder over the completion with
                      cross-attention; a batch adds ``encoder_tokens``/``encoder_mask`` (framework/data/seq2seq.py)

A family declares its kind (framework/models/registry.py ``Family.kind``); :func:`kind_of` is how every
layer asks. What each kind means for a layer above lives in that layer, keyed by the kind's name: its
batches (framework/data/batching.py), its greedy completion (framework/inference/generate.py); here are the
loss of a micro-batch and what the jobs refuse for the kind, each refusal naming its key.

Loss: the model returns megatron's vocab-parallel cross entropy per label position, [b, s] (s: the decoder
length for T5), computed from the TP-sharded logits without gathering them; the caller masks it with
``loss_mask`` and normalises (framework/training/step.py: the mean over all target tokens of a global batch).
For T5, encoder padding is hidden from the encoder's self-attention and the decoder's cross-attention
(megatron's boolean mask, True = hidden, [b, 1, 1, s_enc]); the decoder is causal, so its right padding is
never seen. Transformers' ``T5ForConditionalGeneration(labels=...)`` computes the same mean over the labels
that are not -100 (tests/training/test_t5_job.py checks loss and LoRA gradients against it).
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import torch

from framework.models.t5 import t5_problems


def decoder_only_loss(model, batch: dict) -> torch.Tensor:
    # attention_mask: only packed batches carry one (block-diagonal causal, True = masked out); without it
    # the core attention is plain causal.
    return model(batch["tokens"], batch["position_ids"], batch.get("attention_mask"), labels=batch["labels"])


def encoder_decoder_loss(model, batch: dict) -> torch.Tensor:
    hidden = (batch["encoder_mask"] == 0)[:, None, None, :]
    return model(batch["encoder_tokens"], batch["tokens"], hidden, None, hidden, lm_labels=batch["labels"])


def _no_problems(cfg, model_cfg, job: str) -> list[str]:
    return []


#: PEFT methods the encoder-decoder jobs support (none: full fine-tuning)
T5_METHODS = ("lora", "none")
#: LoRA targets of a T5 (framework/peft/wrapping.py: layer targets on both stacks, cross-attention targets)
T5_LORA_TARGETS = ("qkv", "proj", "fc1", "fc2", "cross_q", "cross_kv", "cross_proj")


def _encoder_decoder_problems(cfg, model_cfg, job: str) -> list[str]:
    """What a job (``train``, ``dpo``, ``generate``) asks of an encoder-decoder model that it does not do.
    Supported: ``peft=lora`` (targets qkv, proj, fc1, fc2 on both stacks; cross_q, cross_kv, cross_proj on the
    decoder's cross-attention) and full fine-tuning, at any TP (with or without SP) and DP; generation and
    evaluation with such an adapter or weights. Refused: pipeline parallelism (framework/models/t5.py), other
    PEFT methods, LoRA on the embedding or output layer, chat data and packing (framework/data/seq2seq.py),
    DPO, fp8 (T5 runs on the local layer spec, not Transformer Engine's)."""
    problems = t5_problems(model_cfg, cfg.parallel.pipeline)
    if cfg.get("precision") == "fp8":
        problems.append("precision=fp8 is not supported for T5 (it runs on the local layer spec, not Transformer "
                        "Engine's); use precision=bf16" + (" or fp32" if job == "generate" else ""))
    if job == "generate":
        return problems
    method = cfg.peft.method
    if method not in T5_METHODS:
        problems.append(f"peft.method={method!r} is not supported for encoder-decoder models (T5) yet; use "
                        f"peft=lora or peft=none (full fine-tuning)")
    elif method == "lora":
        other = [t for t in (cfg.peft.get("targets") or []) if t not in T5_LORA_TARGETS]
        if other:
            problems.append(f"peft.targets: {other} are not supported for T5 (the shared embedding feeds both "
                            f"stacks); T5 LoRA targets: {list(T5_LORA_TARGETS)}")
    if job == "dpo":
        problems.append("DPO (launch/dpo.py) is not supported for encoder-decoder models (T5)")
    return problems


@dataclasses.dataclass(frozen=True)
class ModelKind:
    name: str
    loss: Callable                   # loss(model, micro_batch) -> per-token loss [b, s]
    problems: Callable               # problems(cfg, model_cfg, job) -> what ``job`` refuses for this kind
    peft_methods: tuple | None       # the PEFT methods its jobs take (None: all)


DECODER_ONLY = ModelKind("decoder_only", decoder_only_loss, _no_problems, None)
ENCODER_DECODER = ModelKind("encoder_decoder", encoder_decoder_loss, _encoder_decoder_problems, T5_METHODS)


def kind_of_batch(batch: dict) -> ModelKind:
    """The kind a micro-batch was built for (its tensors say: an encoder-decoder batch has encoder tokens)."""
    return ENCODER_DECODER if "encoder_tokens" in batch else DECODER_ONLY


def model_loss(model, batch: dict) -> torch.Tensor:
    """Per-token loss [b, s] of one micro-batch (this stage's output tensor under PP), for any kind."""
    return kind_of_batch(batch).loss(model, batch)
