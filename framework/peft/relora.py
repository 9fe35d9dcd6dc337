"""ReLoRA (Lialin et al. 2023, "ReLoRA: High-Rank Training Through Low-Rank Updates"): LoRA whose update
is merged into the base every ``peft.merge_every`` steps and then started again, so that the sum of many
rank-r updates can reach a high rank while each step trains only rank-r factors.

The layers are LoRA's (framework/peft/lora.py): y = W x + s B A x with W frozen. After step k T (T =
``merge_every``, k = 1, 2, ...), a restart:

    1. W <- W + s B A                 every wrapped layer, on this rank's shard of W (the shard's own block
                                      of B A, framework/peft/merge.py: no communication), so after k restarts
                                      W_k = W_0 + sum_{i<=k} s B_i A_i
    2. A <- a fresh kaiming-uniform draw, B <- 0
                                      the model's function is unchanged (B A = 0); A is drawn whole from a
                                      seed of (run seed, layer, target, restart number) and sliced, as LoRA's
                                      first draw, so every TP/PP layout restarts from the same factors
    3. Adam's moments of the adapters: ``peft.reset=zero`` sets them to 0; ``reset=prune`` (the paper's
                                      choice) keeps in each tensor only the entries whose magnitude exceeds
                                      the ``prune_ratio`` quantile of that tensor's magnitudes (the quantile of
                                      the whole tensor: TP shards are gathered to take it). Adam's step
                                      count is kept, as in the paper's code.
    4. the learning rate warms up again ("jagged" schedule, as the paper's code): on the j-th step after a
                                      restart (j = 0 .. W-1, W = restart_warmup_steps) it is j / W times the
                                      run's schedule at the end of that warm-up; elsewhere the run's schedule

Every parameter the optimizer holds is an adapter factor (the base is frozen), so steps 3 and 4 apply to
the whole optimizer. A job's checkpoint then holds the merged base (a full checkpoint, resharded on load)
beside the current adapter, and a resume continues exactly (framework/checkpoint/trained.py).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps

from framework.peft.lora import TARGETS, LoRAEmbedding, LoRALinear, targets_problems
from framework.peft.wrapping import init_seed, peft_modules

RESETS = ("zero", "prune")


def restart_seed(base_seed: int, layer_number: int | None, target: str, restart: int) -> int:
    """The seed of A's draw at restart ``restart`` (1, 2, ...) of the layer's ``target``: distinct from
    LoRA's first draw (restart 0) and from every other layer, target and restart."""
    return init_seed(init_seed(base_seed, layer_number, list(TARGETS).index(target)), restart, 0)


def restart_warmup(step: int, merge_every: int, restart_warmup_steps: int) -> tuple[float, int] | None:
    """For step ``step`` (1-based) in a warm-up after a restart: (the factor j / W, the schedule position
    whose rate it scales: the warm-up's end); None elsewhere. Positions count steps before this one (the
    scheduler's ``num_steps``), as the paper's schedule counts its 0-based ``current_step``."""
    t = step - 1
    restart_number, j = divmod(t, merge_every)
    if restart_number == 0 or j >= restart_warmup_steps:
        return None
    return j / restart_warmup_steps, restart_number * merge_every + restart_warmup_steps


def magnitude_prune_(tensor: torch.Tensor, ratio: float, group=None) -> None:
    """Zero the entries of ``tensor`` whose magnitude is at or below the ``ratio`` quantile of the magnitudes
    of the whole tensor; ``group``: the process group over which the tensor is sharded (its shards are
    gathered to take the quantile)."""
    magnitude = tensor.abs()
    whole = magnitude.flatten().float()
    if group is not None and dist.get_world_size(group) > 1:
        parts = [torch.empty_like(whole) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, whole.contiguous(), group=group)
        whole = torch.cat(parts)
    threshold = torch.quantile(whole, ratio).to(tensor.dtype)
    tensor.mul_((magnitude > threshold).to(tensor.dtype))


