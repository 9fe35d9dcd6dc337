"""``peft.*``: the PEFT method and its keys, one section per method (conf/peft/<method>.yaml).

The target names each method accepts, and the checks that need the model (cross-attention targets on a
decoder-only model, MLP targets on a mixture of experts, virtual tokens that still fit the positions),
belong to the method's module in framework/peft/; the value checks are here.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from framework.config.checks import at_least, fraction


@dataclasses.dataclass
class PeftSection:
    method: str = "none"

    def problems(self) -> list[str]:
        return []


@dataclasses.dataclass
class NoneSection(PeftSection):
    """Full-parameter fine-tuning: nothing frozen."""
    method: str = "none"


@dataclasses.dataclass
class LoraSection(PeftSection):
    """y = W x + (alpha / rank) B A x (alpha / sqrt(rank) with rslora), W frozen."""
    method: str = "lora"
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    rslora: bool = False
    targets: list[str] = dataclasses.field(default_factory=lambda: ["qkv", "proj", "fc1", "fc2"])
    # HF PEFT's init_lora_weights: kaiming (its True), gaussian; pissa, pissa_niter_<n>, olora initialise
    # from the base weight (framework/peft/lora_init.py; the names are checked there)
    init_lora_weights: str = "kaiming"
    lora_plus_ratio: float | None = None   # LoRA+: B's learning rate / A's (framework/peft/lora_plus.py)
    lora_plus_lr_embedding: float = 1e-6   # LoRA+: the embedding LoRA's peak learning rate (HF PEFT's default)

    def problems(self) -> list[str]:
        out = [fraction("peft.dropout", self.dropout)]
        if self.rank < 1:
            out.insert(0, f"peft.rank={self.rank!r}: expected a positive integer")
        if self.alpha <= 0:
            out.append(f"peft.alpha={self.alpha!r}: expected a positive number")
        if self.method != "lora" and self.init_lora_weights != "kaiming":
            out.append(f"peft.init_lora_weights={self.init_lora_weights!r}: peft.method={self.method} initialises "
                       f"its factors as LoRA's default (kaiming); other initialisations are peft.method=lora's")
        if self.lora_plus_ratio is not None and not self.lora_plus_ratio > 0:
            out.append(f"peft.lora_plus_ratio={self.lora_plus_ratio!r}: expected a positive number (B's learning "
                       f"rate / A's; LoRA+ suggests 16), or null for one learning rate")
        if not self.lora_plus_lr_embedding > 0:
            out.append(f"peft.lora_plus_lr_embedding={self.lora_plus_lr_embedding!r}: expected a positive number")
        return [p for p in out if p]


@dataclasses.dataclass
class DoraSection(LoraSection):
    """LoRA's direction update with a trained per-row magnitude (Liu et al. 2024)."""
    method: str = "dora"


@dataclasses.dataclass
class QLoraSection(LoraSection):
    """LoRA over a base stored in NF4 with double-quantised block scales."""
    method: str = "qlora"
    block_size: int = 64
    scaler_block_size: int = 256

    def problems(self) -> list[str]:
        out = super().problems() + [p for p in (at_least("peft.block_size", self.block_size, 2),
                                                at_least("peft.scaler_block_size", self.scaler_block_size, 1)) if p]
        if self.block_size >= 2 and self.block_size % 2:
            out.append(f"peft.block_size={self.block_size}: must be even (two 4-bit codes are packed per byte)")
        return out


@dataclasses.dataclass
class ReLoraSection(LoraSection):
    """LoRA merged into the base every merge_every steps and restarted (framework/peft/relora.py)."""
    method: str = "relora"
    merge_every: int = 100            # steps between restarts (merge, new factors, optimizer reset)
    restart_warmup_steps: int = 10    # the jagged schedule's warm-up after each restart (0: none)
    reset: str = "prune"              # the adapters' Adam moments at a restart: zero | prune (by magnitude)
    prune_ratio: float = 0.99         # reset=prune: the fraction of each moment tensor set to zero

    def problems(self) -> list[str]:
        out = super().problems() + [p for p in (at_least("peft.merge_every", self.merge_every, 1),
                                                at_least("peft.restart_warmup_steps", self.restart_warmup_steps, 0))
                                    if p]
        if self.reset not in ("zero", "prune"):
            out.append(f"peft.reset={self.reset!r} is not one of ['zero', 'prune']")
        if not 0.0 <= self.prune_ratio < 1.0:
            out.append(f"peft.prune_ratio={self.prune_ratio!r}: expected a number in [0, 1)")
        return out


