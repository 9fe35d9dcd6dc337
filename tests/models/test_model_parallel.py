"""The whole model with LoRA gives the same loss and adapter gradients at every layout.

One tiny Llama (random weights from Hugging Face transformers, so every layout loads identical weights
through the HF import), one LoRA adapter with non-zero A and B (so both factors get gradients), one
global batch whose samples have very different numbers of target tokens. Each layout runs one
forward/backward through megatron's schedule, DDP and gradient finalisation; adapter gradients are
gathered unsharded by the adapter writer (gradients copied into the parameters first).

Tolerances (fp32, tests/tolerances.py): loss within FORWARD_REL (1e-5) relative; every gradient within
GRAD_REL (1e-4) of its tensor's largest entry in the single-process run. Reduction order is the only
difference between layouts, on any CPU; a wrong communication gives errors of order 1 (see
tests/peft/test_lora_layer.py for the layer-level proof).
"""

import os

import pytest
import torch

from launch.spawn import run_distributed
from tests.hf_models import fill_trainable
from tests.tolerances import FORWARD_REL, GRAD_REL

ARCH = dict(vocab_size=256, hidden_size=64, num_layers=4, num_attention_heads=4, num_query_groups=2,
            ffn_hidden_size=128, kv_channels=16, max_position_embeddings=256, rotary_base=10000.0,
            norm_eps=1e-5, tie_word_embeddings=False)
LORA = dict(rank=4, alpha=8.0, dropout=0.0, targets=["qkv", "proj", "fc1", "fc2"])
GLOBAL_BATCH, MICRO, SEQ = 4, 1, 16


def _make_hf_model(path):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=ARCH["vocab_size"], hidden_size=ARCH["hidden_size"],
                      intermediate_size=ARCH["ffn_hidden_size"], num_hidden_layers=ARCH["num_layers"],
                      num_attention_heads=ARCH["num_attention_heads"],
                      num_key_value_heads=ARCH["num_query_groups"], head_dim=ARCH["kv_channels"],
                      max_position_embeddings=ARCH["max_position_embeddings"], rms_norm_eps=ARCH["norm_eps"],
                      rope_theta=ARCH["rotary_base"], tie_word_embeddings=False)
    LlamaForCausalLM(cfg).save_pretrained(path)


def _make_batch():
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, ARCH["vocab_size"], (GLOBAL_BATCH, SEQ), generator=g)
    labels = torch.randint(0, ARCH["vocab_size"], (GLOBAL_BATCH, SEQ), generator=g)
    loss_mask = torch.zeros(GLOBAL_BATCH, SEQ)
    for i, n_targets in enumerate([1, 15, 4, 9]):  # very different target lengths per sample
        loss_mask[i, SEQ - n_targets:] = 1
    position_ids = torch.arange(SEQ).expand(GLOBAL_BATCH, SEQ).clone()
    return dict(tokens=tokens, labels=labels, loss_mask=loss_mask, position_ids=position_ids)


def _layout_worker(tp, pp, sp, hf_dir, adapter_dir, grad_dir, micro=MICRO):
    from megatron.core import parallel_state as ps

    from framework.checkpoint.adapter import load_adapter, save_adapter
    from framework.checkpoint.hf_import import load_hf_into_gpt
    from framework.data.batching import micro_batches
    from framework.models.config import ModelConfig
    from framework.models.gpt import build_gpt
    from framework.peft.lora import apply_lora
    from framework.runtime import initialize
    from framework.training.optim import wrap_ddp
    from framework.training.step import forward_backward

    rt = initialize(tp=tp, pp=pp, sp=sp, seed=0)
    model_cfg = ModelConfig(**ARCH)
    model = build_gpt(model_cfg, tp, pp, sp)
    load_hf_into_gpt(model, hf_dir, model_cfg)
    apply_lora(model, targets=tuple(LORA["targets"]), rank=LORA["rank"], alpha=LORA["alpha"])
    load_adapter(model, adapter_dir, model_cfg)
    ddp = wrap_ddp(model)
    batch = _make_batch()
    mine = micro_batches(list(range(GLOBAL_BATCH)), ps.get_data_parallel_rank(), rt.dp, micro)
    mbs = [{k: v[idx] for k, v in batch.items()} for idx in mine]
    loss, n_targets = forward_backward(ddp, mbs)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(p.main_grad)
    save_adapter(model, grad_dir, LORA, model_cfg)
    return loss, n_targets


def _init_adapter_worker(hf_dir, adapter_dir):
    """Single process: LoRA with seeded non-zero A and B, saved as the shared starting adapter."""
    from framework.checkpoint.adapter import save_adapter
    from framework.checkpoint.hf_import import load_hf_into_gpt
    from framework.models.config import ModelConfig
    from framework.models.gpt import build_gpt
    from framework.peft.lora import apply_lora
    from framework.runtime import initialize

    initialize(tp=1, pp=1, seed=0)
    model_cfg = ModelConfig(**ARCH)
    model = build_gpt(model_cfg)
    load_hf_into_gpt(model, hf_dir, model_cfg)
    apply_lora(model, targets=tuple(LORA["targets"]), rank=LORA["rank"], alpha=LORA["alpha"])
    fill_trainable(model, seed=2, scale=0.05)
    save_adapter(model, adapter_dir, LORA, model_cfg)


def _load(path):
    from safetensors.torch import load_file

    return load_file(os.path.join(path, "adapter.safetensors"))


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    root = tmp_path_factory.mktemp("layouts")
    hf_dir, adapter_dir, grad_dir = root / "hf", root / "adapter", root / "grads_single"
    _make_hf_model(hf_dir)
    run_distributed(_init_adapter_worker, 1, str(hf_dir), str(adapter_dir), timeout=120)
    (loss, n), = run_distributed(_layout_worker, 1, 1, 1, False, str(hf_dir), str(adapter_dir), str(grad_dir),
                                 timeout=120)
    return root, loss, n, _load(grad_dir)


@pytest.mark.timeout(240)
@pytest.mark.parametrize("tp,pp,sp,world,micro", [
    (2, 1, False, 2, 1),   # TP=2
    (2, 1, True, 2, 1),    # TP=2 + SP
    (1, 2, False, 2, 1),   # PP=2
    (2, 2, False, 4, 1),   # TP=2 x PP=2
    (1, 1, False, 2, 1),   # DP=2
    (1, 1, False, 1, 2),   # single process, 2 micro-batches of 2 instead of 4 of 1
], ids=["tp2", "tp2-sp", "pp2", "tp2xpp2", "dp2", "micro2"])
def test_layout_matches_single_process(reference, tp, pp, sp, world, micro):
    root, ref_loss, ref_n, ref_grads = reference
    grad_dir = root / f"grads_tp{tp}_pp{pp}_sp{int(sp)}_w{world}_m{micro}"
    results = run_distributed(_layout_worker, world, tp, pp, sp, str(root / "hf"), str(root / "adapter"),
                              str(grad_dir), micro, timeout=200)
    assert ref_n == 1 + 15 + 4 + 9
    for loss, n in results:
        assert n == ref_n
        assert loss == pytest.approx(ref_loss, rel=FORWARD_REL)
    grads = _load(grad_dir)
    assert grads.keys() == ref_grads.keys()
    assert any(g.abs().sum() > 0 for k, g in ref_grads.items() if "lora_A" in k), "A must receive gradients"
    for k, ref in ref_grads.items():
        torch.testing.assert_close(grads[k], ref, atol=GRAD_REL * ref.abs().max().item(), rtol=0,
                                   msg=lambda m: f"{k}: {m}")