class Restarts:
    """ReLoRA's restarts of a model's LoRA layers and the optimizer that trains them (every rank calls)."""

    def __init__(self, model, optimizer, scheduler, merge_every: int, restart_warmup_steps: int, reset: str,
                 prune_ratio: float, seed: int):
        self.model, self.optimizer, self.scheduler, self.seed = model, optimizer, scheduler, int(seed)
        self.merge_every, self.restart_warmup_steps = int(merge_every), int(restart_warmup_steps)
        self.reset, self.prune_ratio = reset, float(prune_ratio)
        self.layers = [m for m in peft_modules(model) if isinstance(m, (LoRALinear, LoRAEmbedding))]
        for layer in self.layers:
            reason = layer.merge_refusal()
            if reason:
                raise ValueError(f"peft.method=relora merges LoRA into the base, but {reason}")

    @classmethod
    def from_config(cls, peft, model, optimizer, scheduler, seed: int) -> "Restarts":
        return cls(model, optimizer, scheduler, peft.merge_every, peft.restart_warmup_steps, peft.reset,
                   peft.prune_ratio, seed)

    def after_step(self, step: int) -> bool:
        """After optimizer and scheduler stepped for ``step``: restart when ``step`` is a multiple of
        merge_every, then set the next step's learning rate. Returns whether it restarted."""
        restarted = step % self.merge_every == 0
        if restarted:
            self.restart(step // self.merge_every)
        self.set_lr(step + 1)
        return restarted

    @torch.no_grad()
    def restart(self, number: int) -> None:
        """Restart ``number`` (1, 2, ...): steps 1-3 of the module docstring."""
        for layer in self.layers:
            layer.merge()
            layer.merged = False  # the update now belongs to the base: B A restarts from 0
            layer.reset_parameters(restart_seed(self.seed, layer.layer_number, layer.target, number))
        # megatron's mixed-precision optimizers keep fp32 main copies of the factors: copy the new values in
        self.optimizer.reload_model_params()
        for opt in getattr(self.optimizer, "chained_optimizers", [self.optimizer]):
            inner = opt.optimizer
            for group in inner.param_groups:
                for param in group["params"]:
                    state = inner.state.get(param, {})
                    for key in ("exp_avg", "exp_avg_sq"):
                        if key not in state:
                            continue
                        if self.reset == "zero":
                            state[key].zero_()
                        else:
                            sharded = getattr(param, "tensor_model_parallel", False)
                            magnitude_prune_(state[key], self.prune_ratio,
                                             ps.get_tensor_model_parallel_group() if sharded else None)

    def set_lr(self, step: int) -> None:
        """In a warm-up after a restart, replace the learning rate the scheduler set for ``step`` (after every
        scheduler step, and after a resume restored the scheduler) by the jagged schedule's."""
        warmup = restart_warmup(step, self.merge_every, self.restart_warmup_steps)
        if warmup is None:
            return
        factor, position = warmup
        now, self.scheduler.num_steps = self.scheduler.num_steps, position
        try:
            for group in self.optimizer.param_groups:  # each group's own rate (LoRA+ groups, lr_mult)
                group["lr"] = factor * self.scheduler.get_lr(group)
        finally:
            self.scheduler.num_steps = now


def config_problems(cfg, model_cfg) -> list[str]:
    """Checks of ``cfg.peft`` for ReLoRA, before any process group starts (its own keys' values are checked
    by framework/config/peft.py's section)."""
    problems = targets_problems(cfg.peft, TARGETS, "ReLoRA")
    if cfg.peft.get("reset") == "prune" and cfg.get("trainer", {}).get("distributed_optimizer", False):
        problems.append("peft.reset=prune takes each tensor's magnitude quantile, but trainer.distributed_optimizer="
                        "true splits the optimizer state of a tensor over data-parallel ranks; use peft.reset=zero or "
                        "trainer.distributed_optimizer=false")
    return problems
