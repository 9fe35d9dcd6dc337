"""HF PEFT adapters of every layout HF PEFT writes import with PEFT's logits and export back bitwise (issue 21).

On two families (Llama, Qwen2: q/k/v biases), random HF PEFT adapters (non-zero B, DoRA magnitudes and IA3
vectors moved off their initial values) of the layouts our fused layers do not have: DoRA/LoRA on part of a
fused group (q_proj + v_proj, gate_proj + up_proj), mixed ranks and alphas (``rank_pattern`` /
``alpha_pattern``, rsLoRA too), adapters on some layers only (``layers_to_transform``), IA3 on keys only,
``target_modules="all-linear"`` written as a string, trained biases (``bias="lora_only"`` / ``"all"``) and a
trained embedding and head (``modules_to_save``). Each imports (framework/checkpoint/peft_import.py) and
gives PEFT's logits within 1e-4 at TP=1, TP=2 with sequence parallelism and PP=2 (one spawn per layout runs
every case; two cases also generate greedily, as PEFT's ``generate`` does); saved at TP=2 as a training job
saves it and loaded again, PEFT's logits still; exported straight away and after that save it gives back HF
PEFT's tensors and config bitwise; an adapter trained beyond HF's layout (a filler moved, a module's B
outside its block) exports to a form PEFT loads with our logits."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from launch.spawn import run_distributed
from tests.family_cases import tokens_for
from tests.family_models import hf_model
from tests.generate_cases import PROMPTS, hf_greedy

TOL = 1e-4  # fp32 logits of two implementations: the reductions' order differs (tests/tolerances.py)
GREEDY = {("llama", "lora_patterns"), ("qwen2", "saved_modules_bias_all")}  # also generated, vs PEFT's generate
N_NEW = 8

FAMILIES = {
    "llama": lambda: hf_model("llama", 0, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2),
    "qwen2": lambda: hf_model("qwen2", 1, num_hidden_layers=2),
}


def _cases():
    from peft import IA3Config, LoraConfig

    return {
        "dora_q_v": LoraConfig(r=4, lora_alpha=8, use_dora=True, target_modules=["q_proj", "v_proj"]),
        "dora_gate_up_patterns": LoraConfig(r=4, lora_alpha=8, use_dora=True,
                                            target_modules=["gate_proj", "up_proj", "o_proj"],
                                            rank_pattern={"up_proj": 2}, alpha_pattern={"o_proj": 3}),
        "lora_patterns": LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "gate_proj", "down_proj"],
                                    rank_pattern={"k_proj": 2, "model.layers.1.self_attn.q_proj": 6},
                                    alpha_pattern={"q_proj": 3, "down_proj": 5}),
        "rslora_some_layers": LoraConfig(r=4, lora_alpha=8, use_rslora=True, target_modules=["v_proj", "up_proj"],
                                         layers_to_transform=[1], layers_pattern="layers"),
        "dora_some_layers": LoraConfig(r=2, lora_alpha=4, use_dora=True, target_modules=["q_proj", "down_proj"],
                                       layers_to_transform=[0]),
        "ia3_keys_some_layers": IA3Config(target_modules=["model.layers.1.self_attn.k_proj", "down_proj"],
                                          feedforward_modules=["down_proj"]),
        "all_linear": LoraConfig(r=2, lora_alpha=4, target_modules="all-linear"),
        # trained biases (Qwen2's q/k/v; Llama has none, so PEFT writes none) and a trained embedding and head
        "bias_lora_only": LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"], bias="lora_only"),
        "saved_modules_bias_all": LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "o_proj"], bias="all",
                                             modules_to_save=["embed_tokens", "lm_head"]),
    }


def _random_adapter(model, seed):
    """LoRA factors N(0, 0.1), DoRA magnitudes and IA3 vectors scaled by 1 + N(0, 0.1); trained biases and
    modules_to_save moved by N(0, 0.1)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g) * 0.1
            if "lora_A" in n or "lora_B" in n:
                p.copy_(noise)
            elif "lora_magnitude" in n or "ia3_l" in n:
                p.mul_(1 + noise)
            elif p.requires_grad and ("modules_to_save" in n or n.endswith(".bias")):
                p.add_(noise)
    return model.eval()


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    """Every family's HF model and every case's PEFT adapter, its logits and our import of it."""
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    from framework.checkpoint.peft_import import import_peft
    from framework.models.registry import config_from_hf

    root = tmp_path_factory.mktemp("layouts")
    out = {}
    for fam, make in FAMILIES.items():
        make().save_pretrained(root / fam)
        hf_dir = str(root / fam)
        cfg = config_from_hf(json.loads(Path(hf_dir, "config.json").read_text()))
        tokens = tokens_for(cfg.vocab_size, seq=10, seed=3)
        cases = {}
        for j, (name, peft_cfg) in enumerate(_cases().items()):
            base = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
            model = _random_adapter(get_peft_model(base, peft_cfg), seed=10 + j)
            peft_dir = root / f"{fam}-{name}-peft"
            model.save_pretrained(peft_dir)
            if name == "all_linear":  # PEFT writes the module list it found; users write the string
                c = json.loads((peft_dir / "adapter_config.json").read_text())
                c["target_modules"] = "all-linear"
                (peft_dir / "adapter_config.json").write_text(json.dumps(c))
            with torch.no_grad():
                expected = model(input_ids=tokens).logits.float()
            greedy = hf_greedy(model, PROMPTS, N_NEW) if (fam, name) in GREEDY else None
            meta = import_peft(peft_dir, root / f"{fam}-{name}", cfg, base_dir=hf_dir)
            cases[name] = (str(peft_dir), str(root / f"{fam}-{name}"), expected, meta, greedy)
        out[fam] = (hf_dir, tokens, cases)
    return root, out


