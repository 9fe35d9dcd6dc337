"""The benchmark scripts: each imports and answers --help; the GPU one refuses a machine without a GPU
clearly; the communication counter's bytes equal the analytic formula at a small layout; the GPU script's
FLOP count for full SFT equals Megatron's published formula.

The communication check is a real check of our wiring and of the counter: the counts come from the
wrapped torch.distributed collectives in spawned gloo ranks during one training step, the expected bytes
from the formulas in bench/comm_volume.py's docstring (TP=2 without SP: activations all-reduced twice per
layer forward and twice backward, LoRA only r-wide; TP=2 with SP: all-gathers and reduce-scatters of the
same buffers plus the factors' TP gradient sync).
"""

from __future__ import annotations

import importlib
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
SCRIPTS = sorted(p.name for p in (ROOT / "bench").glob("*.py"))


def _load(name: str):
    """bench/NAME as the module bench.NAME (importable again by name in spawned ranks)."""
    return importlib.import_module(f"bench.{name[:-3]}")


def test_every_bench_script_is_covered():
    assert {"lora_step.py", "comm_volume.py", "pipeline_bubble.py", "checkpoint_io.py", "gpu_throughput.py"} <= set(SCRIPTS)


@pytest.mark.parametrize("name", SCRIPTS)
def test_help(name, capsys):
    module = _load(name)
    with pytest.raises(SystemExit) as e:
        module.main(["--help"])
    assert e.value.code == 0
    assert "usage:" in capsys.readouterr().out


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU: the no-GPU refusal cannot be seen")
def test_gpu_throughput_without_gpu_fails_clearly():
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_throughput.py"), "--runs", "lora-bf16"],
                       capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert r.returncode == 2
    assert "needs a CUDA GPU" in r.stderr and "Traceback" not in r.stderr


def test_gpu_flops_match_megatrons_formula():
    """Full SFT: 3 x forward of every GEMM and of attention over s keys, which is Megatron's
    num_floating_point_operations (transcribed here) for a SwiGLU GQA model; LoRA: the frozen GEMMs
    without their weight gradient."""
    g = _load("gpu_throughput.py")
    cfg = g.model_config(str(ROOT / "conf" / "model" / "llama3_8b.yaml"))
    s, L, h, n, q, f, V = 4096, cfg.num_layers, cfg.hidden_size, cfg.num_attention_heads, cfg.num_query_groups, \
        cfg.ffn_hidden_size, cfg.vocab_size
    qp = cfg.kv_channels * n / h
    megatron = 12 * s * L * h * h * ((1 + q / n + s / h) * qp + (f / h) * 3 / 2 + V / (2 * L * h)) / s
    targets = ["qkv", "proj", "fc1", "fc2"]
    assert g.flops_per_token(cfg, s, "none", 16, targets) == pytest.approx(megatron, rel=1e-12)
    attn = 12 * s * L * h * h * (s / h) * qp / s
    lora_factors = 6 * 16 * L * ((h + (n + 2 * q) * cfg.kv_channels) + (n * cfg.kv_channels + h) + (h + 2 * f) + (f + h))
    assert g.flops_per_token(cfg, s, "lora", 16, targets) == pytest.approx(
        (megatron - attn) * 2 / 3 + attn + lora_factors, rel=1e-12)


TINY = dict(hidden=64, layers=2, heads=4, kv_heads=2, ffn=128, vocab=256, seq=16, micro_batch=2, micro_batches=2, rank=4)


def test_comm_volume_counts_equal_the_analytic_bytes():
    cv = _load("comm_volume.py")
    shape = cv.Shape(**TINY)
    layouts = [cv.LAYOUTS["tp2-lora"], cv.LAYOUTS["tp2-sp-lora"]]
    results = cv.measure(layouts, shape, timeout=600)
    for layout in layouts:
        for r in results[layout.name]:
            counted, _ = cv._counted(r["calls"])
            want = cv.analytic(layout, shape, r["stage"], regather=True)
            assert dict(counted) == {k: v for k, v in want.items() if v}, (layout.name, r["rank"], r["calls"])
            # the LoRA branch moves only r-wide tensors: every activation collective is h-wide, r-wide or
            # the cross entropy's per-token scalars
            T, h, rank = TINY["seq"] * TINY["micro_batch"], TINY["hidden"], TINY["rank"]
            widths = {T * h * 4, T * rank * 4, T * 4}
            assert {n for phase, _, _, n in r["calls"] if phase == "activations"} <= widths
    # the counted rows in the table agree with the per-rank check above
    assert all(row["exact"] for row in cv.rows(results, shape))
