"""Full-vocabulary logits of a token batch, on every rank, for any TP/PP/SP layout.

The forward pass runs through megatron's own pipeline schedule (``get_forward_backward_func`` with
``forward_only=True``), so the code path is the one training uses:

    first stage    tokens -> embedding -> its layers -> send hidden [s/(tp if sp), mbs, h]
    middle stages  recv hidden -> their layers -> send
    last stage     recv -> layers -> final norm -> output layer -> [mbs, s, V/tp] (vocab-parallel)
                   -> all-gather over TP along the vocabulary -> [mbs, s, V]

then the last stage broadcasts the [b, s, V] float32 logits over the pipeline group. Micro-batches are
``tokens.split(micro_batch_size)``; their logits are concatenated in order.

Megatron's GPTModel called without labels returns [b, s, V/tp] (it transposes from [s, b, .]
itself). The p2p buffers are shaped [seq_length / (tp if sequence_parallel), micro_batch_size,
hidden] in ``config.pipeline_dtype``, so ``seq_length`` and ``micro_batch_size`` must be the real ones.
"""

from __future__ import annotations

import torch

from framework.models.unwrap import unwrap_model
from framework.models.vocab_parallel import gather_vocab_parallel
from framework.peft.virtual_tokens import extend_batch, num_virtual_tokens


def _keep_logits(output_tensor: torch.Tensor):
    """Loss function for the last stage: no loss, just the gathered logits (schedule's 3-tuple form:
    loss, number of tokens, data to keep)."""
    logits = gather_vocab_parallel(output_tensor)
    zero = torch.zeros((), dtype=torch.float32, device=output_tensor.device)
    return zero, torch.ones((), dtype=torch.int, device=output_tensor.device), {"logits": logits.float()}


def _forward_step(data_iterator, model):
    tokens = next(data_iterator)
    b, s = tokens.shape
    position_ids = torch.arange(s, device=tokens.device).unsqueeze(0).expand(b, s)
    # attention_mask=None: the layers apply their causal mask themselves.
    return model(tokens, position_ids, None), _keep_logits


def forward_logits(model, tokens: torch.Tensor, micro_batch_size: int | None = None) -> torch.Tensor:
    """float32 logits [b, s, vocab] of ``tokens`` [b, s], identical on every rank of the model-parallel
    group. ``micro_batch_size`` (default b) must divide b. Runs without autograd; does not change the
    model's train/eval mode."""
    from megatron.core import parallel_state
    from megatron.core.pipeline_parallel import get_forward_backward_func

    models = model if isinstance(model, (list, tuple)) else [model]
    if len(models) != 1:
        raise ValueError("forward_logits: virtual pipeline stages (a list of model chunks) are not supported")
    gpt = unwrap_model(models[0])
    if tokens.dim() != 2:
        raise ValueError(f"forward_logits: tokens must be [batch, seq], got shape {tuple(tokens.shape)}")
    b, s = tokens.shape
    mbs = micro_batch_size or b
    if b % mbs:
        raise ValueError(f"forward_logits: micro_batch_size={mbs} does not divide the batch size {b}")
    tp = parallel_state.get_tensor_model_parallel_world_size()
    # Prompt methods: n virtual positions in front (and SP padding behind), dropped from the logits below.
    n_virtual, real = num_virtual_tokens(gpt), s
    tokens = extend_batch({"tokens": tokens}, n_virtual, tp if gpt.config.sequence_parallel else 1)["tokens"]
    s = tokens.shape[1]
    if gpt.config.sequence_parallel and s % tp:
        raise ValueError(f"forward_logits: with sequence parallelism the sequence length {s} must be a "
                         f"multiple of the tensor-parallel size {tp}")

    microbatches = list(tokens.split(mbs))
    with torch.no_grad():
        results = get_forward_backward_func()(
            forward_step_func=_forward_step,
            data_iterator=iter(microbatches),
            model=models,
            num_microbatches=len(microbatches),
            seq_length=s,
            micro_batch_size=mbs,
            forward_only=True,
        )

    vocab = gpt.vocab_size
    if parallel_state.is_pipeline_last_stage():
        logits = torch.cat([r["logits"] for r in results], dim=0)
        if tuple(logits.shape) != (b, s, vocab):
            raise RuntimeError(f"forward_logits: last stage produced logits of shape {tuple(logits.shape)}, "
                               f"expected {(b, s, vocab)}")
    else:
        logits = torch.empty((b, s, vocab), dtype=torch.float32, device=tokens.device)
    if parallel_state.get_pipeline_model_parallel_world_size() > 1:
        torch.distributed.broadcast(logits, src=parallel_state.get_pipeline_model_parallel_last_rank(),
                                    group=parallel_state.get_pipeline_model_parallel_group())
    return logits[:, n_virtual:n_virtual + real] if n_virtual else logits
