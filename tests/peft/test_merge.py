"""Merging adapters into the base weights and several named adapters on one base.

Merge, at TP=1 and TP=2 (each rank merges its own shard): for LoRA (with embedding and output-layer LoRA),
rsLoRA, DoRA and IA3 with non-zero adapter tensors, the merged model's logits equal the unmerged adapter
model's within 1e-5, and unmerging restores every base weight within 1e-6. Merges that cannot be done are
refused and leave the model as it was.

Named adapters: LoRA, IA3 and DoRA adapters added to one base at TP=2 with SP, saved by name and switched
back and forth give each adapter's own logits, with the base modules and weights the very same objects
throughout; loaded by name at TP=1 they give the TP=2 logits.
"""

from __future__ import annotations

import json

import pytest
import torch
import yaml

from framework.checkpoint.adapter import wrapper_key
from launch.spawn import run_distributed
from tests.hf_models import fill_adapter, tiny_llama
from tests.tolerances import FORWARD_REL

SEQ = 8
LAYERS = ["qkv", "proj", "fc1", "fc2"]
CASES = {
    "lora": {"method": "lora", "rank": 4, "alpha": 8.0, "dropout": 0.0, "rslora": False,
             "targets": LAYERS + ["embedding", "output"]},
    "rslora": {"method": "lora", "rank": 4, "alpha": 6.0, "dropout": 0.0, "rslora": True, "targets": LAYERS},
    "dora": {"method": "dora", "rank": 4, "alpha": 8.0, "dropout": 0.0, "rslora": False,
             "targets": LAYERS + ["output"]},
    "ia3": {"method": "ia3", "targets": ["k", "v", "fc2"]},
}
ADAPTER = {"method": "adapter", "bottleneck": 8, "activation": "gelu", "targets": ["attention", "mlp"]}


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("merge") / "hf"
    tiny_llama(4, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2).save_pretrained(d)
    return d


def _tokens():
    return torch.randint(0, 256, (2, SEQ), generator=torch.Generator().manual_seed(3))


def _base_model(hf_dir, tp, sp=False):
    from framework.checkpoint.hf_import import load_hf_into_gpt
    from framework.models.gpt import build_gpt
    from framework.models.registry import config_from_hf

    cfg = config_from_hf(json.loads((hf_dir / "config.json").read_text()))
    model = build_gpt(cfg, tp, 1, sp)
    load_hf_into_gpt(model, hf_dir, cfg)
    return model.eval(), cfg


def _frozen(model) -> dict:
    return {n: p for n, p in model.named_parameters() if not p.requires_grad}


def _expect_error(fn) -> str | None:
    try:
        fn()
    except ValueError as e:
        return str(e)
    return None


def _merge_worker(tp, hf_dir):
    from omegaconf import OmegaConf

    from framework.inference.logits import forward_logits
    from framework.models.gpt import build_gpt
    from framework.peft.merge import is_merged, merge_adapter, unmerge_adapter
    from framework.peft.registry import apply_peft
    from framework.runtime import initialize

    initialize(tp=tp, seed=0)
    tokens = _tokens()
    out = {}
    for name, peft_cfg in CASES.items():
        model, cfg = _base_model(hf_dir, tp)
        base_logits = forward_logits(model, tokens)
        apply_peft(model, OmegaConf.create(peft_cfg), cfg)
        fill_adapter(model, seed=9)
        unmerged = forward_logits(model, tokens)
        before = {n: p.detach().clone() for n, p in _frozen(model).items()}
        merge_adapter(model)
        merged = forward_logits(model, tokens)
        moved = max((p - before[n]).abs().max().item() for n, p in _frozen(model).items())
        twice = _expect_error(lambda: merge_adapter(model))
        unmerge_adapter(model)
        restored = max((p - before[n]).abs().max().item() for n, p in _frozen(model).items())
        after = forward_logits(model, tokens)
        out[name] = dict(merged=(merged - unmerged).abs().max().item(), moved=moved, restored=restored,
                         after=(after - unmerged).abs().max().item(),
                         effect=(unmerged - base_logits).abs().max().item(), twice=twice,
                         still_merged=is_merged(model))

    # refused merges leave the model as it was
    model, cfg = _base_model(hf_dir, tp)
    apply_peft(model, OmegaConf.create(ADAPTER), cfg)
    out["adapter_refused"] = _expect_error(lambda: merge_adapter(model))
    tied = cfg.__class__.from_dict({**cfg.to_dict(), "tie_word_embeddings": True})
    model = build_gpt(tied, tp)
    apply_peft(model, OmegaConf.create({**CASES["lora"], "targets": ["qkv", "output"]}), tied)
    fill_adapter(model, seed=9)
    before = {n: p.detach().clone() for n, p in _frozen(model).items()}
    out["tied_refused"] = _expect_error(lambda: merge_adapter(model))
    out["tied_untouched"] = not is_merged(model) and all(
        torch.equal(p, before[n]) for n, p in _frozen(model).items())
    return out


