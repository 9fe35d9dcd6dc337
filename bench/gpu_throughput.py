"""Training throughput on one GPU at a real shape: Llama-3-8B (random weights), LoRA and full SFT, bf16 and FP8.

    python bench/gpu_throughput.py                            # all four runs on one H100/H200
    python bench/gpu_throughput.py --runs lora-fp8 --steps 20  # one of them, longer

Needs a CUDA GPU; Transformer Engine for the TE layer spec and for FP8 (``pip install -e .[gpu]`` or the
NGC PyTorch container). Without a GPU it stops at once with a message and exit status 2.

The model is conf/model/llama3_8b.yaml's shape (hidden 4096, 32 layers, 32 query / 8 KV heads, head dim
128, SwiGLU 14336, vocabulary 128256, untied), built by framework/models/gpt.py ``build_gpt`` with
megatron's Transformer Engine layer spec, bf16 parameters, random weights (no download). FP8 is TE
delayed scaling, the job's ``precision=fp8`` (framework/models/precision.py ``transformer_settings``:
hybrid format, amax history 1024, max). LoRA: rank 16, alpha 32, on qkv, proj, fc1, fc2 (NeMo's default
targets). Full SFT: every parameter trains, megatron's Adam with fp32 main parameters and gradients; on one
80 GB GPU the whole 8B model does not fit (16 GB bf16 weights + 16 x 8B bytes of fp32 master weights,
gradients and Adam moments), so the SFT run keeps the real layer shape and takes as many layers as the
memory planner (framework/planner/memory.py) fits in 85 % of the GPU (``--sft-layers`` to choose).

A step is ``--micro-batches`` micro-batches of one 4096-token row each (every position a target, one
sample per row: the densest packing), then the optimizer step. Timed: ``--steps`` steps after
``--warmup`` (FP8 scales settle in those), CUDA-synchronised wall time.

Reported per run: tokens/s/GPU; model TFLOP/s/GPU; MFU = model FLOP/s / measured bf16 dense matmul peak
(``--peak-size`` cubed bf16 ``torch.matmul``, best of several, measured here on this GPU: FP8 runs are
also divided by the bf16 peak); peak memory (``torch.cuda.max_memory_allocated``).

FLOPs counted as Megatron counts them (megatron/training ``num_floating_point_operations``; NeMo's
``flops_formulas.llama2`` is the same), by framework/training/flops.py, which the fine-tuning job's
TFLOP/s and MFU log lines use too: full SFT 3 x forward of every GEMM and of attention over all s = 4096
keys; LoRA 2 x the frozen GEMMs (input gradient only), 3 x attention and 3 x the LoRA factors' GEMMs.

LoRA on the TE layer spec needs framework/peft to wrap Transformer Engine linears
(TELayerNormColumnParallelLinear fuses the input norm into qkv and fc1); until it does, the LoRA runs
report "not run" with the framework's reason and the SFT runs (no wrapping) still measure.

The NeMo 24.12 anchors (published, H100 FP8, Llama 2 7B, packed 4096-token rows) are printed beside:
LoRA 24,824 tokens/s/GPU and 663 model TFLOP/s/GPU, SFT 16,891 tokens/s/GPU and 673 TFLOP/s/GPU. Their
rows pack several shorter samples (attention is cheaper per token than over 4096 keys) and Llama 2 7B has
a 32000 vocabulary, so compare TFLOP/s and MFU more than tokens/s; NeMo's LoRA TFLOP/s (663 / 24,824 =
26.7 GFLOP per token, about 2/3 of its SFT count) counts LoRA's backward like ours does.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

RUNS = ("lora-bf16", "lora-fp8", "sft-bf16", "sft-fp8")
NEMO_ANCHORS = {"lora": (24_824, 663), "sft": (16_891, 673)}  # NeMo 24.12, H100 FP8, Llama 2 7B
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class NoGPU(RuntimeError):
    """This machine cannot run the benchmark (no CUDA GPU, no Transformer Engine, no FP8)."""


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", nargs="*", default=list(RUNS), choices=RUNS, help="which runs (default all four)")
    p.add_argument("--model", default=os.path.join(ROOT, "conf", "model", "llama3_8b.yaml"),
                   help="model YAML whose arch gives the shape (default conf/model/llama3_8b.yaml)")
    p.add_argument("--seq", type=int, default=4096, help="tokens per row (default 4096)")
    p.add_argument("--micro-batches", type=int, default=4, help="micro-batches (rows) per step (default 4)")
    p.add_argument("--layers", type=int, default=None, help="LoRA runs: layers (default: the model's 32)")
    p.add_argument("--sft-layers", type=int, default=None,
                   help="full-SFT runs: layers (default: as many as the memory planner fits in 85%% of the GPU)")
    p.add_argument("--rank", type=int, default=16, help="LoRA rank (default 16; alpha = 2 x rank)")
    p.add_argument("--steps", type=int, default=10, help="timed steps per run (default 10)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first (default 3)")
    p.add_argument("--peak-size", type=int, default=8192, help="matmul size of the bf16 peak measurement")
    return p.parse_args(argv)


def require_gpu(runs) -> None:
    """Stop with a clear message (exit status 2) when there is no CUDA GPU or, for FP8, no TE/Hopper."""
    import torch

    if not torch.cuda.is_available():
        raise NoGPU("bench/gpu_throughput.py needs a CUDA GPU (H100/H200 class) and found none "
                    f"(torch {torch.__version__}, torch.cuda.is_available() is False); run it on a GPU machine")
    from framework.models.precision import fp8_available
    from framework.models.gpt import te_available

    if not te_available():
        raise NoGPU("bench/gpu_throughput.py measures the Transformer Engine layer spec, but Transformer Engine "
                    "is not importable here: pip install -e '.[gpu]' (or use the NGC PyTorch container)")
    ok, why = fp8_available()
    if not ok and any(r.endswith("fp8") for r in runs):
        raise NoGPU(f"the FP8 runs need a Hopper-class GPU with Transformer Engine, but {why}; "
                    f"choose --runs lora-bf16 sft-bf16")


def model_config(path: str, layers: int | None = None):
    from omegaconf import OmegaConf

    from framework.models.config import ModelConfig

    arch = dict(OmegaConf.to_container(OmegaConf.load(path).arch, resolve=True))
    if layers is not None:
        arch["num_layers"] = layers
    return ModelConfig(**arch)


def flops_per_token(cfg, seq: int, method: str, rank: int, targets) -> float:
    """Model FLOPs per token of one training step (framework/training/flops.py)."""
    from framework.training import flops

    peft = {"method": method, "rank": rank, "targets": list(targets)}
    return flops.flops_per_token(cfg, seq, trains_base=method == "none", peft_gemm=flops.peft_gemm_per_token(cfg, peft))


def sft_layers_that_fit(cfg, seq: int, micro_batches: int, precision: str, memory_bytes: int) -> int:
    """The most layers of ``cfg``'s shape whose full-SFT estimate fits in 85% of ``memory_bytes``."""
    import dataclasses

    from framework.planner.memory import Job, estimate

    best = 1
    for layers in range(1, cfg.num_layers + 1):
        job = Job(dataclasses.replace(cfg, num_layers=layers), method="none", precision=precision, seq_length=seq,
                  micro_batch_size=1, global_batch_size=micro_batches, distributed_optimizer=False)
        if estimate(job, 1, 1, 1).total <= 0.85 * memory_bytes:
            best = layers
    return best


