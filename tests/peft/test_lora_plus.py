"""LoRA+ against HF PEFT's ``create_loraplus_optimizer``: the same tiny Llama, the same non-zero adapter, the
same batch; three AdamW steps through our optimizer (megatron's, with the LoRA+ groups of
framework/training/optim.py) and through PEFT's. Every factor -- A at lr, B at ratio x lr, the embedding's
at its own rate -- and every group's learning rate and weight decay must equal PEFT's.

The targets are the layers that are one HF module each (o_proj, down_proj, embed_tokens, lm_head): a fused
q/k/v shares one A in our layers, which HF's three A's leave after the first step.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn.functional as F

from launch.spawn import run_distributed
from tests.hf_models import tiny_llama

RANK, ALPHA, LR, RATIO, LR_EMB, WD, STEPS = 4, 8.0, 2e-3, 16.0, 5e-4, 0.1, 3
OURS = {"proj": "self_attention.linear_proj", "fc2": "mlp.linear_fc2"}
HF = {"proj": "self_attn.o_proj", "fc2": "mlp.down_proj"}


def _hf_key(ours: str) -> str | None:
    """Our parameter name (TP=1) -> HF PEFT's."""
    ours = ours.removeprefix("module.")
    if ours.startswith("embedding.word_embeddings."):
        return "base_model.model.model.embed_tokens." + ours.rsplit(".", 1)[1] + ".default"
    if ours.startswith("output_layer."):
        return "base_model.model.lm_head." + ours.split(".")[1] + ".default.weight"
    for t, mod in OURS.items():
        if f".{mod}." in ours:
            i = int(ours.split(".")[2])
            return f"base_model.model.model.layers.{i}.{HF[t]}.{ours.split('.')[-2]}.default.weight"
    return None


def _batch():
    g = torch.Generator().manual_seed(4)
    return torch.randint(0, 256, (2, 10), generator=g), torch.randint(0, 256, (2, 10), generator=g)


def _reference(hf, steps=STEPS):
    """PEFT's LoRA+ run: (initial adapter, adapter after STEPS, {name: (lr, weight decay)} of its groups)."""
    from peft import LoraConfig, get_peft_model
    from peft.optimizers import create_loraplus_optimizer

    model = get_peft_model(copy.deepcopy(hf), LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=[
        "o_proj", "down_proj", "embed_tokens", "lm_head"]))
    g = torch.Generator().manual_seed(9)
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    with torch.no_grad():
        for p in trainable.values():
            p.copy_(0.1 * torch.randn(p.shape, generator=g))
    start = {n: p.detach().clone() for n, p in trainable.items()}
    opt = create_loraplus_optimizer(model, torch.optim.AdamW, lr=LR, loraplus_lr_ratio=RATIO,
                                    loraplus_lr_embedding=LR_EMB, loraplus_weight_decay=WD,
                                    betas=(0.9, 0.999), eps=1e-8)
    ids = {id(p): n for n, p in trainable.items()}
    groups = {ids[id(p)]: (grp["lr"], grp["weight_decay"]) for grp in opt.param_groups for p in grp["params"]}
    tokens, labels = _batch()
    model.train()
    for _ in range(steps):
        opt.zero_grad()
        logits = model(input_ids=tokens).logits
        F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1)).backward()
        opt.step()
    return start, {n: p.detach().clone() for n, p in trainable.items()}, groups


def _ours(hf_dir, start, steps=STEPS):
    from omegaconf import OmegaConf

    from framework.checkpoint.hf_import import load_hf_into_gpt
    from framework.models.registry import build_model, config_from_hf
    from framework.peft import lora_plus
    from framework.peft.lora import apply_lora
    from framework.runtime.distributed import initialize
    from framework.training.optim import build_optimizer, wrap_ddp
    from framework.training.step import train_step

    initialize(tp=1, pp=1, seed=0)
    cfg = config_from_hf(json.loads((hf_dir / "config.json").read_text()))
    model = build_model(cfg, tp=1, pp=1)
    load_hf_into_gpt(model, hf_dir, cfg)
    apply_lora(model, targets=("proj", "fc2", "embedding", "output"), rank=RANK, alpha=ALPHA)
    lora_plus.mark(model, RATIO, LR_EMB)
    names = {}
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.requires_grad:
                names[n] = _hf_key(n)
                p.copy_(start[names[n]])
    ddp = wrap_ddp(model)
    trainer = OmegaConf.create(dict(lr=LR, min_lr=LR, weight_decay=WD, adam_beta1=0.9, adam_beta2=0.999,
                                    clip_grad=1e9, max_steps=10, warmup_steps=0))
    opt, sched = build_optimizer(ddp, trainer)
    params = dict(model.named_parameters())
    ids = {id(p): n for n, p in params.items()}
    groups = {names[ids[id(p)]]: (grp["lr"], grp["weight_decay"])
              for grp in opt.param_groups for p in grp["params"]}
    tokens, labels = _batch()
    mb = dict(tokens=tokens, labels=labels, loss_mask=torch.ones_like(tokens, dtype=torch.float32),
              position_ids=torch.arange(tokens.shape[1]).expand_as(tokens).contiguous())
    for _ in range(steps):
        train_step(ddp, opt, sched, [mb])
    return {names[n]: params[n].detach().numpy().copy() for n in names}, groups  # by value through the queue


@pytest.mark.timeout(180)
def test_lora_plus_equals_hf_peft(tmp_path):
    hf = tiny_llama(5, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2)
    hf.save_pretrained(tmp_path / "hf")
    start, want, want_groups = _reference(hf)
    got, groups = run_distributed(_ours, 1, tmp_path / "hf", start, timeout=150)[0]
    assert set(got) == set(want), sorted(set(got) ^ set(want))
    for name, (lr, wd) in want_groups.items():  # the learning rate and weight decay of every tensor
        assert groups[name] == (pytest.approx(lr, rel=1e-12), pytest.approx(wd, rel=1e-12)), name
    assert sorted({round(lr, 12) for lr, _ in groups.values()}) == [LR_EMB, LR, LR * RATIO]
    for name, w in want.items():
        moved = (w - start[name]).abs().max().item()
        assert moved > 1e-4, f"{name} did not train"
        # AdamW steps of size <= lr * ratio, from gradients equal to ~1e-5 (HF's and our fp32 sums)
        assert (torch.from_numpy(got[name]) - w).abs().max().item() < 1e-5 * max(1.0, moved), name
