"""The reward model's loss against TRL 1.16's ``RewardTrainer.compute_loss`` (tests/training/reward/cases.py):
one tiny random HF LlamaForSequenceClassification and a fixed batch of 4 pairs, without and with per-pair
margins and the centring term. LoRA: our adapter (non-zero A and B) exported to HF PEFT; loss, accuracy,
margin, mean score and the gradients of every factor and of the score head compared. Full parameters: every
weight's gradient, exported under HF's names (framework/checkpoint/score_head.py)."""

from __future__ import annotations

import os

import pytest
from safetensors.torch import load_file

from launch.spawn import run_distributed
from tests.training.reward.cases import VARIANTS, assert_grads, assert_metrics, lora_grads, ours_worker, trl_reference


@pytest.mark.timeout(300)
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_lora_matches_trl(models, lora_single, variant):
    loss, metrics, grads = trl_reference(str(models / "rm"), str(models / "peft"), variant)
    assert metrics["margin"] != 0 and metrics["accuracy"] not in (0.0, 1.0)  # a real test
    assert_metrics(lora_single[variant], loss, metrics, variant)
    assert "score.weight" in grads and any(".lora_A." in k for k in grads)
    assert_grads(lora_grads(models / "lora_single" / variant), grads, variant)


@pytest.mark.timeout(300)
def test_full_parameters_match_trl(models, tmp_path):
    variants = list(VARIANTS)
    ours = run_distributed(ours_worker, 1, 1, 1, False, 2, str(models / "rm"), variants, str(tmp_path), timeout=200)[0]
    for variant in variants:
        loss, metrics, grads = trl_reference(str(models / "rm"), None, variant)
        assert_metrics(ours[variant], loss, metrics, variant)
        d = tmp_path / variant
        mine = {}
        for f in os.listdir(d):
            if f.endswith(".safetensors"):
                mine |= load_file(str(d / f))
        assert_grads(mine, grads, f"full {variant}")