@dataclasses.dataclass
class IA3Section(PeftSection):
    """Learned rescaling of keys, values and the MLP's inner activations."""
    method: str = "ia3"
    targets: list[str] = dataclasses.field(default_factory=lambda: ["k", "v", "fc2"])


@dataclasses.dataclass
class AdapterSection(PeftSection):
    """Houlsby bottleneck adapters after attention and MLP."""
    method: str = "adapter"
    bottleneck: int = 16
    activation: str = "gelu"
    targets: list[str] = dataclasses.field(default_factory=lambda: ["attention", "mlp"])

    def problems(self) -> list[str]:
        return [f"peft.bottleneck={self.bottleneck!r}: expected a positive integer"] if self.bottleneck < 1 else []


INITS = ("random", "vocab", "text")  # prompt tuning's initialisations (framework/peft/prompt_tuning.py)


@dataclasses.dataclass
class PromptTuningSection(PeftSection):
    """n learned embeddings prepended to every sequence."""
    method: str = "prompt_tuning"
    num_virtual_tokens: int = 20
    init: str = "random"
    init_text: str | None = None
    seed: int | None = None
    text_tokenizer: Any = None   # a model node (source, path, tokenizer) whose tokenizer reads init_text

    def problems(self) -> list[str]:
        out = [at_least("peft.num_virtual_tokens", self.num_virtual_tokens, 1),
               None if self.init in INITS else f"peft.init={self.init!r} is not one of {list(INITS)}"]
        if self.init == "text" and not self.init_text:
            out.append("peft.init=text needs peft.init_text (the text whose token embeddings start the prompt)")
        return [p for p in out if p]


@dataclasses.dataclass
class PTuningSection(PeftSection):
    """Virtual tokens produced by a trained prompt encoder (MLP or LSTM)."""
    method: str = "ptuning"
    num_virtual_tokens: int = 20
    encoder_reparameterization_type: str = "MLP"
    encoder_hidden_size: int | None = None
    encoder_num_layers: int = 2
    encoder_dropout: float = 0.0
    seed: int | None = None

    def problems(self) -> list[str]:
        out = [at_least("peft.num_virtual_tokens", self.num_virtual_tokens, 1),
               None if self.encoder_hidden_size is None or self.encoder_hidden_size >= 1 else
               f"peft.encoder_hidden_size={self.encoder_hidden_size!r}: expected an integer >= 1, or null (= hidden size)",
               at_least("peft.encoder_num_layers", self.encoder_num_layers, 1),
               fraction("peft.encoder_dropout", self.encoder_dropout)]
        return [p for p in out if p]


@dataclasses.dataclass
class PrefixTuningSection(PeftSection):
    """n trained key/value positions in front of every attention layer's own (framework/peft/prefix_tuning.py)."""
    method: str = "prefix_tuning"
    num_virtual_tokens: int = 20
    prefix_projection: bool = False
    encoder_hidden_size: int | None = None
    init_weights: str | None = None
    seed: int | None = None

    def problems(self) -> list[str]:
        out = [at_least("peft.num_virtual_tokens", self.num_virtual_tokens, 1),
               None if self.encoder_hidden_size is None or self.encoder_hidden_size >= 1 else
               f"peft.encoder_hidden_size={self.encoder_hidden_size!r}: expected an integer >= 1, or null",
               None if self.init_weights in (None, "zero") else
               f"peft.init_weights={self.init_weights!r}: expected null (random) or 'zero'"]
        return [p for p in out if p]


#: conf/peft/<name>.yaml -> its section
SECTIONS: dict[str, type[PeftSection]] = {
    "none": NoneSection, "lora": LoraSection, "dora": DoraSection, "qlora": QLoraSection, "relora": ReLoraSection,
    "ia3": IA3Section,
    "adapter": AdapterSection, "prompt_tuning": PromptTuningSection, "ptuning": PTuningSection,
    "prefix_tuning": PrefixTuningSection,
}
