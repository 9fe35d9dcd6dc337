"""The memory planner (issue 6): parameter counts equal what megatron builds and the published sizes of
real models; the estimate's parts follow their formulas; Llama 2 70B LoRA in bf16 on 80 GiB GPUs does not
fit at TP=1 (PP=1) and does at TP=2; the CLI recommends a layout."""

from __future__ import annotations

import subprocess
import sys

import pytest

from framework.models.config import ModelConfig
from framework.runtime.spawn import run_distributed
from tests.test_finetune_job import ROOT, compose

TINY = {
    "llama_untied": dict(),
    "llama_tied_gqa": dict(num_query_groups=2, tie_word_embeddings=True),
    "qwen2_qkv_bias": dict(family="qwen2", add_qkv_bias=True),
    "mixtral_experts": dict(family="mixtral", num_experts=4, moe_router_topk=2),
}


def _built_counts(configs):
    from framework.models.registry import build_model
    from framework.runtime.distributed import initialize

    initialize(tp=1, pp=1)
    return {name: sum(p.numel() for p in build_model(ModelConfig(**c)).parameters()) for name, c in configs.items()}


@pytest.mark.timeout(120)
def test_parameter_counts_equal_the_built_models():
    from framework.planner.params import count

    base = dict(vocab_size=256, hidden_size=64, num_layers=3, num_attention_heads=4, ffn_hidden_size=96)
    configs = {k: {**base, **v} for k, v in TINY.items()}
    built = run_distributed(_built_counts, 1, configs, timeout=100)[0]
    for name, c in configs.items():
        cfg = ModelConfig(**c)
        assert count(cfg).total(cfg.num_layers) == built[name], name


@pytest.mark.parametrize("model,published", [
    ("llama2_7b", 6_738_415_616),    # meta-llama/Llama-2-7b-hf
    ("llama2_13b", 13_015_864_320),  # meta-llama/Llama-2-13b-hf
    ("llama2_70b", 68_976_648_192),  # meta-llama/Llama-2-70b-hf
    ("llama3_8b", 8_030_261_248),    # meta-llama/Meta-Llama-3-8B
    ("mistral_7b", 7_241_732_096),   # mistralai/Mistral-7B-v0.1
    ("mixtral_8x7b", 46_702_792_704),  # mistralai/Mixtral-8x7B-v0.1
])
def test_parameter_counts_of_real_models(model, published):
    from framework.config.validate import model_config
    from framework.planner.params import count

    cfg = model_config(compose([f"model={model}"]))
    assert count(cfg).total(cfg.num_layers) == published


def test_estimate_parts_follow_their_formulas():
    from framework.planner.memory import OVERHEAD, Job, estimate
    from framework.planner.params import count, lora_per_layer

    m = ModelConfig(vocab_size=1000, hidden_size=512, num_layers=8, num_attention_heads=8, num_query_groups=4,
                    ffn_hidden_size=1024)
    job = Job(model=m, method="lora", lora_rank=8, precision="bf16", seq_length=256, micro_batch_size=2,
              global_batch_size=16)
    e = estimate(job, tp=2, pp=1, dp=2)
    c = count(m)
    assert e.weights == pytest.approx(c.total(8) * 2 / 2)
    trainable = 8 * lora_per_layer(m, 8)
    assert e.gradients == pytest.approx(trainable * 4 / 2)
    assert e.optimizer == pytest.approx(trainable * 12 / 2 / 2)  # distributed optimizer over DP=2
    d, n, g, f = 64, 8, 4, 1024
    per_layer = 2 * 256 * 2 * (4 * 512 / 2 + ((n + 2 * g) * d + n * d + 2 * f + f) / 2)
    assert e.activations == pytest.approx(8 * per_layer)
    assert e.logits == pytest.approx(256 * 2 * 1000 / 2 * 4 * 2)
    assert e.total == pytest.approx(e.weights + e.gradients + e.optimizer + e.activations + e.logits + OVERHEAD)
    # full fine-tuning trains every parameter; full recompute keeps one hidden state per layer
    full = estimate(Job(model=m, method="none", precision="bf16", seq_length=256, micro_batch_size=2,
                        recompute="full", distributed_optimizer=False), tp=1, pp=2, dp=1)
    # the last stage needs most here: 4 layers + final norm + output layer (untied), plus the logits
    assert full.gradients == pytest.approx((4 * c.per_layer + c.final) * 4)
    assert full.activations < e.activations


def test_llama2_70b_lora_needs_tp2_on_80gib():
    from framework.planner.memory import GiB, estimate, job_from_config, plan

    job = job_from_config(compose(["model=llama2_70b", "peft=lora", "precision=bf16", "data.max_length=4096",
                                   "trainer.micro_batch_size=1"]))
    for rc in ("none", "full"):
        import dataclasses

        tp1 = estimate(dataclasses.replace(job, recompute=rc), tp=1, pp=1, dp=8)
        assert tp1.weights > 80 * GiB and tp1.total > 80 * GiB  # 69B parameters x 2 bytes alone
    rows = plan(job, gpus=8, gpu_memory_gib=80)
    fitting = [e for e, fits in rows if fits]
    assert any(e.tp == 2 and e.pp == 1 for e in fitting)
    assert not any(e.tp == 1 and e.pp == 1 for e in fitting)


@pytest.mark.timeout(120)
def test_plan_cli_recommends_a_layout():
    p = subprocess.run([sys.executable, "launch/plan.py", "model=llama2_70b", "peft=lora", "precision=bf16",
                        "data.max_length=4096", "trainer.micro_batch_size=1", "--gpus", "8"],
                       cwd=ROOT, capture_output=True, text=True, timeout=100)
    assert p.returncode == 0, p.stderr[-2000:]
    assert "recommended: parallel.tensor=2 parallel.pipeline=1" in p.stdout
    p = subprocess.run([sys.executable, "launch/plan.py", "model=llama2_70b", "peft=none", "--gpus", "1"],
                       cwd=ROOT, capture_output=True, text=True, timeout=100)
    assert p.returncode == 1 and "no layout fits" in p.stdout
