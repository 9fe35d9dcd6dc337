"""Model FLOPs per training step (framework/training/flops.py) against torch's own FLOP counter, and the
TFLOP/s and MFU the job reports.

The reference is ``torch.utils.flop_counter.FlopCounterMode`` around one forward + backward of the real
megatron model (local layer spec, CPU; attention on torch's math backend, so its matmuls are visible): it
counts the matmuls torch actually runs, and none that autograd skips for frozen weights, so the full-SFT
(3x), frozen-base (2x) and PEFT (3x) factors of the formula are checked, not assumed.
"""

import re

import pytest
import torch

from launch.spawn import run_distributed

ARCH = dict(vocab_size=256, hidden_size=64, num_layers=3, num_attention_heads=4, num_query_groups=2,
            ffn_hidden_size=128, max_position_embeddings=256)
MOE = dict(ARCH, num_experts=4, moe_router_topk=2)
ROWS, SEQ = 2, 48

CASES = {
    "full": (ARCH, {"method": "none"}),
    "lora": (ARCH, {"method": "lora", "rank": 8, "alpha": 16, "dropout": 0.0, "rslora": False,
                    "targets": ["qkv", "proj", "fc1", "fc2", "output"]}),
    "adapter": (ARCH, {"method": "adapter", "bottleneck": 16, "activation": "gelu", "targets": ["attention", "mlp"]}),
    "moe-lora": (MOE, {"method": "lora", "rank": 4, "alpha": 8, "dropout": 0.0, "rslora": False,
                       "targets": ["qkv", "proj"]}),  # LoRA does not wrap expert linears
}


def _counted(arch, peft):
    from omegaconf import OmegaConf
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    from framework.models.config import ModelConfig
    from framework.models.gpt import build_gpt
    from framework.peft.registry import apply_peft
    from framework.runtime import initialize

    initialize(tp=1, pp=1, seed=0)
    cfg = ModelConfig(**arch)
    model = build_gpt(cfg)
    apply_peft(model, OmegaConf.create(peft), cfg)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    # Megatron counts the backward through every layer; autograd runs the part below the first trained
    # parameter only when something there needs a gradient (a lookup table's gradient is no matmul).
    model.embedding.word_embeddings.weight.requires_grad_(True)
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, cfg.vocab_size, (ROWS, SEQ + 1), generator=g)
    position_ids = torch.arange(SEQ).expand(ROWS, SEQ).contiguous()
    counter = FlopCounterMode(display=False)
    # the math backend runs attention as matmuls the counter sees (torch's fused CPU kernel it does not count)
    with sdpa_kernel(SDPBackend.MATH), counter:
        loss = model(tokens[:, :-1], position_ids, None, labels=tokens[:, 1:]).sum()
        loss.backward()
    return counter.get_total_flops(), trainable


@pytest.mark.timeout(240)
@pytest.mark.parametrize("case", list(CASES))
def test_step_flops_match_torch_flop_counter(case):
    from framework.models.config import ModelConfig
    from framework.training.flops import step_flops

    arch, peft = CASES[case]
    counted, trainable = run_distributed(_counted, 1, arch, peft, timeout=200)[0]
    formula = step_flops(ModelConfig(**arch), peft, ROWS, SEQ)
    assert trainable > 0
    assert formula == pytest.approx(counted, rel=0.01), (case, formula, counted)


def test_frozen_base_counts_less_than_full_and_lora_adds_its_gemms():
    """The formula's structure on a real shape (Llama-3-8B): frozen GEMMs 2x, attention 3x, LoRA 3x."""
    from omegaconf import OmegaConf

    from framework.models.config import ModelConfig
    from framework.training.flops import flops_per_token, peft_gemm_per_token

    arch = OmegaConf.to_container(OmegaConf.load("conf/model/llama3_8b.yaml").arch, resolve=True)
    cfg = ModelConfig(**arch)
    h, L, V, s = cfg.hidden_size, cfg.num_layers, cfg.vocab_size, 4096
    full = flops_per_token(cfg, s, trains_base=True)
    # 8.03e9 parameters, of which V h is the input embedding (a lookup): 6 x the GEMM weights + attention
    gemm_weights = 8_030_261_248 - V * h - h * (2 * L + 1)  # minus embedding and the norms
    assert full == pytest.approx(6 * gemm_weights + 12 * s * h * L, rel=1e-9)
    lora = {"method": "lora", "rank": 16, "targets": ["qkv", "proj", "fc1", "fc2"]}
    peft = peft_gemm_per_token(cfg, lora)
    assert peft == 16 * L * ((h + 6144) + (4096 + h) + (h + 2 * 14336) + (14336 + h))
    frozen = flops_per_token(cfg, s, trains_base=False, peft_gemm=peft)
    assert frozen == pytest.approx(4 * gemm_weights + 12 * s * h * L + 6 * peft, rel=1e-9)


