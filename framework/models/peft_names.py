"""A family's Hugging Face PEFT module names: which HF modules each of our PEFT targets stands for.

Each family module (framework/models/families/) declares ``PEFT = PeftNames(...)`` beside its weight table;
framework/checkpoint/adapter.py (unsharded adapters, which carry HF PEFT's keys), peft_export.py and
peft_import.py look it up through the registry instead of assuming Llama's names::

    our target   a layer's module                       HF modules (Llama)                  rows
    qkv          self_attention.linear_qkv (fused)      self_attn.{q,k,v}_proj              qkv
    proj         self_attention.linear_proj             self_attn.o_proj                    -
    fc1          mlp.linear_fc1 (gate/up per TP rank)   mlp.{gate,up}_proj (mlp.up_proj)    gate_up (-)
    fc2          mlp.linear_fc2                         mlp.down_proj                       -
    embedding    embedding.word_embeddings              model.embed_tokens
    output       output_layer                           lm_head

``rows`` names the framework/models/weight_table.py transform between the rows of our column-parallel
layer (LoRA's B and DoRA's magnitude run along them) and the HF module(s): the same transform the weight
table applies to that layer's base weight, so an adapter's output-side tensors are permuted and split
exactly as the base weight is. ``qkv`` splits megatron's query-group order into HF's q/k/v, ``gate_up``
megatron's per-rank gate/up fusion; GPT-2's packed ``c_attn`` [q; k; v] is ``qkv_packed``; a fused HF
module already in megatron's order (Falcon's ``query_key_value``, GPTBigCode's ``c_attn``) needs none
(None: the TP shards are concatenated as they are). The input side (LoRA's A) needs no permutation: it
runs along the hidden size, or along the row-parallel input, which HF and megatron order alike. A
transposed HF weight (GPT-2's Conv1D) changes nothing here: HF PEFT keeps A [r, in] and B [out, r] and
records ``fan_in_fan_out``.

What a family cannot do is declared with the reason, so exports and imports are refused with it:
``refused`` (our targets, e.g. Mixtral's fc1/fc2: its MLP is a mixture of experts), ``unsupported`` (HF
modules an HF PEFT adapter may name, e.g. Mixtral's ``w1``/``w2``/``w3``).
"""

from __future__ import annotations

import dataclasses
from typing import Mapping, Optional

LAYER_TARGETS = ("qkv", "proj", "fc1", "fc2")


@dataclasses.dataclass(frozen=True)
class PeftModule:
    """The HF module(s) one of our targets stands for, in the order ``rows`` splits into."""

    names: tuple[str, ...]
    rows: Optional[str] = None  # weight_table transform of output-side tensors; None: shards concatenated


@dataclasses.dataclass(frozen=True)
class PeftNames:
    layer: str                                # HF prefix of a layer, with {i} (global, 0-based)
    targets: Mapping[str, PeftModule]         # our layer target -> its HF module(s) under ``layer``
    ia3: Mapping[str, str]                    # IA3 target (k, v, fc2) -> HF module under ``layer``
    embedding: str                            # HF module of the token embedding
    output: str = "lm_head"
    plain_fc1: Optional[PeftModule] = None    # fc1 of a non-gated MLP, where the family has both kinds
    fan_in_fan_out: bool = False              # HF stores the wrapped weights [in, out] (GPT-2's Conv1D)
    task_type: str = "CAUSAL_LM"
    refused: Mapping[str, str] = dataclasses.field(default_factory=dict)      # our target -> why not
    unsupported: Mapping[str, str] = dataclasses.field(default_factory=dict)  # HF module -> why not
    # encoder-decoder (T5): the names of each stack's layers ('encoder', 'decoder'), keyed like the wrappers'
    # ``stack``; the top level then holds only what the stacks share (embedding, output, task_type, ...)
    stacks: Mapping[str, "PeftNames"] = dataclasses.field(default_factory=dict)

    def for_stack(self, stack: Optional[str]) -> "PeftNames":
        """The names of a stack's layers (None: a decoder-only model's one stack, this object)."""
        return self if stack is None else self.stacks[stack]

    def module(self, target: str, gated: bool = True) -> Optional[PeftModule]:
        """The HF module(s) of a layer target (fc1: of a gated or plain MLP); None when the family has no
        such module (the caller says why, from ``refused``)."""
        if target == "fc1" and not gated and self.plain_fc1 is not None:
            return self.plain_fc1
        found = self.targets.get(target)
        if target == "fc1" and found is not None and gated != (found.rows == "gate_up"):
            return None
        return found

    def ia3_fused(self) -> bool:
        """IA3 on keys and values scales one fused HF module (its query rows stay one)."""
        return self.ia3["k"] == self.ia3["v"]

    def all_modules(self) -> list[str]:
        """Every HF module name this family declares (for choosing unambiguous ``target_modules``)."""
        mods = [m for pm in self.targets.values() for m in pm.names]
        if self.plain_fc1 is not None:
            mods += list(self.plain_fc1.names)
        return list(dict.fromkeys(mods + list(self.ia3.values()) + [self.embedding, self.output]))

    def target_name(self, module: str) -> str:
        """The shortest dotted suffix of ``module`` that no other declared module ends with: what HF PEFT's
        ``target_modules`` lists (it matches a module whose name is or ends with ``.`` + an entry), e.g.
        ``q_proj`` for Llama, but ``attn.c_proj`` / ``mlp.c_proj`` for GPT-2."""
        parts = module.split(".")
        others = [m for m in self.all_modules() if m != module]
        for k in range(1, len(parts) + 1):
            suffix = ".".join(parts[-k:])
            if not any(o == suffix or o.endswith("." + suffix) for o in others):
                return suffix
        return module


def llama_names(**overrides) -> PeftNames:
    """Llama's module names (Mistral, Qwen2, Gemma, Mixtral's attention, and the base of Starcoder2's and
    Nemotron's), with ``overrides`` for what a family names otherwise."""
    fields = dict(
        layer="model.layers.{i}.",
        targets={"qkv": PeftModule(("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), "qkv"),
                 "proj": PeftModule(("self_attn.o_proj",)),
                 "fc1": PeftModule(("mlp.gate_proj", "mlp.up_proj"), "gate_up"),
                 "fc2": PeftModule(("mlp.down_proj",))},
        plain_fc1=PeftModule(("mlp.up_proj",)),
        ia3={"k": "self_attn.k_proj", "v": "self_attn.v_proj", "fc2": "mlp.down_proj"},
        embedding="model.embed_tokens",
    )
    fields.update(overrides)
    return PeftNames(**fields)
