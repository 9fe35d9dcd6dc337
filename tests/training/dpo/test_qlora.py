"""QLoRA + DPO: the policy is LoRA over an NF4 base, the reference the same network with its adapters off
(the NF4 base itself, no second copy).

Parity. TRL 1.16's own loss code (``DPOTrainer._compute_loss``, through tests/dpo_cases.py's stand-in trainer)
runs on log-probabilities that this test computes by hand from our QLoRA model's full logits (log-softmax,
the next-token labels, masked to the responses): the policy with its adapters, the reference inside
``adapters_disabled``, plain autograd for the gradients. Our DPO step (megatron's schedule, the
vocab-parallel cross entropy, ``AdaptersDisabled``) on a second copy of the same model gives the same loss,
rewards, log-probs and LoRA gradients within 1e-5. The NF4 base is checked to differ from the
full-precision one, so the reference really is the quantised base.

Learning: a short QLoRA DPO job on 32 of the bundled arithmetic pairs raises reward accuracy well above
chance (it starts at 0: policy = reference).
"""

from __future__ import annotations

import contextlib
import os
from types import SimpleNamespace

import pytest
import torch

from launch.spawn import run_distributed
from tests.dpo_cases import (ROOT, SHAPE, VARIANTS, as_pairs, assert_metrics, build_from_hf, fixed_examples, run_dpo,
                             tiny_dpo, trl_dpo)
from tests.hf_models import fill_trainable, tiny_llama
from tests.tolerances import DPO_ATOL

QLORA = dict(method="qlora", rank=4, alpha=8.0, dropout=0.0, rslora=False, targets=["qkv", "proj", "fc1", "fc2"],
             block_size=64, scaler_block_size=256)
CHECKED = ["sigmoid", "ipo"]


class HandLogProbs(torch.nn.Module):
    """TRL's fused-LM-head interface (``model(..., labels, fused_lm_head=True).log_probs`` and the per-token
    metrics it logs) over our megatron model, computed here from the full logits; ``disabled``: the
    model with its adapters switched off."""

    is_gradient_checkpointing = False  # TRL asks before its reference forward

    def __init__(self, gpt, disabled: bool = False):
        super().__init__()
        self.gpt, self.disabled = gpt, disabled

    def forward(self, input_ids, attention_mask=None, labels=None, use_cache=False, fused_lm_head=True):
        from framework.peft.wrapping import adapters_disabled

        b, s = input_ids.shape
        positions = torch.arange(s).expand(b, s)  # right padding: real tokens at 0..n-1, causal attention
        with adapters_disabled(self.gpt) if self.disabled else contextlib.nullcontext():
            logits = self.gpt(input_ids, positions, None).float()[:, :-1]  # [b, s-1, V]: predicts token t+1
        target = labels[:, 1:]
        mask = target != -100
        logp = torch.log_softmax(logits, -1)
        log_probs = logp.gather(-1, target.clamp(min=0).unsqueeze(-1)).squeeze(-1) * mask
        entropy = -(logp.exp() * logp).sum(-1) * mask
        return SimpleNamespace(log_probs=log_probs, entropy=entropy.detach(),
                               mean_logits=(logits.mean(-1) * mask).detach(),
                               is_top1=(logits.argmax(-1) == target) & mask, aux_loss=None)


def _qlora_model(base_dir):
    from omegaconf import OmegaConf

    from framework.peft.registry import apply_peft

    model, cfg = build_from_hf(base_dir, 1, 1, False)
    apply_peft(model, OmegaConf.create(QLORA), cfg)
    fill_trainable(model, seed=2, scale=0.2)
    return model


