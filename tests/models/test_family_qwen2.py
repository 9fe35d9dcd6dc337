"""Qwen2 (q/k/v biases): logits equal transformers' at TP=1, TP=2+SP, PP=2; HF -> ours -> HF bitwise."""

from __future__ import annotations

import pytest

from tests.family_cases import check_parity, check_roundtrip, randomized, save_cases


def _qwen2(seed: int, **shape):
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = Qwen2Config(vocab_size=256, hidden_size=64, intermediate_size=128, max_position_embeddings=128,
                      num_hidden_layers=3, **shape)
    torch.manual_seed(seed)
    return randomized(Qwen2ForCausalLM(cfg), seed)


@pytest.fixture(scope="module")
def cases(tmp_path_factory):
    models = {
        "gqa_4x2": _qwen2(0, num_attention_heads=4, num_key_value_heads=2),        # 2 query heads per KV head
        "gqa_8x2_tied": _qwen2(1, num_attention_heads=8, num_key_value_heads=2,    # 4 per KV head, tied
                               tie_word_embeddings=True, rope_theta=1e6),
    }
    return save_cases(tmp_path_factory.mktemp("qwen2"), models, shard_one="gqa_4x2")


@pytest.mark.timeout(300)
@pytest.mark.parametrize("tp,pp,sp", [(1, 1, False), (2, 1, True), (1, 2, False)], ids=["tp1", "tp2-sp", "pp2"])
def test_qwen2_logits_match_transformers(cases, tp, pp, sp):
    check_parity(cases, tp, pp, sp)


@pytest.mark.timeout(300)
def test_qwen2_roundtrip_is_bitwise(cases, tmp_path):
    check_roundtrip(cases, tmp_path)
