"""NF4 storage and QLoRA: the code values, the quantiser, the byte count, the layer and the model.

References we did not write: the 16 NF4 values published in the QLoRA paper (Dettmers et al. 2023,
appendix E) and bitsandbytes' ``NF4`` table; bitsandbytes' ``quantize_4bit`` / dequantisation; a
plain-PyTorch linear + LoRA for the layer; and, for the whole model under TP=2 + SP, the same layout with the
dequantised shards as ordinary frozen weights (plain LoRA). The bitsandbytes proofs in full (every byte, the
model's loss vs transformers + bitsandbytes + HF PEFT, pipeline layouts): tests/peft/test_qlora_bnb.py.
"""

from __future__ import annotations

import json
import math
import os

import pytest
import torch
import torch.nn.functional as F

from framework.peft.nf4 import NF4Weight, nf4_bytes, nf4_code
from launch.spawn import run_distributed
from tests.hf_models import fill_trainable, tiny_llama
from tests.portable import to_numpy, to_torch

#: QLoRA paper appendix E / bitsandbytes functional.py: the NormalFloat4 data type
PAPER_NF4 = [-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
             -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
             0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
             0.7229568362236023, 1.0]


def reference_nf4(w: torch.Tensor):
    """(code indices, dequantised weight, first-level absmax) by bitsandbytes' own CPU functions (its
    reference PyTorch kernel for the dequantisation: its AVX-512 kernel mis-indexes the constants of rows that
    are not whole blocks, see tests/peft/test_qlora_bnb.py)."""
    import bitsandbytes.functional as bnb
    from bitsandbytes.backends.default.ops import _dequantize_4bit_compute

    packed, state = bnb.quantize_4bit(w, quant_type="nf4", blocksize=64, compress_statistics=True)
    idx = torch.stack([packed.view(-1) >> 4, packed.view(-1) & 0xF], dim=1).view(-1)[:w.numel()].long()
    absmax = bnb.dequantize_blockwise(state.absmax, state.state2) + state.offset
    with torch._dynamo.config.patch(disable=True):  # its kernel is wrapped in torch.compile
        deq = _dequantize_4bit_compute(packed.view(-1), absmax, torch.tensor(PAPER_NF4), 64, w.shape, w.dtype)
    flat = F.pad(w.reshape(-1).float(), (0, -w.numel() % 64))
    return idx, deq, flat.view(-1, 64).abs().amax(1)


def test_nf4_code_is_the_papers():
    assert torch.equal(nf4_code(), torch.tensor(PAPER_NF4))  # bit for bit (float64 quantiles, fp32 division)


@pytest.mark.parametrize("shape", [(300, 70), (128, 64), (3, 5)], ids=["partial-blocks", "whole-blocks", "tiny"])
def test_quantiser_matches_bitsandbytes_and_round_trips(shape):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(shape, generator=g) * 0.02
    w[0, 0] = 0.5  # one outlier: its block's absmax is far from the others
    q = NF4Weight(w)
    idx, ref_deq, absmax = reference_nf4(w)
    assert torch.equal(q.code_indices(), idx)
    deq = q.dequantize()
    assert deq.shape == w.shape and deq.dtype == w.dtype
    assert torch.equal(deq, ref_deq)
    # Round-trip bound: half the largest gap of the code times the block's absmax, plus the error of the
    # double-quantised absmax (|code| <= 1).
    table = torch.tensor(PAPER_NF4)
    half_gap = (table[1:] - table[:-1]).max() / 2
    block_of = torch.arange(w.numel()) // 64
    bound = absmax[block_of] * half_gap + (absmax - q.absmax()).abs()[block_of] + 1e-7
    err = (deq - w).reshape(-1).abs()
    assert (err <= bound).all(), (err - bound).max()
    # and the 8-bit dynamic code keeps each constant within half its largest step (0.9 / 64, in [0.1, 1]) of
    # the group's scale, plus the lookup table's spacing (2 / 65535) and fp32 rounding
    scale = (absmax - absmax.mean()).abs().max()
    assert ((absmax - q.absmax()).abs() <= (0.9 / 128 + 2 / 65535) * scale + 1e-8).all()


