"""HF PEFT adapters, both ways, for the families whose HF modules do not carry Llama's names (issue 3):
GPT-2 (Conv1D, packed c_attn), GPTBigCode (multi-head and multi-query c_attn), Starcoder2, Nemotron, Falcon
(grouped and multi-query query_key_value) and Mixtral (attention only: its experts are not wrapped).

For each: a LoRA trained by our code for two optimizer steps at TP=2 (multi-query models too: their KV head
is replicated over TP, framework/models/kv_replication.py) exports to HF PEFT, and ``peft.PeftModel.from_pretrained`` on the HF
model gives our logits; and an HF PEFT LoRA made with ``get_peft_model`` (every factor random) imports and
gives HF PEFT's logits at TP=1 and TP=2. IA3 and DoRA on GPT-2's fused c_attn go HF -> ours (TP=2) -> HF
with the same logits and tensors. A bare ``GPT2Model`` save (no ``transformer.`` prefix) converts, and our
model gives the logits of ``GPT2LMHeadModel`` built from the same weights."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from launch.spawn import run_distributed
from tests.family_cases import tokens_for
from tests.family_models import hf_model

TOL = 1e-4
RANK, ALPHA = 4, 8.0


LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj"]
GPT2_LIKE = ["c_attn", "c_proj", "c_fc"]  # c_proj: attn.c_proj and mlp.c_proj, as HF PEFT matches names
FALCON = ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"]
# name: (HF model, HF PEFT target_modules, our LoRA targets, TP sizes)
MODELS = {
    "gpt2": (lambda: hf_model("gpt2", 0), GPT2_LIKE, None, (1, 2)),
    "gpt_bigcode_mha": (lambda: hf_model("gpt_bigcode", 1, multi_query=False, n_inner=96), GPT2_LIKE, None, (1, 2)),
    "gpt_bigcode_mqa": (lambda: hf_model("gpt_bigcode", 0), GPT2_LIKE, None, (1, 2)),
    "starcoder2": (lambda: hf_model("starcoder2", 0, num_hidden_layers=2), LINEAR + ["c_fc", "c_proj"], None, (1, 2)),
    "nemotron": (lambda: hf_model("nemotron", 0, num_hidden_layers=2), LINEAR + ["up_proj", "down_proj"], None,
                 (1, 2)),
    "falcon_gqa": (lambda: hf_model("falcon", 1, new_decoder_architecture=True, num_kv_heads=2, num_hidden_layers=2,
                                    bias=True), FALCON, None, (1, 2)),
    "falcon_mqa": (lambda: hf_model("falcon", 0, num_hidden_layers=2), FALCON, None, (1, 2)),
    "mixtral": (lambda: hf_model("mixtral", 0, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2),
                LINEAR, ("qkv", "proj"), (1, 2)),
}


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    """Each family's tiny random HF model, saved once (built on first use)."""
    root, made = tmp_path_factory.mktemp("peft_families"), {}

    def get(name):
        if name not in made:
            MODELS[name][0]().save_pretrained(root / name)
            made[name] = str(root / name)
        return made[name]
    return get


def _hf_logits(model, tokens):
    with torch.no_grad():
        return model(input_ids=tokens).logits.float()


