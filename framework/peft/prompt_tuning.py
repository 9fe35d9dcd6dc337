"""Prompt tuning (Lester et al. 2021): n learned embeddings prepended to every sequence, base model frozen.

The trainable table P [n, h] (``prompt_encoder.embedding.weight``, Hugging Face PEFT's ``PromptEmbedding``
layout) enters on the first pipeline stage; how the batch, positions, labels, SP, PP and packing are
extended is in framework/peft/virtual_tokens.py.

Initialisation (HF PEFT's ``prompt_tuning_init``):

    random   P ~ N(0, 1)                          (nn.Embedding's default; HF RANDOM)
    vocab    rows of the word embeddings of n token ids drawn uniformly from the vocabulary (HF SAMPLE_VOCAB)
    text     rows of the word embeddings of ``init_text``'s tokens, repeated / cut to n (HF TEXT)

drawn from ``seed`` (default: the run's seed) alone, so every rank and every layout starts from the same P.
``text`` tokenises with the job's tokenizer (``peft.text_tokenizer``, defaulting to the model's) without
special tokens; the model builder passes the tokenising function in (this layer knows no tokenizer).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from framework.peft.virtual_tokens import VirtualTokenError, VirtualTokenSource
from framework.peft.virtual_tokens import config_problems as shared
from framework.peft.virtual_tokens import (install, plain_config, prompt_source, read_prompt_adapter,
                                           save_prompt_adapter, vocab_rows)

INITS = ("random", "vocab", "text")


class PromptTable(VirtualTokenSource):
    """P itself: ``embedding.weight`` [n, h]."""

    def __init__(self, n: int, hidden: int, device=None):
        super().__init__()
        self.embedding = nn.Embedding(n, hidden, device=device)

    def prompt(self) -> torch.Tensor:
        return self.embedding.weight


def init_token_ids(n: int, init: str, vocab_size: int, text_ids: list[int] | None = None) -> list[int] | None:
    """The token ids whose embeddings start P (None for ``random``); call inside :func:`seeded`."""
    if init == "random":
        return None
    if init == "vocab":
        return torch.randint(0, vocab_size, (n,), dtype=torch.long).tolist()
    if init == "text":
        if not text_ids:
            raise VirtualTokenError("prompt tuning init=text: init_text tokenises to no tokens")
        return (text_ids * math.ceil(n / len(text_ids)))[:n]
    raise VirtualTokenError(f"prompt tuning init={init!r} is not one of {INITS}")


def apply_prompt_tuning(model, num_virtual_tokens: int, init: str = "random", init_text_ids: list[int] | None = None,
                        seed: int | None = None) -> PromptTable | None:
    """Freeze the model and add n virtual tokens (call on every stage); returns the first stage's table."""
    n = int(num_virtual_tokens)

    def make(gpt, device):
        table = PromptTable(n, gpt.config.hidden_size, device=device)
        ids = init_token_ids(n, init, gpt.vocab_size, init_text_ids)
        if device != "meta":
            with torch.no_grad():
                if ids is None:
                    nn.init.normal_(table.embedding.weight)
                else:
                    table.embedding.weight.copy_(vocab_rows(model, ids))
        return table

    return install(model, n, make, seed)


# -- registry interface ------------------------------------------------------------------------------
def apply_from_config(model, peft_cfg, model_cfg, encode_text=None) -> None:
    """``encode_text(text) -> ids`` tokenises ``peft.init_text`` for init=text: the caller that knows the
    tokenizer passes it (framework/checkpoint/model_loading.py), since a PEFT method knows no tokenizer."""
    init = peft_cfg.get("init", "random")
    text_ids = None
    if init == "text":
        if encode_text is None:
            raise VirtualTokenError("peft.init=text needs the tokenizer of peft.text_tokenizer to tokenise "
                                    "peft.init_text; pass encode_text to apply_peft")
        text_ids = encode_text(str(peft_cfg.init_text))
    apply_prompt_tuning(model, int(peft_cfg.num_virtual_tokens), init=init, init_text_ids=text_ids,
                        seed=peft_cfg.get("seed"))


def save(model, directory, peft_cfg, model_cfg, base=None):
    src = prompt_source(model)
    meta = {**plain_config(peft_cfg), "method": "prompt_tuning", "base": dict(base or {})}
    with torch.no_grad():
        return save_prompt_adapter(model, directory, meta, model_cfg, None if src is None else src.prompt())


def load(model, directory, model_cfg) -> dict:
    """Load a prompt table -- from prompt tuning, or the exported table of P-tuning -- at any layout."""
    meta, table = read_prompt_adapter(directory, model, ("prompt_tuning", "ptuning"))
    src = prompt_source(model)
    if src is not None:
        if not isinstance(src, PromptTable):
            raise VirtualTokenError(f"{directory}: a prompt table loads into a prompt-tuning model "
                                    f"(peft.method=prompt_tuning), this model has a {type(src).__name__}")
        with torch.no_grad():
            src.embedding.weight.copy_(table.to(src.embedding.weight))
    return meta


def config_problems(cfg, model_cfg) -> list[str]:
    """Positions that fit the model (peft.init and init_text are checked by framework/config/peft.py's
    section)."""
    return shared(cfg, model_cfg)
