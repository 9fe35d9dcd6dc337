"""DPO, IPO, robust and conservative DPO and the SFT term against TRL 1.16 (tests/dpo_cases.py).

One tiny random HF Llama and a fixed batch of 4 pairs. LoRA: our adapter (non-zero A and B) exported to HF
PEFT, TRL's reference is PEFT with its adapters disabled, ours the same network with its adapters switched
off; loss, rewards, log-probs and the gradients of every factor compared. Full fine-tuning: the policy is a
perturbed copy of the base weights, TRL's reference model is the base, ours a frozen copy or precomputed
log-probs (also at TP=2+SP, DP=2 and with packed pairs); every weight's gradient compared (exported to HF
names). The reference of adapter runs, the adapters disabled, is exactly the base model for every
layer-wrapping method.
"""

from __future__ import annotations

import pytest
import torch

from launch.spawn import run_distributed
from tests.dpo_cases import (LORA, PACKED_LENGTH, VARIANTS, adapter_grads, assert_grads, assert_metrics, build_from_hf,
                             fixed_examples, hf_grads, ours_worker, trl_full_reference, trl_lora_reference)
from tests.hf_models import fill_trainable


@pytest.mark.timeout(300)
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_lora_matches_trl(models, lora_single, variant):
    """Loss, rewards, log-probs and every LoRA factor's gradient equal TRL's on HF PEFT (reference: the
    adapters disabled, in both)."""
    loss, metrics, grads = trl_lora_reference(str(models / "base"), str(models / "peft"), fixed_examples(), variant)
    assert metrics["reward_margin"] != 0 and metrics["reward_accuracy"] not in (0.0, 1.0)  # a real test
    assert_metrics(lora_single[variant], loss, metrics, variant)
    assert_grads(adapter_grads(models / "lora_single" / variant), grads, variant)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("reference_kind,tp,pp,sp,world,micro", [
    ("frozen_copy", 1, 1, False, 1, 2),
    ("precomputed", 1, 1, False, 1, 2),
    ("frozen_copy", 2, 1, True, 2, 2),    # TP=2 + SP: the copy sharded like the policy
    ("precomputed", 1, 1, False, 2, 1),   # DP=2: each rank precomputes half the pairs
    ("precomputed", 1, 1, False, 1, 1),   # packed pairs, the table looked up per packed pair
    ("frozen_copy", 2, 1, True, 2, 1),    # packed pairs at TP=2 + SP
], ids=["frozen_copy", "precomputed", "frozen_copy-tp2-sp", "precomputed-dp2", "precomputed-packed",
        "frozen_copy-packed-tp2-sp"])
def test_full_parameters_match_trl(models, tmp_path, request, reference_kind, tp, pp, sp, world, micro):
    """Full fine-tuning: TRL with a reference model; ours with a frozen copy or precomputed log-probs.
    Every weight's gradient (embedding, norms, output layer included) equals TRL's."""
    variants = ["sigmoid", "ipo"]
    packed = PACKED_LENGTH if "packed" in request.node.callspec.id else None
    results = run_distributed(ours_worker, world, tp, pp, sp, micro, str(models / "policy"), variants,
                              str(tmp_path), reference_dir=str(models / "base"), reference_kind=reference_kind,
                              packed_length=packed, timeout=250)
    for variant in variants:
        loss, metrics, grads = trl_full_reference(str(models / "base"), str(models / "policy"), fixed_examples(),
                                                  variant)
        for ours in results:
            assert_metrics(ours[variant], loss, metrics, variant)
        assert_grads(hf_grads(tmp_path / variant), grads, variant)


def _disabled_worker(base_dir):
    """{method: (max |with adapter - base|, max |adapters disabled - base|, max |after - with adapter|)}."""
    from omegaconf import OmegaConf

    from framework.inference.logits import forward_logits
    from framework.peft.registry import apply_peft
    from framework.peft.wrapping import adapters_disabled, remove_peft
    from framework.runtime.distributed import initialize

    initialize(tp=1, pp=1, seed=0)
    model, cfg = build_from_hf(base_dir, 1, 1, False)
    model.eval()
    tokens = torch.randint(3, 256, (2, 12), generator=torch.Generator().manual_seed(0))
    base = forward_logits(model, tokens)
    out = {}
    for peft in (LORA, dict(method="dora", rank=4, alpha=8.0, dropout=0.0, targets=["qkv", "fc2"]),
                 dict(method="ia3", targets=["k", "v", "fc2"]),
                 dict(method="adapter", bottleneck=8, activation="gelu", targets=["attention", "mlp"])):
        apply_peft(model, OmegaConf.create(peft), cfg)
        fill_trainable(model, seed=4, scale=0.2)
        with_adapter = forward_logits(model, tokens)
        with adapters_disabled(model):
            disabled = forward_logits(model, tokens)
        after = forward_logits(model, tokens)
        out[peft["method"]] = tuple((a - b).abs().max().item() for a, b in
                                    ((with_adapter, base), (disabled, base), (after, with_adapter)))
        remove_peft(model)
    return out


@pytest.mark.timeout(200)
def test_adapters_disabled_is_the_base_model(models):
    """For every layer-wrapping method (the DPO reference of adapter runs): inside ``adapters_disabled`` the
    logits are exactly the base model's, and the adapter is back afterwards."""
    results = run_distributed(_disabled_worker, 1, str(models / "base"), timeout=150)[0]
    assert set(results) == {"lora", "dora", "ia3", "adapter"}
    for method, (changed, disabled, restored) in results.items():
        assert changed > 1e-3, f"{method}: the adapter does not change the output, the test would prove nothing"
        assert disabled == 0 and restored == 0, (method, disabled, restored)
