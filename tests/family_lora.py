"""LoRA on a family's model against HF PEFT on the HF model, forward and backward (issue 3).

HF PEFT wraps the family's own modules (GPT-2's Conv1D ``c_attn``, Falcon's ``query_key_value``, ...) with
random non-zero factors; we load the same HF checkpoint, ``apply_lora`` (framework/peft/lora.py) and copy
the factors in through the weight table's transforms (e.g. B of a packed [q; k; v] into megatron's fused
per-group order, A of a row-parallel layer sharded along its input). Then the summed token cross-entropy
and every LoRA factor's gradient must equal PEFT's, at the given TP (and SP) layout. Biased base layers
return their bias separately in megatron; this proves the wrappers keep it.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F

from launch.spawn import run_distributed

RANK, ALPHA = 4, 8.0
TOL = 1e-4  # relative to the largest reference value


def peft_reference(hf_dir, target_modules, tokens, labels, fan_in_fan_out: bool = False, seed: int = 0):
    """(loss, {HF factor name: tensor}, {HF factor name: gradient}) of HF PEFT LoRA with random factors."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=0.0,
                                             target_modules=list(target_modules), fan_in_fan_out=fan_in_fan_out))
    g = torch.Generator().manual_seed(seed)
    factors = {}
    for name, p in model.named_parameters():
        if "lora_" in name:
            with torch.no_grad():
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
            factors[name.replace("base_model.model.", "").replace(".default", "")] = p
    logits = model(input_ids=tokens).logits.float()
    loss = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="sum")
    loss.backward()
    return (loss.item(), {k: p.detach().clone() for k, p in factors.items()},
            {k: p.grad.detach().clone() for k, p in factors.items()})


def _lora_worker(tp, sp, hf_dir, hf_layer, layout, tokens, labels, factors, grads, expected_loss):
    from megatron.core import parallel_state as ps

    from framework.checkpoint.hf_import import load_hf_into_gpt, shard_context
    from framework.models import weight_table as wt
    from framework.models.registry import build_model, config_from_hf
    from framework.peft.lora import apply_lora
    from framework.runtime.distributed import initialize

    initialize(tp=tp, pp=1, sp=sp)
    cfg = config_from_hf(json.loads(Path(hf_dir, "config.json").read_text()))
    model = build_model(cfg, tp=tp, pp=1, sp=sp)
    load_hf_into_gpt(model, hf_dir, cfg)
    apply_lora(model, targets=("qkv", "proj", "fc1", "fc2"), rank=RANK, alpha=ALPHA)
    ctx = shard_context(cfg, ps.get_tensor_model_parallel_rank(), tp)
    params = dict(model.named_parameters())
    expected = {}
    for i in range(cfg.num_layers):
        for ours_module, (hf_module, a_transform, b_transform) in layout.items():
            for factor, transform in (("lora_A", a_transform), ("lora_B", b_transform)):
                hf = f"{hf_layer.format(i=i)}{hf_module}.{factor}.weight"
                ours = next(n for n in params if n.endswith(f"layers.{i}.{ours_module}.{factor}.weight"))
                with torch.no_grad():
                    params[ours].copy_(wt.TRANSFORMS[transform].forward([factors[hf]], ctx))
                expected[ours] = wt.TRANSFORMS[transform].forward([grads[hf]], ctx)
    model.train()
    b, s = tokens.shape
    position_ids = torch.arange(s).unsqueeze(0).expand(b, s)
    loss = model(tokens, position_ids, None, labels=labels).sum()
    loss.backward()
    diffs = {}
    for name, want in expected.items():
        p = params[name]
        if getattr(p, "sequence_parallel", False):  # partial per rank under SP, as megatron all-reduces it
            torch.distributed.all_reduce(p.grad, group=ps.get_tensor_model_parallel_group())
        diffs[name] = ((p.grad - want).abs().max() / want.abs().max().clamp_min(1e-12)).item()
    trainable = sorted(n for n, p in params.items() if p.requires_grad)
    return {"loss": abs(loss.item() - expected_loss) / abs(expected_loss), "grads": diffs,
            "unchecked": sorted(set(trainable) - set(expected))}


def check_lora_against_peft(hf_dir, target_modules, hf_layer: str, layout: dict, tp: int, sp: bool,
                            fan_in_fan_out: bool = False, timeout: float = 300) -> None:
    """``layout``: our module under a layer (``self_attention.linear_qkv``) -> (HF module under
    ``hf_layer``, transform of A, transform of B) from framework/models/weight_table.py."""
    from transformers import AutoConfig

    vocab = AutoConfig.from_pretrained(hf_dir).vocab_size
    g = torch.Generator().manual_seed(1)
    tokens, labels = (torch.randint(0, vocab, (2, 16), generator=g) for _ in range(2))
    loss, factors, grads = peft_reference(hf_dir, target_modules, tokens, labels, fan_in_fan_out)
    results = run_distributed(_lora_worker, tp, tp, sp, str(hf_dir), hf_layer, layout, tokens, labels, factors,
                              grads, loss, timeout=timeout)
    for rank, r in enumerate(results):
        assert r["loss"] < 1e-5, f"rank {rank}: LoRA loss differs from HF PEFT's by {r['loss']:.3g} (relative)"
        assert not r["unchecked"], f"rank {rank}: trainable parameters without a PEFT counterpart: {r['unchecked']}"
        assert r["grads"], f"rank {rank}: no LoRA factor compared"
        worst = max(r["grads"], key=r["grads"].get)
        assert r["grads"][worst] < TOL, f"rank {rank}: gradient of {worst} differs from HF PEFT's by " \
                                        f"{r['grads'][worst]:.3g} (relative)"
