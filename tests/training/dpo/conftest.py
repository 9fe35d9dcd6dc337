"""The preference-tuning tests' shared models, built once for the whole folder: the tiny base and policy
(HF), our LoRA adapter and its HF PEFT export, our single-process results, and the tiny job model."""

from __future__ import annotations

import pytest
import torch

from launch.spawn import run_distributed
from tests.dpo_cases import SHAPE, VARIANTS, init_adapter_worker, ours_worker
from tests.hf_models import save_tiny_job_llama, tiny_llama


@pytest.fixture(scope="package")
def models(tmp_path_factory):
    """base (HF), policy (base perturbed, HF), our LoRA adapter and its HF PEFT export."""
    root = tmp_path_factory.mktemp("dpo")
    base = tiny_llama(0, **SHAPE)
    base.save_pretrained(root / "base")
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in base.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.02)
    base.save_pretrained(root / "policy")
    run_distributed(init_adapter_worker, 1, str(root / "base"), str(root / "adapter"), str(root / "peft"),
                    timeout=120)
    return root


@pytest.fixture(scope="package")
def lora_single(models):
    """Our single-process LoRA results for every variant (metrics; gradients under lora_single/)."""
    out = models / "lora_single"
    return run_distributed(ours_worker, 1, 1, 1, False, 2, str(models / "base"), list(VARIANTS), str(out),
                           adapter_dir=str(models / "adapter"), timeout=200)[0]


@pytest.fixture(scope="package")
def tiny_hf(tmp_path_factory):
    """The tiny job model (tests/hf_models.save_tiny_job_llama) the job tests train."""
    return save_tiny_job_llama(tmp_path_factory.mktemp("tiny_hf"))
