"""Nemotron (LayerNorm1p, squared-ReLU MLP, partial RoPE, GQA): logits equal transformers' at TP=1, TP=2+SP,
PP=2 (3 layers); HF -> ours -> HF bitwise; unsupported values refused by key."""

from __future__ import annotations

import pytest

from tests.family_cases import check_parity, check_roundtrip, randomized, save_cases


def _config(**kw):
    from transformers import NemotronConfig

    shape = dict(vocab_size=256, hidden_size=64, intermediate_size=128, max_position_embeddings=64,
                 num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2)
    return NemotronConfig(**{**shape, **kw})


def _nemotron(seed: int, **kw):
    import torch
    from transformers import NemotronForCausalLM

    torch.manual_seed(seed)
    return randomized(NemotronForCausalLM(_config(**kw)), seed)


@pytest.fixture(scope="module")
def cases(tmp_path_factory):
    models = {
        "gqa_4x2_half_rotary": _nemotron(0),                                 # as released: partial_rotary 0.5
        "gqa_8x2_quarter_rotary_bias_tied": _nemotron(                      # 4 query heads per KV head
            1, num_attention_heads=8, partial_rotary_factor=0.25, attention_bias=True, mlp_bias=True,
            tie_word_embeddings=True),
        "mha_4x4_full_rotary": _nemotron(2, num_key_value_heads=4, num_hidden_layers=2, partial_rotary_factor=1.0),
    }
    return save_cases(tmp_path_factory.mktemp("nemotron"), models, shard_one="gqa_4x2_half_rotary")


@pytest.mark.timeout(300)
@pytest.mark.parametrize("tp,pp,sp", [(1, 1, False), (2, 1, True), (1, 2, False)], ids=["tp1", "tp2-sp", "pp2"])
def test_nemotron_logits_match_transformers(cases, tp, pp, sp):
    check_parity(cases, tp, pp, sp)


@pytest.mark.timeout(300)
def test_nemotron_roundtrip_is_bitwise(cases, tmp_path):
    check_roundtrip(cases, tmp_path)


@pytest.mark.parametrize("change,key", [
    ({"attention_bias": True}, "attention_bias"),  # without mlp_bias: megatron has one switch for all biases
    ({"hidden_act": "silu"}, "hidden_act"),
    ({"partial_rotary_factor": 0.0, "rope_parameters": None}, "partial_rotary_factor"),
])
def test_nemotron_unsupported_config_is_refused_by_key(change, key):
    from framework.models.registry import config_from_hf

    with pytest.raises(ValueError, match=key):
        config_from_hf({**_config().to_dict(), **change})
