"""Adapters saved unsharded at one layout load at any other: TP=2 -> TP=1 (same logits) and -> PP=2
(saving again gives the same file). Also: only LoRA factors train, the base is bitwise unchanged by an
optimiser step, A's initialisation does not depend on the layout, and bad adapters fail with clear errors."""

from __future__ import annotations

import pytest

from launch.spawn import run_distributed
from tests.tolerances import FORWARD_REL

CFG = dict(vocab_size=256, hidden_size=64, num_layers=2, num_attention_heads=4, num_query_groups=2,
           ffn_hidden_size=128)
LORA = dict(method="lora", rank=6, alpha=12.0, dropout=0.0, rslora=False, targets=["qkv", "proj", "fc1", "fc2"])


def _model_cfg():
    from framework.models.config import ModelConfig

    return ModelConfig(**CFG)


def _set_base(model, cfg, seed=0):
    """Give every layout the same random base model: full tensors drawn identically, then sharded."""
    import torch
    from megatron.core import parallel_state as ps

    from framework.models.fused_layout import fuse_gate_up, shard

    tp, r = ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank()
    g = torch.Generator().manual_seed(seed)
    h, d, n, q, f, V = (cfg.hidden_size, cfg.kv_channels, cfg.num_attention_heads, cfg.num_query_groups,
                        cfg.ffn_hidden_size, cfg.vocab_size)

    def rnd(*shape):
        return torch.randn(*shape, generator=g) / shape[-1] ** 0.5

    emb, out, final = rnd(V, h) * 8, rnd(V, h), 1 + 0.1 * rnd(h)
    layers = [dict(ln1=1 + 0.1 * rnd(h), qkv=rnd((n + 2 * q) * d, h), proj=rnd(h, n * d), ln2=1 + 0.1 * rnd(h),
                   gate=rnd(f, h), up=rnd(f, h), down=rnd(h, f)) for _ in range(cfg.num_layers)]
    with torch.no_grad():
        if model.pre_process:
            model.embedding.word_embeddings.weight.copy_(shard(emb, 0, r, tp))
        if model.post_process:
            model.output_layer.weight.copy_(shard(out, 0, r, tp))
            model.decoder.final_layernorm.weight.copy_(final)
        for layer in model.decoder.layers:
            w = layers[layer.layer_number - 1]
            layer.input_layernorm.weight.copy_(w["ln1"])
            layer.pre_mlp_layernorm.weight.copy_(w["ln2"])
            layer.self_attention.linear_qkv.weight.copy_(shard(w["qkv"], 0, r, tp))
            layer.self_attention.linear_proj.weight.copy_(shard(w["proj"], 1, r, tp))
            layer.mlp.linear_fc1.weight.copy_(fuse_gate_up(w["gate"], w["up"], r, tp))
            layer.mlp.linear_fc2.weight.copy_(shard(w["down"], 1, r, tp))


def _tokens():
    import torch

    g = torch.Generator().manual_seed(5)
    tokens = torch.randint(0, CFG["vocab_size"], (2, 8), generator=g)
    return tokens, torch.arange(8).expand(2, 8)


def _logits(model):
    import torch
    from megatron.core.tensor_parallel.mappings import gather_from_tensor_model_parallel_region

    model.eval()
    with torch.no_grad():
        tokens, pos = _tokens()
        return gather_from_tensor_model_parallel_region(model(tokens, pos, None)).clone()


def _build(tp=1, pp=1):
    from framework.models.gpt import build_gpt
    from framework.peft.lora import apply_lora
    from framework.runtime import distributed as rtd

    rtd.initialize(tp=tp, pp=pp, seed=1234)
    cfg = _model_cfg()
    model = build_gpt(cfg, tp, pp)
    _set_base(model, cfg)
    apply_lora(model, targets=LORA["targets"], rank=LORA["rank"], alpha=LORA["alpha"], dropout=LORA["dropout"])
    return model, cfg


