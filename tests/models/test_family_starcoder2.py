"""Starcoder2 (GQA + RoPE, LayerNorm with bias, non-gated GELU MLP, use_bias, sliding window): logits equal
transformers' at TP=1, TP=2+SP, PP=2 (3 layers); HF -> ours -> HF bitwise; unsupported values refused by key."""

from __future__ import annotations

import pytest

from tests.family_cases import check_parity, check_roundtrip, randomized, save_cases


def _config(**kw):
    from transformers import Starcoder2Config

    shape = dict(vocab_size=256, hidden_size=64, intermediate_size=128, max_position_embeddings=64,
                 num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2)
    return Starcoder2Config(**{**shape, **kw})


def _starcoder2(seed: int, **kw):
    import torch
    from transformers import Starcoder2ForCausalLM

    torch.manual_seed(seed)
    return randomized(Starcoder2ForCausalLM(_config(**kw)), seed)


@pytest.fixture(scope="module")
def cases(tmp_path_factory):
    models = {
        "gqa_4x2_bias_tied": _starcoder2(0),                                         # 2 query heads per KV head
        "gqa_8x2_window8_untied": _starcoder2(1, num_attention_heads=8, use_bias=False,  # 4 per KV head; the
                                              tie_word_embeddings=False, sliding_window=8),  # 16 tokens > window
        "mha_4x4": _starcoder2(2, num_key_value_heads=4, num_hidden_layers=2,        # 1 per KV head
                               rope_parameters={"rope_type": "default", "rope_theta": 1e5}),
    }
    return save_cases(tmp_path_factory.mktemp("starcoder2"), models, shard_one="gqa_4x2_bias_tied")


@pytest.mark.timeout(300)
@pytest.mark.parametrize("tp,pp,sp", [(1, 1, False), (2, 1, True), (1, 2, False)], ids=["tp1", "tp2-sp", "pp2"])
def test_starcoder2_logits_match_transformers(cases, tp, pp, sp):
    check_parity(cases, tp, pp, sp)


@pytest.mark.timeout(300)
def test_starcoder2_roundtrip_is_bitwise(cases, tmp_path):
    check_roundtrip(cases, tmp_path)


@pytest.mark.parametrize("key,value", [("hidden_act", "silu"), ("sliding_window", 0),
                                       ("rope_parameters", {"rope_type": "yarn", "rope_theta": 1e4, "factor": 2.0})])
def test_starcoder2_unsupported_config_is_refused_by_key(key, value):
    from framework.models.registry import config_from_hf

    with pytest.raises(ValueError, match=key):
        config_from_hf({**_config().to_dict(), key: value})
