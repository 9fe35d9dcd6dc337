"""One optimiser step and one evaluation pass over megatron-core's forward-backward schedule.

Loss normalisation: the loss of a global batch is the mean over *all its target tokens*, however it is
split into micro-batches, data-parallel ranks and pipeline stages. Each micro-batch returns its
(sum of token losses, number of target tokens); megatron's schedule backpropagates the sums
(``calculate_per_token_loss``) and ``finalize_model_grads`` divides every gradient by the global token
count, all-reduced over data-parallel ranks. The logged loss is the same ratio, sum / count.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Iterable

import torch
import torch.distributed as dist

from framework.models.kinds import model_loss
from framework.peft.virtual_tokens import with_virtual_tokens


@dataclasses.dataclass
class StepResult:
    loss: float            # mean loss per target token over the global batch
    target_tokens: int     # target tokens in the global batch
    grad_norm: float | None = None
    lr: float | None = None


def _autocast(precision: str, device: torch.device):
    # On CPU, bf16 means autocast of the matmuls with fp32 weights and fp32 main grads.
    if precision == "bf16" and device.type == "cpu":
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def forward_step_fn(precision: str, device: torch.device):
    """megatron's forward step for a micro-batch on ``device``: the per-token loss, and a loss function
    giving (sum of its target-token losses, number of target tokens, both for :func:`global_ratio`)."""
    def forward_step(data_iterator, model):
        batch = next(data_iterator)
        batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
        with _autocast(precision, device):
            per_token_loss = model_loss(model, batch)
        loss_mask = batch["loss_mask"]

        def loss_func(output_tensor):
            loss_sum = (output_tensor.float() * loss_mask).sum()
            n = loss_mask.sum().to(torch.int)
            return loss_sum, n, {"lm loss": torch.stack([loss_sum.detach(), n.detach().float()])}

        return per_token_loss, loss_func

    return forward_step


def global_ratio(reduced: list[dict], device) -> tuple[float, int]:
    """Sum (loss, tokens) over micro-batches here and over all ranks; TP copies cancel in the ratio."""
    t = torch.zeros(2, dtype=torch.float64, device=device)
    for r in reduced:
        t += r["lm loss"].to(t)
    dist.all_reduce(t)
    from megatron.core import parallel_state as ps

    n = t[1].item() / ps.get_tensor_model_parallel_world_size()  # every TP rank of a last stage adds it
    return (t[0] / t[1]).item() if t[1] > 0 else float("nan"), round(n)


def forward_backward(model, micro_batches: list[dict], precision: str = "fp32") -> tuple[float, int]:
    """Accumulate gradients of this rank's micro-batches into ``main_grad``; return the global
    (mean loss per target token, number of target tokens). Gradients end finalised: reduced over
    DP, SP and tied embeddings, and divided by the global target-token count."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    micro_batches = with_virtual_tokens(model, micro_batches)  # prompt methods: n more positions, no loss
    device = next(model.parameters()).device
    seq_length, mbs = micro_batches[0]["tokens"].shape[1], micro_batches[0]["tokens"].shape[0]
    model.zero_grad_buffer()
    reduced = get_forward_backward_func()(
        forward_step_func=forward_step_fn(precision, device),
        data_iterator=iter(micro_batches),
        model=[model],
        num_microbatches=len(micro_batches),
        seq_length=seq_length,
        micro_batch_size=mbs,
        forward_only=False,
    )
    return global_ratio(reduced, device)


def train_step(model, optimizer, scheduler, micro_batches: list[dict], precision: str = "fp32") -> StepResult:
    """Forward and backward every micro-batch of this rank's share of a global batch, then step."""
    optimizer.zero_grad()
    loss, n_target = forward_backward(model, micro_batches, precision)
    ok, grad_norm, _ = optimizer.step()
    scheduler.step(increment=1)
    return StepResult(loss=loss, target_tokens=n_target,
                      grad_norm=None if grad_norm is None else float(grad_norm),
                      lr=optimizer.param_groups[0]["lr"])


@torch.no_grad()
def evaluate(model, micro_batches: Iterable[dict], precision: str = "fp32") -> float:
    """Mean loss per target token over the given micro-batches (this rank's share), all ranks agreeing."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    micro_batches = with_virtual_tokens(model, list(micro_batches))
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    reduced = []
    for mb in micro_batches:  # one at a time: validation batches may differ in length
        reduced += get_forward_backward_func()(
            forward_step_func=forward_step_fn(precision, device),
            data_iterator=iter([mb]),
            model=[model],
            num_microbatches=1,
            seq_length=mb["tokens"].shape[1],
            micro_batch_size=mb["tokens"].shape[0],
            forward_only=True,
        )
    model.train(was_training)
    return global_ratio(reduced, device)[0]