@pytest.mark.timeout(240)
@pytest.mark.parametrize("tp", [1, 2])
def test_merge_equals_unmerged_and_unmerge_restores_base(hf_dir, tp):
    for rank, out in enumerate(run_distributed(_merge_worker, tp, tp, hf_dir, timeout=220)):
        for name in CASES:
            r, where = out[name], f"{name} TP={tp} rank {rank}"
            assert r["effect"] > 1e-2, f"{where}: the adapter does not change the logits"
            assert r["moved"] > 1e-3, f"{where}: merging did not change the base weights"
            assert r["merged"] < 1e-5, f"{where}: merged logits differ by {r['merged']:.3g}"
            assert r["restored"] < 1e-6, f"{where}: unmerge leaves the base off by {r['restored']:.3g}"
            assert r["after"] < 1e-5, f"{where}: logits after unmerge differ by {r['after']:.3g}"
            assert r["twice"] and "already merged" in r["twice"], where
            assert not r["still_merged"], where
        assert out["adapter_refused"] and "cannot be merged" in out["adapter_refused"], out["adapter_refused"]
        assert out["tied_refused"] and "tie_word_embeddings" in out["tied_refused"], out["tied_refused"]
        assert out["tied_untouched"], "a refused merge must leave every base weight as it was"


# -- several named adapters on one base ----------------------------------------------------------------------
def _named_save_worker(hf_dir, root):
    from omegaconf import OmegaConf

    from framework.inference.logits import forward_logits
    from framework.peft.merge import merge_adapter, unmerge_adapter
    from framework.checkpoint.named_adapters import NamedAdapters
    from framework.peft.wrapping import peft_modules
    from framework.runtime import initialize

    initialize(tp=2, sp=True, seed=0)
    tokens = _tokens()
    model, cfg = _base_model(hf_dir, 2, sp=True)
    base_params = {id(p) for p in model.parameters()}
    named = NamedAdapters(model, cfg, root=root)
    logits = {"base": forward_logits(model, tokens)}
    for i, (name, method) in enumerate((("a", "lora"), ("b", "ia3"), ("c", "dora"))):
        named.add(name, OmegaConf.create(CASES[method]))
        fill_adapter(model, seed=20 + i)
        logits[name] = forward_logits(model, tokens)
        named.save(name)

    seen = {}
    for name in ("a", "b", "base", "c", "a"):
        if name == "base":
            named.deactivate()
        else:
            named.activate(name)
        seen[name] = (forward_logits(model, tokens) - logits[name]).abs().max().item()
    named.add("a2", OmegaConf.create(CASES["lora"]))  # same structure as "a": switching reuses the wrappers
    wrappers = [id(m) for m in peft_modules(model)]
    named.activate("a")
    reused = [id(m) for m in peft_modules(model)] == wrappers
    seen["a_after_a2"] = (forward_logits(model, tokens) - logits["a"]).abs().max().item()

    merge_adapter(model)
    merged = (forward_logits(model, tokens) - logits["a"]).abs().max().item()
    switch_merged = _expect_error(lambda: named.activate("b"))
    unmerge_adapter(model)
    named.activate("b")
    seen["b_after_merge"] = (forward_logits(model, tokens) - logits["b"]).abs().max().item()
    same_base = {id(p) for p in _frozen(model).values()} == base_params
    unknown = _expect_error(lambda: named.activate("nope"))
    return dict(logits=logits, seen=seen, reused=reused, merged=merged, switch_merged=switch_merged,
                same_base=same_base, unknown=unknown, names=named.names)