#: what a training job's peft section holds: a job saves its adapter with these only (trained.py)
_JOB_KEYS = ("method", "rank", "alpha", "dropout", "rslora", "targets")


def _logits_worker(tp, pp, sp, jobs, resave_root=None):
    """Each rank: for every (family, hf_dir, tokens, adapters) job, our model at this layout with each adapter
    applied and loaded in turn: {(family, case): logits}. With resave_root each adapter is also saved again
    as a training job saves it (save_trained with the job's peft section only: what the import added beyond
    it must come from the loaded wrappers), loaded from there into fresh wrappers: {(family, case,
    'resaved'): logits}. Where the job names a case in GREEDY (and not under SP), also its greedy completions of
    PROMPTS: {(family, case, 'greedy'): token lists}."""
    from omegaconf import OmegaConf

    from framework.inference.generate import GenerationConfig, generate

    from framework.checkpoint.adapter import load_adapter, read_adapter_config
    from framework.checkpoint.trained import load_trained, save_trained
    from framework.checkpoint.hf_import import load_hf_into_gpt
    from framework.inference.logits import forward_logits
    from framework.models.registry import build_model, config_from_hf
    from framework.peft.registry import apply_peft
    from framework.peft.wrapping import remove_peft
    from framework.runtime.distributed import initialize

    initialize(tp=tp, pp=pp, sp=sp)
    out = {}
    for fam, hf_dir, tokens, adapters in jobs:
        cfg = config_from_hf(json.loads(Path(hf_dir, "config.json").read_text()))
        model = build_model(cfg, tp=tp, pp=pp, sp=sp)
        load_hf_into_gpt(model, hf_dir, cfg)
        for name, adapter_dir in adapters.items():
            meta = read_adapter_config(adapter_dir)
            job_peft = OmegaConf.create({k: meta[k] for k in _JOB_KEYS if k in meta})
            apply_peft(model, job_peft, cfg)
            load_adapter(model, adapter_dir, cfg)
            out[(fam, name)] = forward_logits(model.eval(), tokens)
            if (fam, name) in GREEDY and not sp:
                done = generate(model, PROMPTS, GenerationConfig(max_new_tokens=N_NEW))
                out[(fam, name, "greedy")] = [c.tokens for c in done]
            if "column_scales" in meta:
                assert "scaling=per-column" in repr(model), name
            if resave_root is not None:
                again = Path(resave_root) / f"{fam}-{name}"
                save_trained(model, again, job_peft, cfg)
                remove_peft(model)
                if "saved_tensors" in meta:  # the base's own again, so that the saved tensors must load
                    load_hf_into_gpt(model, hf_dir, cfg)
                apply_peft(model, job_peft, cfg)
                load_trained(model, again, job_peft, cfg)
                out[(fam, name, "resaved")] = forward_logits(model.eval(), tokens)
            remove_peft(model)
            if "saved_tensors" in meta:  # the adapter's embedding, head or biases replaced the base's
                load_hf_into_gpt(model, hf_dir, cfg)
    return out


