"""Every PEFT method against its reference: Hugging Face PEFT for LoRA (with embedding and output-layer
LoRA), rsLoRA, DoRA and IA3; a plain PyTorch bottleneck MLP hooked into the HF model for Houlsby adapters.

One tiny random HF Llama (GQA 4:2, 2 layers, untied), one batch. For each method the reference model gets
seeded non-zero adapter tensors (q/k/v and gate/up share one A, as our fused layers do); those tensors,
as the reference saves them, are our adapter file. Our model at TP=1, TP=2 with sequence parallelism and
PP=2 loads the HF base and that adapter and must give the reference's logits (< 1e-4) and, through
megatron's schedule, DDP and gradient finalisation, its loss and adapter gradients (gathered unsharded by
the adapter writer; within 1e-4 of each tensor's largest entry). The adapter saved again at every layout
must be bitwise the file it loaded. DoRA's dropout path is checked against HF PEFT on one layer with the
same dropout mask. Then each method fine-tunes through the job and its validation loss falls, and DoRA/IA3
adapters export to HF PEFT with the same logits.
"""

from __future__ import annotations

import copy
import json
import os
import re

import pytest
import torch
import torch.nn.functional as F

from launch.spawn import run_distributed
from tests.hf_models import fill_adapter, tiny_llama
from tests.sft_jobs import ROOT

SEQ, BATCH, RANK = 12, 2, 4
LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
LAYER_TARGETS = ["qkv", "proj", "fc1", "fc2"]
#: method -> (our peft config, HF PEFT config kwargs); "adapter" has no HF PEFT config (plain reference)
CASES = {
    "lora": ({"method": "lora", "rank": RANK, "alpha": 8.0, "dropout": 0.0, "rslora": False,
              "targets": LAYER_TARGETS + ["embedding", "output"]},
             dict(r=RANK, lora_alpha=8, target_modules=LINEAR + ["embed_tokens", "lm_head"])),
    "rslora": ({"method": "lora", "rank": RANK, "alpha": 6.0, "dropout": 0.0, "rslora": True,
                "targets": LAYER_TARGETS},
               dict(r=RANK, lora_alpha=6, use_rslora=True, target_modules=LINEAR)),
    "dora": ({"method": "dora", "rank": RANK, "alpha": 8.0, "dropout": 0.0, "rslora": False,
              "targets": LAYER_TARGETS + ["output"]},
             dict(r=RANK, lora_alpha=8, use_dora=True, target_modules=LINEAR + ["lm_head"])),
    "ia3": ({"method": "ia3", "targets": ["k", "v", "fc2"]},
            dict(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"])),
    "adapter": ({"method": "adapter", "bottleneck": 8, "activation": "gelu", "targets": ["attention", "mlp"]}, None),
}
LAYOUTS = [pytest.param(1, 1, False, id="tp1"), pytest.param(2, 1, True, id="tp2-sp"),
           pytest.param(1, 2, False, id="pp2")]


def _hf_base():
    return tiny_llama(3, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2)


def _batch():
    g = torch.Generator().manual_seed(11)
    return torch.randint(0, 256, (BATCH, SEQ), generator=g), torch.randint(0, 256, (BATCH, SEQ), generator=g)


def _our_key(name: str) -> str:
    """HF PEFT parameter name -> the key in its saved adapter (and in ours)."""
    k = name.removeprefix("base_model.model.").replace(".default", "")
    return k.removesuffix(".weight") if k.endswith("lora_magnitude_vector.weight") else k


def _shared_key(key: str) -> str:
    """q/k/v and gate/up LoRA A factors are one tensor in our fused layers."""
    if ".lora_A." not in key:
        return key
    return re.sub(r"(gate|up)_proj", "gate_up", re.sub(r"(q|k|v)_proj", "qkv", key))


class _Bottleneck(torch.nn.Module):
    """The reference Houlsby adapter: up(gelu(down(h))), applied to a module's output by a forward hook."""

    def __init__(self, hidden, r, g):
        super().__init__()
        self.down, self.up = torch.nn.Linear(hidden, r), torch.nn.Linear(r, hidden)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(0.2 * torch.randn(p.shape, generator=g))

    def hook(self, module, inputs, output):
        return output + self.up(F.gelu(self.down(output)))


def _reference(method, hf, tokens, labels):
    """(logits, loss, gradients by our key, adapter tensors by HF PEFT key) of the reference model."""
    model = copy.deepcopy(hf)
    peft_cfg, hf_kwargs = CASES[method]
    if hf_kwargs is None:  # Houlsby adapters: plain PyTorch modules hooked after o_proj and down_proj
        for p in model.parameters():
            p.requires_grad_(False)
        g, adapters = torch.Generator().manual_seed(5), {}
        for i, layer in enumerate(model.model.layers):
            for block, mod in (("self_attn", layer.self_attn.o_proj), ("mlp", layer.mlp.down_proj)):
                a = _Bottleneck(hf.config.hidden_size, peft_cfg["bottleneck"], g)
                mod.register_forward_hook(a.hook)
                adapters[f"model.layers.{i}.{block}.adapter"] = a
        named = {f"{k}.{n}": p for k, a in adapters.items() for n, p in a.named_parameters()}
    else:
        from peft import IA3Config, LoraConfig, get_peft_model

        config = IA3Config(**hf_kwargs) if method == "ia3" else LoraConfig(**hf_kwargs)
        model = get_peft_model(model, config)
        fill_adapter(model, seed=7, share=lambda name: _shared_key(_our_key(name)))
        named = {_our_key(n): p for n, p in model.named_parameters() if p.requires_grad}
    logits = model(input_ids=tokens).logits
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1))
    loss.backward()
    grads = {k: p.grad.detach().clone() for k, p in named.items()}
    # our fused A receives the sum of the gradients of the HF factors it stands for
    sums = {}
    for k, gr in grads.items():
        sums[_shared_key(k)] = sums.get(_shared_key(k), 0) + gr
    grads = {k: sums[_shared_key(k)] for k in grads}
    weights = {k: p.detach().clone().contiguous() for k, p in named.items()}
    return logits.detach(), loss.item(), grads, weights