def _named_load_worker(hf_dir, root):
    from framework.inference.logits import forward_logits
    from framework.checkpoint.named_adapters import NamedAdapters
    from framework.runtime import initialize

    initialize(tp=1, seed=0)
    tokens = _tokens()
    model, cfg = _base_model(hf_dir, 1)
    named = NamedAdapters(model, cfg, root=root)
    out = {}
    for name in ("b", "a", "c"):
        meta = named.load(name)
        out[name] = (meta["method"], forward_logits(model, tokens))
    named.activate("b")
    out["b_again"] = forward_logits(model, tokens)
    named.activate("a")  # from DoRA's wrappers back to LoRA's, with adapter a's column scales
    out["a_again"] = forward_logits(model, tokens)
    named.deactivate()
    out["base"] = forward_logits(model, tokens)
    return out


@pytest.mark.timeout(240)
def test_named_adapters_switch_save_and_load_by_name(hf_dir, tmp_path):
    res = run_distributed(_named_save_worker, 2, hf_dir, tmp_path, timeout=200)
    for rank, r in enumerate(res):
        for what, diff in r["seen"].items():
            assert diff < 1e-6, f"rank {rank}: {what} after switching differs by {diff:.3g}"
        assert r["reused"], "switching between adapters of the same structure must reuse the wrappers"
        assert r["merged"] < 1e-5
        assert r["switch_merged"] and "unmerge" in r["switch_merged"], r["switch_merged"]
        assert r["same_base"], "the base parameters must stay the same objects"
        assert r["unknown"] and "'nope'" in r["unknown"] and "'a'" in r["unknown"], r["unknown"]
        assert r["names"] == ["a", "b", "c", "a2"]
        for x, y in (("a", "b"), ("a", "c"), ("b", "c"), ("a", "base")):
            assert (r["logits"][x] - r["logits"][y]).abs().max() > 1e-2, f"adapters {x} and {y} look the same"
    assert sorted(p.name for p in (tmp_path / "adapters").iterdir()) == ["a", "b", "c"]

    tp2 = res[0]["logits"]
    loaded = run_distributed(_named_load_worker, 1, hf_dir, tmp_path, timeout=200)[0]
    assert [loaded[n][0] for n in ("a", "b", "c")] == ["lora", "ia3", "dora"]
    assert torch.equal(loaded["a_again"], loaded["a"][1])  # switching back keeps the column scales of its file

    # an adapter whose rank columns scale differently (an imported HF PEFT adapter of mixed ranks/alphas)
    meta_file = tmp_path / "adapters" / "a" / "adapter.yaml"
    meta = yaml.safe_load(meta_file.read_text())
    s = CASES["lora"]["alpha"] / CASES["lora"]["rank"]
    meta["column_scales"] = {wrapper_key(None, 0, "qkv"): [3 * s] + [s] * (CASES["lora"]["rank"] - 1)}
    meta_file.write_text(yaml.safe_dump(meta))
    scaled = run_distributed(_named_load_worker, 1, hf_dir, tmp_path, timeout=200)[0]
    assert (scaled["a"][1] - loaded["a"][1]).abs().max() > 1e-3  # the scales change the model ...
    assert torch.equal(scaled["a_again"], scaled["a"][1])  # ... and stay when the adapter is switched back to
    # TP=1 adds the TP=2 sums in another order: FORWARD_REL (tests/tolerances.py) of the logits' terms, whose
    # scale is ~1 here (64 normed activations times output weights of ~0.02)
    for name in ("a", "b", "c"):
        diff = (loaded[name][1] - tp2[name]).abs().max().item()
        assert diff < FORWARD_REL, f"adapter {name} saved at TP=2 and loaded at TP=1: logits differ by {diff:.3g}"
    assert (loaded["b_again"] - tp2["b"]).abs().max().item() < FORWARD_REL
    assert (loaded["base"] - tp2["base"]).abs().max().item() < FORWARD_REL
