"""Greedy decoding at any TP/PP by re-running the full forward per token.

No KV cache yet: each new token costs a forward over the whole sequence. That is fine for the few
dozen tokens the fine-tuning job shows before and after training; batch generation with a cache is a
separate command.
"""

from __future__ import annotations

import math

import torch


@torch.no_grad()
def greedy_generate(model, prompt_ids: list[int], max_new_tokens: int, eos_id: int | None = None,
                    pad_multiple: int = 1) -> list[int]:
    """Return the generated token ids (prompt excluded). Every rank must call this with the same prompt."""
    from framework.inference.logits import forward_logits

    was_training = model.training
    model.eval()
    ids = list(prompt_ids)
    new: list[int] = []
    for _ in range(max_new_tokens):
        n = len(ids)
        padded = math.ceil(n / pad_multiple) * pad_multiple
        # Right padding never affects earlier positions under a causal mask.
        tokens = torch.tensor([ids + [ids[-1]] * (padded - n)], dtype=torch.long)
        logits = forward_logits(model, tokens)
        nxt = int(logits[0, n - 1].argmax())
        if eos_id is not None and nxt == eos_id:
            break
        ids.append(nxt)
        new.append(nxt)
    model.train(was_training)
    return new
