"""Sequence packing: bin packing, the packed row's mask and positions, and the proof that a packed batch
gives the same per-sample losses and LoRA gradients as the same samples one per padded row."""

import os

import pytest
import torch

from framework.data.packing import collate_packed, pack, packing_efficiency
from framework.data.sample import Sample
from launch.spawn import run_distributed
from tests.hf_models import fill_trainable, save_tiny_job_llama
from tests.tolerances import FORWARD_REL, GRAD_REL

LORA = dict(rank=4, alpha=8.0, dropout=0.0, targets=["qkv", "proj", "fc1", "fc2"])
SHAPE = dict(num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
BIN = 16


# ---- (a) bin packing -------------------------------------------------------------------------------------

def test_pack_properties():
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(1, 33, (200,), generator=g).tolist()
    bins = pack(lengths, 32)
    assert sorted(i for b in bins for i in b) == list(range(200))  # every index exactly once
    assert all(sum(lengths[i] for i in b) <= 32 for b in bins)
    used = sum(lengths)
    assert packing_efficiency(bins, lengths, 32) == pytest.approx(used / (len(bins) * 32))
    assert len(bins) >= -(-used // 32)  # never below the lower bound
    assert pack(lengths, 32) == bins  # deterministic


def test_best_fit_decreasing_beats_naive_next_fit():
    lengths = [2, 5, 4, 7, 1, 3, 8]  # 30 positions into bins of 10: 3 bins are optimal
    bins = pack(lengths, 10)
    assert len(bins) == 3
    assert packing_efficiency(bins, lengths, 10) == pytest.approx(1.0)
    naive, room = 1, 10  # next fit in the given order
    for n in lengths:
        if n > room:
            naive, room = naive + 1, 10
        room -= n
    assert naive > len(bins)


def test_pack_refuses_a_sample_longer_than_a_bin():
    with pytest.raises(ValueError, match="sample 2 needs 11 positions but bins hold 10"):
        pack([3, 4, 11], 10)


# ---- (b) one packed row by hand --------------------------------------------------------------------------

def test_packed_row_by_hand():
    a = Sample([10, 11, 12, 13], [0, 0, 1, 1])  # 3 positions
    b = Sample([20, 21, 22], [0, 1, 1])          # 2 positions
    batch = collate_packed([[a, b]], pad_id=0, seq_length=7)
    assert batch["tokens"].tolist() == [[10, 11, 12, 20, 21, 0, 0]]
    assert batch["labels"].tolist() == [[11, 12, 13, 21, 22, 0, 0]]
    assert batch["loss_mask"].tolist() == [[0, 1, 1, 1, 1, 0, 0]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1, 0, 0]]
    allowed = (~batch["attention_mask"][0, 0]).int().tolist()
    assert batch["attention_mask"].shape == (1, 1, 7, 7) and batch["attention_mask"].dtype == torch.bool
    assert allowed == [
        [1, 0, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0, 0],
        [1, 1, 1, 0, 0, 0, 0],
        [0, 0, 0, 1, 0, 0, 0],
        [0, 0, 0, 1, 1, 0, 0],
        [0, 0, 0, 0, 0, 1, 0],  # padding sees only itself
        [0, 0, 0, 0, 0, 0, 1],
    ]
    with pytest.raises(ValueError, match="bin 0 needs more than seq_length=4"):
        collate_packed([[a, b]], pad_id=0, seq_length=4)


# ---- (c) packed == unpacked: per-sample loss and LoRA gradients ------------------------------------------

def _samples():
    g = torch.Generator().manual_seed(3)
    out = []
    for n, prompt in [(9, 3), (5, 1), (13, 6), (3, 1), (7, 2), (6, 4)]:
        ids = torch.randint(3, 256, (n,), generator=g).tolist()
        out.append(Sample(ids, [0] * prompt + [1] * (n - prompt)))
    return out


def _worker(tp, sp, packed, hf_dir, adapter_dir, grad_dir):
    from framework.checkpoint.adapter import load_adapter, save_adapter
    from framework.checkpoint.hf_import import load_hf_into_gpt
    from framework.data.batching import collate
    from framework.data.packing import sample_positions
    from framework.models import registry as hf_llama  # config_from_hf of any family
    from framework.models.gpt import build_gpt
    from framework.peft.lora import apply_lora
    from framework.runtime import initialize
    from framework.training.optim import wrap_ddp
    from framework.training.step import forward_backward

    import json
    initialize(tp=tp, pp=1, sp=sp, seed=0)
    model_cfg = hf_llama.config_from_hf(json.loads(open(f"{hf_dir}/config.json").read()))
    model = build_gpt(model_cfg, tp, 1, sp)
    load_hf_into_gpt(model, hf_dir, model_cfg)
    apply_lora(model, targets=tuple(LORA["targets"]), rank=LORA["rank"], alpha=LORA["alpha"])
    if adapter_dir is None:  # first call: make the shared non-zero adapter
        fill_trainable(model, seed=2, scale=0.05)
        save_adapter(model, grad_dir, LORA, model_cfg)
        return None
    load_adapter(model, adapter_dir, model_cfg)
    samples = _samples()
    lengths = [sample_positions(s) for s in samples]
    if packed:
        bins = pack(lengths, BIN)
        assert len(bins) < len(samples)
        batch = collate_packed([[samples[i] for i in b] for b in bins], pad_id=0, seq_length=BIN)
        if packed == "arange":  # what megatron's own RoPE would use: positions 0..s-1 per row
            batch["position_ids"] = torch.arange(BIN).expand(len(bins), BIN).clone()
        if packed == "nomask":  # plain causal attention: samples of a row see each other
            del batch["attention_mask"]
        # (row, start, length) of every sample
        where = {}
        for r, b in enumerate(bins):
            at = 0
            for i in b:
                where[i] = (r, at, lengths[i])
                at += lengths[i]
    else:
        batch = collate(samples, pad_id=0, seq_length=BIN)
        where = {i: (i, 0, n) for i, n in enumerate(lengths)}
    ddp = wrap_ddp(model)
    with torch.no_grad():
        per_token = model(batch["tokens"], batch["position_ids"], batch.get("attention_mask"),
                          labels=batch["labels"]).float() * batch["loss_mask"]
    per_sample = [per_token[r, at:at + n].sum().item() for r, at, n in (where[i] for i in range(len(samples)))]
    loss, n_targets = forward_backward(ddp, [batch])
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(p.main_grad)
    save_adapter(model, grad_dir, LORA, model_cfg)
    return per_sample, loss, n_targets


def _load(path):
    from safetensors.torch import load_file

    return load_file(os.path.join(path, "adapter.safetensors"))


@pytest.fixture(scope="module")
def unpacked(tmp_path_factory):
    from tests.hf_models import tiny_llama

    root = tmp_path_factory.mktemp("packing")
    tiny_llama(0, **SHAPE).save_pretrained(root / "hf")
    run_distributed(_worker, 1, 1, False, False, str(root / "hf"), None, str(root / "adapter"), timeout=120)
    (per_sample, loss, n), = run_distributed(_worker, 1, 1, False, False, str(root / "hf"), str(root / "adapter"),
                                             str(root / "grads_unpacked"), timeout=120)
    return root, per_sample, loss, n, _load(root / "grads_unpacked")


@pytest.mark.timeout(200)
@pytest.mark.parametrize("tp,sp,world", [(1, False, 1), (2, True, 2)], ids=["tp1", "tp2-sp"])
def test_packed_matches_unpacked(unpacked, tp, sp, world):
    root, ref_per_sample, ref_loss, ref_n, ref_grads = unpacked
    grad_dir = root / f"grads_packed_tp{tp}"
    results = run_distributed(_worker, world, tp, sp, True, str(root / "hf"), str(root / "adapter"), str(grad_dir),
                              timeout=180)
    assert ref_n == sum(s.num_targets - s.loss_mask[0] for s in _samples())
    for per_sample, loss, n in results:
        assert n == ref_n
        # packing reorders the softmax and loss sums: the rounding of reordered fp32 sums (tests/tolerances.py)
        torch.testing.assert_close(torch.tensor(per_sample), torch.tensor(ref_per_sample), atol=0, rtol=FORWARD_REL)
        assert loss == pytest.approx(ref_loss, rel=FORWARD_REL, abs=0)
    grads = _load(grad_dir)
    assert grads.keys() == ref_grads.keys()
    assert any(g.abs().sum() > 0 for k, g in ref_grads.items() if "lora_A" in k)
    for k, ref in ref_grads.items():
        torch.testing.assert_close(grads[k], ref, atol=GRAD_REL * ref.abs().max().item(), rtol=0,
                                   msg=lambda m: f"{k}: {m}")


@pytest.mark.timeout(120)
def test_what_the_mask_and_positions_do(unpacked):
    """Non-vacuity: without the block-diagonal mask packed losses are far off. With positions 0..s-1 per
    row (what megatron's own RoPE uses: it ignores position_ids) they differ only by rounding, because
    RoPE scores depend on position *differences* only, which the mask keeps within one sample; per-sample
    position_ids make the rotary angles identical to the unpacked run's instead of relying on that."""
    root, ref_per_sample, *_ = unpacked
    ref = torch.tensor(ref_per_sample)
    (no_mask, _, _), = run_distributed(_worker, 1, 1, False, "nomask", str(root / "hf"), str(root / "adapter"),
                                       str(root / "grads_nomask"), timeout=120)
    assert (torch.tensor(no_mask) - ref).abs().max() > 1e-2
    (arange, _, _), = run_distributed(_worker, 1, 1, False, "arange", str(root / "hf"), str(root / "adapter"),
                                      str(root / "grads_arange"), timeout=120)
    torch.testing.assert_close(torch.tensor(arange), ref, atol=1e-4, rtol=1e-5)


def test_rope_from_arange_positions_is_megatrons():
    """With positions 0..s-1 the per-row RoPE is bitwise megatron's (its get_emb, broadcast over rows)."""
    import types

    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding

    from framework.models.gpt import rope_from_position_ids

    rope = types.SimpleNamespace(inv_freq=1.0 / (10000 ** (torch.arange(0, 16, 2).float() / 16)),
                                 seq_len_interpolation_factor=None, rotary_interleaved=False)
    freqs = RotaryEmbedding.get_freqs_non_repeated(rope, 12)  # megatron's own arithmetic (get_emb minus .cuda())
    ref = torch.cat((freqs, freqs), dim=-1)[:, None, None, :]
    ours = rope_from_position_ids(rope, torch.arange(12).expand(3, 12))
    assert ours.shape == (12, 3, 1, 16)
    assert torch.equal(ours, ref.expand(12, 3, 1, 16))


# ---- (d) a packed fine-tuning job -------------------------------------------------------------------------

@pytest.mark.timeout(200)
def test_packed_job_learns(tmp_path, tiny_tokenizer_dir, tmp_path_factory):
    from tests.sft_jobs import ROOT, run_sft, tiny_job

    hf = save_tiny_job_llama(tmp_path_factory.mktemp("tiny_hf_packing"))
    cfg = tiny_job(hf, tiny_tokenizer_dir, tmp_path, "data.packing=true", "data.max_length=256",
                   "trainer.global_batch_size=2")
    losses, before, after, _ = run_distributed(run_sft, 1, cfg, timeout=180)[0]
    assert len(losses) == 3
    os.chdir(ROOT)
    from framework.data.packing import sample_positions
    from framework.training.sft import prepare_inputs

    train_set = prepare_inputs(cfg, 1)[2]
    lengths = [sample_positions(s) for s in train_set]
    bins = pack(lengths, 256)
    assert len(bins) < len(train_set)  # some rows really hold several samples
    print(f"packing: {len(train_set)} samples -> {len(bins)} bins, efficiency "
          f"{packing_efficiency(bins, lengths, 256):.3f}")
    assert after < before, (before, after)
