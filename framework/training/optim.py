"""Wrap a model stage in megatron DDP and build its optimizer (Adam) and LR schedule (warmup + cosine)."""

from __future__ import annotations

import torch


def wrap_ddp(model, use_distributed_optimizer: bool = False):
    """megatron DDP: gradients of trainable parameters live in contiguous fp32 buffers, reduced over DP."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.distributed.finalize_model_grads import finalize_model_grads

    from framework.models import kv_replication

    config = model.config
    ddp = DistributedDataParallel(
        config=config,
        ddp_config=DistributedDataParallelConfig(
            grad_reduce_in_fp32=True, overlap_grad_reduce=False,
            use_distributed_optimizer=use_distributed_optimizer),
        module=model,
    )
    # The schedule calls these: finalisation all-reduces DP/SP/embedding grads and divides by the
    # global number of target tokens.
    config.finalize_model_grads_func = kv_replication.with_tied_copies(finalize_model_grads)  # + KV copies' grads
    config.no_sync_func = ddp.no_sync
    return ddp


def build_optimizer(ddp_model, trainer, precision: str = "fp32", total_steps: int | None = None):
    """Return (optimizer, scheduler) for the trainable parameters of ``ddp_model``; the schedule decays over
    ``total_steps`` (default ``trainer.max_steps``)."""
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    on_gpu = torch.cuda.is_available()
    opt = get_megatron_optimizer(
        OptimizerConfig(
            optimizer="adam", lr=float(trainer.lr), min_lr=float(trainer.min_lr),
            weight_decay=float(trainer.weight_decay), adam_beta1=float(trainer.adam_beta1),
            adam_beta2=float(trainer.adam_beta2), clip_grad=float(trainer.clip_grad),
            bf16=precision in ("bf16", "fp8") and on_gpu,  # on CPU bf16 is autocast over fp32 parameters
            params_dtype=torch.bfloat16 if precision in ("bf16", "fp8") and on_gpu else torch.float32,
            use_distributed_optimizer=ddp_model.ddp_config.use_distributed_optimizer,
        ),
        [ddp_model],
    )
    from framework.models.kv_replication import count_copies_once

    count_copies_once(opt, ddp_model)  # a KV head replicated over TP counts once in the grad norm
    steps = int(trainer.max_steps if total_steps is None else total_steps)
    warmup = min(int(trainer.warmup_steps), steps - 1)
    sched = OptimizerParamScheduler(
        opt, init_lr=0.0, max_lr=float(trainer.lr), min_lr=float(trainer.min_lr),
        lr_warmup_steps=warmup, lr_decay_steps=steps, lr_decay_style="cosine",
        start_wd=float(trainer.weight_decay), end_wd=float(trainer.weight_decay),
        wd_incr_steps=steps, wd_incr_style="constant",
    )
    return opt, sched
