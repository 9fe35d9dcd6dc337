"""HF Llama -> our GPTModel: logits match transformers at TP=1, TP=2/3 and PP=2, on random tiny
models and on the real SmolLM2-135M; bad checkpoints fail naming the tensor."""

from __future__ import annotations

import json

import pytest
import torch

from framework.models.families import llama as hf_llama
from launch.spawn import run_distributed
from tests.hf_models import hf_logits, tiny_llama
from tests.real_model import require_smollm2

TOL = 1e-4
SEQ = 16

# GQA ratios 1, 3 and 4; kv heads divisible by TP=2; heads * head_dim != hidden in the last one.
# (transformers requires hidden % heads == 0, so the 3:1 model is 96 wide.)
TINY = {
    "mha_4x4": dict(num_attention_heads=4, num_key_value_heads=4, num_hidden_layers=2),
    "gqa_6x2_sharded": dict(hidden_size=96, num_attention_heads=6, num_key_value_heads=2, num_hidden_layers=2,
                            rope_theta=500000.0, rms_norm_eps=1e-5),
    "gqa_8x2_tied": dict(num_attention_heads=8, num_key_value_heads=2, num_hidden_layers=4,
                         tie_word_embeddings=True),
}


def _tiny_hf(name: str, seed: int):
    return tiny_llama(seed, **TINY[name])


_hf_logits = hf_logits


@pytest.fixture(scope="module")
def tiny_cases(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny_hf")
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 256, (2, SEQ), generator=g)
    cases = []
    for seed, name in enumerate(TINY):
        model = _tiny_hf(name, seed)
        out = root / name
        # One checkpoint saved in shards, to read through model.safetensors.index.json.
        model.save_pretrained(out, max_shard_size="40KB" if "sharded" in name else "1GB")
        cases.append((name, str(out), tokens, _hf_logits(model, tokens)))
    assert (root / "gqa_6x2_sharded" / "model.safetensors.index.json").is_file()
    return cases


def _parity_worker(tp: int, pp: int, cases, sp: bool = False, micro_batch_size: int | None = None):
    """Each rank: build our stage, load the HF checkpoint, compare full logits with HF's."""
    from framework.checkpoint.hf_import import load_hf_into_gpt
    from framework.inference.logits import forward_logits
    from framework.models.gpt import build_gpt
    from framework.runtime.distributed import initialize

    initialize(tp=tp, pp=pp, sp=sp)
    diffs = {}
    for name, hf_dir, tokens, expected in cases:
        cfg = hf_llama.config_from_hf(json.loads(open(f"{hf_dir}/config.json").read()))
        gpt = build_gpt(cfg, tp=tp, pp=pp, sp=sp)
        load_hf_into_gpt(gpt, hf_dir, cfg)
        gpt.eval()
        logits = forward_logits(gpt, tokens, micro_batch_size=micro_batch_size)
        assert logits.shape == expected.shape, (name, logits.shape, expected.shape)
        diffs[name] = (logits - expected).abs().max().item()
    return diffs


def _check(results, world):
    assert len(results) == world
    for rank, diffs in enumerate(results):
        for name, diff in diffs.items():
            assert diff < TOL, f"rank {rank}, {name}: max |logit diff| = {diff:.3g} >= {TOL}"


LAYOUTS = [pytest.param(1, 1, False, None, id="tp1"), pytest.param(2, 1, False, None, id="tp2"),
           pytest.param(1, 2, False, None, id="pp2"),
           # sequence parallel and one micro-batch per sample: the other p2p/gather paths of forward_logits
           pytest.param(2, 1, True, 1, id="tp2-sp-mbs1")]


@pytest.mark.timeout(120)
@pytest.mark.parametrize("tp,pp,sp,mbs", LAYOUTS)
def test_tiny_llama_parity(tiny_cases, tp, pp, sp, mbs):
    world = tp * pp
    _check(run_distributed(_parity_worker, world, tp, pp, tiny_cases, sp, mbs, timeout=110), world)


@pytest.mark.timeout(200)
@pytest.mark.parametrize("layers,pp", [(5, 2), (5, 3), (7, 4)], ids=["5-layers-pp2", "5-layers-pp3", "7-layers-pp4"])
def test_pipeline_with_uneven_layers(tmp_path, layers, pp):
    """Layers that do not divide by PP: the first and last stages take the remainder; logits unchanged."""
    from framework.models.layout import pipeline_split
    from tests.family_cases import check_parity, save_cases

    first, last = pipeline_split(layers, pp)
    middle = (layers - (first or 0) - (last or 0)) // (pp - (first is not None) - (last is not None))
    assert first + (last if last is not None else middle) + middle * (pp - 2) == layers
    model = tiny_llama(7, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=layers)
    check_parity(save_cases(tmp_path, {f"llama_{layers}": model}), tp=1, pp=pp)