def _write_adapter(directory, weights, peft_cfg, model_cfg) -> None:
    """Our adapter directory around the reference's tensors (HF PEFT's keys and shapes)."""
    import yaml
    from safetensors.torch import save_file

    from framework.checkpoint.adapter import target_modules

    directory.mkdir(parents=True)
    save_file(weights, str(directory / "adapter.safetensors"))
    meta = {"format_version": 1, **peft_cfg, "target_modules": target_modules(peft_cfg["method"], peft_cfg["targets"]),
            "base": {}, "model": model_cfg.to_dict()}
    (directory / "adapter.yaml").write_text(yaml.safe_dump(meta, sort_keys=False))


@pytest.fixture(scope="module")
def references(tmp_path_factory):
    from framework.models.registry import config_from_hf

    root = tmp_path_factory.mktemp("peft_methods")
    hf = _hf_base()
    hf.save_pretrained(root / "hf")
    model_cfg = config_from_hf(json.loads((root / "hf" / "config.json").read_text()))
    tokens, labels = _batch()
    with torch.no_grad():
        base_logits = hf(input_ids=tokens).logits
    refs = {}
    for method in CASES:
        logits, loss, grads, weights = _reference(method, hf, tokens, labels)
        _write_adapter(root / method / "adapter", weights, CASES[method][0], model_cfg)
        refs[method] = dict(logits=logits, loss=loss, grads=grads, weights=weights)
    return root, tokens, labels, base_logits, refs


def _layout_worker(tp, pp, sp, root, tokens, labels, tag):
    from omegaconf import OmegaConf

    from framework.checkpoint.adapter import load_adapter, save_adapter
    from framework.checkpoint.hf_import import load_hf_into_gpt
    from framework.inference.logits import forward_logits
    from framework.models.registry import config_from_hf
    from framework.models.gpt import build_gpt
    from framework.peft.registry import apply_peft
    from framework.runtime import initialize
    from framework.training.optim import wrap_ddp
    from framework.training.step import forward_backward

    initialize(tp=tp, pp=pp, sp=sp, seed=0)
    cfg = config_from_hf(json.loads((root / "hf" / "config.json").read_text()))
    batch = dict(tokens=tokens, labels=labels, loss_mask=torch.ones(BATCH, SEQ),
                 position_ids=torch.arange(SEQ).expand(BATCH, SEQ).clone())
    out = {}
    for method, (peft_cfg, _) in CASES.items():
        model = build_gpt(cfg, tp, pp, sp)
        load_hf_into_gpt(model, root / "hf", cfg)
        apply_peft(model, OmegaConf.create(peft_cfg), cfg)
        load_adapter(model, root / method / "adapter", cfg)
        save_adapter(model, root / method / f"resaved_{tag}", peft_cfg, cfg)
        model.eval()
        logits = forward_logits(model, tokens)
        model.train()
        loss, _ = forward_backward(wrap_ddp(model), [batch])
        with torch.no_grad():
            for p in model.parameters():
                if p.requires_grad:
                    p.copy_(p.main_grad)
        save_adapter(model, root / method / f"grads_{tag}", peft_cfg, cfg)
        out[method] = (logits, loss)
    return out


