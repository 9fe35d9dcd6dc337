"""QLoRA against bitsandbytes, the NF4 implementation everyone uses (0.50.2, on the CPU).

- The NF4 table and the 8-bit dynamic code of the block constants are bitsandbytes' own, bit for bit.
- Storage: for each weight, our packed codes, 8-bit block constants, their fp32 scales and the mean equal the
  tensors of ``bitsandbytes.functional.quantize_4bit(quant_type="nf4", compress_statistics=True)`` byte for
  byte, and the dequantised weight equals its ``dequantize_4bit``.
- The model: a tiny Llama loaded by transformers with ``BitsAndBytesConfig(load_in_4bit, nf4, double quant)``
  (``Linear4bit`` layers, run on the CPU) plus HF PEFT LoRA gives the loss and LoRA gradients of our QLoRA
  model at TP=1 and TP=2 on the same weights and factors.
- Training: QLoRA at PP=2 and TP=2 x PP=2 takes the single process's losses (the quantised model is the
  same at every layout: blocks of the full Hugging Face tensors).

bitsandbytes' AVX-512 ``dequantize_4bit`` kernel (0.50.2) reads the block constants by row
(``absmax[row * (cols / blocksize) + col / blocksize]``), which is wrong when a row is not a whole number of
blocks (e.g. 93 x 208: errors of 0.1 on weights of 0.05, while its quantiser and its reference PyTorch kernel
agree with each other); those shapes are compared with its reference kernel, the others with
``dequantize_4bit`` itself. The tiny models' rows are whole blocks, so ``Linear4bit`` is right for them.
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from framework.peft.nf4 import NF4Weight, dynamic_code, nf4_code
from launch.spawn import run_distributed
from tests.hf_models import fill_adapter, save_tiny_job_llama, tiny_llama
from tests.tolerances import FORWARD_REL, GRAD_REL, TRAINED_ATOL

bnb = pytest.importorskip("bitsandbytes.functional")

LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
SEQ, BATCH, RANK, ALPHA = 12, 2, 4, 8.0


def _bnb_reference_dequantize(packed, state, shape, dtype):
    """bitsandbytes' reference (PyTorch) 4-bit dequantisation, without its torch.compile wrapper."""
    from bitsandbytes.backends.default.ops import _dequantize_4bit_compute

    absmax = bnb.dequantize_blockwise(state.absmax, state.state2) + state.offset
    with torch._dynamo.config.patch(disable=True):
        return _dequantize_4bit_compute(packed.view(-1), absmax, nf4_code(), 64, shape, dtype)


def test_code_tables_are_bitsandbytes():
    assert torch.equal(nf4_code(), bnb.get_4bit_type("nf4", device="cpu"))
    assert torch.equal(dynamic_code(), bnb.create_dynamic_map())


@pytest.mark.parametrize("shape,dtype", [
    ((96, 64), torch.float32), ((128, 192), torch.bfloat16), ((960, 576), torch.float32),  # rows of whole blocks
    ((300, 70), torch.float32), ((33, 7), torch.float32), ((3, 5), torch.float32),  # partial blocks, odd counts
    ((93, 208), torch.bfloat16), ((1, 64), torch.float32), ((2, 1000), torch.float16),
])
def test_storage_is_bitsandbytes_bytes(shape, dtype):
    """Codes, constants, scales and mean byte for byte; the dequantised weight equal in its dtype. Weights
    drawn at several scales, with an outlier and an all-zero block (its constant 0, its codes 0's index)."""
    g = torch.Generator().manual_seed(shape[0] * 1000 + shape[1])
    w = torch.randn(shape, generator=g) * torch.logspace(-3, 0, shape[0])[:, None]
    w.view(-1)[0] = 3.0
    if w.numel() >= 256:
        w.view(-1)[128:192] = 0
    w = w.to(dtype)
    packed, state = bnb.quantize_4bit(w, quant_type="nf4", blocksize=64, compress_statistics=True)
    ours = NF4Weight(w)
    assert torch.equal(ours.codes, packed.view(-1))
    assert torch.equal(ours.qabsmax, state.absmax)
    assert torch.equal(ours.absmax_scale, state.state2.absmax)
    assert torch.equal(ours.absmax_mean, state.offset.view(1))
    deq = ours.dequantize()
    assert deq.dtype == dtype
    assert torch.equal(deq, _bnb_reference_dequantize(packed, state, shape, dtype))
    if shape[1] % 64 == 0:  # bitsandbytes' own kernel, where it indexes the constants right
        assert torch.equal(deq, bnb.dequantize_4bit(packed, state))