def _explicit_split_worker(hf_dir, tokens, first, last):
    from framework.checkpoint.hf_import import load_hf_into_gpt
    from framework.inference.logits import forward_logits
    from framework.models.gpt import build_gpt
    from framework.runtime.distributed import initialize

    initialize(tp=1, pp=2)
    cfg = hf_llama.config_from_hf(json.loads(open(f"{hf_dir}/config.json").read()))
    gpt = build_gpt(cfg, pp=2, num_layers_in_first_pipeline_stage=first, num_layers_in_last_pipeline_stage=last)
    load_hf_into_gpt(gpt, hf_dir, cfg)
    return len(gpt.decoder.layers), forward_logits(gpt.eval(), tokens)


@pytest.mark.timeout(200)
def test_explicit_pipeline_split(tmp_path):
    """parallel.first_stage_layers=1 on a 5-layer model at PP=2: stages of 1 and 4 layers, logits unchanged."""
    from framework.models.layout import split_problems
    from tests.family_cases import save_cases

    model = tiny_llama(8, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=5)
    (_, hf_dir, tokens, expected), = save_cases(tmp_path, {"llama_5": model})
    results = run_distributed(_explicit_split_worker, 2, hf_dir, tokens, 1, None, timeout=150)
    assert [n for n, _ in results] == [1, 4]
    assert (results[1][1] - expected).abs().max().item() < TOL
    assert split_problems(5, 2, 1, None) == [] and split_problems(6, 3, 2, 2) == []
    assert split_problems(6, 4, 2, 2) == []
    assert "leave 1 of the model's 6 layers for 2 other stage(s)" in split_problems(6, 4, 2, 3)[0]
    assert "need parallel.pipeline >= 2" in split_problems(6, 1, 2, None)[0]


# --- the real SmolLM2-135M-Instruct ------------------------------------------------------------------

@pytest.fixture(scope="module")
def smollm2_case():
    require_smollm2()
    from tokenizers import Tokenizer
    from transformers import LlamaForCausalLM

    from framework.checkpoint import hub

    hf_dir = hub.smollm2_dir()
    tok = Tokenizer.from_file(str(hf_dir / "tokenizer.json"))
    texts = ["The capital of France is Paris, and the capital of Italy is Rome. Both cities are old.",
             "def add(a, b):\n    return a + b\n\nprint(add(2, 3))  # prints five, of course"]
    tokens = torch.tensor([tok.encode(t).ids[:SEQ] for t in texts])
    assert tokens.shape == (2, SEQ)
    model = LlamaForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32).eval()
    expected = _hf_logits(model, tokens)
    del model
    return [("smollm2_135m", str(hf_dir), tokens, expected)]


@pytest.mark.real_model
@pytest.mark.timeout(240)
@pytest.mark.parametrize("tp,pp", [pytest.param(1, 1, id="tp1"), pytest.param(3, 1, id="tp3"),
                                   pytest.param(1, 2, id="pp2")])
def test_smollm2_parity(smollm2_case, tp, pp):
    world = tp * pp
    _check(run_distributed(_parity_worker, world, tp, pp, smollm2_case, timeout=200), world)


# --- bad checkpoints and configs ---------------------------------------------------------------------

def _load_errors_worker(dirs):
    from framework.checkpoint.hf_import import HFImportError, load_hf_into_gpt
    from framework.models.gpt import build_gpt
    from framework.runtime.distributed import initialize

    initialize()
    errors = {}
    for name, hf_dir in dirs.items():
        cfg = hf_llama.config_from_hf(json.loads(open(f"{hf_dir}/config.json").read()))
        try:
            load_hf_into_gpt(build_gpt(cfg), hf_dir, cfg)
            errors[name] = None
        except HFImportError as e:
            errors[name] = str(e)
    return errors


@pytest.mark.timeout(90)
def test_bad_checkpoint_names_the_tensor(tmp_path):
    from safetensors.torch import load_file, save_file

    good = tmp_path / "good"
    _tiny_hf("mha_4x4", 0).save_pretrained(good)
    state = load_file(str(good / "model.safetensors"))

    def variant(name, edit):
        d = tmp_path / name
        d.mkdir()
        (d / "config.json").write_text((good / "config.json").read_text())
        s = dict(state)
        edit(s)
        save_file(s, str(d / "model.safetensors"), metadata={"format": "pt"})
        return str(d)

    dirs = {
        "missing": variant("missing", lambda s: s.pop("model.layers.1.mlp.down_proj.weight")),
        "shape": variant("shape", lambda s: s.update({"model.layers.0.self_attn.o_proj.weight": torch.zeros(64, 32)})),
        "unknown": variant("unknown", lambda s: s.update({"model.layers.0.self_attn.q_norm.weight": torch.ones(16)})),
        "extra_layer": variant("extra_layer", lambda s: s.update({"model.layers.2.mlp.up_proj.weight": torch.ones(1)})),
    }
    errors = run_distributed(_load_errors_worker, 1, dirs, timeout=80)[0]
    assert "model.layers.1.mlp.down_proj.weight" in errors["missing"] and "missing" in errors["missing"]
    assert "decoder.layers.1.mlp.linear_fc2.weight" in errors["missing"]
    assert "model.layers.0.self_attn.o_proj.weight" in errors["shape"] and "shape mismatch" in errors["shape"]
    assert "decoder.layers.0.self_attention.linear_proj.weight" in errors["shape"]
    assert "model.layers.0.self_attn.q_norm.weight" in errors["unknown"]
    assert "model.layers.2.mlp.up_proj.weight" in errors["extra_layer"]


