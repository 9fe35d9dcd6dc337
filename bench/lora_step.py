"""Throughput of one LoRA training step: ours (megatron-core, single process) vs HF transformers + PEFT.

Same Llama config, same base weights (ours imported from the HF model's safetensors), same LoRA rank,
alpha and targets, same batch, same optimizer (Adam on the adapter only), same thread count, in one run.
Both models live in the process and their timed steps alternate (HF, ours, HF, ours, ...), so a change of
load on a shared machine hits both alike. Reported per side: the fastest timed step (the estimate of the
undisturbed cost: other processes only ever add time) and the median; tokens/s and the ratio ours / HF
from the fastest steps (the medians' ratio beside it).

``--full``: full-parameter SFT instead (every parameter trainable): ours with ``peft.method=none``
(framework/peft/registry.py) and megatron's Adam over DDP's fp32 gradient buffers, HF transformers with a
plain ``torch.optim.AdamW`` on all parameters; no PEFT on either side.

    python bench/lora_step.py                       # hidden 512, 4 layers, seq 512, batch 2
    python bench/lora_step.py --full                # the same, full-parameter SFT step
    python bench/lora_step.py --hidden 256 --steps 3 --seq 128     # a quick look
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hidden", type=int, default=512, help="hidden size (default 512)")
    p.add_argument("--layers", type=int, default=4, help="transformer layers (default 4)")
    p.add_argument("--heads", type=int, default=8, help="attention heads (default 8)")
    p.add_argument("--kv-heads", type=int, default=4, help="KV heads (default 4)")
    p.add_argument("--ffn", type=int, default=1408, help="MLP intermediate size (default 1408)")
    p.add_argument("--vocab", type=int, default=8192, help="vocabulary size (default 8192)")
    p.add_argument("--seq", type=int, default=512, help="sequence length (default 512)")
    p.add_argument("--batch", type=int, default=2, help="sequences per step (default 2)")
    p.add_argument("--rank", type=int, default=8, help="LoRA rank (default 8)")
    p.add_argument("--steps", type=int, default=6, help="timed steps per framework (default 6)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first (default 2)")
    p.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch threads for both")
    p.add_argument("--full", action="store_true", help="full-parameter SFT step (no LoRA; AdamW on every weight)")
    return p.parse_args(argv)


def make_hf_model(a, path):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=a.vocab, hidden_size=a.hidden, intermediate_size=a.ffn,
                      num_hidden_layers=a.layers, num_attention_heads=a.heads, num_key_value_heads=a.kv_heads,
                      head_dim=a.hidden // a.heads, max_position_embeddings=max(2048, a.seq),
                      rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg)
    model.save_pretrained(path)
    return model


def batch(a):
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, a.vocab, (a.batch, a.seq + 1), generator=g)
    return tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()


def time_steps(steps: dict, n_warmup: int, n_steps: int) -> tuple[dict, dict]:
    """({name: (fastest s, median s)} per step, {name: loss of its first step}); the named steps run in turn
    every round."""
    import statistics

    first = {name: step() for name, step in steps.items()}
    for _ in range(n_warmup - 1):
        for step in steps.values():
            step()
    times = {name: [] for name in steps}
    for _ in range(n_steps):
        for name, step in steps.items():
            t0 = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - t0)
    return {name: (min(t), statistics.median(t)) for name, t in times.items()}, first


def hf_step(a, hf_model, inputs, labels):
    """One HF training step (a closure)."""
    from peft import LoraConfig, get_peft_model

    if a.full:
        model = hf_model
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.0)
    else:
        model = get_peft_model(hf_model, LoraConfig(
            r=a.rank, lora_alpha=2 * a.rank, lora_dropout=0.0,
            target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]))
        opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    model.train()

    def step():
        opt.zero_grad(set_to_none=True)
        logits = model(input_ids=inputs).logits
        loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), labels.flatten())
        loss.backward()
        opt.step()
        return loss.item()

    return step


def our_step(a, hf_dir, inputs, labels):
    """One training step of ours (a closure), on weights imported from ``hf_dir``."""
    from omegaconf import OmegaConf

    from framework.checkpoint.hf_import import load_hf_into_gpt
    from framework.models.config import ModelConfig
    from framework.models.gpt import build_gpt
    from framework.peft.registry import apply_peft
    from framework.runtime import initialize
    from framework.training.optim import build_optimizer, wrap_ddp
    from framework.training.step import train_step

    initialize(tp=1, pp=1, seed=0)
    torch.set_num_threads(a.threads)
    model_cfg = ModelConfig(vocab_size=a.vocab, hidden_size=a.hidden, num_layers=a.layers,
                            num_attention_heads=a.heads, num_query_groups=a.kv_heads, ffn_hidden_size=a.ffn,
                            kv_channels=a.hidden // a.heads, max_position_embeddings=max(2048, a.seq))
    model = build_gpt(model_cfg)
    load_hf_into_gpt(model, hf_dir, model_cfg)
    apply_peft(model, OmegaConf.create(dict(method="none") if a.full else dict(
        method="lora", targets=["qkv", "proj", "fc1", "fc2"], rank=a.rank, alpha=2 * a.rank, dropout=0.0)), model_cfg)
    ddp = wrap_ddp(model)
    trainer = OmegaConf.create(dict(lr=1e-4, min_lr=1e-4, weight_decay=0.0, adam_beta1=0.9, adam_beta2=0.999,
                                    clip_grad=0.0, max_steps=a.warmup + a.steps + 1, warmup_steps=0))
    opt, sched = build_optimizer(ddp, trainer)
    mb = dict(tokens=inputs, labels=labels, loss_mask=torch.ones_like(labels, dtype=torch.float),
              position_ids=torch.arange(a.seq).expand(a.batch, -1).contiguous())
    return lambda: train_step(ddp, opt, sched, [mb]).loss


def main(argv=None):
    a = parse_args(argv)
    torch.set_num_threads(a.threads)
    from framework.runtime.logs import setup_logging

    setup_logging("WARNING")
    inputs, labels = batch(a)
    tokens = a.batch * a.seq
    hf_name = "HF transformers" + ("" if a.full else " + PEFT")
    with tempfile.TemporaryDirectory() as d:
        steps = {hf_name: hf_step(a, make_hf_model(a, d), inputs, labels),
                 "ours (megatron-core)": our_step(a, d, inputs, labels)}
        times, first = time_steps(steps, a.warmup, a.steps)
    (t_hf, m_hf), (t_ours, m_ours) = times.values()
    print(f"\n{'full SFT step' if a.full else f'LoRA step (rank {a.rank})'}, Llama hidden={a.hidden} "
          f"layers={a.layers} heads={a.heads}/{a.kv_heads} ffn={a.ffn} vocab={a.vocab}, batch {a.batch} x seq {a.seq}, "
          f"threads {a.threads}, torch {torch.__version__}")
    print(f"{'implementation':<26}{'s/step':>10}{'tokens/s':>12}{'median s/step':>15}")
    for name, (t, m) in times.items():
        print(f"{name:<26}{t:>10.3f}{tokens / t:>12.0f}{m:>15.3f}")
    print("loss of the first step (same weights and batch): " + ", ".join(f"{n} {v:.5f}" for n, v in first.items()))
    print(f"ratio ours / HF (tokens/s): {t_hf / t_ours:.2f}x (medians: {m_hf / m_ours:.2f}x)")


if __name__ == "__main__":
    main()