def _jobs(data, adapters=None):
    return [(fam, hf_dir, tokens, adapters[fam] if adapters else {n: c[1] for n, c in cases.items()})
            for fam, (hf_dir, tokens, cases) in data.items()]


def _check(results, want, label):
    for rank, got in enumerate(results):
        for key, logits in got.items():
            if logits is None or key[-1] == "greedy":
                continue
            diff = (logits - want[key[:2]]).abs().max().item()
            assert diff < TOL, f"{label} rank {rank} {key}: max |logit diff| against HF PEFT {diff:.3g}"


def _expected(data):
    return {(fam, n): c[2] for fam, (_, _, cases) in data.items() for n, c in cases.items()}


def _assert_bitwise(peft_dir, back_dir, label):
    from safetensors.torch import load_file

    a, b = (load_file(str(Path(d) / "adapter_model.safetensors")) for d in (peft_dir, back_dir))
    assert sorted(a) == sorted(b), (label, sorted(set(a) ^ set(b)))
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), (label, k)
    ca, cb = (json.loads((Path(d) / "adapter_config.json").read_text()) for d in (peft_dir, back_dir))
    assert ca == cb, (label, {k: (ca.get(k), cb.get(k)) for k in set(ca) | set(cb) if ca.get(k) != cb.get(k)})


def test_imported_layouts(imported):
    """What the import made of each layout: fused groups stacked to the ranks the members have, mixed
    scales kept per rank column, fillers where HF adapted nothing."""
    _, data = imported
    cases = data["llama"][2]
    meta = cases["dora_q_v"][3]
    assert (meta["method"], meta["targets"], meta["rank"]) == ("dora", ["qkv"], 8)
    assert sorted(meta["hf_peft"]["fillers"]) == [f"model.layers.{i}.self_attn.k_proj" for i in range(2)]
    meta = cases["lora_patterns"][3]
    assert meta["rank"] == 8  # layer 1: q (6) + k (2) side by side; gate_proj (4) and an up_proj filler in fc1
    assert meta["hf_peft"]["modules"]["model.layers.1.self_attn.q_proj"] == [0, 6, 3 / 6]
    assert "0.qkv" in meta["column_scales"] and "column_scales" not in meta["hf_peft"]
    meta = cases["ia3_keys_some_layers"][3]
    assert meta["targets"] == ["k", "fc2"] and list(meta["hf_peft"]["fillers"]) == ["model.layers.0.self_attn.k_proj"]
    assert cases["saved_modules_bias_all"][3]["saved_tensors"] == ["lm_head.weight", "model.embed_tokens.weight"]
    assert "saved_tensors" not in cases["bias_lora_only"][3]  # Llama has no biases
    meta = data["qwen2"][2]["bias_lora_only"][3]  # q and v biases trained; k's, the base's, beside them
    assert meta["saved_tensors"] == sorted(f"model.layers.{i}.self_attn.{m}_proj.bias" for i in range(2) for m in "qkv")
    assert sorted(meta["hf_peft"]["saved_fillers"]) == [f"model.layers.{i}.self_attn.k_proj.bias" for i in range(2)]
    assert meta["hf_peft"]["saved"]["model.layers.0.self_attn.q_proj.bias"] == \
        "model.layers.0.self_attn.q_proj.base_layer.bias"


