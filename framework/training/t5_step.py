"""The fine-tuning job's encoder-decoder (T5) path: the forward of a seq2seq micro-batch, its micro-batches,
the greedy completion shown before and after training, and what the job refuses for T5.

Loss. A micro-batch (framework/data/seq2seq.py: ``encoder_tokens``, ``encoder_mask``, decoder input
``tokens``, ``labels``, ``loss_mask``) gives megatron's vocab-parallel cross entropy per decoder position,
[b, s_dec]; framework/training/step.py masks it and normalises exactly as for a GPT: the loss of a global
batch is the mean over all its decoder target tokens (completion + eos), however it is split into
micro-batches and data-parallel ranks. Transformers' ``T5ForConditionalGeneration(labels=...)`` computes the
same mean over the labels that are not -100 (tests/test_t5_job.py checks loss and LoRA gradients against it).

Encoder padding is hidden from the encoder's self-attention and the decoder's cross-attention (megatron's
boolean mask, True = hidden, [b, 1, 1, s_enc]); the decoder is causal, so its right padding is never seen.

What the job supports for T5: ``peft=lora`` (targets qkv, proj, fc1, fc2 on both stacks; cross_q, cross_kv,
cross_proj on the decoder's cross-attention) and full fine-tuning (``peft=none``), at any TP (with or without
SP) and DP. Refused, with the key: pipeline parallelism (framework/models/t5.py), other PEFT methods, LoRA on
the embedding or output layer, chat data and packing (framework/data/seq2seq.py), DPO, fp8 (T5 runs on the
local layer spec, not Transformer Engine's).
"""

from __future__ import annotations

import torch

#: PEFT methods the T5 job supports (none: full fine-tuning)
T5_METHODS = ("lora", "none")
#: LoRA targets of a T5 (framework/peft/wrapping.py: layer targets on both stacks, cross-attention targets)
T5_LORA_TARGETS = ("qkv", "proj", "fc1", "fc2", "cross_q", "cross_kv", "cross_proj")


def seq2seq_loss(model, batch: dict) -> torch.Tensor:
    """Per-token loss [b, s_dec] of a seq2seq micro-batch (a T5Model, possibly DDP-wrapped)."""
    hidden = (batch["encoder_mask"] == 0)[:, None, None, :]
    return model(batch["encoder_tokens"], batch["tokens"], hidden, None, hidden, lm_labels=batch["labels"])


def seq2seq_batches(micro_batch_indices: list[list[int]], indices: list[int], dataset, tokenizer,
                    multiple: int) -> list[dict]:
    """This rank's micro-batches (``micro_batch_indices``) of a global batch (``indices``), all padded to the
    global batch's longest encoder input and label sequence (rounded up to ``multiple``), as every rank pads
    a GPT batch; the decoder starts from the tokenizer's pad id (T5's ``decoder_start_token_id``)."""
    from framework.data.seq2seq import collate_seq2seq, lengths

    se, sd = lengths([dataset[i] for i in indices])
    return [collate_seq2seq([dataset[i] for i in mb], tokenizer.pad_id, tokenizer.pad_id, multiple,
                            encoder_length=se, decoder_length=sd) for mb in micro_batch_indices]


def complete(model, sample, tokenizer, max_new_tokens: int, pad_multiple: int) -> str:
    """Greedy completion of a seq2seq sample's encoder input (its prompt + eos)."""
    from framework.data.seq2seq import split
    from framework.inference.generate import t5_greedy

    encoder, _ = split(sample)
    ids = t5_greedy(model, encoder, max_new_tokens, tokenizer.pad_id, tokenizer.eos_id, pad_multiple)
    return tokenizer.decode(ids)


def job_problems(cfg, model_cfg) -> list[str]:
    """What a fine-tuning config asks of an encoder-decoder model that the job does not do (each names its key)."""
    from omegaconf import OmegaConf

    from framework.runtime.errors import ConfigError
    from framework.models.t5 import check_t5

    problems = []
    try:
        check_t5(model_cfg, int(cfg.parallel.pipeline))
    except ConfigError as e:
        problems += [line.strip()[2:] for line in str(e).splitlines()[1:]]
    method = cfg.peft.method
    if method not in T5_METHODS:
        problems.append(f"peft.method={method!r} is not supported for encoder-decoder models (T5) yet; use "
                        f"peft=lora or peft=none (full fine-tuning)")
    elif method == "lora":
        other = [t for t in (cfg.peft.get("targets") or []) if t not in T5_LORA_TARGETS]
        if other:
            problems.append(f"peft.targets: {other} are not supported for T5 (the shared embedding feeds both "
                            f"stacks); T5 LoRA targets: {list(T5_LORA_TARGETS)}")
    if "dpo" in cfg:
        problems.append("DPO (launch/dpo.py) is not supported for encoder-decoder models (T5)")
    if OmegaConf.select(cfg, "precision") == "fp8":
        problems.append("precision=fp8 is not supported for T5 (it runs on the local layer spec, not Transformer "
                        "Engine's); use precision=bf16")
    return problems