def bf16_peak_tflops(n: int, repeats: int = 20) -> float:
    """Best measured TFLOP/s of an n x n x n bf16 matmul on this GPU."""
    import torch

    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    best = 0.0
    for _ in range(5):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(repeats):
            a @ b
        end.record()
        torch.cuda.synchronize()
        best = max(best, 2 * n ** 3 * repeats / (start.elapsed_time(end) / 1e3) / 1e12)
    return best


def run_one(name: str, a, cfg_path: str) -> dict:
    """Build, warm up and time one run in this process (a spawned one: each run starts with an empty GPU);
    returns its figures."""
    import torch
    from omegaconf import OmegaConf

    from framework.models.precision import transformer_settings
    from framework.models.gpt import build_gpt
    from framework.peft.registry import apply_peft
    from framework.runtime import initialize
    from framework.training.optim import build_optimizer, wrap_ddp
    from framework.training.step import train_step

    method, precision = ("none" if name.startswith("sft") else "lora"), name.split("-")[1]
    initialize(tp=1, pp=1, seed=0)
    total_mem = torch.cuda.get_device_properties(0).total_memory
    base = model_config(cfg_path)
    layers = (a.layers or base.num_layers) if method == "lora" else (
        a.sft_layers or sft_layers_that_fit(base, a.seq, a.micro_batches, precision, total_mem))
    cfg = model_config(cfg_path, layers)
    torch.cuda.reset_peak_memory_stats()
    model = build_gpt(cfg, params_dtype=torch.bfloat16, **transformer_settings(precision, {"recipe": "delayed"}))
    targets = ["qkv", "proj", "fc1", "fc2"]
    peft = {"method": "none"} if method == "none" else {
        "method": "lora", "targets": targets, "rank": a.rank, "alpha": 2.0 * a.rank, "dropout": 0.0}
    try:
        apply_peft(model, OmegaConf.create(peft), cfg)
    except TypeError as e:  # PEFT on Transformer Engine linears: framework/peft/wrapping.py parallel_mode
        return dict(name=name, layers=layers, error=str(e))
    ddp = wrap_ddp(model)
    trainer = OmegaConf.create(dict(lr=1e-5, min_lr=1e-5, weight_decay=0.0, adam_beta1=0.9, adam_beta2=0.95,
                                    clip_grad=1.0, max_steps=a.warmup + a.steps + 1, warmup_steps=0))
    opt, sched = build_optimizer(ddp, trainer, precision)
    g = torch.Generator().manual_seed(0)
    mbs = []
    for _ in range(a.micro_batches):
        tokens = torch.randint(0, cfg.vocab_size, (1, a.seq + 1), generator=g)
        mbs.append({k: v.cuda() for k, v in dict(
            tokens=tokens[:, :-1].contiguous(), labels=tokens[:, 1:].contiguous(),
            loss_mask=torch.ones(1, a.seq), position_ids=torch.arange(a.seq)[None]).items()})
    losses = []
    for _ in range(a.warmup):
        losses.append(train_step(ddp, opt, sched, mbs, precision).loss)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(a.steps):
        losses.append(train_step(ddp, opt, sched, mbs, precision).loss)
    torch.cuda.synchronize()
    seconds = (time.perf_counter() - t0) / a.steps
    tokens = a.micro_batches * a.seq
    fpt = flops_per_token(cfg, a.seq, method, a.rank, targets)
    full_fpt = flops_per_token(base, a.seq, method, a.rank, targets)
    out = dict(name=name, layers=layers, seconds=seconds, tokens_s=tokens / seconds, tflops=fpt * tokens / seconds / 1e12,
               tokens_s_full_model=fpt * tokens / seconds / full_fpt, peak_gib=torch.cuda.max_memory_allocated() / 2**30,
               losses=losses, finite=all(x == x for x in losses))
    return out


