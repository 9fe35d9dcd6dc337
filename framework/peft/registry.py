"""The PEFT methods the job knows, behind one interface: apply a method to this rank's model stage, and
say what it trains.

    apply(model, peft_cfg, model_cfg)          freeze what the method freezes, add its parameters
    artefact                                   what is saved after training (framework/checkpoint/trained.py):
        "adapter"        a small unsharded adapter directory (framework/checkpoint/adapter.py)
        "prompt_table"   the prompt methods' table (framework/peft/virtual_tokens.py; prefix tuning's key/value
                         table, framework/peft/prefix_tuning.py; ``module`` saves it)
        "weights"        every weight (``peft.method=none``, full fine-tuning), through megatron
                         dist_checkpointing so it reshards on load
        "base_and_adapter"  ReLoRA: the base weights its restarts changed (as "weights") and the current
                         adapter (as "adapter")

``check(cfg, model_cfg)``, where a method has one, lists what is wrong with its ``peft.*`` keys before any
process group starts.
"""

from __future__ import annotations

import dataclasses
import importlib
from typing import Callable

from framework.models.unwrap import unwrap_model
from framework.peft import lora_plus, moe
from framework.peft.lora import apply_lora
from framework.peft.qlora import apply_qlora
from framework.runtime.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class Method:
    name: str
    apply: Callable
    artefact: str = "adapter"  # adapter | prompt_table | weights (see the module docstring)
    module: str | None = None  # the peft module that saves and loads a prompt_table
    encodes_text: bool = False  # apply() takes encode_text (prompt tuning initialised from peft.init_text)
    check: Callable | None = None  # check(cfg, model_cfg) -> list of problems with cfg.peft (before any process starts)
    # peft.targets names that adapt the MLP (refused on a mixture-of-experts MLP, framework/peft/moe.py) and
    # the attention-only list suggested instead
    mlp_targets: tuple = ()
    attention_targets: tuple = ()

    @property
    def trains_base(self) -> bool:
        """Every base weight is trained (full fine-tuning): nothing is frozen, the artefact is a checkpoint."""
        return self.artefact == "weights"

    @property
    def saves_base(self) -> bool:
        """What it saves includes base weights (full fine-tuning; ReLoRA's merged base)."""
        return self.artefact in ("weights", "base_and_adapter")


def _lazy(module: str, name: str) -> Callable:
    """``module.name``, imported on first call (the registry itself stays import-light)."""
    def call(*args, **kwargs):
        return getattr(importlib.import_module(module), name)(*args, **kwargs)

    call.__name__ = name
    return call


def _apply_lora(model, peft_cfg, model_cfg):
    apply_lora(model, targets=tuple(peft_cfg.targets), rank=int(peft_cfg.rank), alpha=float(peft_cfg.alpha),
               dropout=float(peft_cfg.dropout), rslora=bool(peft_cfg.get("rslora", False)),
               init_lora_weights=str(peft_cfg.get("init_lora_weights", "kaiming")))


def _apply_qlora(model, peft_cfg, model_cfg):
    apply_qlora(model, targets=tuple(peft_cfg.targets), rank=int(peft_cfg.rank), alpha=float(peft_cfg.alpha),
                dropout=float(peft_cfg.dropout), rslora=bool(peft_cfg.get("rslora", False)),
                block_size=int(peft_cfg.block_size), scaler_block_size=int(peft_cfg.scaler_block_size))


def _apply_none(model, peft_cfg, model_cfg):
    for p in model.parameters():
        p.requires_grad_(True)