def _worker(base_dir):
    """{variant: (TRL's loss, TRL's metrics, our metrics, max relative gradient error, number of LoRA
    tensors)} and max |NF4 reference log-probs - full-precision log-probs|."""
    from framework.peft.nf4 import NF4Weight
    from framework.runtime.distributed import initialize
    from framework.training.dpo import DPOOptions, dpo_forward_backward
    from framework.training.dpo_reference import AdaptersDisabled
    from framework.training.dpo_task import pair_batches
    from framework.training.optim import wrap_ddp

    rt = initialize(tp=1, pp=1, seed=0)
    examples, pairs = fixed_examples(), as_pairs(fixed_examples())
    hand = _qlora_model(base_dir)
    assert sum(isinstance(m, NF4Weight) for m in hand.modules()) == 4 * SHAPE["num_hidden_layers"]
    ours = wrap_ddp(_qlora_model(base_dir))  # the same weights and adapters (quantisation is deterministic)
    reference = AdaptersDisabled(ours, "fp32")

    from trl.trainer.dpo_trainer import DataCollatorForPreference

    full, _ = build_from_hf(base_dir, 1, 1, False)  # the unquantised base
    inputs = DataCollatorForPreference(pad_token_id=0)(examples)
    labels = inputs["input_ids"].masked_fill(inputs["completion_mask"] == 0, -100)
    with torch.no_grad():
        nf4_ref, fp_ref = (HandLogProbs(m, disabled=True)(inputs["input_ids"], labels=labels).log_probs.sum(-1)
                           for m in (hand, full))

    out = {}
    for variant in CHECKED:
        opts, types, weights, beta, eps = VARIANTS[variant]
        hand.zero_grad(set_to_none=True)
        loss, metrics = trl_dpo(HandLogProbs(hand), HandLogProbs(hand, disabled=True), examples, types, weights,
                                beta, eps)
        loss.backward()
        want = {n: p.grad.clone() for n, p in hand.named_parameters() if p.requires_grad}

        batches, idx = pair_batches(list(range(len(pairs))), pairs, 2, 0, rt)
        reference.attach(batches, idx, "train")
        got = dpo_forward_backward(ours, batches, DPOOptions(**opts))
        grads = {n: p.main_grad.clone() for n, p in ours.module.named_parameters() if p.requires_grad}
        assert grads.keys() == want.keys()
        err = max(((grads[n] - w).abs().max() / w.abs().max()).item() for n, w in want.items())
        out[variant] = (loss.item(), metrics, got.__dict__, err, len(want))
    return out, (nf4_ref - fp_ref).abs().max().item()


@pytest.mark.timeout(200)
def test_qlora_dpo_matches_trl_on_hand_computed_logprobs(tmp_path):
    tiny_llama(0, **SHAPE).save_pretrained(tmp_path / "base")
    results, quantisation_effect = run_distributed(_worker, 1, str(tmp_path / "base"), timeout=150)[0]
    assert quantisation_effect > 1e-3  # the reference is the NF4 base, not the full-precision one
    for variant, (loss, metrics, ours, grad_err, n_lora) in results.items():
        assert metrics["reward_margin"] != 0 and metrics["reward_accuracy"] not in (0.0, 1.0)  # a real test
        assert_metrics(ours, loss, metrics, f"qlora {variant}")
        assert n_lora == 4 * SHAPE["num_hidden_layers"] * 2  # A and B of every wrapped linear
        assert grad_err < 1e-5, f"qlora {variant}: LoRA gradients differ by {grad_err:.3g}"


@pytest.mark.timeout(300)
def test_short_qlora_run_raises_reward_accuracy(tiny_hf, tiny_tokenizer_dir, tmp_path):
    """peft=qlora on the tiny model and 32 arithmetic pairs, 20 steps (5 epochs): the validation reward accuracy
    over those pairs is well above chance, the margin positive, the loss lower, and the adapter written."""
    pairs = tmp_path / "pairs.jsonl"
    with open(os.path.join(ROOT, "data", "preference", "arithmetic.jsonl")) as f:
        pairs.write_text("".join(f.readlines()[:32]))
    cfg = tiny_dpo(tiny_hf, tiny_tokenizer_dir, tmp_path / "run", "peft=qlora", "peft.rank=4", f"data.train={pairs}",
                   f"data.validation={pairs}", "data.validation_split=null", "trainer.eval_samples=32",
                   "trainer.max_steps=20", "trainer.eval_interval=100", "trainer.save_interval=null", "trainer.lr=5e-3")
    history, before, after, trained = run_distributed(run_dpo, 1, cfg, timeout=250)[0]
    # before training the policy is the reference up to rounding (a fp32 forward of the same weights in another
    # batch or thread split): margins within DPO_ATOL of 0, so the reward accuracy only counts rounding's signs
    assert abs(before["reward_margin"]) <= DPO_ATOL and before["loss"] == pytest.approx(0.693147, abs=DPO_ATOL)
    assert after["reward_accuracy"] >= 0.8 and after["reward_margin"] > 0 and after["loss"] < before["loss"], after
    assert os.path.isfile(os.path.join(trained, "adapter.safetensors"))
