"""Adapters between HF PEFT and ours, both ways (issue 3): an HF PEFT LoRA (separate q/k/v and gate/up
pairs, k_proj left out, rsLoRA too) imports and gives HF PEFT's logits at TP=1 and TP=2; a LoRA trained by
our job at TP=2 exports to HF PEFT, and peft on the HF model gives our logits."""

from __future__ import annotations

import pytest
import torch

from launch.spawn import run_distributed
from tests.hf_models import hf_logits, save_tiny_job_llama, tiny_llama
from tests.sft_jobs import run_sft, tiny_job

TOL = 1e-4


def _ours_with_adapter(tp, hf_dir, adapter_dir, tokens):
    """Our model at TP=tp with the HF weights and our adapter directory; full logits."""
    import json
    from pathlib import Path

    from framework.checkpoint.adapter import load_adapter, read_adapter_config
    from framework.checkpoint.hf_import import load_hf_into_gpt
    from framework.inference.logits import forward_logits
    from framework.models.gpt import build_gpt
    from framework.models.registry import config_from_hf
    from framework.peft.lora import apply_lora
    from framework.runtime.distributed import initialize

    initialize(tp=tp)
    cfg = config_from_hf(json.loads(Path(hf_dir, "config.json").read_text()))
    gpt = build_gpt(cfg, tp=tp)
    load_hf_into_gpt(gpt, hf_dir, cfg)
    meta = read_adapter_config(adapter_dir)
    apply_lora(gpt, targets=meta["targets"], rank=meta["rank"], alpha=meta["alpha"], rslora=meta["rslora"])
    load_adapter(gpt, adapter_dir, cfg)
    return forward_logits(gpt.eval(), tokens)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("rslora", [False, True], ids=["lora", "rslora"])
def test_hf_peft_adapter_imports_with_its_logits(tmp_path, rslora):
    from peft import LoraConfig, get_peft_model

    from framework.checkpoint.peft_import import import_peft
    from framework.models.registry import config_from_hf

    hf = tiny_llama(3, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2)
    hf.save_pretrained(tmp_path / "hf")
    peft_cfg = LoraConfig(r=4, lora_alpha=8, use_rslora=rslora, lora_dropout=0.0,
                          target_modules=["q_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    model = get_peft_model(hf, peft_cfg)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    model.save_pretrained(tmp_path / "peft")
    tokens = torch.randint(0, 256, (2, 12), generator=g)
    expected = hf_logits(model.eval(), tokens)

    meta = import_peft(tmp_path / "peft", tmp_path / "ours", config_from_hf(hf.config.to_dict()))
    # q and v (k not targeted: a filler) and gate/up differ: stacked side by side to 2 x 4, scale alpha/r kept
    assert meta["rank"] == 8 and meta["targets"] == ["qkv", "proj", "fc1", "fc2"]
    for tp in (1, 2):
        got = run_distributed(_ours_with_adapter, tp, tp, str(tmp_path / "hf"), str(tmp_path / "ours"), tokens,
                              timeout=200)
        for rank, logits in enumerate(got):
            diff = (logits - expected).abs().max().item()
            assert diff < TOL, f"TP={tp} rank {rank}: max |logit diff| {diff:.3g}"


def test_bad_peft_adapters_are_refused(tmp_path):
    import json

    from framework.checkpoint.peft_import import PeftImportError, import_peft
    from framework.runtime.errors import CheckpointError
    from framework.models.config import ModelConfig

    (tmp_path / "p").mkdir()
    (tmp_path / "p" / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": 8,
                                                                    "target_modules": ["q_proj"],
                                                                    "layer_replication": [[0, 1], [0, 1]]}))
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(1)}, str(tmp_path / "p" / "adapter_model.safetensors"))
    with pytest.raises(PeftImportError, match="layer_replication"):
        import_peft(tmp_path / "p", tmp_path / "o", ModelConfig())
    (tmp_path / "p" / "adapter_config.json").write_text(json.dumps({"peft_type": "LOHA"}))
    with pytest.raises(PeftImportError, match="peft_type='LOHA'"):
        import_peft(tmp_path / "p", tmp_path / "o", ModelConfig())
    (tmp_path / "p" / "adapter_config.json").write_text(json.dumps({"peft_type": "PREFIX_TUNING"}))
    with pytest.raises(CheckpointError, match="task_type=None; prefix tuning imports for CAUSAL_LM"):
        import_peft(tmp_path / "p", tmp_path / "o", ModelConfig())
    with pytest.raises(PeftImportError, match="not found"):
        import_peft(tmp_path / "nothing", tmp_path / "o", ModelConfig())


@pytest.mark.timeout(400)
def test_adapter_trained_at_tp2_exports_to_hf_peft(tmp_path, tiny_tokenizer_dir):
    from peft import PeftModel
    from transformers import LlamaForCausalLM

    from framework.checkpoint.peft_export import export_peft

    hf_dir = save_tiny_job_llama(tmp_path / "hf")
    cfg = tiny_job(hf_dir, tiny_tokenizer_dir, tmp_path / "run", "parallel.tensor=2", "trainer.max_steps=3")
    *_, adapter_dir = run_distributed(run_sft, 2, cfg, timeout=300)[0]
    export_peft(adapter_dir, tmp_path / "peft")
    base = LlamaForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32).eval()
    tokens = torch.randint(0, 512, (2, 16), generator=torch.Generator().manual_seed(1))
    before = hf_logits(base, tokens)
    peft_model = PeftModel.from_pretrained(base, str(tmp_path / "peft")).eval()
    expected = hf_logits(peft_model, tokens)
    assert (expected - before).abs().max().item() > 1e-3  # the trained adapter changes the model
    ours = run_distributed(_ours_with_adapter, 1, 1, str(hf_dir), adapter_dir, tokens, timeout=200)[0]
    assert (ours - expected).abs().max().item() < TOL
