"""PiSSA and OLoRA initialisations (framework/peft/lora_init.py) against HF PEFT's ``init_lora_weights``.

HF PEFT initialises every LoRA module of a tiny Llama (q, k, v, o, gate, up, down, lm_head) from its base
weight and replaces the weight by the residual. We load the same weights at TP=1 and TP=2, apply LoRA with
the same initialisation, gather every base weight and factor back to HF's modules (a fused q/k/v or gate/up
layer holds one rank-r block per module), and compare: the residual bases and the factors equal HF's (the
same fp32 SVD / QR of the same matrix: a few roundings of values of order 1, 1e-5), and the logits equal
the untouched model's (W_res + s B A = W).
"""

from __future__ import annotations

import copy
import json

import pytest
import torch

from launch.spawn import run_distributed
from tests.hf_models import hf_logits, tiny_llama

RANK, ALPHA = 4, 8.0
TOL = 1e-5
MODULES = {"qkv": ("self_attn", ("q_proj", "k_proj", "v_proj")), "proj": ("self_attn", ("o_proj",)),
           "fc1": ("mlp", ("gate_proj", "up_proj")), "fc2": ("mlp", ("down_proj",))}


def _tokens():
    return torch.randint(0, 256, (2, 9), generator=torch.Generator().manual_seed(3))


def _reference(hf, init):
    """HF PEFT's {HF weight name: tensor} for the bases and factors after the initialisation, and its logits."""
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(copy.deepcopy(hf), LoraConfig(
        r=RANK, lora_alpha=ALPHA, init_lora_weights=init,
        target_modules=[m for _, ms in MODULES.values() for m in ms] + ["lm_head"]))
    out = {n.removeprefix("base_model.model.").replace(".default", "").replace(".base_layer", ""): p.detach().clone()
           for n, p in model.named_parameters() if "lora_" in n or "proj.base_layer" in n or "lm_head" in n}
    return out, hf_logits(model, _tokens())


def _ours(hf_dir, tp, init):
    from framework.checkpoint.hf_import import load_hf_into_gpt
    from framework.inference.logits import forward_logits
    from framework.models.registry import build_model, config_from_hf
    from framework.peft.lora import apply_lora, lora_modules
    from framework.peft.hf_sources import source_layout
    from framework.runtime.distributed import initialize

    initialize(tp=tp, pp=1, seed=0)
    cfg = config_from_hf(json.loads((hf_dir / "config.json").read_text()))
    model = build_model(cfg, tp=tp, pp=1)
    load_hf_into_gpt(model, hf_dir, cfg)
    apply_lora(model, targets=("qkv", "proj", "fc1", "fc2", "output"), rank=RANK, alpha=ALPHA, init_lora_weights=init)
    out = {}
    for layer_number, target, mod in lora_modules(model):
        if target == "output":
            block, names = None, ("lm_head",)
        else:
            block, names = MODULES[target]
        k = len(names)
        prefix = [f"model.layers.{layer_number - 1}.{block}.{n}" for n in names] if block else list(names)
        # gather each tensor over TP and split it into HF's modules, as the weight itself is laid out
        bases, _ = source_layout(mod, mod.base_layer.weight.detach(), None)
        if mod.parallel_mode == "row":
            a_parts, b_parts = source_layout(mod, mod.lora_A.weight.detach(), None)[0], [mod.lora_B.weight.detach()]
        else:
            a_parts = list(mod.lora_A.weight.detach().chunk(k, dim=0))
            b_parts = source_layout(mod, mod.lora_B.weight.detach(), None)[0]
        for i, p in enumerate(prefix):
            b = b_parts[i]
            others = torch.cat([b[:, :i * RANK], b[:, (i + 1) * RANK:]], dim=1)
            assert not others.any(), f"{p}: B has non-zero entries outside its own rank block"
            out[f"{p}.weight"] = bases[i].numpy().copy()
            out[f"{p}.lora_A.weight"] = a_parts[i].numpy().copy()
            out[f"{p}.lora_B.weight"] = b[:, i * RANK:(i + 1) * RANK].numpy().copy()
    logits = forward_logits(model, _tokens())
    return out, None if logits is None else logits.numpy().copy()


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora_init")
    hf = tiny_llama(6, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2)
    hf.save_pretrained(root / "hf")
    return root / "hf", hf


@pytest.mark.timeout(300)
@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_init_equals_hf_peft_at_every_layout(hf_dir, init):
    path, hf = hf_dir
    want, want_logits = _reference(hf, init)
    base_logits = hf_logits(hf, _tokens())
    assert (want_logits - base_logits).abs().max() < 1e-4  # HF's own starting point: the model unchanged
    results = {tp: run_distributed(_ours, tp, path, tp, init, timeout=250)[0] for tp in (1, 2)}
    for tp, (got, logits) in results.items():
        assert set(got) <= set(want) and len(got) == len(want), sorted(set(want) ^ set(got))
        for name, w in want.items():
            diff = (torch.from_numpy(got[name]) - w).abs().max().item()
            assert diff < TOL * max(1.0, w.abs().max().item()), f"TP={tp} {init}: {name} differs by {diff:.3g}"
        # the residual really is modified, and the model still computes the base's logits
        assert (torch.from_numpy(got["model.layers.0.self_attn.q_proj.weight"])
                - hf.state_dict()["model.layers.0.self_attn.q_proj.weight"]).abs().max() > 1e-3
        assert (torch.from_numpy(logits) - base_logits).abs().max() < 1e-4 * base_logits.abs().max()


def _niter_worker(hf_dir, tp):
    from framework.checkpoint.hf_import import load_hf_into_gpt
    from framework.models.registry import build_model, config_from_hf
    from framework.peft.lora import apply_lora, lora_modules
    from framework.peft.hf_sources import source_layout
    from framework.runtime.distributed import initialize

    initialize(tp=tp, pp=1, seed=0)
    cfg = config_from_hf(json.loads((hf_dir / "config.json").read_text()))
    model = build_model(cfg, tp=tp, pp=1)
    load_hf_into_gpt(model, hf_dir, cfg)
    apply_lora(model, targets=("qkv", "proj"), rank=RANK, alpha=ALPHA, init_lora_weights="pissa_niter_2", seed=7)
    out = {}
    for layer_number, target, mod in lora_modules(model):
        out[f"{layer_number}.{target}.w"] = torch.cat(source_layout(mod, mod.base_layer.weight.detach(), None)[0]).numpy()
    return out


@pytest.mark.timeout(200)
def test_pissa_niter_is_the_same_at_every_layout(hf_dir):
    """The randomised SVD draws from per-module seeds: TP=2 starts from TP=1's residual base exactly."""
    path, _ = hf_dir
    one, two = (run_distributed(_niter_worker, tp, path, tp, timeout=150)[0] for tp in (1, 2))
    assert one.keys() == two.keys()
    for k in one:
        assert (torch.from_numpy(one[k]) - torch.from_numpy(two[k])).abs().max() < TOL, k


def test_refused_with_reasons():
    from framework.peft.lora_init import init_problem

    assert init_problem("pissa_niter_4") is None and init_problem("olora") is None
    assert "kaiming" in init_problem("true")
    assert init_problem("pissa_niter_0") is not None
