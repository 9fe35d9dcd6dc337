"""Gemma (scaled embeddings, GeGLU, (1+w) RMSNorm in fp32, tied embeddings, head_dim != hidden/heads):
logits equal transformers' at TP=1, TP=2+SP, PP=2; HF -> ours -> HF bitwise; bad configs are refused by key;
the fine-tuning job trains it."""

from __future__ import annotations

import json

import pytest
import torch

from tests.family_cases import check_parity, check_roundtrip, logits_of, randomized, save_cases, tokens_for


def _gemma(seed: int, **shape):
    from transformers import GemmaConfig, GemmaForCausalLM

    # head_dim 32 with hidden 64: kv_channels != hidden / heads, as in the released models (256 vs 2048/8).
    cfg = GemmaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, max_position_embeddings=128,
                      head_dim=32, **shape)
    torch.manual_seed(seed)
    return randomized(GemmaForCausalLM(cfg), seed)


@pytest.fixture(scope="module")
def models():
    return {
        # gemma-2b-like: multi-query (one KV head), tied, 3 layers (uneven PP=2 split)
        "mqa_4x1_tied": _gemma(0, num_attention_heads=4, num_key_value_heads=1, num_hidden_layers=3),
        # gemma-7b-like: multi-head attention
        "mha_4x4": _gemma(1, num_attention_heads=4, num_key_value_heads=4, num_hidden_layers=2, rope_theta=1e4),
        # untied output layer and GQA 2 query heads per KV head
        "gqa_4x2_untied": _gemma(2, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2,
                                 tie_word_embeddings=False),
    }


@pytest.fixture(scope="module")
def cases(models, tmp_path_factory):
    return save_cases(tmp_path_factory.mktemp("gemma"), models, shard_one="mqa_4x1_tied")


def test_gemma_config():
    """What the HF config implies: sqrt(hidden) embedding scale, GeGLU, zero-centred norm, head_dim, ties."""
    from framework.models.families import gemma
    from framework.models.registry import config_from_hf

    hf = _gemma(0, num_attention_heads=4, num_key_value_heads=1, num_hidden_layers=1).config.to_dict()
    cfg = config_from_hf(hf)
    assert (cfg.family, cfg.kv_channels, cfg.num_query_groups, cfg.activation) == ("gemma", 32, 1, "gelu_tanh")
    assert cfg.embedding_multiplier == 8.0 and cfg.zero_centered_gamma and cfg.tie_word_embeddings
    assert cfg.gated_linear_unit and cfg.norm_eps == 1e-6
    assert config_from_hf(gemma.hf_config(cfg)) == cfg
    # The released config.json files say hidden_act "gelu": transformers runs the tanh approximation.
    assert config_from_hf({**hf, "hidden_act": "gelu"}).activation == "gelu_tanh"


def test_norm_and_embedding_scale_are_transformers(models):
    """Our RMSNorm with zero_centered_gamma is HF's GemmaRMSNorm bitwise (fp32 and bf16 input), and the
    embedding multiplier is HF's scale in the hidden dtype (bf16: sqrt(3072) -> 55.5)."""
    import types

    from transformers.models.gemma.modeling_gemma import GemmaRMSNorm, GemmaTextScaledWordEmbedding

    from framework.models.gpt import scale_embeddings
    from framework.models.norms import RMSNorm

    ref = GemmaRMSNorm(64, eps=1e-6)
    with torch.no_grad():
        ref.weight.uniform_(-0.3, 0.3)
    ours = RMSNorm(types.SimpleNamespace(layernorm_zero_centered_gamma=True, params_dtype=torch.float32,
                                         sequence_parallel=False), 64, eps=1e-6)
    with torch.no_grad():
        ours.weight.copy_(ref.weight)
    x = torch.randn(3, 5, 64, generator=torch.Generator().manual_seed(0)) * 3
    for dtype in (torch.float32, torch.bfloat16):
        assert torch.equal(ours(x.to(dtype)), ref(x.to(dtype))), dtype
    for hidden, dtype in ((3072, torch.bfloat16), (64, torch.float32), (2048, torch.float32)):
        emb = GemmaTextScaledWordEmbedding(10, hidden, 0, embed_scale=hidden ** 0.5).to(dtype)
        plain = torch.nn.Embedding(10, hidden).to(dtype)
        plain.weight.data.copy_(emb.weight.data)
        scale_embeddings(plain, float(hidden) ** 0.5)
        ids = torch.arange(10)[None]
        assert torch.equal(plain(ids), emb(ids)), (hidden, dtype)


