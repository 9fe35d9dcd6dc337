"""What the reward-model tests share: a tiny random HF ``LlamaForSequenceClassification`` (num_labels=1), a fixed
batch of four pairs with margins, TRL's side of the comparison (``RewardTrainer.compute_loss`` on a stand-in
trainer holding the attributes it reads) and our side (``ours_worker``: the same weights imported through
framework/checkpoint/score_head.py, the loss through megatron's schedule at any layout, the gradients written
where the assertions read them)."""

from __future__ import annotations

import os
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from tests.dpo_cases import assert_grads

PAD = 0
SHAPE = dict(num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
LORA = dict(method="lora", rank=4, alpha=8.0, dropout=0.0, targets=["qkv", "proj", "fc1", "fc2"])
# (prompt, chosen, rejected) lengths and each pair's margin
LENGTHS = [(5, 4, 2), (9, 2, 5), (3, 6, 3), (7, 3, 6)]
MARGINS = [0.5, 0.0, 1.5, -0.25]
# name -> (margins used, center_rewards_coefficient)
VARIANTS = {"plain": (False, None), "margin+center": (True, 0.05)}


def tiny_reward_model(seed: int, family: str = "llama", tied: bool = False):
    """A seeded ``...ForSequenceClassification`` (hidden 64, vocab 256, one label, pad id 0) in fp32 eval mode,
    norms randomised and the score head drawn large enough that scores differ clearly between sequences."""
    from transformers import (LlamaConfig, LlamaForSequenceClassification, Qwen2Config,
                              Qwen2ForSequenceClassification)

    config_cls, model_cls = {"llama": (LlamaConfig, LlamaForSequenceClassification),
                             "qwen2": (Qwen2Config, Qwen2ForSequenceClassification)}[family]
    cfg = config_cls(intermediate_size=128, head_dim=16, vocab_size=256, max_position_embeddings=128, hidden_size=64,
                     num_labels=1, pad_token_id=PAD, tie_word_embeddings=tied, **SHAPE)
    torch.manual_seed(seed)
    model = model_cls(cfg).float().eval()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "norm" in n:
                p.uniform_(0.5, 1.5)
        model.score.weight.normal_(0, 1.0)
    return model


def fixed_examples(margins: bool):
    """TRL's tokenised reward examples: prompt + response ids (no id is the padding id 0)."""
    g = torch.Generator().manual_seed(3)

    def ids(n):
        return torch.randint(3, 256, (n,), generator=g).tolist()

    out = []
    for (p, c, r), m in zip(LENGTHS, MARGINS):
        prompt = ids(p)
        e = {"chosen_ids": prompt + ids(c), "rejected_ids": prompt + ids(r)}
        out.append(e | ({"margin": m} if margins else {}))
    return out


def as_pairs(examples):
    from framework.data.preference import PreferencePair
    from framework.data.sample import Sample

    def row(ids):
        return Sample(ids, [1] * len(ids))

    return [PreferencePair(row(e["chosen_ids"]), row(e["rejected_ids"]), e.get("margin")) for e in examples]


class _Accelerator:
    device = torch.device("cpu")

    @staticmethod
    def gather(t):
        return t

    gather_for_metrics = gather


def trl_reward(model, examples, center):
    """(loss, {accuracy, margin, mean_reward}) from TRL's RewardTrainer.compute_loss; not yet backpropagated."""
    from trl.trainer.reward_trainer import DataCollatorForPreference, RewardTrainer

    trainer = SimpleNamespace(model=model, accelerator=_Accelerator(),
                              args=SimpleNamespace(center_rewards_coefficient=center),
                              _metrics={"train": defaultdict(list), "eval": defaultdict(list)},
                              _total_train_tokens=0, _tp_size=1)
    inputs = DataCollatorForPreference(pad_token_id=PAD)(examples)
    model.train()
    loss = RewardTrainer.compute_loss(trainer, model, inputs)
    m = trainer._metrics["train"]
    return loss, {"accuracy": m["accuracy"][-1], "margin": m["margin"][-1], "mean": m["mean_reward"][-1]}


def trl_reference(model_dir, peft_dir, variant):
    """TRL's loss, metrics and gradients {HF name: grad} of the score head and (``peft_dir``) the LoRA factors
    of HF PEFT with our adapter, or (no ``peft_dir``) every weight; fused layers' A gradients summed over
    their parts as our shared A receives them."""
    from transformers import AutoModelForSequenceClassification

    from tests.dpo_cases import _shared_a_grads

    margins, center = VARIANTS[variant]
    model = AutoModelForSequenceClassification.from_pretrained(model_dir, dtype=torch.float32)
    if peft_dir:
        from peft import LoraConfig, PeftModel

        config = LoraConfig.from_pretrained(peft_dir)
        config.task_type = None  # the plain PeftModel: the causal-LM wrapper would call generation hooks
        model = PeftModel.from_pretrained(model, peft_dir, config=config, is_trainable=True)
        model.base_model.model.score.weight.requires_grad_(True)
    loss, metrics = trl_reward(model, fixed_examples(margins), center)
    loss.backward()
    grads = {n.replace("base_model.model.", "").replace(".default", ""): p.grad.clone()
             for n, p in model.named_parameters() if p.requires_grad}
    return loss.item(), metrics, _shared_a_grads(grads) if peft_dir else grads


# --- our side -----------------------------------------------------------------------------------------------


def build_reward_model(path, tp, pp, sp):
    """Our model stage with a score head, filled from the HF sequence-classification directory ``path``."""
    import json

    from framework.checkpoint.score_head import load_hf_score_model
    from framework.models.registry import build_model, config_from_hf
    from framework.models.score_head import install_score_head

    cfg = config_from_hf(json.loads(open(os.path.join(path, "config.json")).read()))
    model = build_model(cfg, tp=tp, pp=pp, sp=sp)
    install_score_head(model, cfg.init_method_std)
    assert load_hf_score_model(model, path, cfg)
    return model, cfg


def init_adapter_worker(model_dir, adapter_dir, peft_dir):
    """Our LoRA with seeded non-zero A and B on the reward model, saved and exported to HF PEFT."""
    from framework.checkpoint.adapter import save_adapter
    from framework.checkpoint.peft_export import export_peft
    from framework.peft.lora import apply_lora
    from framework.runtime.distributed import initialize
    from tests.hf_models import fill_trainable

    initialize(tp=1, pp=1, seed=0)
    model, cfg = build_reward_model(model_dir, 1, 1, False)
    apply_lora(model, targets=tuple(LORA["targets"]), rank=LORA["rank"], alpha=LORA["alpha"])
    fill_trainable(model, seed=2, scale=0.2)
    save_adapter(model, adapter_dir, LORA, cfg)
    export_peft(adapter_dir, peft_dir, base_model_name_or_path=model_dir)


def ours_worker(tp, pp, sp, micro, model_dir, variants, out_root, adapter_dir=None):
    """Our step on the fixed batch for each variant: {variant: metrics}; the gradients written under
    out_root/variant: LoRA as an adapter plus score_head.safetensors, or (no adapter) every weight as an HF
    sequence-classification directory."""
    from framework.checkpoint.adapter import load_adapter, save_adapter
    from framework.checkpoint.score_head import export_hf_score, save_score_head
    from framework.models.score_head import score_head_of
    from framework.peft.lora import apply_lora
    from framework.runtime.distributed import initialize
    from framework.training.optim import wrap_ddp
    from framework.training.reward import RewardOptions, reward_forward_backward
    from framework.training.reward_task import pair_batches

    rt = initialize(tp=tp, pp=pp, sp=sp, seed=0)
    model, cfg = build_reward_model(model_dir, tp, pp, sp)
    if adapter_dir:
        apply_lora(model, targets=tuple(LORA["targets"]), rank=LORA["rank"], alpha=LORA["alpha"])
        load_adapter(model, adapter_dir, cfg)
        if score_head_of(model) is not None:
            score_head_of(model).weight.requires_grad_(True)
    ddp = wrap_ddp(model)
    out = {}
    for variant in variants:
        margins, center = VARIANTS[variant]
        pairs = as_pairs(fixed_examples(margins))
        batches = pair_batches(list(range(len(pairs))), pairs, micro, PAD, rt)
        metrics = reward_forward_backward(ddp, batches, RewardOptions(center))
        out[variant] = metrics.__dict__
        grad_dir = os.path.join(out_root, variant)
        if adapter_dir:
            saved = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
            with torch.no_grad():
                for n, p in model.named_parameters():
                    if p.requires_grad:
                        p.copy_(p.main_grad)
            save_adapter(model, grad_dir, LORA, cfg)
            save_score_head(model, grad_dir)
            with torch.no_grad():
                for n, p in model.named_parameters():
                    if p.requires_grad:
                        p.copy_(saved[n])
        else:
            export_hf_score(model, grad_dir, cfg, params={n: p.main_grad for n, p in model.named_parameters()})
    return out


def lora_grads(path) -> dict:
    """{HF PEFT name or score.weight: gradient} of a gradient directory written by ``ours_worker``."""
    from safetensors.torch import load_file

    from framework.checkpoint.score_head import HEAD_FILE

    grads = load_file(os.path.join(path, "adapter.safetensors")) | load_file(os.path.join(path, HEAD_FILE))
    return {k.replace("base_model.model.", ""): v for k, v in grads.items()}


def assert_metrics(ours: dict, loss: float, metrics: dict, what: str, atol: float = 1e-5):
    assert ours["pairs"] == len(LENGTHS), what
    assert ours["loss"] == pytest.approx(loss, abs=atol, rel=atol), f"{what}: loss ours {ours['loss']} TRL {loss}"
    for k, v in metrics.items():
        assert ours[k] == pytest.approx(v, abs=atol, rel=atol), f"{what}: {k} ours {ours[k]} TRL {v}"


__all__ = ["assert_grads"]