def test_byte_count_is_analytic():
    """n elements: ceil(n/2) bytes of codes + one byte per 64-block + one fp32 per 256 blocks + the fp32 mean
    (bitsandbytes' tensors of a double-quantised NF4 weight)."""
    for shape in [(4096, 4096), (6144, 4096), (960, 576), (100, 7)]:
        n = shape[0] * shape[1]
        blocks = -(-n // 64)
        expected = -(-n // 2) + blocks + 4 * -(-blocks // 256) + 4
        assert nf4_bytes(n) == expected
        if n < 2_000_000:
            assert NF4Weight(torch.randn(shape)).nbytes() == expected
        assert NF4Weight(torch.empty(shape, device="meta")).nbytes() == expected
    # about 4.127 bits per element for large tensors (4 + 8/64 + 32/(64*256))
    assert nf4_bytes(4096 * 4096) * 8 / (4096 * 4096) == pytest.approx(4 + 8 / 64 + 32 / 64 / 256, abs=1e-5)


# -- the layer ----------------------------------------------------------------------------------------
def _layer_worker():
    from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear

    from framework.models.gpt import transformer_config
    from framework.models.config import ModelConfig
    from framework.peft.lora import LoRALinear
    from framework.peft.qlora import QLoRALinear, quantize_base
    from framework.runtime import initialize

    initialize(seed=0)
    config = transformer_config(ModelConfig(hidden_size=64, ffn_hidden_size=96, num_attention_heads=4))
    g = torch.Generator().manual_seed(3)
    results = []
    for cls, kw in ((ColumnParallelLinear, dict(gather_output=False)),
                    (RowParallelLinear, dict(input_is_parallel=True, skip_bias_add=True))):
        base = cls(64, 96, config=config, init_method=lambda t: torch.nn.init.normal_(t, std=0.02), bias=False,
                   **kw)
        w = base.weight.detach().clone()
        layer = QLoRALinear(base, rank=4, alpha=8.0)
        with torch.no_grad():
            layer.lora_A.weight.copy_(torch.randn(4, 64, generator=g) * 0.1)
            layer.lora_B.weight.copy_(torch.randn(96, 4, generator=g) * 0.1)
        before, after = quantize_base(layer)
        x = torch.randn(5, 2, 64, generator=g, requires_grad=True)
        y, _ = layer(x)
        gy = torch.randn(y.shape, generator=g)
        y.backward(gy)
        merge_error = None
        try:
            layer.merge()
        except ValueError as e:
            merge_error = str(e)
        results.append(dict(w=w, y=y.detach(), gy=gy, x=x.detach(), gx=x.grad, A=layer.lora_A.weight.detach(),
                            B=layer.lora_B.weight.detach(), gA=layer.lora_A.weight.grad,
                            gB=layer.lora_B.weight.grad, before=before, after=after,
                            frozen=[n for n, p in layer.named_parameters() if not p.requires_grad],
                            is_lora=isinstance(layer, LoRALinear), merge_error=merge_error))
    return to_numpy(results)


@pytest.mark.timeout(120)
def test_layer_matches_plain_pytorch():
    """Column- and row-parallel QLoRA layers: output and gradients of x, A, B equal a plain-PyTorch
    ``x W_deq^T + (alpha/r) x A^T B^T`` with W_deq from the reference quantiser; W itself is gone."""
    for r in to_torch(run_distributed(_layer_worker, 1, timeout=110)[0]):
        _, w_deq, _ = reference_nf4(r["w"])
        x = r["x"].clone().requires_grad_(True)
        A, B = r["A"].clone().requires_grad_(True), r["B"].clone().requires_grad_(True)
        y = F.linear(x, w_deq) + 2.0 * F.linear(F.linear(x, A), B)
        y.backward(r["gy"])
        torch.testing.assert_close(r["y"], y.detach(), atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(r["gx"], x.grad, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(r["gA"], A.grad, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(r["gB"], B.grad, atol=1e-6, rtol=1e-5)
        assert r["before"] == 96 * 64 * 4 and r["after"] == nf4_bytes(96 * 64)
        assert r["frozen"] == [] and r["is_lora"]  # no full-precision base parameter left
        assert "cannot merge a LoRA update into 4-bit NF4 base weights" in r["merge_error"]


# -- the model under TP + SP ----------------------------------------------------------------------------
LORA = dict(targets=("qkv", "proj", "fc1", "fc2"), rank=4, alpha=8.0)


def _model_worker(tp, sp, hf_dir, quantized: bool, dequantized_dir: str):
    """QLoRA model (quantized) or the same layout with each rank's dequantised shards as plain weights + LoRA."""
    import logging

    from megatron.core import parallel_state as ps

    from framework.checkpoint.hf_import import load_hf_into_gpt
    from framework.models.gpt import build_gpt
    from framework.models.registry import config_from_hf
    from framework.peft.lora import apply_lora, lora_modules
    from framework.peft.nf4 import NF4Weight
    from framework.peft.qlora import apply_qlora
    from framework.runtime import initialize
    from framework.training.optim import wrap_ddp
    from framework.training.step import forward_backward

    initialize(tp=tp, sp=sp, seed=0)
    rank = ps.get_tensor_model_parallel_rank()
    model_cfg = config_from_hf(json.loads(open(os.path.join(hf_dir, "config.json")).read()))
    model = build_gpt(model_cfg, tp, 1, sp)
    load_hf_into_gpt(model, hf_dir, model_cfg)
    records = []
    handler = logging.Handler()
    handler.emit = lambda rec: records.append(rec.getMessage())
    logging.getLogger("framework.peft.qlora").addHandler(handler)
    logging.getLogger("framework.peft.qlora").setLevel(logging.INFO)
    shapes, report = {}, None
    if quantized:
        report = apply_qlora(model, **LORA)
        deq = {}
        for n, t, m in lora_modules(model):
            base = m.base_layer
            assert isinstance(base.weight, NF4Weight)
            local = ((base.output_size_per_partition, base.input_size) if m.parallel_mode == "column"
                     else (base.output_size, base.input_size_per_partition))
            shapes[(n, t)] = (tuple(base.weight.shape), local)
            deq[f"{n}.{t}"] = m.base_layer.weight.dequantize()
        torch.save(deq, os.path.join(dequantized_dir, f"rank{rank}.pt"))
    else:
        deq = torch.load(os.path.join(dequantized_dir, f"rank{rank}.pt"))
        apply_lora(model, **LORA)
        with torch.no_grad():
            for n, t, m in lora_modules(model):
                m.base_layer.weight.copy_(deq[f"{n}.{t}"])
    torch.manual_seed(5)
    fill_trainable(model, seed=2, scale=0.05)  # same values on every rank and layout-independent per shard
    g = torch.Generator().manual_seed(1)
    batch = dict(tokens=torch.randint(0, 256, (2, 16), generator=g), labels=torch.randint(0, 256, (2, 16), generator=g),
                 loss_mask=torch.ones(2, 16), position_ids=torch.arange(16).expand(2, 16).clone())
    ddp = wrap_ddp(model)
    loss, _ = forward_backward(ddp, [batch])
    grads = {k: p.main_grad.clone() for k, p in model.named_parameters() if p.requires_grad}
    return to_numpy((loss, grads, shapes, report, records))


@pytest.mark.timeout(300)
@pytest.mark.parametrize("tp,sp", [(1, False), (2, False), (2, True)], ids=["tp1", "tp2", "tp2-sp"])
def test_model_matches_dequantised_lora(tmp_path, tp, sp):
    """Each TP rank quantises its own shard (the NF4 weight has the local shard's shape); loss and every LoRA
    gradient equal those of the same layout with those dequantised shards as plain frozen weights (1e-6);
    the memory report counts this rank's base linear weights, fp32 before and NF4 after, analytically."""
    hf_dir = tmp_path / "hf"
    tiny_llama(0, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2).save_pretrained(hf_dir)
    q = run_distributed(_model_worker, tp, tp, sp, str(hf_dir), True, str(tmp_path), timeout=280)
    p = run_distributed(_model_worker, tp, tp, sp, str(hf_dir), False, str(tmp_path), timeout=280)
    for (ql, qg, shapes, report, logs), (pl, pg, _, _, _) in zip(to_torch(q), to_torch(p)):
        assert ql == pytest.approx(pl, rel=1e-6)
        assert qg.keys() == pg.keys() and len(qg) == 2 * 4 * 2
        for k in qg:
            torch.testing.assert_close(qg[k], pg[k], atol=1e-6, rtol=1e-5, msg=lambda m: f"{k}: {m}")
        for nf4_shape, local in shapes.values():
            assert nf4_shape == local
        # h=64, head_dim 16, 4 heads, 2 KV heads, ffn 128, fp32; per layer: qkv, proj, fc1 (gate+up), fc2
        per_layer = [(64 + 2 * 32) // tp * 64, 64 * 64 // tp, 2 * 128 // tp * 64, 64 * 128 // tp]
        assert report["bytes_before"] == 2 * sum(4 * n for n in per_layer)
        if tp == 1:  # one NF4 tensor per HF tensor (q, k, v, o, gate, up, down), as bitsandbytes stores them
            hf = [64 * 64, 32 * 64, 32 * 64, 64 * 64, 128 * 64, 128 * 64, 64 * 128]
            assert report["bytes_after"] == 2 * sum(nf4_bytes(n) for n in hf)
        else:  # this rank's codes, and the constants of no more than the full matrices' blocks
            full_constants = sum(nf4_bytes(n) - n // 2 for n in [64 * 64, 32 * 64, 32 * 64, 64 * 64, 128 * 64,
                                                                  128 * 64, 64 * 128])
            assert sum(n // 2 for n in per_layer) < report["bytes_after"] / 2 <= sum(n // 2 for n in per_layer) + full_constants
        assert any("MiB saved" in m and "NF4" in m for m in logs), logs


def _count_worker(tp: int):
    """(trainable, total) as the job counts and logs them (framework/peft/param_count.py count_parameters) for
    QLoRA on a multi-query tiny Llama (4 query heads, 1 KV head: replicated over the ranks at TP > 1), and at
    TP=1 the plain count of the same model with full-precision LoRA (every weight a parameter)."""
    from framework.models.config import ModelConfig
    from framework.models.registry import build_model
    from framework.peft.lora import apply_lora
    from framework.peft.qlora import apply_qlora
    from framework.runtime.distributed import initialize
    from framework.peft.param_count import count_parameters

    initialize(tp=tp, seed=0)
    cfg = ModelConfig(family="llama", vocab_size=256, hidden_size=64, num_layers=2, num_attention_heads=4,
                      num_query_groups=1, ffn_hidden_size=96)
    targets = ("qkv", "proj", "fc1", "fc2")
    model = build_model(cfg, tp=tp)
    apply_qlora(model, targets=targets, rank=4)
    plain = None
    if tp == 1:
        ref = build_model(cfg)
        apply_lora(ref, targets=targets, rank=4)
        plain = (sum(p.numel() for p in ref.parameters() if p.requires_grad), sum(p.numel() for p in ref.parameters()))
    return count_parameters(model), plain


@pytest.mark.timeout(300)
def test_parameter_counts_with_replicated_kv_heads_count_each_head_once():
    """At TP=2 and TP=4 every rank holds a copy of the one KV head, in its NF4 qkv storage and in LoRA's B:
    the counts the job reports equal the single-process model's, counted plainly."""
    (tp1, plain), = run_distributed(_count_worker, 1, 1, timeout=100)
    assert tp1 == plain
    for tp in (2, 4):
        for rank, (counts, _) in enumerate(run_distributed(_count_worker, tp, tp, timeout=200)):
            assert counts == plain, (tp, rank, counts, plain)


# -- the job --------------------------------------------------------------------------------------------
@pytest.mark.timeout(400)
def test_short_qlora_finetune_reduces_validation_loss(tiny_tokenizer_dir, tmp_path):
    from tests.sft_jobs import compose, evaluate_adapter, run_sft

    cfg = compose(["model=tiny_llama", "model.source=random", f"model.tokenizer={tiny_tokenizer_dir}", "peft=qlora",
                   "data.max_length=64", "trainer.max_steps=4", "trainer.global_batch_size=4",
                   "trainer.micro_batch_size=1", "trainer.eval_samples=4", "trainer.eval_interval=100",
                   "trainer.lr=1e-2", "generate.max_new_tokens=0", f"output_dir={tmp_path}"])
    losses, before, after, adapter_dir = run_distributed(run_sft, 1, cfg, timeout=350)[0]
    assert after < before, (before, after)
    reloaded = run_distributed(evaluate_adapter, 1, cfg, adapter_dir, timeout=300)[0]
    assert reloaded == pytest.approx(after, abs=1e-6)


def test_bad_block_sizes_are_refused(tiny_tokenizer_dir):
    from framework.runtime.errors import ConfigError
    from framework.training.job_config import validate
    from tests.sft_jobs import compose

    cfg = compose(["model=tiny_llama", "model.source=random", f"model.tokenizer={tiny_tokenizer_dir}", "peft=qlora",
                   "peft.block_size=63", "peft.scaler_block_size=0"])
    with pytest.raises(ConfigError) as e:
        validate(cfg, 1)
    assert "peft.block_size=63: must be even" in str(e.value)
    assert "peft.scaler_block_size=0: expected an integer >= 1" in str(e.value)