def test_peak_is_looked_up_from_the_gpu_name():
    from framework.training.flops import peak_for_name, peak_tflops

    assert peak_for_name("NVIDIA H100 80GB HBM3") == 989.0
    assert peak_for_name("NVIDIA H100 PCIe") == 756.0
    assert peak_for_name("NVIDIA H200") == 989.0
    assert peak_for_name("NVIDIA A100-SXM4-80GB") == 312.0
    assert peak_for_name("NVIDIA GeForce RTX 4090") is None
    assert peak_tflops(None, torch.device("cpu")) is None
    assert peak_tflops(123.0, torch.device("cpu")) == 123.0


def _job_log(cfg):
    """Run the job in this (spawned) process; returns the job's INFO messages."""
    import logging
    import os

    from framework.runtime.logs import setup_logging
    from framework.training import finetune
    from tests.job_process import capture_messages
    from tests.sft_jobs import ROOT

    os.chdir(ROOT)
    setup_logging("WARNING")
    messages = capture_messages("framework.finetune", logging.INFO)
    finetune.run(cfg)
    return messages


@pytest.mark.timeout(300)
def test_job_logs_tflops_and_mfu(tiny_tokenizer_dir, tmp_path):
    """A short job with trainer.peak_tflops set (so MFU is shown on the CPU): every step's log line has
    TFLOP/s/GPU and MFU, TensorBoard has train/tflops_per_gpu and train/mfu, and MFU = TFLOP/s / peak."""
    from tests.sft_jobs import job_cfg, tensorboard_scalars

    peak = 1e-4  # TFLOP/s: the tiny model on a busy CPU reaches about that
    cfg = job_cfg(tiny_tokenizer_dir, tmp_path, f"trainer.peak_tflops={peak}", "trainer.save_interval=null",
                  "trainer.eval_interval=100", "trainer.max_steps=3")
    messages = run_distributed(_job_log, 1, cfg, timeout=240)[0]
    lines = [m for m in messages if re.match(r"step \d+/3 loss", m)]
    assert len(lines) == 3, messages
    for line in lines:
        m = re.search(r"TFLOP/s/GPU (\S+) MFU (\S+)%", line)
        assert m, line
        assert float(m.group(2)) == pytest.approx(100 * float(m.group(1)) / peak, rel=2e-2)
    tflops = tensorboard_scalars(tmp_path, "train/tflops_per_gpu")
    mfu = tensorboard_scalars(tmp_path, "train/mfu")
    assert [s for s, _ in tflops] == [1, 2, 3] and [s for s, _ in mfu] == [1, 2, 3]
    for (_, t), (_, u) in zip(tflops, mfu):
        assert t > 0 and u == pytest.approx(t / peak, rel=1e-5)


def test_without_a_peak_only_tflops_are_reported():
    from framework.models.config import ModelConfig
    from framework.training.flops import Throughput, step_flops

    cfg, peft = ModelConfig(**ARCH), {"method": "none"}
    meter = Throughput(cfg, peft, world_size=2, peak=None)
    meter.add_step(4, [{"tokens": torch.zeros(2, 32)}, {"tokens": torch.zeros(2, 32)}])
    meter.add_step(4, [{"tokens": torch.zeros(4, 16)}])
    scalars = meter.scalars(seconds=2.0)
    expected = (step_flops(cfg, peft, 4, 32) + step_flops(cfg, peft, 4, 16)) / 2.0 / 2 / 1e12
    assert scalars == {"train/tflops_per_gpu": pytest.approx(expected), "train/mfu": None}
    assert "TFLOP/s/GPU" in Throughput.describe(scalars) and "MFU" not in Throughput.describe(scalars)
    t5 = ModelConfig(**dict(ARCH, num_decoder_layers=2))
    assert step_flops(t5, peft, 4, 32) is None
    meter = Throughput(t5, peft, world_size=1, peak=100.0)
    meter.add_step(4, [{"encoder_tokens": torch.zeros(4, 16)}])
    assert meter.scalars(1.0) == {"train/tflops_per_gpu": None, "train/mfu": None}
    assert Throughput.describe(meter.scalars(1.0)) == ""


def test_micro_batches_of_their_own_lengths_count_each_at_its_length():
    """Without pipeline parallelism a step's micro-batches have their own lengths (framework/data/batching.py):
    each counts at its length, the other data-parallel ranks' rows (8 global rows, 4 here) at this rank's."""
    from framework.models.config import ModelConfig
    from framework.training.flops import Throughput, step_flops

    cfg, peft = ModelConfig(**ARCH), {"method": "lora", "rank": 4, "targets": ["qkv"]}
    meter = Throughput(cfg, peft, world_size=2, peak=None)
    meter.add_step(8, [{"tokens": torch.zeros(2, 32)}, {"tokens": torch.zeros(2, 16)}])
    assert meter.flops == pytest.approx(step_flops(cfg, peft, 4, 32) + step_flops(cfg, peft, 4, 16), rel=1e-12)