def _load(path):
    from safetensors.torch import load_file

    return load_file(str(path / "adapter.safetensors"))


@pytest.mark.timeout(300)
@pytest.mark.parametrize("tp,pp,sp", LAYOUTS)
def test_methods_match_reference(references, tp, pp, sp):
    root, tokens, labels, base_logits, refs = references
    tag = f"tp{tp}pp{pp}sp{int(sp)}"
    results = run_distributed(_layout_worker, tp * pp, tp, pp, sp, root, tokens, labels, tag, timeout=280)
    for method, ref in refs.items():
        for rank, per_rank in enumerate(results):
            logits, loss = per_rank[method]
            diff = (logits - ref["logits"]).abs().max().item()
            assert diff < 1e-4, f"{method} {tag} rank {rank}: max |logit diff| {diff:.3g}"
            assert loss == pytest.approx(ref["loss"], rel=1e-5), f"{method} {tag} rank {rank}: loss"
        assert (ref["logits"] - base_logits).abs().max() > 1e-2, f"{method}: the adapter must change the logits"

        saved = _load(root / method / "adapter")
        resaved = _load(root / method / f"resaved_{tag}")
        assert resaved.keys() == {k.removeprefix("base_model.model.") for k in saved}, method
        for k, v in saved.items():
            assert torch.equal(resaved[k.removeprefix("base_model.model.")], v), f"{method} {tag}: {k} changed"

        grads = _load(root / method / f"grads_{tag}")
        assert grads.keys() == ref["grads"].keys(), method
        for k, want in ref["grads"].items():
            scale = want.abs().max().item()
            assert scale > 0, f"{method}: reference gradient of {k} is zero"
            err = (grads[k] - want).abs().max().item() / scale
            assert err < 1e-4, f"{method} {tag}: gradient of {k} off by {err:.3g} of its scale"


@pytest.mark.timeout(120)
@pytest.mark.parametrize("method", ["dora", "ia3"])
def test_export_to_hf_peft(references, method, tmp_path):
    """Our DoRA / IA3 adapter -> HF PEFT directory -> PeftModel.from_pretrained gives the reference logits;
    Houlsby adapters are refused (HF PEFT has no such method)."""
    from peft import PeftModel

    from framework.checkpoint.peft_export import PeftExportError, export_peft

    root, tokens, _, _, refs = references
    export_peft(root / method / "adapter", tmp_path / "peft", base_model_name_or_path=str(root / "hf"))
    cfg = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == ("IA3" if method == "ia3" else "LORA")
    model = PeftModel.from_pretrained(_hf_base(), str(tmp_path / "peft")).eval()
    with torch.no_grad():
        logits = model(input_ids=tokens).logits
    assert (logits - refs[method]["logits"]).abs().max().item() < 1e-5
    with pytest.raises(PeftExportError, match="no Hugging Face PEFT equivalent"):
        export_peft(root / "adapter" / "adapter", tmp_path / "refused")


