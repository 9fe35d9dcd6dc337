"""What the generation tests share: the prompts of the tiny model's batch, transformers' batched greedy
generation (the reference), the generation job's config, the environment a CLI subprocess runs in, and
SQuAD's exact match / F1 written out from the definition."""

from __future__ import annotations

import collections
import os
import re
import string
from pathlib import Path

import torch

ROOT = str(Path(__file__).resolve().parent.parent)
# prompts of lengths 7, 2, 5 and 1, batched together (so padded)
PROMPTS = [[5, 17, 33, 2, 90, 11, 7], [42, 8], [100, 101, 102, 103, 104], [9]]


def hf_greedy(model, prompts, n, eos=None, pad=0):
    """transformers' batched greedy generation (left padding + attention mask), cut before the first eos."""
    longest = max(map(len, prompts))
    ids = torch.tensor([[pad] * (longest - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (longest - len(p)) + [1] * len(p) for p in prompts])
    model.generation_config.eos_token_id = eos
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, do_sample=False,
                             pad_token_id=pad, eos_token_id=eos)
    rows = out[:, longest:].tolist()
    return [row[:row.index(eos)] if eos is not None and eos in row else row for row in rows]


def compose(overrides, config_name="generate"):
    """The generation job's config (conf/generate.yaml) with ``overrides``, as the command line composes it."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=os.path.join(ROOT, "conf"), version_base="1.3"):
        return hydra_compose(config_name=config_name, overrides=overrides)


def cli_env():
    """This process's environment without torchrun's variables: a CLI started from a test is its own job."""
    return {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}


def squad_by_hand(pred: str, ref: str) -> tuple[float, float]:
    """SQuAD's normalisation and scores written out again here, from the definition."""
    def norm(s):
        s = "".join(c for c in s.lower() if c not in set(string.punctuation))
        return " ".join(re.sub(r"\b(a|an|the)\b", " ", s).split())

    p, r = norm(pred).split(), norm(ref).split()
    if not p or not r:
        return float(p == r), float(p == r)
    common = sum((collections.Counter(p) & collections.Counter(r)).values())
    f1 = 0.0 if common == 0 else 2 * (common / len(p)) * (common / len(r)) / (common / len(p) + common / len(r))
    return float(norm(pred) == norm(ref)), f1