# -- the model vs transformers + bitsandbytes + HF PEFT ---------------------------------------------------
def _shared_key(key: str) -> str:
    """q/k/v and gate/up LoRA A factors are one tensor in our fused layers."""
    import re

    if ".lora_A." not in key:
        return key
    return re.sub(r"(gate|up)_proj", "gate_up", re.sub(r"(q|k|v)_proj", "qkv", key))


@pytest.fixture(scope="module")
def hf_reference(tmp_path_factory):
    """The HF model quantised by transformers + bitsandbytes, LoRA by HF PEFT with seeded factors (one A for
    q/k/v and one for gate/up, as our fused layers have): loss, gradients by adapter key, adapter dir."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from framework.models.registry import config_from_hf

    root = tmp_path_factory.mktemp("qlora_bnb")
    tiny_llama(3, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2).save_pretrained(root / "hf")
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=torch.float32)
    hf = AutoModelForCausalLM.from_pretrained(root / "hf", dtype=torch.float32, device_map="cpu",
                                              quantization_config=quant)
    assert type(hf.model.layers[0].self_attn.q_proj).__name__ == "Linear4bit"
    model = get_peft_model(hf, LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=LINEAR))
    fill_adapter(model, seed=7, share=lambda n: _shared_key(n.removeprefix("base_model.model.").replace(".default", "")))
    named = {n.removeprefix("base_model.model.").replace(".default", ""): p
             for n, p in model.named_parameters() if p.requires_grad}
    g = torch.Generator().manual_seed(11)
    tokens, labels = (torch.randint(0, 256, (BATCH, SEQ), generator=g) for _ in range(2))
    # train mode (no dropout here): in eval mode Linear4bit repacks its weight for an AVX-512-BF16 kernel
    # that multiplies in bfloat16 on CPUs that have one
    model.train()
    logits = model(input_ids=tokens).logits
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1))
    loss.backward()
    sums = {}
    for k, p in named.items():  # our fused A receives the sum of the gradients of the factors it stands for
        sums[_shared_key(k)] = sums.get(_shared_key(k), 0) + p.grad
    grads = {k: sums[_shared_key(k)] for k in named}
    model_cfg = config_from_hf(json.loads((root / "hf" / "config.json").read_text()))
    _write_adapter(root / "adapter", {k: p.detach().clone().contiguous() for k, p in named.items()}, model_cfg)
    return root, tokens, labels, loss.item(), grads


PEFT_CFG = {"method": "qlora", "rank": RANK, "alpha": ALPHA, "dropout": 0.0, "rslora": False,
            "targets": ["qkv", "proj", "fc1", "fc2"], "block_size": 64, "scaler_block_size": 256}


def _write_adapter(directory, weights, model_cfg) -> None:
    """Our adapter directory around HF PEFT's tensors (its keys and shapes)."""
    import yaml
    from safetensors.torch import save_file

    from framework.checkpoint.adapter import target_modules

    directory.mkdir(parents=True)
    save_file(weights, str(directory / "adapter.safetensors"))
    meta = {"format_version": 1, **PEFT_CFG, "method": "lora", "target_modules": target_modules("lora", PEFT_CFG["targets"]),
            "base": {}, "model": model_cfg.to_dict()}
    (directory / "adapter.yaml").write_text(yaml.safe_dump(meta, sort_keys=False))