def _dora_dropout_worker():
    """One DoRA layer with dropout, training mode, against HF PEFT's DoRA on an nn.Linear with the same
    weights: the dropout branch recomputes W x_d (HF's base_result=None path). Both draw their one dropout
    mask from torch's default generator (a replicated input at TP=1), seeded alike."""
    from megatron.core.tensor_parallel.layers import ColumnParallelLinear
    from peft import LoraConfig, get_peft_model

    from framework.models.config import ModelConfig
    from framework.models.gpt import transformer_config
    from framework.peft.dora import DoRALinear
    from framework.runtime import initialize

    initialize(tp=1, seed=0)
    cfg = transformer_config(ModelConfig(hidden_size=16, num_attention_heads=4, ffn_hidden_size=32), 1, 1, False)
    base = ColumnParallelLinear(16, 24, config=cfg, init_method=cfg.init_method, bias=False, gather_output=False)
    ours = DoRALinear(base, rank=4, alpha=8.0, dropout=0.3, init_seed=1)
    holder = torch.nn.Module()  # a container for get_peft_model; the wrapped layer is called directly
    holder.lin = torch.nn.Linear(16, 24, bias=False)
    with torch.no_grad():
        holder.lin.weight.copy_(base.weight)
    hf = get_peft_model(holder, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.3, use_dora=True, target_modules=["lin"]))
    fill_adapter(ours, seed=3)
    with torch.no_grad():
        layer = hf.base_model.model.lin
        layer.lora_A["default"].weight.copy_(ours.lora_A.weight)
        layer.lora_B["default"].weight.copy_(ours.lora_B.weight)
        layer.lora_magnitude_vector["default"].weight.copy_(ours.lora_magnitude_vector)
    x = torch.randn(5, 2, 16, generator=torch.Generator().manual_seed(4))
    diffs = {}
    for mode in ("train", "eval"):
        ours.train(mode == "train"), hf.train(mode == "train")
        torch.manual_seed(123)
        y_ours, _ = ours(x)
        torch.manual_seed(123)
        y_hf = hf.base_model.model.lin(x)
        diffs[mode] = (y_ours - y_hf).abs().max().item()
    torch.manual_seed(124)
    diffs["other_mask"] = (ours.train()(x)[0] - y_ours).abs().max().item()
    return diffs


@pytest.mark.timeout(120)
def test_dora_with_dropout_matches_hf_peft():
    diffs = run_distributed(_dora_dropout_worker, 1, timeout=100)[0]
    assert diffs["train"] < 1e-6 and diffs["eval"] < 1e-6, diffs
    assert diffs["other_mask"] > 1e-3, "dropout must change the training-mode output"


# -- config errors ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("method,overrides,message", [
    ("lora", ["peft.rank=0"], "peft.rank=0"),
    ("lora", ["peft.targets=[qkv,mlp]"], "unknown LoRA target"),
    ("dora", ["peft.targets=[qkv,embedding]"], "unknown DoRA target"),
    ("ia3", ["peft.targets=[q]"], "unknown IA3 target"),
    ("adapter", ["peft.bottleneck=0", "peft.activation=tanh"], "peft.activation='tanh'"),
])
def test_bad_peft_config_is_refused_before_start(method, overrides, message, tiny_tokenizer_dir):
    from framework.runtime.errors import ConfigError
    from framework.training.job_config import validate
    from tests.sft_jobs import compose

    cfg = compose(["model=tiny_llama", f"model.tokenizer={tiny_tokenizer_dir}", f"peft={method}", *overrides])
    with pytest.raises(ConfigError, match=re.escape(message)):
        validate(cfg, 1)


# -- a short fine-tune per method ------------------------------------------------------------------------
def _finetune(cfg):
    os.chdir(ROOT)
    from framework.runtime.logs import setup_logging
    from framework.training.finetune import run

    setup_logging("WARNING")
    r = run(cfg)
    return r.val_loss_before, r.val_loss_after, r.adapter_dir, r.trainable_params


@pytest.mark.timeout(300)
@pytest.mark.parametrize("peft,lr", [
    (["peft=lora", "peft.rslora=true", "peft.targets=[qkv,proj,fc1,fc2,embedding,output]"], 5e-3),
    (["peft=dora"], 5e-3),
    (["peft=ia3"], 5e-2),  # scaling vectors start at 1 and need larger steps (HF's IA3 examples use 1e-2+)
    (["peft=adapter"], 5e-3),
], ids=["rslora-emb-out", "dora", "ia3", "adapter"])
def test_short_finetune_reduces_validation_loss(peft, lr, tiny_tokenizer_dir, tmp_path):
    from tests.sft_jobs import compose

    cfg = compose(["model=tiny_llama", "model.source=random", f"model.tokenizer={tiny_tokenizer_dir}",
                   "data.max_length=64", "trainer.max_steps=4", "trainer.global_batch_size=4",
                   "trainer.micro_batch_size=2", "trainer.eval_samples=8", "trainer.eval_interval=100",
                   "trainer.save_interval=null", "trainer.tensorboard=false", "data.cache_dir=null",
                   f"trainer.lr={lr}", "generate.max_new_tokens=0", f"output_dir={tmp_path}", *peft])
    before, after, adapter_dir, trainable = run_distributed(_finetune, 1, cfg, timeout=280)[0]
    assert after < before, (peft, before, after)
    assert os.path.isfile(os.path.join(adapter_dir, "adapter.safetensors"))
    assert trainable > 0