def _save_at_tp2(directory):
    import torch
    from megatron.core import parallel_state as ps

    from framework.checkpoint.adapter import save_adapter
    from framework.peft.lora import lora_modules

    model, cfg = _build(tp=2)
    tp, rank = ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank()
    with torch.no_grad():
        for i, (_, _, mod) in enumerate(lora_modules(model)):  # non-zero B so the adapter changes the logits
            g = torch.Generator().manual_seed(10 + i)  # same on every TP rank: B of a row layer is replicated
            out, r = mod.lora_B.weight.shape
            full = torch.randn(out * tp if mod.parallel_mode == "column" else out, r, generator=g) * 0.5
            mod.lora_B.weight.copy_(full.chunk(tp)[rank] if mod.parallel_mode == "column" else full)
    logits = _logits(model)
    save_adapter(model, directory, LORA, cfg, base={"name": "tiny-random", "source": "random"})
    return logits


def _load_at_tp1(directory, tmp):
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    from framework.checkpoint.adapter import AdapterError, load_adapter
    from framework.peft.lora import apply_lora, lora_modules, trainable_parameters

    model, cfg = _build(tp=1)
    base_logits = _logits(model)
    init_A = {(ln, t): m.lora_A.weight.detach().clone() for ln, t, m in lora_modules(model)}
    meta = load_adapter(model, directory, cfg)
    logits = _logits(model)
    same_init = all(torch.equal(init_A[(ln, t)], m.lora_A.weight) for ln, t, m in lora_modules(model))

    # only adapter factors train; an Adam step leaves the base bitwise unchanged
    trainable = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    only_lora = all(".lora_A." in n or ".lora_B." in n for n in trainable) and len(trainable) == 2 * 4 * 2
    base_before = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    lora_before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    model.train()
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    tokens, pos = _tokens()
    loss = model(tokens, pos, None, labels=tokens.roll(-1, 1)).float().mean()
    loss.backward()
    opt.step()
    base_same = all(torch.equal(p, base_before[n]) for n, p in model.named_parameters() if not p.requires_grad)
    no_base_grad = all(p.grad is None for p in model.parameters() if not p.requires_grad)
    lora_moved = all(not torch.equal(p, lora_before[n]) for n, p in model.named_parameters() if p.requires_grad)

    # clear errors
    errors = {}

    def expect(name, fn):
        try:
            fn()
        except (AdapterError, ValueError) as e:
            errors[name] = str(e)
        else:
            errors[name] = None

    expect("unknown_target", lambda: apply_lora(_build_plain(cfg), targets=("qkv", "mlp")))
    tensors = load_file(f"{directory}/adapter.safetensors")

    def variant(name, change):
        d = tmp / name
        shutil.copytree(directory, d)
        t = dict(tensors)
        change(t)
        save_file(t, str(d / "adapter.safetensors"))
        return d

    d = variant("missing", lambda t: t.pop("model.layers.1.mlp.up_proj.lora_B.weight"))
    expect("missing", lambda: load_adapter(model, d, cfg))
    d2 = variant("shape", lambda t: t.update({"model.layers.0.self_attn.o_proj.lora_A.weight": torch.zeros(6, 32)}))
    expect("shape", lambda: load_adapter(model, d2, cfg))
    d3 = variant("qkv_separate",
                 lambda t: t.update({"model.layers.0.self_attn.k_proj.lora_A.weight":
                                     t["model.layers.0.self_attn.k_proj.lora_A.weight"] + 1}))
    expect("qkv_separate", lambda: load_adapter(model, d3, cfg))
    other = _build_plain(cfg)
    apply_lora(other, targets=("qkv",), rank=6, alpha=12.0)
    expect("targets", lambda: load_adapter(other, directory, cfg))
    return {"logits": logits, "base_logits": base_logits, "same_init": same_init, "meta": meta,
            "only_lora": only_lora, "n_trainable": trainable_parameters(model), "base_same": base_same,
            "no_base_grad": no_base_grad, "lora_moved": lora_moved, "errors": errors}