def _model_worker(tp, root, tokens, labels):
    from omegaconf import OmegaConf

    from framework.checkpoint.adapter import load_adapter, save_adapter
    from framework.checkpoint.hf_import import load_hf_into_gpt
    from framework.models.gpt import build_gpt
    from framework.models.registry import config_from_hf
    from framework.peft.registry import apply_peft
    from framework.runtime import initialize
    from framework.training.optim import wrap_ddp
    from framework.training.step import forward_backward

    initialize(tp=tp, seed=0)
    cfg = config_from_hf(json.loads((root / "hf" / "config.json").read_text()))
    model = build_gpt(cfg, tp, 1, False)
    load_hf_into_gpt(model, root / "hf", cfg)
    apply_peft(model, OmegaConf.create(PEFT_CFG), cfg)
    load_adapter(model, root / "adapter", cfg)
    batch = dict(tokens=tokens, labels=labels, loss_mask=torch.ones(BATCH, SEQ),
                 position_ids=torch.arange(SEQ).expand(BATCH, SEQ).clone())
    model.train()
    loss, _ = forward_backward(wrap_ddp(model), [batch])
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(p.main_grad)
    save_adapter(model, root / f"grads_tp{tp}", PEFT_CFG, cfg)
    return loss


@pytest.mark.timeout(300)
@pytest.mark.parametrize("tp", [1, 2])
def test_model_matches_transformers_bitsandbytes_peft(hf_reference, tp):
    """Loss (FORWARD_REL) and every LoRA gradient (GRAD_REL of its tensor's largest entry) equal those of
    transformers' Linear4bit model with HF PEFT LoRA: the same quantised weights at both layouts."""
    from safetensors.torch import load_file

    root, tokens, labels, ref_loss, ref_grads = hf_reference
    losses = run_distributed(_model_worker, tp, tp, root, tokens, labels, timeout=280)
    for loss in losses:
        assert float(loss) == pytest.approx(ref_loss, rel=FORWARD_REL)
    grads = load_file(str(root / f"grads_tp{tp}" / "adapter.safetensors"))
    assert grads.keys() == ref_grads.keys()
    for k, want in ref_grads.items():
        err = (grads[k] - want).abs().max() / want.abs().max()
        assert err < GRAD_REL, (k, err.item())


# -- training at pipeline layouts ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_hf(tmp_path_factory):
    return save_tiny_job_llama(tmp_path_factory.mktemp("tiny_hf"))


def _qlora_job(tiny_hf, tokenizer, out, *overrides):
    from tests.sft_jobs import tiny_job

    return tiny_job(tiny_hf, tokenizer, out, "peft=qlora", "peft.rank=4", *overrides)


@pytest.mark.timeout(600)
def test_qlora_pipeline_layouts_match_single_process(tiny_hf, tiny_tokenizer_dir, tmp_path):
    """Three optimizer steps of QLoRA at PP=2 and at TP=2 x PP=2 (the tiny job's o_proj shards are half a
    block wide: each rank keeps its codes and the constants of the blocks its rows touch): the same losses
    (FORWARD_REL) and the same trained adapter (TRAINED_ATOL) as one process."""
    from tests.sft_jobs import adapter_tensors, run_sft

    runs = {}
    for name, world, overrides in (("single", 1, ()), ("pp2", 2, ("parallel.pipeline=2",)),
                                   ("tp2pp2", 4, ("parallel.tensor=2", "parallel.pipeline=2"))):
        cfg = _qlora_job(tiny_hf, tiny_tokenizer_dir, tmp_path / name, *overrides)
        runs[name] = run_distributed(run_sft, world, cfg, timeout=280)[0]
    losses, before, after, adapter_dir = runs["single"]
    assert after < before
    reference = adapter_tensors(tmp_path / "single")
    for name in ("pp2", "tp2pp2"):
        l, b, a, _ = runs[name]
        assert l == pytest.approx(losses, rel=FORWARD_REL), name
        assert (b, a) == pytest.approx((before, after), rel=FORWARD_REL), name
        trained = adapter_tensors(tmp_path / name)
        assert trained.keys() == reference.keys()
        for k in reference:
            assert (trained[k] - reference[k]).abs().max().item() <= TRAINED_ATOL, (name, k)