def _hf_model(hf_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()


def _peft_cfg(meta: dict) -> dict:
    return {"method": meta["method"], "targets": list(meta["targets"]),
            **{k: meta[k] for k in ("rank", "alpha", "dropout", "rslora") if k in meta}}


def _build(tp, hf_dir, sp: bool = False):
    from framework.checkpoint.hf_import import load_hf_into_gpt
    from framework.models.registry import build_model, config_from_hf
    from framework.runtime.distributed import initialize

    initialize(tp=tp, sp=sp)
    cfg = config_from_hf(json.loads(Path(hf_dir, "config.json").read_text()))
    model = build_model(cfg, tp=tp, sp=sp)
    load_hf_into_gpt(model, hf_dir, cfg)
    return model, cfg


def _ours_with_adapter(tp, hf_dir, adapter_dir, tokens, resave_dir=None):
    """Our model at TP=tp with the HF weights and our adapter directory: full logits (and, with
    ``resave_dir``, the adapter saved again from this layout)."""
    from omegaconf import OmegaConf

    from framework.checkpoint.adapter import load_adapter, read_adapter_config, save_adapter
    from framework.inference.logits import forward_logits
    from framework.peft.registry import apply_peft

    model, cfg = _build(tp, hf_dir)
    peft_cfg = _peft_cfg(read_adapter_config(adapter_dir))
    apply_peft(model, OmegaConf.create(peft_cfg), cfg)
    load_adapter(model, adapter_dir, cfg)
    if resave_dir is not None:
        save_adapter(model, resave_dir, peft_cfg, cfg)
    return forward_logits(model.eval(), tokens)


def _train_and_save(tp, hf_dir, targets, adapter_dir, tokens):
    """LoRA on ``targets`` trained for two Adam steps at TP=tp, with sequence parallelism when TP > 1 (megatron
    DDP, optimizer and schedule, as the job trains; megatron's MoE layers train under TP only with SP), saved
    to ``adapter_dir``; returns the trained model's logits and the two steps' losses."""
    from omegaconf import OmegaConf

    from framework.checkpoint.adapter import save_adapter
    from framework.inference.logits import forward_logits
    from framework.peft.registry import apply_peft
    from framework.training.optim import build_optimizer, wrap_ddp
    from framework.training.step import train_step

    model, cfg = _build(tp, hf_dir, sp=tp > 1)
    peft_cfg = {"method": "lora", "rank": RANK, "alpha": ALPHA, "dropout": 0.0, "rslora": False,
                "targets": list(targets)}
    apply_peft(model, OmegaConf.create(peft_cfg), cfg)
    trainer = OmegaConf.create({"lr": 2e-2, "min_lr": 2e-2, "weight_decay": 0.0, "adam_beta1": 0.9,
                                "adam_beta2": 0.999, "clip_grad": 1.0, "max_steps": 2, "warmup_steps": 0})
    ddp = wrap_ddp(model)
    optimizer, scheduler = build_optimizer(ddp, trainer)
    b, s = tokens.shape
    labels = tokens.roll(-1, dims=1)
    batch = {"tokens": tokens, "position_ids": torch.arange(s).expand(b, s), "labels": labels,
             "loss_mask": torch.ones(b, s)}
    losses = [train_step(ddp, optimizer, scheduler, [batch]).loss for _ in range(2)]
    save_adapter(model, adapter_dir, peft_cfg, cfg)
    return forward_logits(model.eval(), tokens), losses


@pytest.mark.timeout(200)
@pytest.mark.parametrize("name", list(MODELS))
def test_lora_trained_here_exports_to_hf_peft(name, hf_dirs, tmp_path):
    """Two optimizer steps at the largest TP the model takes (with SP), exported, loaded by HF PEFT."""
    from peft import PeftModel

    from framework.checkpoint.peft_export import export_peft

    hf_dir = hf_dirs(name)
    _, _, targets, tps = MODELS[name]
    tp = max(tps)
    base = _hf_model(hf_dir)
    tokens = tokens_for(base.config.vocab_size, seq=12)
    results = run_distributed(_train_and_save, tp, tp, hf_dir, targets or ("qkv", "proj", "fc1", "fc2"),
                              str(tmp_path / "ours"), tokens, timeout=180)
    ours, losses = results[0]
    assert losses[1] < losses[0], losses  # the two steps trained something
    export_peft(tmp_path / "ours", tmp_path / "peft")
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert config["fan_in_fan_out"] == (name == "gpt2")
    before = _hf_logits(base, tokens)
    expected = _hf_logits(PeftModel.from_pretrained(base, str(tmp_path / "peft")).eval(), tokens)
    assert (expected - before).abs().max().item() > 1e-3  # the adapter changes the model
    for rank, (logits, _) in enumerate(results):
        diff = (logits - expected).abs().max().item()
        assert diff < TOL, f"{name} TP={tp} rank {rank}: max |logit diff| against HF PEFT {diff:.3g}"


def _random_peft_model(hf_dir, peft_config, seed: int = 5, fix=None):
    """HF PEFT on the HF model with every adapter tensor random: LoRA factors N(0, 0.1), DoRA magnitudes and
    IA3 vectors 1 + N(0, 0.1); ``fix(name, tensor)`` adjusts a tensor in place after drawing."""
    from peft import get_peft_model

    model = get_peft_model(_hf_model(hf_dir), peft_config)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g) * 0.1
            if "lora_A" in n or "lora_B" in n:
                p.copy_(noise)
            elif "lora_magnitude" in n:  # starts as the weight's row norms
                p.mul_(1 + noise)
            elif "ia3_l" in n:
                p.copy_(1 + noise)
            else:
                continue
            if fix is not None:
                fix(n, p)
    return model.eval()


