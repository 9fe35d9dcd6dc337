"""The reward-model tests' shared models, built once for the folder: the tiny HF sequence classifier, our
LoRA adapter on it and its HF PEFT export, and our single-process results (gradients under lora_single/)."""

from __future__ import annotations

import pytest

from launch.spawn import run_distributed
from tests.training.reward.cases import VARIANTS, init_adapter_worker, ours_worker, tiny_reward_model


@pytest.fixture(scope="package")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("reward")
    tiny_reward_model(0).save_pretrained(root / "rm")
    run_distributed(init_adapter_worker, 1, str(root / "rm"), str(root / "adapter"), str(root / "peft"), timeout=120)
    return root


@pytest.fixture(scope="package")
def lora_single(models):
    """Our single-process LoRA results for every variant."""
    return run_distributed(ours_worker, 1, 1, 1, False, 2, str(models / "rm"), list(VARIANTS),
                           str(models / "lora_single"), adapter_dir=str(models / "adapter"), timeout=200)[0]
