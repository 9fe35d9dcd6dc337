"""GPT-2 (learned positions, LayerNorm, GELU, Conv1D weights, packed c_attn, tied lm_head): logits equal
transformers' at TP=1, TP=2+SP, PP=2 (3 layers: uneven stages); HF -> ours -> HF bitwise; unsupported
config values refused by key; LoRA equals HF PEFT forward and backward at TP=2+SP."""

from __future__ import annotations

import pytest

from tests.family_cases import check_parity, check_roundtrip, randomized, save_cases


def _config(**kw):
    from transformers import GPT2Config

    return GPT2Config(vocab_size=256, n_embd=64, n_positions=64, n_layer=3, n_head=4, **kw)


def _gpt2(seed: int, **kw):
    import torch
    from transformers import GPT2LMHeadModel

    torch.manual_seed(seed)
    return randomized(GPT2LMHeadModel(_config(**kw)), seed)


@pytest.fixture(scope="module")
def cases(tmp_path_factory):
    models = {
        "tied_gelu_new": _gpt2(0),                                              # GPT-2 as released
        "untied_gelu_inner96": _gpt2(1, tie_word_embeddings=False, activation_function="gelu", n_inner=96),
    }
    return save_cases(tmp_path_factory.mktemp("gpt2"), models, shard_one="tied_gelu_new")


@pytest.mark.timeout(300)
@pytest.mark.parametrize("tp,pp,sp", [(1, 1, False), (2, 1, True), (1, 2, False)], ids=["tp1", "tp2-sp", "pp2"])
def test_gpt2_logits_match_transformers(cases, tp, pp, sp):
    check_parity(cases, tp, pp, sp)


@pytest.mark.timeout(300)
def test_gpt2_roundtrip_is_bitwise(cases, tmp_path):
    check_roundtrip(cases, tmp_path)


@pytest.mark.parametrize("key,value", [("scale_attn_by_inverse_layer_idx", True), ("add_cross_attention", True),
                                       ("scale_attn_weights", False), ("activation_function", "quick_gelu")])
def test_gpt2_unsupported_config_is_refused_by_key(key, value):
    from framework.models.registry import config_from_hf

    with pytest.raises(ValueError, match=key):
        config_from_hf({**_config().to_dict(), key: value})


# our module -> (GPT-2 module, transform of LoRA A, of LoRA B); Conv1D or not, PEFT's A is [r, in], B [out, r]
GPT2_LORA = {
    "self_attention.linear_qkv": ("attn.c_attn", "replicate", "qkv_packed"),
    "self_attention.linear_proj": ("attn.c_proj", "row", "replicate"),
    "mlp.linear_fc1": ("mlp.c_fc", "replicate", "column"),
    "mlp.linear_fc2": ("mlp.c_proj", "row", "replicate"),
}


@pytest.mark.timeout(300)
def test_gpt2_lora_matches_hf_peft_at_tp2_sp(cases):
    from tests.family_lora import check_lora_against_peft

    hf_dir = dict((name, d) for name, d, *_ in cases)["untied_gelu_inner96"]
    check_lora_against_peft(hf_dir, ["c_attn", "c_proj", "c_fc"], "transformer.h.{i}.", GPT2_LORA, tp=2, sp=True,
                            fan_in_fan_out=True)