def _check_import(name, hf_dir, peft_model, tmp_path, tps, resave_tp=None):
    """Save ``peft_model``, import it, and compare our logits at every TP in ``tps`` with its own; returns
    the imported adapter.yaml."""
    from framework.checkpoint.peft_import import import_peft
    from framework.models.registry import config_from_hf

    peft_model.save_pretrained(tmp_path / "peft")
    tokens = tokens_for(peft_model.config.vocab_size, seq=12, seed=3)
    expected = _hf_logits(peft_model, tokens)
    cfg = config_from_hf(json.loads(Path(hf_dir, "config.json").read_text()))
    meta = import_peft(tmp_path / "peft", tmp_path / "ours", cfg)
    for tp in tps:
        resave = str(tmp_path / "resaved") if tp == resave_tp else None
        got = run_distributed(_ours_with_adapter, tp, tp, hf_dir, str(tmp_path / "ours"), tokens, resave,
                              timeout=180)
        for rank, logits in enumerate(got):
            diff = (logits - expected).abs().max().item()
            assert diff < TOL, f"{name} TP={tp} rank {rank}: max |logit diff| against HF PEFT {diff:.3g}"
    return meta


@pytest.mark.timeout(200)
@pytest.mark.parametrize("name", list(MODELS))
def test_hf_peft_lora_imports_with_its_logits(name, hf_dirs, tmp_path):
    from peft import LoraConfig

    hf_dir = hf_dirs(name)
    _, target_modules, targets, tps = MODELS[name]
    peft_model = _random_peft_model(hf_dir, LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=0.0,
                                                       target_modules=target_modules))
    meta = _check_import(name, hf_dir, peft_model, tmp_path, tps)
    assert meta["targets"] == list(targets or ("qkv", "proj", "fc1", "fc2"))
    # separate q/k/v pairs (different A's) stack to three times the rank; a fused HF module keeps it
    assert meta["rank"] == (3 * RANK if "q_proj" in target_modules else RANK)


