"""Mixtral (megatron-core MoE layers: router + SwiGLU experts, top-2 of 4): logits equal transformers' at
TP=1, TP=2+SP and PP=2 (odd layer count); HF -> ours -> HF bitwise."""

from __future__ import annotations

import pytest

from tests.family_cases import check_parity, check_roundtrip, randomized, save_cases


def _mixtral(seed: int, **shape):
    import torch
    from transformers import MixtralConfig, MixtralForCausalLM

    cfg = MixtralConfig(vocab_size=256, hidden_size=64, intermediate_size=96, max_position_embeddings=128,
                        num_local_experts=4, num_experts_per_tok=2, **shape)
    torch.manual_seed(seed)
    return randomized(MixtralForCausalLM(cfg), seed)


@pytest.fixture(scope="module")
def cases(tmp_path_factory):
    models = {
        "gqa_4x2_3layers": _mixtral(0, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=3),
        "mha_4x4_tied": _mixtral(1, num_attention_heads=4, num_key_value_heads=4, num_hidden_layers=2,
                                 tie_word_embeddings=True, rope_theta=1e6),
    }
    return save_cases(tmp_path_factory.mktemp("mixtral"), models, shard_one="gqa_4x2_3layers")


@pytest.mark.timeout(300)
@pytest.mark.parametrize("tp,pp,sp", [(1, 1, False), (2, 1, True), (1, 2, False)], ids=["tp1", "tp2-sp", "pp2"])
def test_mixtral_logits_match_transformers(cases, tp, pp, sp):
    check_parity(cases, tp, pp, sp)


@pytest.mark.timeout(300)
def test_mixtral_roundtrip_is_bitwise(cases, tmp_path):
    check_roundtrip(cases, tmp_path)


def test_mixtral_config_refuses_router_logits():
    from framework.models.families import mixtral

    hf = {"model_type": "mixtral", "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2,
          "num_attention_heads": 4, "vocab_size": 256, "num_local_experts": 4, "output_router_logits": True}
    with pytest.raises(ValueError, match="output_router_logits"):
        mixtral.config_from_hf(hf)
    with pytest.raises(ValueError, match="num_local_experts"):
        mixtral.config_from_hf({k: v for k, v in hf.items() if k != "num_local_experts"})