_LORA_MLP = {"mlp_targets": ("fc1", "fc2"), "attention_targets": ("qkv", "proj")}
_IA3_MLP = {"mlp_targets": ("fc2",), "attention_targets": ("k", "v")}
_ADAPTER_MLP = {"mlp_targets": ("mlp",), "attention_targets": ("attention",)}
METHODS: dict[str, Method] = {
    "lora": Method("lora", _apply_lora,
                   check=_lazy("framework.peft.lora", "config_problems"), **_LORA_MLP),
    # DoRA, IA3 and Houlsby adapters wrap layers like LoRA and save through the same unsharded adapter files.
    **{name: Method(name, _lazy(f"framework.peft.{module}", "apply_from_config"),
                    check=_lazy(f"framework.peft.{module}", "config_problems"), **mlp)
       for name, module, mlp in (("dora", "dora", _LORA_MLP), ("ia3", "ia3", _IA3_MLP),
                                 ("adapter", "adapters", _ADAPTER_MLP))},
    "none": Method("none", _apply_none, artefact="weights"),
    # ReLoRA: LoRA layers merged into the base every peft.merge_every steps (framework/peft/relora.py)
    "relora": Method("relora", _apply_lora, artefact="base_and_adapter",
                     check=_lazy("framework.peft.relora", "config_problems"), **_LORA_MLP),
    # QLoRA adapters are LoRA adapters (same factors and files); only the base is stored as NF4.
    "qlora": Method("qlora", _apply_qlora,
                    check=_lazy("framework.peft.qlora", "config_problems"), **_LORA_MLP),
    **{name: Method(name, _lazy(f"framework.peft.{module}", "apply_from_config"), artefact="prompt_table",
                    module=f"framework.peft.{module}", check=_lazy(f"framework.peft.{module}", "config_problems"),
                    encodes_text=name == "prompt_tuning")
       for name, module in (("prompt_tuning", "prompt_tuning"), ("ptuning", "p_tuning"),
                            ("prefix_tuning", "prefix_tuning"))},
}


def get_method(name: str) -> Method:
    try:
        return METHODS[name]
    except KeyError:
        raise ConfigError(f"peft.method={name!r} is not one of {sorted(METHODS)}") from None


def config_problems(cfg, model_cfg) -> list[str]:
    """The method's own checks of ``cfg.peft``, and MLP targets on a mixture-of-experts model (empty for an
    unknown method: that is reported elsewhere)."""
    method = METHODS.get(cfg.peft.method)
    if method is None:
        return []
    problems = list(method.check(cfg, model_cfg)) if method.check is not None else []
    return problems + moe_problems(cfg.peft, model_cfg)


def moe_problems(peft_cfg, model_cfg) -> list[str]:
    """MLP targets of ``peft_cfg`` refused on a mixture-of-experts model (framework/peft/moe.py)."""
    method = METHODS.get(str(peft_cfg.method))
    if method is None:
        return []
    return moe.config_problems(peft_cfg, model_cfg, method.mlp_targets, method.attention_targets)


def apply_peft(model, peft_cfg, model_cfg, encode_text=None) -> Method:
    """Apply ``peft_cfg.method`` to this rank's model stage. ``encode_text(text) -> token ids`` is needed by
    methods initialised from text (prompt tuning with init=text)."""
    method = get_method(peft_cfg.method)
    if method.encodes_text:
        method.apply(model, peft_cfg, model_cfg, encode_text=encode_text)
    else:
        method.apply(model, peft_cfg, model_cfg)
    if peft_cfg.get("lora_plus_ratio") is not None:  # LoRA+: B's learning rate, read by the optimizer
        lora_plus.mark(model, float(peft_cfg.lora_plus_ratio),
                       float(peft_cfg.get("lora_plus_lr_embedding", lora_plus.HF_LR_EMBEDDING)))
    if not method.trains_base:
        _grads_through_recomputed_layers(model)
    return method


def _grads_through_recomputed_layers(model) -> None:
    """With full activation recomputation megatron runs each layer under a reentrant checkpoint, which only
    back-propagates when one of its inputs requires grad. With a frozen base the embedding output does
    not, so the adapters inside the layers would silently get no gradient (as HF's
    ``enable_input_require_grads`` handles for gradient checkpointing): mark that output as requiring grad."""
    gpt = unwrap_model(model)
    config = getattr(gpt, "config", None)
    embedding = getattr(gpt, "embedding", None)
    if getattr(config, "recompute_granularity", None) != "full" or embedding is None:
        return
    embedding.register_forward_hook(lambda _module, _inputs, output: output.requires_grad_(True))
