"""Reading Hugging Face checkpoints (framework/checkpoint/hf_import.py, hub.py): a checkpoint that does not
fit the model fails naming the tensor, a truncated safetensors file is named by the import itself, model
sources and tokenizers resolve or are refused by key, and the SmolLM2 conversion runs once under concurrency.
The logits of every family against transformers: tests/models/test_families.py.
"""

from __future__ import annotations

import json

import pytest
import torch

from framework.models.families import llama as hf_llama
from launch.spawn import run_distributed
from tests.hf_models import tiny_llama


def _tiny_llama():
    """A tiny multi-head Llama (4 heads, 2 layers)."""
    return tiny_llama(0, num_attention_heads=4, num_key_value_heads=4, num_hidden_layers=2)


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
    _tiny_llama().save_pretrained(good)
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


@pytest.mark.timeout(30)
def test_hub_sources(tmp_path):
    from framework.checkpoint import hub

    _tiny_llama().save_pretrained(tmp_path / "m")
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

    _tiny_llama().save_pretrained(tmp_path)
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(HFImportError, match=r"model\.safetensors cannot be read \(truncated or corrupted\?\)"):
        safetensors_index(tmp_path)
