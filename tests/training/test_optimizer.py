"""Gradient norm, clipping and the LR schedule of the training loop, checked against direct computation."""

import math

import pytest
import torch

from launch.spawn import run_distributed

ARCH = dict(vocab_size=128, hidden_size=32, num_layers=2, num_attention_heads=4, num_query_groups=2,
            ffn_hidden_size=64, max_position_embeddings=64)


def _clip_worker(tp, clip):
    import torch.distributed as dist
    from megatron.core import parallel_state as ps
    from omegaconf import OmegaConf

    from framework.models.config import ModelConfig
    from framework.models.gpt import build_gpt
    from framework.peft.lora import apply_lora
    from framework.runtime import initialize
    from framework.training.optim import build_optimizer, wrap_ddp
    from framework.training.step import forward_backward

    initialize(tp=tp, seed=0)
    model = build_gpt(ModelConfig(**ARCH), tp=tp)
    apply_lora(model, rank=4, alpha=8)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.full_like(p, 0.05))
    ddp = wrap_ddp(model)
    trainer = OmegaConf.create(dict(lr=1e-3, min_lr=1e-3, weight_decay=0.0, adam_beta1=0.9, adam_beta2=0.999,
                                    clip_grad=clip, max_steps=10, warmup_steps=0))
    opt, _ = build_optimizer(ddp, trainer)
    g = torch.Generator().manual_seed(0)
    mb = dict(tokens=torch.randint(0, 128, (2, 8), generator=g), labels=torch.randint(0, 128, (2, 8), generator=g),
              loss_mask=torch.ones(2, 8), position_ids=torch.arange(8).expand(2, 8).contiguous())
    opt.zero_grad()
    forward_backward(ddp, [mb])
    # The norm by hand: sharded factors summed over TP ranks, replicated ones counted once.
    tp_rank = ps.get_tensor_model_parallel_rank()
    sq = torch.zeros(1, dtype=torch.float64)
    for p in model.parameters():
        if p.requires_grad and (getattr(p, "tensor_model_parallel", False) or tp_rank == 0):
            sq += p.main_grad.double().pow(2).sum()
    dist.all_reduce(sq)
    expected = math.sqrt(sq.item())
    _, grad_norm, _ = opt.step()
    clipped_sq = torch.zeros(1, dtype=torch.float64)
    for p in model.parameters():
        if p.requires_grad and (getattr(p, "tensor_model_parallel", False) or tp_rank == 0):
            clipped_sq += p.grad.double().pow(2).sum()
    dist.all_reduce(clipped_sq)
    return expected, float(grad_norm), math.sqrt(clipped_sq.item())


@pytest.mark.timeout(120)
@pytest.mark.parametrize("tp", [1, 2])
def test_grad_norm_and_clipping(tp):
    unclipped = run_distributed(_clip_worker, tp, tp, 1e9, timeout=100)[0]
    norm = unclipped[0]
    assert unclipped[1] == pytest.approx(norm, rel=1e-5)   # the reported norm is the true global norm
    assert unclipped[2] == pytest.approx(norm, rel=1e-5)   # no clipping below the threshold
    clip = norm / 4
    expected, reported, after = run_distributed(_clip_worker, tp, tp, clip, timeout=100)[0]
    assert reported == pytest.approx(norm, rel=1e-5)        # reported before clipping
    assert after == pytest.approx(clip, rel=1e-4)           # the gradients are scaled to the threshold


def _schedule_worker():
    from omegaconf import OmegaConf

    from framework.models.config import ModelConfig
    from framework.models.gpt import build_gpt
    from framework.peft.lora import apply_lora
    from framework.runtime import initialize
    from framework.training.optim import build_optimizer, wrap_ddp

    initialize(seed=0)
    model = build_gpt(ModelConfig(**ARCH))
    apply_lora(model, rank=2, alpha=2)
    trainer = OmegaConf.create(dict(lr=1e-3, min_lr=1e-4, weight_decay=0.0, adam_beta1=0.9, adam_beta2=0.999,
                                    clip_grad=1.0, max_steps=10, warmup_steps=2))
    opt, sched = build_optimizer(wrap_ddp(model), trainer)
    lrs = []
    for _ in range(10):
        sched.step(increment=1)
        lrs.append(opt.param_groups[0]["lr"])
    return lrs


@pytest.mark.timeout(60)
def test_warmup_then_cosine_schedule():
    lrs = run_distributed(_schedule_worker, 1, timeout=50)[0]
    lr, min_lr, warmup, steps = 1e-3, 1e-4, 2, 10
    for step, got in enumerate(lrs, start=1):
        if step <= warmup:
            want = lr * step / warmup
        else:
            want = min_lr + (lr - min_lr) * 0.5 * (1 + math.cos(math.pi * (step - warmup) / (steps - warmup)))
        assert got == pytest.approx(want, rel=1e-6), step


def _lora_plus_schedule_worker():
    from omegaconf import OmegaConf

    from framework.models.config import ModelConfig
    from framework.models.gpt import build_gpt
    from framework.peft import lora_plus
    from framework.peft.lora import apply_lora
    from framework.runtime import initialize
    from framework.training.optim import build_optimizer, wrap_ddp

    initialize(seed=0)
    model = build_gpt(ModelConfig(**ARCH))
    apply_lora(model, targets=("qkv", "fc2", "embedding"), rank=2, alpha=2)
    lora_plus.mark(model, ratio=16.0, lr_embedding=5e-4)
    trainer = OmegaConf.create(dict(lr=1e-3, min_lr=1e-4, weight_decay=0.01, adam_beta1=0.9, adam_beta2=0.999,
                                    clip_grad=1.0, max_steps=10, warmup_steps=2))
    opt, sched = build_optimizer(wrap_ddp(model), trainer)
    ids = {id(p): n for n, p in model.named_parameters()}
    roles = {}
    for g in opt.param_groups:
        for p in g["params"]:
            n = ids[id(p)]
            roles.setdefault("embedding" if "lora_embedding" in n else "B" if "lora_B" in n else "A", set()).add(id(g))
    lrs = []
    for _ in range(10):
        sched.step(increment=1)
        by_role = {}
        for role, groups in roles.items():
            values = {g["lr"] for g in opt.param_groups if id(g) in groups}
            assert len(values) == 1, (role, values)
            by_role[role] = values.pop()
        lrs.append(by_role)
    return lrs


@pytest.mark.timeout(60)
def test_lora_plus_groups_follow_one_schedule():
    """LoRA+ (framework/peft/lora_plus.py): B at 16 x and the embedding's factors at 5e-4 / 1e-3 = 0.5 x the
    A factors' learning rate at every step of warm-up and cosine decay."""
    lrs = run_distributed(_lora_plus_schedule_worker, 1, timeout=50)[0]
    lr, min_lr, warmup, steps = 1e-3, 1e-4, 2, 10
    for step, got in enumerate(lrs, start=1):
        if step <= warmup:
            want = lr * step / warmup
        else:
            want = min_lr + (lr - min_lr) * 0.5 * (1 + math.cos(math.pi * (step - warmup) / (steps - warmup)))
        assert got["A"] == pytest.approx(want, rel=1e-12), step
        assert got["B"] == pytest.approx(16 * want, rel=1e-12), step
        assert got["embedding"] == pytest.approx(0.5 * want, rel=1e-12), step
