"""Falcon (parallel attention/MLP block, multi-query or grouped attention, RoPE, LayerNorm, GELU): logits
equal transformers' at TP=1, TP=2+SP (multi-query: the KV head replicated), PP=2 (3 layers) for every layer
shape (Falcon-7B: one shared norm, MQA; new architecture: ln_attn/ln_mlp or one norm, GQA; sequential);
HF -> ours -> HF bitwise; alibi and other unsupported values refused by key; LoRA equals HF PEFT forward
and backward through the parallel block at TP=2+SP."""

from __future__ import annotations

import pytest

from tests.family_cases import check_parity, check_roundtrip, randomized, save_cases


def _config(**kw):
    from transformers import FalconConfig

    return FalconConfig(**{**dict(vocab_size=256, hidden_size=64, max_position_embeddings=64, num_hidden_layers=3,
                                  num_attention_heads=4), **kw})


def _falcon(seed: int, **kw):
    import torch
    from transformers import FalconForCausalLM

    torch.manual_seed(seed)
    return randomized(FalconForCausalLM(_config(**kw)), seed)


@pytest.fixture(scope="module")
def cases(tmp_path_factory):
    models = {
        "mqa_7b_style": _falcon(0),                              # parallel block, one norm, 1 KV head, tied
        "gqa_8x2_two_norms_bias": _falcon(1, new_decoder_architecture=True, num_attention_heads=8, num_kv_heads=2,
                                          bias=True, tie_word_embeddings=False),       # Falcon-40B style
        "gqa_4x2_one_norm": _falcon(2, new_decoder_architecture=True, num_kv_heads=2, num_ln_in_parallel_attn=1,
                                    num_hidden_layers=2, ffn_hidden_size=96, activation="gelu_pytorch_tanh"),
        "mha_sequential_bias": _falcon(3, multi_query=False, parallel_attn=False, bias=True, num_hidden_layers=2),
    }
    return save_cases(tmp_path_factory.mktemp("falcon"), models, shard_one="gqa_8x2_two_norms_bias")


@pytest.mark.timeout(300)
@pytest.mark.parametrize("tp,pp,sp", [(1, 1, False), (2, 1, True), (1, 2, False)], ids=["tp1", "tp2-sp", "pp2"])
def test_falcon_logits_match_transformers(cases, tp, pp, sp):
    check_parity(cases, tp, pp, sp)  # multi-query at TP=2: the KV head replicated (framework/models/kv_replication.py)


@pytest.mark.timeout(300)
def test_falcon_roundtrip_is_bitwise(cases, tmp_path):
    check_roundtrip(cases, tmp_path)


@pytest.mark.parametrize("change,key", [
    ({"alibi": True}, "alibi"),
    ({"new_decoder_architecture": True, "parallel_attn": False}, "parallel_attn"),
    ({"num_ln_in_parallel_attn": 2}, "num_ln_in_parallel_attn"),
    ({"activation": "silu"}, "activation"),
])
def test_falcon_unsupported_config_is_refused_by_key(change, key):
    from framework.models.registry import config_from_hf

    with pytest.raises(ValueError, match=key):
        config_from_hf({**_config().to_dict(), **change})


# our module -> (Falcon module, transform of LoRA A, of LoRA B): query_key_value is megatron's fused layout
FALCON_LORA = {
    "self_attention.linear_qkv": ("self_attention.query_key_value", "replicate", "column"),
    "self_attention.linear_proj": ("self_attention.dense", "row", "replicate"),
    "mlp.linear_fc1": ("mlp.dense_h_to_4h", "replicate", "column"),
    "mlp.linear_fc2": ("mlp.dense_4h_to_h", "row", "replicate"),
}


@pytest.mark.timeout(300)
def test_falcon_lora_matches_hf_peft_at_tp2_sp(cases):
    from tests.family_lora import check_lora_against_peft

    hf_dir = dict((name, d) for name, d, *_ in cases)["gqa_8x2_two_norms_bias"]
    check_lora_against_peft(hf_dir, ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"],
                            "transformer.h.{i}.", FALCON_LORA, tp=2, sp=True)


def _falcon_job(hf_dir, tokenizer_dir, out, *overrides):
    """The fine-tuning job (LoRA on qkv/proj/fc1/fc2) on the tiny Falcon in ``hf_dir``; model.arch is the
    checkpoint's own (the job checks it against config.json)."""
    import json
    from pathlib import Path

    from omegaconf import OmegaConf

    from framework.models.registry import config_from_hf
    from tests.sft_jobs import compose

    cfg = compose(["model=tiny_llama", "model.source=hf", f"model.path={hf_dir}", f"model.tokenizer={tokenizer_dir}",
                   "data.max_length=64", "trainer.max_steps=2", "trainer.global_batch_size=4",
                   "trainer.micro_batch_size=1", "trainer.eval_samples=4", "trainer.eval_interval=100",
                   "trainer.lr=5e-3", "generate.max_new_tokens=0", f"output_dir={out}", *overrides])
    arch = config_from_hf(json.loads(Path(hf_dir, "config.json").read_text())).to_dict()
    OmegaConf.set_struct(cfg, False)
    cfg.model.arch = OmegaConf.create(arch)
    return cfg


@pytest.mark.timeout(400)
def test_falcon_job_tp2_sp_matches_single_process(tiny_tokenizer_dir, tmp_path):
    """The training job on a Falcon-40B style model (parallel block, ln_attn/ln_mlp, GQA, biases): TP=2 with
    sequence parallelism gives the single process's losses."""
    from launch.spawn import run_distributed
    from tests.sft_jobs import run_sft

    hf_dir = tmp_path / "hf"
    _falcon(4, vocab_size=512, max_position_embeddings=1024, new_decoder_architecture=True, num_attention_heads=8,
            num_kv_heads=2, bias=True).save_pretrained(hf_dir)
    single = run_distributed(run_sft, 1, _falcon_job(hf_dir, tiny_tokenizer_dir, tmp_path / "single"), timeout=300)[0]
    tp2 = run_distributed(run_sft, 2, _falcon_job(hf_dir, tiny_tokenizer_dir, tmp_path / "tp2", "parallel.tensor=2",
                                                   "parallel.sequence=true"), timeout=300)[0]
    (losses, before, after, _), (ref_losses, ref_before, ref_after, _) = tp2, single
    assert before == pytest.approx(ref_before, rel=1e-5)
    assert losses == pytest.approx(ref_losses, rel=1e-5)
    assert after == pytest.approx(ref_after, rel=1e-5)
    assert after < before