@pytest.mark.timeout(600)
def test_layouts_give_peft_logits_at_every_layout(imported, tmp_path):
    """TP=1, TP=2 + SP and PP=2: PEFT's logits (and at TP=1 and PP=2 greedy completions equal to PEFT's
    ``generate`` for the GREEDY cases). At TP=2 every adapter is also saved as a training job saves
    it (its peft section only, without the import's column scales and HF layout) and loaded back: PEFT's
    logits again, and it exports to HF PEFT's own tensors and config, bitwise, as the imports themselves do
    (mixed ranks and alphas included: the wrappers held their column scales)."""
    from framework.checkpoint.peft_export import export_peft

    root, data = imported
    want = _expected(data)
    greedy = {(fam, n): c[4] for fam, (_, _, cases) in data.items() for n, c in cases.items() if c[4] is not None}
    single = run_distributed(_logits_worker, 1, 1, 1, False, _jobs(data), timeout=300)
    _check(single, want, "TP=1")
    assert {k[:2]: v for k, v in single[0].items() if k[-1] == "greedy"} == greedy  # PEFT's generate, greedy
    resaved = run_distributed(_logits_worker, 2, 2, 1, True, _jobs(data), str(tmp_path), timeout=300)
    assert {k for k in resaved[0] if len(k) == 3} == {(*k, "resaved") for k in want}
    _check(resaved, want, "TP=2+SP")
    staged = run_distributed(_logits_worker, 2, 1, 2, False, _jobs(data), timeout=300)
    _check(staged, want, "PP=2")
    for got in staged:
        assert {k[:2]: v for k, v in got.items() if k[-1] == "greedy"} == greedy
    for fam, (_, _, cases) in data.items():
        for name, (peft_dir, ours, *_) in cases.items():
            export_peft(ours, tmp_path / f"{fam}-{name}-direct")
            _assert_bitwise(peft_dir, tmp_path / f"{fam}-{name}-direct", f"{fam} {name} direct")
            export_peft(tmp_path / f"{fam}-{name}", tmp_path / f"{fam}-{name}-back")
            _assert_bitwise(peft_dir, tmp_path / f"{fam}-{name}-back", f"{fam} {name} via TP=2")


@pytest.mark.timeout(300)
def test_adapter_moved_beyond_hf_layout_exports_with_our_logits(imported, tmp_path):
    """As if trained further: a DoRA filler's B rows and magnitude move (k_proj), a LoRA module's B gets
    columns outside its block, an IA3 filler leaves one. The export names the moved modules (their rank and
    alpha in the patterns) and PEFT on the HF model gives our logits."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from framework.checkpoint.adapter import _write_atomically, read_adapter_config, read_adapter_tensors
    from framework.checkpoint.peft_export import export_peft

    _, data = imported
    hf_dir, tokens, cases = data["llama"]
    moved = {}
    g = torch.Generator().manual_seed(7)
    for name, key in (("dora_q_v", "model.layers.1.self_attn.k_proj.lora_B.weight"),
                      ("lora_patterns", "model.layers.0.self_attn.k_proj.lora_B.weight"),
                      ("ia3_keys_some_layers", "model.layers.0.self_attn.k_proj.ia3_l")):
        meta, tensors = read_adapter_config(cases[name][1]), read_adapter_tensors(cases[name][1])
        tensors[key] = tensors[key] + torch.randn(tensors[key].shape, generator=g) * 0.5
        if name == "dora_q_v":
            m = "model.layers.1.self_attn.k_proj.lora_magnitude_vector"
            tensors[m] = tensors[m] * 1.1
        _write_atomically(tmp_path / name, tensors, meta)
        moved[name] = str(tmp_path / name)
    ours = run_distributed(_logits_worker, 1, 1, 1, False, _jobs({"llama": data["llama"]}, {"llama": moved}),
                           timeout=300)[0]
    for name in moved:
        export_peft(tmp_path / name, tmp_path / f"{name}-peft")
        config = json.loads((tmp_path / f"{name}-peft" / "adapter_config.json").read_text())
        assert any("k_proj" in m for m in config["target_modules"]), (name, config["target_modules"])
        base = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
        peft_model = PeftModel.from_pretrained(base, str(tmp_path / f"{name}-peft")).eval()
        with torch.no_grad():
            expected = peft_model(input_ids=tokens).logits.float()
        assert (expected - cases[name][2]).abs().max().item() > 1e-3, name  # the move changed the model
        diff = (ours[("llama", name)] - expected).abs().max().item()
        assert diff < TOL, f"{name}: max |logit diff| between ours and PEFT on the export {diff:.3g}"


def test_column_scales_without_hf_layout_export_folded(imported, tmp_path):
    """An adapter of mixed ranks/alphas whose HF layout is gone (written by hand, or by a tool that kept only
    our keys) exports at its one rank and scale with the column scales folded into B: PEFT's logits."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from framework.checkpoint.adapter import _write_atomically, read_adapter_config, read_adapter_tensors
    from framework.checkpoint.peft_export import export_peft

    _, data = imported
    hf_dir, tokens, cases = data["llama"]
    for name in ("lora_patterns", "dora_gate_up_patterns"):
        meta, tensors = read_adapter_config(cases[name][1]), read_adapter_tensors(cases[name][1])
        assert meta["column_scales"], name
        del meta["hf_peft"]
        _write_atomically(tmp_path / name, tensors, meta)
        export_peft(tmp_path / name, tmp_path / f"{name}-peft")
        config = json.loads((tmp_path / f"{name}-peft" / "adapter_config.json").read_text())
        assert (config["r"], config["rank_pattern"], config["alpha_pattern"]) == (meta["rank"], {}, {}), name
        base = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
        peft_model = PeftModel.from_pretrained(base, str(tmp_path / f"{name}-peft")).eval()
        with torch.no_grad():
            got = peft_model(input_ids=tokens).logits.float()
        diff = (got - cases[name][2]).abs().max().item()
        assert diff < TOL, f"{name}: max |logit diff| of the folded export against the HF PEFT adapter {diff:.3g}"