def _build_plain(cfg):
    from framework.models.gpt import build_gpt

    return build_gpt(cfg, 1, 1)


def _load_at_pp2_and_resave(directory, again):
    from framework.checkpoint.adapter import load_adapter, save_adapter

    model, cfg = _build(pp=2)
    load_adapter(model, directory, cfg)
    save_adapter(model, again, LORA, cfg, base={"name": "tiny-random", "source": "random"})
    return sorted(ln for ln in {layer.layer_number for layer in model.decoder.layers})


@pytest.mark.timeout(150)
def test_adapter_saved_at_tp2_loads_at_tp1_and_pp2(tmp_path):
    import torch
    import yaml
    from safetensors.torch import load_file

    d = tmp_path / "adapters" / "default"
    tp2_logits = run_distributed(_save_at_tp2, 2, str(d), timeout=120)[0]
    files = sorted(p.name for p in d.iterdir())
    assert files == ["adapter.safetensors", "adapter.yaml"]
    assert not [p for p in d.parent.iterdir() if p.name != "default"], "temporary directory left behind"
    meta = yaml.safe_load((d / "adapter.yaml").read_text())
    assert meta["rank"] == 6 and meta["alpha"] == 12.0 and meta["targets"] == LORA["targets"]
    assert meta["base"] == {"name": "tiny-random", "source": "random"} and meta["model"]["hidden_size"] == 64
    assert meta["target_modules"] == ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    saved = load_file(str(d / "adapter.safetensors"))
    assert saved["model.layers.1.self_attn.q_proj.lora_B.weight"].shape == (64, 6)
    assert saved["model.layers.1.self_attn.k_proj.lora_B.weight"].shape == (32, 6)
    assert saved["model.layers.0.mlp.down_proj.lora_A.weight"].shape == (6, 128)
    assert saved["model.layers.0.mlp.gate_proj.lora_B.weight"].shape == (128, 6)
    assert len(saved) == 2 * 2 * 7

    r = run_distributed(_load_at_tp1, 1, str(d), tmp_path, timeout=120)[0]
    scale = tp2_logits.abs().max()
    # the TP=2 sums in another order: the rounding of reordered fp32 sums (tests/tolerances.py)
    assert (r["logits"] - tp2_logits).abs().max() / scale < FORWARD_REL, "TP=1 logits differ from TP=2 logits"
    assert (r["base_logits"] - tp2_logits).abs().max() / scale > 1e-3, "the adapter did not change the logits"
    assert r["same_init"], "A's initialisation depends on the TP layout"
    assert r["only_lora"] and r["n_trainable"] == 2 * (6 * 64 + 128 * 6 + 6 * 64 + 64 * 6 + 6 * 64 + 256 * 6
                                                         + 6 * 128 + 64 * 6)
    assert r["base_same"] and r["no_base_grad"], "an optimiser step changed the frozen base"
    assert r["lora_moved"]
    e = r["errors"]
    assert e["unknown_target"] and "mlp" in e["unknown_target"] and "fc1" in e["unknown_target"], e
    assert e["missing"] and "model.layers.1.mlp.up_proj.lora_B.weight" in e["missing"], e
    assert e["shape"] and "model.layers.0.self_attn.o_proj.lora_A.weight" in e["shape"], e
    assert e["qkv_separate"] and "not supported" in e["qkv_separate"], e
    assert e["targets"] and "targets" in e["targets"], e

    again = tmp_path / "again"
    stages = run_distributed(_load_at_pp2_and_resave, 2, str(d), str(again), timeout=120)
    assert stages == [[1], [2]]
    resaved = load_file(str(again / "adapter.safetensors"))
    assert sorted(resaved) == sorted(saved)
    for k in saved:
        assert torch.equal(resaved[k], saved[k]), f"{k} changed through a PP=2 load and save"