@pytest.mark.timeout(10)
@pytest.mark.parametrize("key,value,needle", [
    ("rope_scaling", {"rope_type": "dynamic", "factor": 8.0}, "rope_scaling"),  # scaling we do not implement
    ("rope_scaling", {"rope_type": "llama3", "factor": 8.0}, "low_freq_factor"),  # llama3 without its keys
    ("rope_parameters", {"rope_type": "yarn", "rope_theta": 1e4, "factor": 2.0}, "rope_parameters"),
    ("attention_bias", True, "attention_bias"),
    ("mlp_bias", True, "mlp_bias"),
    ("hidden_act", "gelu", "hidden_act"),
    ("model_type", "gpt2", "model_type"),
])
def test_unsupported_config_is_refused(key, value, needle):
    hf = {"model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
          "num_attention_heads": 4, "vocab_size": 256, key: value}
    with pytest.raises(ValueError, match=needle):
        hf_llama.config_from_hf(hf)


@pytest.mark.timeout(10)
def test_config_mapping_both_rope_formats():
    base = {"model_type": "llama", "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 3,
            "num_attention_heads": 8, "num_key_value_heads": 2, "head_dim": 16, "vocab_size": 300,
            "rms_norm_eps": 1e-5, "tie_word_embeddings": True, "max_position_embeddings": 512}
    new = hf_llama.config_from_hf({**base, "rope_parameters": {"rope_type": "default", "rope_theta": 5e5}})
    old = hf_llama.config_from_hf({**base, "rope_theta": 5e5, "rope_scaling": None})
    assert new == old
    assert (new.ffn_hidden_size, new.num_layers, new.num_query_groups, new.kv_channels) == (96, 3, 2, 16)
    assert (new.rotary_base, new.norm_eps, new.tie_word_embeddings, new.vocab_size) == (5e5, 1e-5, True, 300)
    assert new.max_position_embeddings == 512


@pytest.mark.timeout(30)
def test_hub_sources(tmp_path):
    from framework.checkpoint import hub

    _tiny_hf("mha_4x4", 0).save_pretrained(tmp_path / "m")
    node = {"source": "hf", "path": str(tmp_path / "m")}
    assert hub.model_dir(node) == tmp_path / "m"
    cfg = hub.model_config_for(node)
    assert (cfg.num_attention_heads, cfg.num_query_groups, cfg.kv_channels) == (4, 4, 16)
    wrong = {**node, "arch": {**cfg.to_dict(), "num_layers": 5}}
    with pytest.raises(ValueError, match="num_layers"):
        hub.model_config_for(wrong)
    with pytest.raises(ValueError, match="model.tokenizer"):
        hub.tokenizer_dir({"source": "random", "tokenizer": "???"})
    with pytest.raises(ValueError, match="model.source"):
        hub.model_dir({"source": "s3"})


@pytest.mark.timeout(30)
def test_smollm2_conversion_runs_once_under_concurrency(tmp_path, monkeypatch):
    """Two callers at once (threads hold separate flock descriptions, as processes would): one
    converts into a temporary directory renamed into place, the other waits and reuses it."""
    import threading
    import time

    from framework.checkpoint import hub

    calls = []

    def fake_convert(gguf, out):
        calls.append(out)
        time.sleep(0.3)  # long enough for the second caller to reach the lock
        for f in hub.REQUIRED_FILES:
            (out / f).write_text("{}")

    monkeypatch.setenv("FRAMEWORK_CACHE", str(tmp_path))
    monkeypatch.setattr(hub, "_convert_gguf", fake_convert)
    monkeypatch.setattr(hub, "smollm2_gguf_path", lambda: tmp_path / "fake.gguf")
    results = []
    threads = [threading.Thread(target=lambda: results.append(hub.smollm2_dir())) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    target = tmp_path / hub.SMOLLM2_CACHE_NAME
    assert results == [target, target] and len(calls) == 1 and hub.is_complete(target)
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]  # no temporary directory left behind


@pytest.mark.timeout(60)
def test_truncated_hf_file_is_named_by_the_import_itself(tmp_path):
    """The training job's import path (not only the converter CLI) refuses a damaged safetensors file by name."""
    from framework.checkpoint.hf_import import HFImportError, safetensors_index

    _tiny_hf(next(iter(TINY)), 0).save_pretrained(tmp_path)
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(HFImportError, match=r"model\.safetensors cannot be read \(truncated or corrupted\?\)"):
        safetensors_index(tmp_path)