def test_what_still_does_not_import_is_refused_by_key(imported, tmp_path):
    """A DoRA filler needs the base's row norms: without the HF base the import names the module (the
    converter passes --model's HF directory, and then imports it); a bias setting HF PEFT does not have is
    refused by its key, an embedding with added tokens by its key and sizes."""
    from safetensors.torch import load_file, save_file

    from converters import adapter_from_hf
    from framework.checkpoint.adapter import read_adapter_config
    from framework.checkpoint.peft_import import PeftImportError, import_peft
    from framework.models.registry import config_from_hf

    _, data = imported
    hf_dir, _, cases = data["llama"]
    cfg = config_from_hf(json.loads(Path(hf_dir, "config.json").read_text()))
    peft_dir = cases["dora_q_v"][0]
    with pytest.raises(PeftImportError, match=r"model\.layers\.0\.self_attn\.k_proj: the DoRA adapter leaves"):
        import_peft(peft_dir, tmp_path / "no-base", cfg)
    adapter_from_hf.main([peft_dir, str(tmp_path / "cli"), "--model", hf_dir])
    assert read_adapter_config(tmp_path / "cli")["hf_peft"] == cases["dora_q_v"][3]["hf_peft"]
    saved_dir = Path(cases["saved_modules_bias_all"][0])
    resized = tmp_path / "added_tokens"
    resized.mkdir()
    (resized / "adapter_config.json").write_text((saved_dir / "adapter_config.json").read_text())
    t = load_file(str(saved_dir / "adapter_model.safetensors"))
    t["base_model.model.model.embed_tokens.weight"] = torch.zeros(260, 64)
    save_file(t, str(resized / "adapter_model.safetensors"))
    with pytest.raises(PeftImportError, match=r"model\.embed_tokens\.weight has 260 rows, the base model's "
                                              r"vocabulary 256: an adapter that added tokens"):
        import_peft(resized, tmp_path / "added-ours", cfg, base_dir=hf_dir)
    for key, value in (("bias", "lora_and_more"),):
        bad = tmp_path / key
        bad.mkdir()
        config = json.loads(Path(peft_dir, "adapter_config.json").read_text())
        (bad / "adapter_config.json").write_text(json.dumps({**config, key: value}))
        (bad / "adapter_model.safetensors").write_bytes(Path(peft_dir, "adapter_model.safetensors").read_bytes())
        with pytest.raises(PeftImportError, match=key):
            import_peft(bad, tmp_path / f"{key}-ours", cfg, base_dir=hf_dir)
