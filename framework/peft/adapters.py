"""Canonical (Houlsby et al. 2019) bottleneck adapters after the attention block and after the MLP block.

    h   = output of the block's last projection (attention: linear_proj, MLP: linear_fc2), bias included
    h'  = h + U act(D h + b_D) + b_U          D: r x hidden ("down"), U: hidden x r ("up")

and then the transformer layer's own residual connection adds the block input, as in the paper (the
adapter sits inside the residual branch, before the add). U and b_U start at zero, so a fresh adapter is
the identity and the model computes its base; D is kaiming-uniform (torch.nn.Linear's default), b_D zero.
``activation``: gelu (default), relu or silu.

Targets: ``attention`` (wraps linear_proj) and ``mlp`` (wraps linear_fc2).

Tensor parallelism: the adapter is replicated on every TP rank, by design. Its input h is the output of a
row-parallel layer, already complete on every rank (or, under sequence parallelism, this rank's sequence
slice). Sharding D or U would need an h-wide collective per token (splitting r sums partial h-wide
outputs; splitting hidden needs the h-wide output gathered), i.e. the communication of a full linear layer
for 2 x hidden x r parameters; replicated, the adapter communicates nothing in forward or backward. The
duplicated work is 4 x hidden x r flops per token, negligible beside the layer's own projections. Under
sequence parallelism each rank sees only its tokens, so the adapter's gradients are partial: its
parameters carry ``sequence_parallel`` and finalize_model_grads all-reduces them over TP (2 x hidden x r
numbers per step). Their initialisation is drawn from a seed that does not depend on the TP rank.

Saved names (no HF PEFT equivalent): ``model.layers.{i}.self_attn.adapter.{down,up}.{weight,bias}`` and
``model.layers.{i}.mlp.adapter.{down,up}.{weight,bias}``, torch.nn.Linear shapes.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from framework.peft.lora import targets_problems
from framework.peft.wrapping import (PeftWrapper, Piece, check_targets, init_seed, mark, param_like, seeded_generator,
                                     wrap_targets)

ADAPTER_TARGETS = {"attention": "proj", "mlp": "fc2"}
ACTIVATIONS = {"gelu": F.gelu, "relu": F.relu, "silu": F.silu}
_DESCRIBE = "attention: after the attention block (linear_proj), mlp: after the MLP block (linear_fc2)"


class _Linear(nn.Module):
    """weight + bias, created on the base's device/dtype (keys ``weight`` / ``bias`` as torch.nn.Linear)."""

    def __init__(self, base: nn.Module, fan_in: int, fan_out: int):
        super().__init__()
        self.weight = param_like(base, (fan_out, fan_in))
        self.bias = param_like(base, (fan_out,), fill=0.0)

    def forward(self, x):
        return F.linear(x, self.weight, self.bias)


class _Bottleneck(nn.Module):
    def __init__(self, base: nn.Module, hidden: int, bottleneck: int):
        super().__init__()
        self.down = _Linear(base, hidden, bottleneck)
        self.up = _Linear(base, bottleneck, hidden)


class HoulsbyAdapter(PeftWrapper):
    """A row-parallel block output projection followed by a residual bottleneck MLP (module docstring)."""

    method = "adapter"
    TARGET_ORDER = tuple(ADAPTER_TARGETS)

    def __init__(self, base: nn.Module, bottleneck: int, activation: str = "gelu", init_seed: int | None = None):
        if not isinstance(bottleneck, int) or isinstance(bottleneck, bool) or bottleneck < 1:
            raise ValueError(f"adapter bottleneck must be a positive integer, got {bottleneck!r}")
        if activation not in ACTIVATIONS:
            raise ValueError(f"adapter activation {activation!r} is not one of {sorted(ACTIVATIONS)}")
        super().__init__(base)
        if self.parallel_mode != "row":
            raise TypeError(f"Houlsby adapters follow a RowParallelLinear (linear_proj / linear_fc2), got "
                            f"{type(base).__name__}")
        self.bottleneck, self.activation = bottleneck, activation
        self.hidden = base.output_size
        self.adapter = _Bottleneck(base, self.hidden, bottleneck)
        partial = bool(base.sequence_parallel) and self.tp_size > 1
        for p in self.adapter.parameters():
            mark(p, None, partial_grad=partial)
        self.reset_parameters(torch.initial_seed() if init_seed is None else init_seed)

    @torch.no_grad()
    def reset_parameters(self, seed: int) -> None:
        down = torch.empty(self.bottleneck, self.hidden, dtype=torch.float32)
        nn.init.kaiming_uniform_(down, a=math.sqrt(5), generator=seeded_generator(seed))
        self.adapter.down.weight.copy_(down)
        self.adapter.down.bias.zero_()
        self.adapter.up.weight.zero_()
        self.adapter.up.bias.zero_()

    def adapter_forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.adapter.up(ACTIVATIONS[self.activation](self.adapter.down(h)))

    def forward(self, input_: torch.Tensor, *args, **kwargs):
        output, bias = self.base_layer(input_, *args, **kwargs)
        h = output if bias is None else output + bias
        return h + self.adapter_forward(h).to(h.dtype), None

    def covers(self) -> tuple[str, ...]:
        return (next(k for k, v in ADAPTER_TARGETS.items() if v == self.target),)

    def pieces(self) -> list[Piece]:
        return [Piece(f"adapter.{lin}.{p}", f"adapter.{lin}.{p}", None, at_block=True) for lin in ("down", "up")
                for p in ("weight", "bias")]

    def settings(self) -> dict:
        return {"bottleneck": self.bottleneck, "activation": self.activation}

    def extra_repr(self) -> str:
        return f"hidden={self.hidden}, bottleneck={self.bottleneck}, activation={self.activation}, tp={self.tp_size}"


def apply_adapters(model: nn.Module, targets=("attention", "mlp"), bottleneck: int = 16, activation: str = "gelu",
                   seed: int | None = None) -> list[str]:
    """Freeze this stage and add a bottleneck adapter after each chosen block of every layer."""
    targets = check_targets(targets, ADAPTER_TARGETS, "adapter", _DESCRIBE)
    base_seed = torch.initial_seed() if seed is None else int(seed)
    module_targets = tuple(ADAPTER_TARGETS[t] for t in targets)

    def make(base, target, layer_number):
        s = init_seed(base_seed, layer_number, list(ADAPTER_TARGETS.values()).index(target))
        return HoulsbyAdapter(base, bottleneck, activation, init_seed=s)

    return wrap_targets(model, module_targets, make)


def config_problems(cfg, model_cfg) -> list[str]:
    """Checks of ``cfg.peft`` for bottleneck adapters (activation, targets; the bottleneck's value is checked by
    framework/config/peft.py's section)."""
    peft, problems = cfg.peft, []
    if peft.get("activation") not in ACTIVATIONS:
        problems.append(f"peft.activation={peft.get('activation')!r}: expected one of {sorted(ACTIVATIONS)}")
    return problems + targets_problems(peft, ADAPTER_TARGETS, "adapter")


def apply_from_config(model, peft_cfg, model_cfg) -> list[str]:
    return apply_adapters(model, targets=tuple(peft_cfg.targets), bottleneck=int(peft_cfg.bottleneck),
                          activation=str(peft_cfg.activation))
