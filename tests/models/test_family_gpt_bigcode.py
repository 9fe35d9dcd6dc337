"""StarCoder (gpt_bigcode: GPT-2 with multi-query attention and nn.Linear weights): logits equal
transformers' at TP=1, TP=2+SP (multi-query: the KV head replicated on both ranks), PP=2 (3 layers);
HF -> ours -> HF bitwise; unsupported config values refused by key."""

from __future__ import annotations

import pytest

from tests.family_cases import check_parity, check_roundtrip, randomized, save_cases


def _config(**kw):
    from transformers import GPTBigCodeConfig

    return GPTBigCodeConfig(vocab_size=256, n_embd=64, n_positions=64, n_layer=3, n_head=4, **kw)


def _bigcode(seed: int, **kw):
    import torch
    from transformers import GPTBigCodeForCausalLM

    torch.manual_seed(seed)
    return randomized(GPTBigCodeForCausalLM(_config(**kw)), seed)


@pytest.fixture(scope="module")
def cases(tmp_path_factory):
    models = {
        "mqa_tied": _bigcode(0),                                               # StarCoder: 4 query heads, 1 KV head
        "mha_untied": _bigcode(1, multi_query=False, tie_word_embeddings=False, n_inner=96),
    }
    return save_cases(tmp_path_factory.mktemp("gpt_bigcode"), models, shard_one="mqa_tied")


@pytest.mark.timeout(300)
@pytest.mark.parametrize("tp,pp,sp", [(1, 1, False), (2, 1, True), (1, 2, False)], ids=["tp1", "tp2-sp", "pp2"])
def test_gpt_bigcode_logits_match_transformers(cases, tp, pp, sp):
    check_parity(cases, tp, pp, sp)  # multi-query at TP=2: the KV head replicated (framework/models/kv_replication.py)


def test_gpt_bigcode_multi_query_takes_tp2_and_refuses_tp3_by_key():
    from framework.models.layout import LayoutError, check_layout
    from framework.models.registry import config_from_hf

    cfg = config_from_hf(_config().to_dict())
    assert cfg.num_query_groups == 1
    check_layout(cfg, tp=2, pp=1)
    check_layout(cfg, tp=4, pp=1)
    with pytest.raises(LayoutError, match=r"parallel\.tensor=3 does not divide the model's 4 query heads"):
        check_layout(cfg, tp=3, pp=1)


@pytest.mark.timeout(300)
def test_gpt_bigcode_roundtrip_is_bitwise(cases, tmp_path):
    check_roundtrip(cases, tmp_path)


@pytest.mark.parametrize("key,value", [("add_cross_attention", True), ("scale_attn_weights", False),
                                       ("activation_function", "silu")])
def test_gpt_bigcode_unsupported_config_is_refused_by_key(key, value):
    from framework.models.registry import config_from_hf

    with pytest.raises(ValueError, match=key):
        config_from_hf({**_config().to_dict(), key: value})