def table(results: list[dict], peak: float, device: str, full_layers: int) -> str:
    lines = [f"{device}; measured bf16 matmul peak {peak:.0f} TFLOP/s; Llama-3-8B shape, seq 4096",
             f"{'run':<10}{'layers':>7}{'s/step':>8}{'tokens/s/GPU':>14}{f'(x{full_layers}L)':>10}{'TFLOP/s':>9}"
             f"{'MFU':>7}{'peak GiB':>10}   NeMo 24.12 H100 FP8 Llama 2 7B (tokens/s, TFLOP/s)"]
    for r in results:
        kind = r["name"].split("-")[0]
        tok, tf = NEMO_ANCHORS[kind]
        if "error" in r:
            lines.append(f"{r['name']:<10}{r['layers']:>7}  not run: {r['error']}   (NeMo: {tok:,} / {tf})")
            continue
        scaled = f"{r['tokens_s_full_model']:,.0f}" if r["layers"] != full_layers else "="
        lines.append(f"{r['name']:<10}{r['layers']:>7}{r['seconds']:>8.3f}{r['tokens_s']:>14,.0f}{scaled:>10}"
                     f"{r['tflops']:>9.0f}{r['tflops'] / peak:>7.1%}{r['peak_gib']:>10.1f}   {tok:,} / {tf}"
                     + ("" if r["finite"] else "   (loss not finite!)"))
    lines.append(f"(x{full_layers}L): tokens/s the same FLOP rate gives for all {full_layers} layers, where the run "
                 f"held fewer")
    return "\n".join(lines)


def _version(*dists: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    for d in dists:
        try:
            return version(d)
        except PackageNotFoundError:
            continue
    return "?"


def main(argv=None):
    a = parse_args(argv)
    try:
        require_gpu(a.runs)
    except NoGPU as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    import torch

    from framework.runtime.logs import setup_logging
    from launch.spawn import run_distributed

    setup_logging("WARNING")
    peak = bf16_peak_tflops(a.peak_size)
    results = [run_distributed(run_one, 1, name, a, a.model, timeout=3600)[0] for name in a.runs]
    device = (f"{torch.cuda.get_device_name()} ({torch.cuda.get_device_properties(0).total_memory / 2**30:.0f} GiB), "
              f"torch {torch.__version__}, megatron-core {_version('megatron-core')}, "
              f"transformer-engine {_version('transformer_engine', 'transformer-engine', 'transformer-engine-cu12')}")
    print()
    print(table(results, peak, device, model_config(a.model).num_layers))
    return 0


if __name__ == "__main__":
    sys.exit(main())