@pytest.mark.timeout(200)
@pytest.mark.parametrize("method", ["ia3", "dora"])
def test_gpt2_fused_c_attn_ia3_and_dora_round_trip(method, hf_dirs, tmp_path):
    """HF PEFT IA3 (keys/values of c_attn, queries left at one; fc2's input) or DoRA on GPT-2 -> ours: HF
    PEFT's logits at TP=2; saved again from TP=2 and exported: HF PEFT's own tensors and config back."""
    from peft import IA3Config, LoraConfig
    from safetensors.torch import load_file

    from framework.checkpoint.peft_export import export_peft

    hf_dir = hf_dirs("gpt2")
    h = _hf_model(hf_dir).config.n_embd

    def queries_one(name, p):  # c_attn's rows are [q; k; v]: our IA3 has no query vector
        if "c_attn" in name:
            p[:h] = 1.0

    if method == "ia3":
        config = IA3Config(target_modules=["c_attn", "mlp.c_proj"], feedforward_modules=["mlp.c_proj"])
        peft_model = _random_peft_model(hf_dir, config, fix=queries_one)
    else:
        config = LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=0.0, use_dora=True,
                            target_modules=["c_attn", "c_proj", "c_fc"])
        peft_model = _random_peft_model(hf_dir, config)
    meta = _check_import("gpt2", hf_dir, peft_model, tmp_path, (2,), resave_tp=2)
    assert meta["method"] == method
    export_peft(tmp_path / "resaved", tmp_path / "back")
    original, back = (load_file(str(d / "adapter_model.safetensors")) for d in (tmp_path / "peft", tmp_path / "back"))
    assert sorted(original) == sorted(back)
    for k in original:
        assert torch.equal(original[k], back[k]), k
    # saved again at TP=2 the adapter still carries HF's layout (adapter.yaml's hf_peft): HF's own config back
    exported = json.loads((tmp_path / "back" / "adapter_config.json").read_text())
    assert exported == json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert exported["peft_type"] == config.peft_type.value and exported["fan_in_fan_out"] is True


def test_ia3_on_query_rows_and_moe_experts_are_refused(hf_dirs, tmp_path):
    """What our adapters cannot hold is refused by name: IA3 scaling c_attn's query rows (ours scales keys
    and values only); Mixtral's experts (w1/w2/w3), which our PEFT does not wrap, both ways."""
    from peft import IA3Config
    from safetensors.torch import save_file

    from framework.checkpoint.adapter import AdapterError, expected_shapes
    from framework.checkpoint.peft_export import PeftExportError, export_peft
    from framework.checkpoint.peft_import import PeftImportError, import_peft
    from framework.models.config import ModelConfig
    from framework.models.registry import config_from_hf

    hf_dir = hf_dirs("gpt2")
    config = IA3Config(target_modules=["c_attn"], feedforward_modules=[])
    _random_peft_model(hf_dir, config).save_pretrained(tmp_path / "ia3")
    gpt2 = config_from_hf(json.loads(Path(hf_dir, "config.json").read_text()))
    with pytest.raises(PeftImportError, match=r"transformer\.h\.0\.attn\.c_attn\.ia3_l scales query rows"):
        import_peft(tmp_path / "ia3", tmp_path / "o1", gpt2)

    mixtral = ModelConfig(family="mixtral", num_experts=4, num_layers=1)
    (tmp_path / "moe").mkdir()
    (tmp_path / "moe" / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "w1", "w2"]}))
    save_file({"x": torch.zeros(1)}, str(tmp_path / "moe" / "adapter_model.safetensors"))
    with pytest.raises(PeftImportError, match=r"'w1'.*mixture of experts"):
        import_peft(tmp_path / "moe", tmp_path / "o2", mixtral)
    with pytest.raises(AdapterError, match=r"target 'fc1' has no HF module: Mixtral's MLP is a mixture of experts"):
        expected_shapes(mixtral, ["qkv", "fc1"], 4)

    import yaml

    (tmp_path / "ours").mkdir()
    (tmp_path / "ours" / "adapter.yaml").write_text(yaml.safe_dump(
        {"format_version": 1, "method": "lora", "rank": 4, "alpha": 8.0, "targets": ["fc2"], "target_modules": [],
         "model": mixtral.to_dict()}))
    save_file({"x": torch.zeros(1)}, str(tmp_path / "ours" / "adapter.safetensors"))
    with pytest.raises(PeftExportError, match="mixture of experts"):
        export_peft(tmp_path / "ours", tmp_path / "o3")


@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral", "gemma", "mixtral", "gpt2", "gpt_bigcode",
                                    "starcoder2", "nemotron", "falcon"])
