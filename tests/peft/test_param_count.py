"""Trainable-parameter counts for a Llama-3-8B-shaped config, on the meta device, against the analytic count.

The formulas below are written from the shapes (conf/model/llama3_8b.yaml: hidden 4096, 32 layers, 32 query
heads and 8 KV heads of 128, ffn 14336, vocabulary 128256, untied), in our fused layout: the qkv projection is
one linear layer (one LoRA A of r x h shared by q, k and v, one B of (n + 2g) d x r) and so is gate/up
(A r x h, B 2 f x r). HF PEFT, with separate q/k/v and gate/up modules, would hold 3 + 2 A matrices per layer.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from launch.spawn import run_distributed

ROOT = str(Path(__file__).resolve().parents[2])
H, L, N, G, D, F, V = 4096, 32, 32, 8, 128, 14336, 128256


def lora(r, targets=("qkv", "proj", "fc1", "fc2")):
    per_target = {"qkv": r * (H + (N + 2 * G) * D), "proj": r * (N * D + H), "fc1": r * (H + 2 * F), "fc2": r * (F + H)}
    return L * sum(per_target[t] for t in targets)


FULL = 2 * V * H + L * (H * N * D + 2 * H * G * D + N * D * H + 3 * H * F + 2 * H) + H
LINEAR_WEIGHTS = L * (H * (N + 2 * G) * D + N * D * H + 3 * H * F)


def ptuning_mlp(n, e):
    return n * H + (H * e + e) + (e * e + e) + (e * H + H)


def ptuning_lstm(n, e, layers):
    lstm = 0
    for layer in range(layers):
        inp = H if layer == 0 else 2 * e
        lstm += 2 * (4 * e * inp + 4 * e * e + 2 * 4 * e)  # two directions; weight_ih, weight_hh, two biases
    return n * H + lstm + (2 * e * 2 * e + 2 * e) + (2 * e * H + H)


CASES = {
    "lora-r8": ({"method": "lora", "rank": 8, "alpha": 16, "dropout": 0.0, "targets": ["qkv", "proj", "fc1", "fc2"]},
                lora(8)),
    "lora-r16-attn": ({"method": "lora", "rank": 16, "alpha": 32, "dropout": 0.0, "targets": ["qkv", "proj"]},
                      lora(16, ("qkv", "proj"))),
    "qlora-r8": ({"method": "qlora", "rank": 8, "alpha": 16, "dropout": 0.0, "targets": ["qkv", "proj", "fc1", "fc2"],
                  "block_size": 64, "scaler_block_size": 256}, lora(8)),
    "none": ({"method": "none"}, FULL),
    "prompt_tuning-20": ({"method": "prompt_tuning", "num_virtual_tokens": 20, "init": "random"}, 20 * H),
    "ptuning-mlp": ({"method": "ptuning", "num_virtual_tokens": 20, "encoder_reparameterization_type": "MLP",
                     "encoder_hidden_size": 1024}, ptuning_mlp(20, 1024)),
    "ptuning-lstm": ({"method": "ptuning", "num_virtual_tokens": 10, "encoder_reparameterization_type": "LSTM",
                      "encoder_hidden_size": 256, "encoder_num_layers": 2}, ptuning_lstm(10, 256, 2)),
}


def _count_worker(cases):
    import resource

    from omegaconf import OmegaConf

    from framework.models.config import ModelConfig
    from framework.peft.param_count import count_on_meta
    from framework.runtime import initialize

    initialize(seed=0)
    arch = OmegaConf.to_container(OmegaConf.load(os.path.join(ROOT, "conf/model/llama3_8b.yaml")).arch)
    model_cfg = ModelConfig.from_dict(arch)
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    out = {name: count_on_meta(model_cfg, OmegaConf.create(peft)) for name, (peft, _) in cases.items()}
    grown_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before) / 1024
    return out, grown_mib


@pytest.mark.timeout(300)
def test_llama3_8b_counts_match_the_formulas():
    counts, grown_mib = run_distributed(_count_worker, 1, CASES, timeout=280)[0]
    assert FULL == 8_030_261_248  # Llama-3-8B's published size, from the formula
    for name, (_, expected) in CASES.items():
        c = counts[name]
        assert c.trainable == expected, (name, c.trainable, expected)
        extra = 0 if c.method == "none" else c.trainable  # what the method adds to the base
        assert c.total == FULL + extra, (name, c.total)
        assert c.allocated < 1_000, (name, c.allocated)  # nothing of the model's size exists in memory
    q = counts["qlora-r8"]
    assert q.quantized == LINEAR_WEIGHTS
    blocks = LINEAR_WEIGHTS // 64  # every Llama-3-8B linear weight is a whole number of 64-blocks and of 256 constants
    assert q.nf4_bytes == sum(
        (n // 2 + n // 64 + 4 * -(-(n // 64) // 256) + 4)
        for n in [H * (N + 2 * G) * D, N * D * H, 2 * F * H, F * H] for _ in range(L))
    assert q.nf4_bytes < 0.27 * 2 * LINEAR_WEIGHTS and blocks * 64 == LINEAR_WEIGHTS  # ~4.13 of 16 bits
    assert grown_mib < 500, f"counting grew the process by {grown_mib:.0f} MiB"  # an 8B fp32 model is 30 GiB


@pytest.mark.timeout(200)
def test_cli_prints_every_method():
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    p = subprocess.run([sys.executable, "launch/param_count.py", "model=llama3_8b"], cwd=ROOT, capture_output=True,
                       text=True, env=env, timeout=180)
    assert p.returncode == 0, p.stderr[-2000:]
    rows = {line.split()[0]: line.split()[1:3] for line in p.stdout.splitlines()[3:] if line.strip()}
    assert rows["lora"] == [f"{lora(8):,}", f"{FULL + lora(8):,}"]
    assert rows["none"] == [f"{FULL:,}", f"{FULL:,}"]
    assert rows["prompt_tuning"][0] == f"{20 * H:,}"
    assert rows["ptuning"][0] == f"{ptuning_mlp(20, H):,}"
    assert rows["qlora"][0] == f"{lora(8):,}"
    one = subprocess.run([sys.executable, "launch/param_count.py", "model=llama3_8b", "peft=lora", "peft.rank=4"],
                         cwd=ROOT, capture_output=True, text=True, env=env, timeout=180)
    assert one.returncode == 0 and f"{lora(4):,}" in one.stdout and "prompt_tuning" not in one.stdout