def test_embedding_scale_matters(models):
    """Non-vacuity: without the embedding scale HF's logits move far beyond the tolerance, so the parity test
    below checks it (the (1 + w) norm is checked the same way by the randomised norm weights around 0)."""
    model = models["mqa_4x1_tied"]
    tokens = tokens_for(256)
    ref = logits_of(model, tokens)
    embed = model.model.embed_tokens
    scale = embed.embed_scale.clone()
    embed.embed_scale.fill_(1.0)
    try:
        no_scale = logits_of(model, tokens)
    finally:
        embed.embed_scale.copy_(scale)
    assert (no_scale - ref).abs().max() > 1e-2


def test_geglu_activation_is_transformers():
    """With tiny random weights the gate values are small, where tanh-GELU and erf-GELU agree to ~1e-7, so
    logit parity cannot tell them apart; the activation itself is checked here: bitwise HF's
    gelu_pytorch_tanh, and measurably not the exact GELU."""
    import torch.nn.functional as F
    from transformers.activations import ACT2FN

    from framework.models.gpt import activation

    x = torch.linspace(-6, 6, 2001)
    assert torch.equal(activation("gelu_tanh")(x), ACT2FN["gelu_pytorch_tanh"](x))
    assert (activation("gelu_tanh")(x) - F.gelu(x)).abs().max() > 1e-4


@pytest.mark.timeout(300)
@pytest.mark.parametrize("tp,pp,sp", [(1, 1, False), (2, 1, True), (1, 2, False)], ids=["tp1", "tp2-sp", "pp2"])
def test_gemma_logits_match_transformers(cases, tp, pp, sp):
    check_parity(cases, tp, pp, sp)


@pytest.mark.timeout(300)
def test_gemma_roundtrip_is_bitwise(cases, tmp_path):
    check_roundtrip(cases, tmp_path)
    back = json.loads((tmp_path / "mqa_4x1_tied-back" / "config.json").read_text())
    assert back["model_type"] == "gemma" and back["head_dim"] == 32 and back["tie_word_embeddings"] is True


def _hf_dict(**over):
    base = {"model_type": "gemma", "vocab_size": 256, "hidden_size": 64, "intermediate_size": 128,
            "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 1, "head_dim": 32}
    return {**base, **over}


@pytest.mark.parametrize("over,match", [
    ({"hidden_act": "silu"}, "hidden_act='silu'"),
    ({"hidden_activation": "gelu_new"}, "hidden_activation='gelu_new'"),
    ({"attention_bias": True}, "attention_bias"),
    ({"rope_parameters": {"rope_type": "dynamic", "factor": 2.0}}, r"rope_parameters.rope_type='dynamic'"),
    ({"model_type": "gemma2"}, "model_type='gemma2'"),
])
def test_bad_gemma_config_names_the_key(over, match):
    from framework.models.families import gemma

    with pytest.raises(ValueError, match=match):
        gemma.config_from_hf(_hf_dict(**over))


def test_gemma2_is_not_taken_for_gemma():
    from framework.runtime.errors import ConfigError
    from framework.models.registry import config_from_hf

    with pytest.raises(ConfigError, match="model_type='gemma2' is not supported"):
        config_from_hf(_hf_dict(model_type="gemma2"))


@pytest.mark.timeout(300)
def test_job_trains_gemma(tmp_path, tmp_path_factory, tiny_tokenizer_dir):
    """The job loads a Gemma checkpoint (arch declared in the job config) and trains LoRA on it."""
    from transformers import GemmaConfig, GemmaForCausalLM

    from tests.family_models import TINY_JOB_SHAPE, job_learns

    torch.manual_seed(0)
    model = GemmaForCausalLM(GemmaConfig(**TINY_JOB_SHAPE, tie_word_embeddings=True))
    job_learns(model, tmp_path_factory.mktemp("tiny_gemma"), tmp_path, tiny_tokenizer_dir,
               "model.arch.family=gemma", "model.arch.tie_word_embeddings=true", "+model.arch.activation=gelu_tanh",
               "+model.arch.zero_centered_gamma=true", "+model.arch.embedding_multiplier=8.0")