def test_peft_names_agree_with_the_weight_table(family):
    """Each decoder family's declared HF PEFT modules are the modules its weight table reads for our layer,
    and the declared row transform is the one the table applies to that layer's weight (Conv1D's transpose
    aside), so adapters are permuted exactly as base weights are."""
    from framework.models.config import ModelConfig
    from framework.models.registry import get_family

    fam = get_family(family)
    names = fam.peft
    cfg = ModelConfig(family=family, gated_linear_unit=family in ("llama", "qwen2", "mistral", "gemma", "mixtral"),
                      add_bias_linear=True)
    rules = {r.ours: r for r in fam.rules(False, cfg)}
    ours = {"qkv": "self_attention.linear_qkv", "proj": "self_attention.linear_proj", "fc1": "mlp.linear_fc1",
            "fc2": "mlp.linear_fc2"}
    checked = 0
    for target, module in ours.items():
        rule = rules.get(f"decoder.layers.{{i}}.{module}.weight")
        declared = names.module(target, cfg.gated_linear_unit)
        if rule is None:  # Mixtral's MoE layer has no dense linear_fc1/fc2, and refuses them by name
            assert declared is None and target in names.refused, (family, target)
            continue
        hf = tuple(n.removeprefix(names.layer).removesuffix(".weight") for n in rule.hf)
        assert declared.names == hf, (family, target, declared.names, hf)
        if target in ("qkv", "fc1"):  # column-parallel: B's rows follow the weight's rows
            assert (declared.rows or "column") == rule.transform.removeprefix("conv1d_"), (family, target)
        checked += 1
    assert checked >= 2
    qkv = names.targets["qkv"].names  # IA3 scales rows of the qkv module(s) and fc2's input
    assert names.ia3["k"] == qkv[1 if len(qkv) == 3 else 0] and names.ia3["v"] == qkv[-1], family
    assert names.ia3.get("fc2") == (names.targets["fc2"].names[0] if "fc2" in names.targets else None), family
    for target, module in (("embedding", names.embedding), ("output", names.output)):
        want = "embedding.word_embeddings.weight" if target == "embedding" else "output_layer.weight"
        assert rules[want].hf == (f"{module}.weight",), (family, target)


def _converted_logits(ckpt_dir, tokens):
    from framework.checkpoint.ckpt_format import load_checkpoint_into, model_config_of
    from framework.inference.logits import forward_logits
    from framework.models.registry import build_model
    from framework.runtime.distributed import initialize

    initialize(tp=1)
    cfg = model_config_of(ckpt_dir)
    model = build_model(cfg)
    load_checkpoint_into(model, ckpt_dir, cfg)
    return forward_logits(model.eval(), tokens)


@pytest.mark.timeout(200)
def test_bare_gpt2model_save_converts(tmp_path):
    """transformers' bare GPT2Model saves its tensors without 'transformer.' and no LM head (tied): the
    converter reads it, and our model's logits are GPT2LMHeadModel's on the same weights."""
    from safetensors import safe_open

    from converters import hf_to_ckpt

    lm = hf_model("gpt2", 3)
    lm.transformer.save_pretrained(tmp_path / "bare")
    with safe_open(str(tmp_path / "bare" / "model.safetensors"), "pt") as f:
        names = list(f.keys())
    assert "wte.weight" in names and not any(n.startswith("transformer.") or n.startswith("lm_head") for n in names)
    assert json.loads((tmp_path / "bare" / "config.json").read_text())["architectures"] == ["GPT2Model"]
    run_distributed(hf_to_ckpt.convert, 1, str(tmp_path / "bare"), str(tmp_path / "ckpt"), 1, 1, None, False, False,
                    timeout=150)
    tokens = tokens_for(lm.config.vocab_size)
    ours = run_distributed(_converted_logits, 1, str(tmp_path / "ckpt"), tokens, timeout=150)[0]
    diff = (ours - _hf_logits(lm, tokens)).abs().max().item()
    assert diff < TOL, f"max |logit diff| against GPT2LMHeadModel {diff:.3g}"
