"""Teacher-forced loss of reference samples, per sample, at any TP/PP: what validation computes, kept apart.

For sample i with target positions T_i (its ``loss_mask``: the completion and the final EOS for
prompt/completion data, the last assistant turn and its end-of-turn token for chat; see framework/data)::

    sum_i   = sum over t in T_i of  -log p(x_t | x_<t)        (megatron's vocab-parallel cross entropy)
    count_i = |T_i|

The corpus loss is ``sum_i sum_i / sum_i count_i`` -- the mean over all target tokens, exactly the
validation loss of training (framework/training/step.py ``evaluate``) -- and perplexity is its exp. The
forward goes through megatron's schedule as training's does (prompt methods' virtual positions added and
ignored); the last stage's per-sample sums are broadcast over the pipeline, so every rank returns them.

Encoder-decoder models (T5): a sample is framework/data/seq2seq.py's (encoder input = prompt + EOS, targets
= completion + EOS); it is batched by ``collate_seq2seq`` (decoder start = ``pad_id``, T5's) and its
per-token loss comes from framework/models/kinds.py ``model_loss``, as the job's validation loss does.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

from framework.data.batching import collate
from framework.data.sample import Sample
from framework.data.seq2seq import collate_seq2seq
from framework.inference.encoder_decoder import is_encoder_decoder
from framework.models.kinds import model_loss
from framework.models.unwrap import unwrap_model
from framework.peft.virtual_tokens import with_virtual_tokens


def _forward_step(data_iterator, model):
    batch = next(data_iterator)
    per_token = model_loss(model, batch)
    mask = batch["loss_mask"]

    def loss_func(output_tensor):
        per_sample = torch.stack([(output_tensor.float() * mask).sum(1), mask.sum(1)], dim=1)  # [b, 2]
        return per_sample[:, 0].sum(), mask.sum().to(torch.int), {"per_sample": per_sample.double()}

    return per_token, loss_func


@torch.no_grad()
def sample_losses(model, samples: list[Sample], pad_id: int, micro_batch_size: int = 1) -> list[tuple[float, int]]:
    """``(sum of target-token losses, number of target tokens)`` of each sample, on every rank of the
    model-parallel group (all of which call this with the same samples)."""
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func

    gpt = unwrap_model(model)
    device = next(gpt.parameters()).device
    multiple = gpt.config.tensor_model_parallel_size if gpt.config.sequence_parallel else 1
    was_training = model.training
    model.eval()
    out = torch.zeros(len(samples), 2, dtype=torch.float64)
    try:
        for start in range(0, len(samples), micro_batch_size):
            group = samples[start:start + micro_batch_size]
            if is_encoder_decoder(model):
                batch = collate_seq2seq(group, pad_id, pad_id, multiple)
            else:
                batch = with_virtual_tokens(model, [collate(group, pad_id, pad_to_multiple_of=multiple)])[0]
            batch = {k: v.to(device) for k, v in batch.items()}
            results = get_forward_backward_func()(
                forward_step_func=_forward_step, data_iterator=iter([batch]), model=[model], num_microbatches=1,
                seq_length=batch["tokens"].shape[1], micro_batch_size=len(group), forward_only=True)
            if ps.is_pipeline_last_stage():
                out[start:start + len(group)] = results[0]["per_sample"].cpu()
    finally:
        model.train(was_training)
    if ps.get_pipeline_model_parallel_world_size() > 1:
        t = out.to(device)
        dist.broadcast(t, src=ps.get_pipeline_model_parallel_last_rank(), group=ps.get_pipeline_model_parallel_group())
        out = t.cpu()
    return [(float(s), int(round(n))) for s, n in out.tolist()]


def corpus_loss(losses: list[tuple[float, int]]) -> dict[str, float]:
    """{'loss': mean per target token, 'perplexity': exp(loss), 'target_tokens': n}."""
    total = sum(s for s, _ in losses)
    n = sum(c for _, c in losses)
    loss = total / n if n else float("nan")
    return {"loss": loss, "perplexity": math.exp(loss) if n else float("nan"), "target_tokens": n}
