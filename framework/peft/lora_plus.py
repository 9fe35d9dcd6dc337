"""LoRA+ (Hayou et al. 2024): the B factors learn faster than the A factors, as HF PEFT's
``peft.optimizers.create_loraplus_optimizer`` groups them.

    lora_B (and every other 1-D trainable tensor, e.g. DoRA's magnitude)   lr x lora_plus_ratio
    the embedding LoRA's A and B (HF's ``Embedding`` tuner layer)          lora_plus_lr_embedding (absolute)
    everything else (lora_A)                                               lr

The method marks each trainable tensor with its learning rate rule (:func:`mark`); the optimizer
(framework/training/optim.py) turns the marks into parameter groups whose peak and final learning rates
are the trainer's times :func:`lr_multiplier`, so warm-up and cosine decay scale every group by the same
factor at every step (HF's schedulers multiply each group's initial lr by one shared factor likewise).
The embedding's rate is absolute in HF PEFT (default 1e-6): here it becomes the multiplier
``lora_plus_lr_embedding / trainer.lr``, the same peak, and the schedule shapes it as it shapes the others.

Weight decay stays the trainer's rule (megatron's: no decay on 1-D tensors and biases). HF PEFT decays 1-D
tensors outside norms and biases (a DoRA magnitude), so with ``trainer.weight_decay > 0`` a DoRA magnitude
is decayed there and not here; LoRA's factors are 2-D and decay alike in both.
"""

from __future__ import annotations

from torch import nn

from framework.peft.wrapping import peft_modules

#: the attribute a marked parameter carries: ("ratio", r) -- r times the schedule -- or ("lr", peak) -- absolute
ATTR = "lora_plus_lr"
#: HF PEFT's default learning rate of embedding LoRA factors under LoRA+ (``loraplus_lr_embedding``)
HF_LR_EMBEDDING = 1e-6


def mark(model: nn.Module, ratio: float, lr_embedding: float = HF_LR_EMBEDDING) -> int:
    """Mark this stage's trainable LoRA tensors with their LoRA+ learning rate rule; return how many were marked.

    The rule follows the tensor's role, not its shape on this rank, so every TP/PP layout groups alike.
    """
    if not ratio > 0:
        raise ValueError(f"lora_plus_ratio must be a positive number, got {ratio!r}")
    if not lr_embedding > 0:
        raise ValueError(f"lora_plus_lr_embedding must be a positive number, got {lr_embedding!r}")
    n = 0
    for mod in peft_modules(model):
        if not hasattr(mod, "rank"):  # not a LoRA-style wrapper (IA3, bottleneck adapters)
            raise ValueError(f"LoRA+ applies to LoRA factors; {mod.where()} is a {mod.method} layer")
        embedding = getattr(mod, "parallel_mode", None) == "vocab"
        for name, p in mod.named_parameters():
            if not p.requires_grad or name.startswith("base_layer."):
                continue
            if embedding:
                rule = ("lr", float(lr_embedding))
            elif name.startswith("lora_B.") or p.dim() == 1:
                rule = ("ratio", float(ratio))
            else:
                continue  # lora_A: the trainer's learning rate
            setattr(p, ATTR, rule)
            n += 1
    return n


def lr_multiplier(param, lr: float) -> float | None:
    """The factor on the trainer's learning rate (peak ``lr``) for a marked parameter, None for unmarked."""
    rule = getattr(param, ATTR, None)
    if rule is None:
        return None
    kind, value = rule
    return value if kind == "ratio" else value / lr
