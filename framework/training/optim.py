"""Wrap a model stage in megatron DDP and build its optimizer (Adam) and LR schedule (warmup + cosine).

Parameters a PEFT method marked with their own learning rate (LoRA+, framework/peft/lora_plus.py) get a
parameter group each whose peak and final learning rates are the trainer's times their multiplier, so one
schedule scales every group by the same factor at every step; the rest keep megatron's groups.
"""

from __future__ import annotations

import torch

from framework.models import kv_replication
from framework.models.kv_replication import count_copies_once
from framework.peft.lora_plus import lr_multiplier


def wrap_ddp(model, use_distributed_optimizer: bool = False):
    """megatron DDP: gradients of trainable parameters live in contiguous fp32 buffers, reduced over DP."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.distributed.finalize_model_grads import finalize_model_grads

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
    config = OptimizerConfig(
        optimizer="adam", lr=float(trainer.lr), min_lr=float(trainer.min_lr),
        weight_decay=float(trainer.weight_decay), adam_beta1=float(trainer.adam_beta1),
        adam_beta2=float(trainer.adam_beta2), clip_grad=float(trainer.clip_grad),
        bf16=precision in ("bf16", "fp8") and on_gpu,  # on CPU bf16 is autocast over fp32 parameters
        params_dtype=torch.bfloat16 if precision in ("bf16", "fp8") and on_gpu else torch.float32,
        use_distributed_optimizer=ddp_model.ddp_config.use_distributed_optimizer,
    )
    opt = get_megatron_optimizer(config, [ddp_model], config_overrides=lr_overrides(ddp_model, config))
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


def lr_overrides(model, config):
    """megatron's standard parameter-group overrides (no weight decay on 1-D tensors and biases), plus one
    group per learning-rate multiplier a PEFT method marked (:func:`framework.peft.lora_plus.lr_multiplier`):
    peak ``m * lr``, final ``m * min_lr``, ``lr_mult = m`` (which also tells the groups apart when a
    distributed optimizer's state is loaded). None without marks: megatron's defaults exactly."""
    from megatron.core.optimizer import ParamKey, ParamPredicate, get_standard_config_overrides

    lr = float(config.lr)
    mults = sorted({m for p in model.parameters() if p.requires_grad
                    for m in [lr_multiplier(p, lr)] if m is not None})
    if not mults:
        return None
    overrides = get_standard_config_overrides(config)
    for m in mults:
        match = ParamPredicate(name=f"lr_x{m!r}", fn=lambda p, m=m: p.requires_grad and lr_multiplier(p, lr) == m)
        overrides[ParamKey(predicate=match)] = {"max_lr": m * lr, "min_lr": m * float(config.min_lr), "lr_mult": m}
    return overrides
