"""Mistral (a Llama with sliding-window attention): logits equal transformers' at TP=1, TP=2+SP, PP=2 with a
window shorter than the sequence; the window applies per sample in packed rows; HF -> ours -> HF bitwise;
bad configs are refused by key; the fine-tuning job trains it with packing."""

from __future__ import annotations

import json

import pytest
import torch

from launch.spawn import run_distributed
from tests.family_cases import SEQ, TOL, check_parity, check_roundtrip, logits_of, randomized, save_cases

WINDOW = 5  # < SEQ, so the window changes the logits


def _mistral(seed: int, **shape):
    from transformers import MistralConfig, MistralForCausalLM

    cfg = MistralConfig(vocab_size=256, hidden_size=64, intermediate_size=128, max_position_embeddings=128,
                        num_hidden_layers=3, head_dim=16, **shape)
    torch.manual_seed(seed)
    return randomized(MistralForCausalLM(cfg), seed)


@pytest.fixture(scope="module")
def models():
    return {
        "gqa_4x2_w5": _mistral(0, num_attention_heads=4, num_key_value_heads=2, sliding_window=WINDOW),
        "gqa_8x2_w3_tied": _mistral(1, num_attention_heads=8, num_key_value_heads=2, sliding_window=3,
                                    tie_word_embeddings=True, rope_theta=1e6),
        "mqa_4x1_no_window": _mistral(2, num_attention_heads=4, num_key_value_heads=1, sliding_window=None),
    }


@pytest.fixture(scope="module")
def cases(models, tmp_path_factory):
    return save_cases(tmp_path_factory.mktemp("mistral"), models, shard_one="gqa_4x2_w5")


def test_the_window_matters(models):
    """Non-vacuity: the same weights without the window give clearly different logits at SEQ tokens, and the
    first WINDOW positions (which see the whole prefix either way) stay the same."""
    model = models["gqa_4x2_w5"]
    tokens = torch.randint(0, 256, (2, SEQ), generator=torch.Generator().manual_seed(0))
    windowed = logits_of(model, tokens)
    model.config.sliding_window = None
    try:
        full = logits_of(model, tokens)
    finally:
        model.config.sliding_window = WINDOW
    assert (windowed - full)[:, WINDOW:].abs().max() > 1e-2
    assert (windowed - full)[:, :WINDOW].abs().max() < 1e-5


def test_window_mask_is_transformers():
    """Our band (attention.window_allowed with Mistral's (w - 1, 0)) is transformers' sliding-window causal
    mask function, including the off-by-one (the query counts in the window), also with a KV-cache offset."""
    from transformers.masking_utils import sliding_window_causal_mask_function

    from framework.models.attention import window_allowed

    fn = sliding_window_causal_mask_function(WINDOW)
    for sq, sk in ((SEQ, SEQ), (3, SEQ), (1, SEQ)):
        ours = window_allowed(sq, sk, WINDOW - 1, 0)
        zero = torch.tensor(0)
        ref = fn(zero, zero, torch.arange(sq)[:, None] + (sk - sq), torch.arange(sk)[None, :])
        assert torch.equal(ours, ref), (sq, sk)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("tp,pp,sp", [(1, 1, False), (2, 1, True), (1, 2, False)], ids=["tp1", "tp2-sp", "pp2"])
def test_mistral_logits_match_transformers(cases, tp, pp, sp):
    check_parity(cases, tp, pp, sp)


@pytest.mark.timeout(300)
def test_mistral_roundtrip_is_bitwise(cases, tmp_path):
    check_roundtrip(cases, tmp_path)
    back = json.loads((tmp_path / "gqa_4x2_w5-back" / "config.json").read_text())
    assert back["model_type"] == "mistral" and back["sliding_window"] == WINDOW


# ---- packed rows: the window applies within each sample ----------------------------------------------------

def _packed_worker(tp, sp, hf_dir, row):
    from framework.checkpoint.hf_import import load_hf_into_gpt
    from framework.models.vocab_parallel import gather_vocab_parallel
    from framework.models.registry import build_model, config_from_hf
    from framework.runtime.distributed import initialize

    initialize(tp=tp, pp=1, sp=sp)
    cfg = config_from_hf(json.loads(open(f"{hf_dir}/config.json").read()))
    model = build_model(cfg, tp=tp, pp=1, sp=sp)
    load_hf_into_gpt(model, hf_dir, cfg)
    model.eval()
    with torch.no_grad():
        return gather_vocab_parallel(model(row["tokens"], row["position_ids"], row["attention_mask"])).float()


@pytest.mark.timeout(300)
@pytest.mark.parametrize("tp,sp", [(1, False), (2, True)], ids=["tp1", "tp2-sp"])
def test_window_applies_per_sample_in_packed_rows(models, cases, tp, sp):
    """Two samples (7 and 9 positions, both longer than the window) packed into one row of SEQ with the
    block-diagonal mask of framework/data/packing.py: each sample's logits equal transformers' on that
    sample alone."""
    from framework.data.packing import collate_packed
    from framework.data.sample import Sample

    name = "gqa_4x2_w5"
    hf_dir = next(c[1] for c in cases if c[0] == name)
    g = torch.Generator().manual_seed(5)
    a, b = (torch.randint(3, 256, (n,), generator=g).tolist() for n in (8, 10))
    row = collate_packed([[Sample(a, [1] * len(a)), Sample(b, [1] * len(b))]], pad_id=0, seq_length=SEQ)
    results = run_distributed(_packed_worker, tp, tp, sp, hf_dir, row, timeout=200)
    ref_a = logits_of(models[name], torch.tensor([a[:-1]]))[0]
    ref_b = logits_of(models[name], torch.tensor([b[:-1]]))[0]
    for logits in results:
        assert (logits[0, :7] - ref_a).abs().max() < TOL
        assert (logits[0, 7:16] - ref_b).abs().max() < TOL


# ---- bad configs ----------------------------------------------------------------------------------------------

def _hf_dict(**over):
    base = {"model_type": "mistral", "vocab_size": 256, "hidden_size": 64, "intermediate_size": 128,
            "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "sliding_window": 4}
    return {**base, **over}


@pytest.mark.parametrize("over,match", [
    ({"sliding_window": 0}, "sliding_window=0"),
    ({"sliding_window": "4096"}, "sliding_window='4096'"),
    ({"hidden_act": "gelu"}, "hidden_act='gelu'"),
    ({"layer_types": ["sliding_attention", "full_attention"]}, "layer_types"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, r"rope_scaling.rope_type='yarn'"),
])
def test_bad_mistral_config_names_the_key(over, match):
    from framework.models.registry import config_from_hf

    with pytest.raises(ValueError, match=match):
        config_from_hf(_hf_dict(**over))


def test_config_maps_window_and_back():
    from framework.models.families import mistral
    from framework.models.registry import config_from_hf

    cfg = config_from_hf(_hf_dict())
    assert cfg.family == "mistral" and cfg.sliding_window == 4 and cfg.num_query_groups == 2
    assert config_from_hf(mistral.hf_config(cfg)) == cfg
    assert config_from_hf(_hf_dict(sliding_window=None)).sliding_window is None


# ---- the fine-tuning job -------------------------------------------------------------------------------------

# The tiny job model's shape (tests/hf_models.save_tiny_job_llama, conf/model/tiny_llama.yaml: the vocabulary
# fits the tiny test tokenizer), here in other families.
TINY_JOB_SHAPE = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=1024,
                      rms_norm_eps=1e-5, rope_theta=10000.0)


def job_learns(model, hf_dir, out, tokenizer_dir, *overrides):
    """Save ``model`` to ``hf_dir``, run the tiny fine-tuning job (3 LoRA steps) on it from that directory
    with ``overrides`` (the arch fields that differ from tiny_llama's), and check it learns."""
    from tests.sft_jobs import run_sft, tiny_job

    model.save_pretrained(hf_dir)
    cfg = tiny_job(hf_dir, tokenizer_dir, out, *overrides)
    losses, before, after, _ = run_distributed(run_sft, 1, cfg, timeout=250)[0]
    assert len(losses) == 3 and all(torch.isfinite(torch.tensor(losses)))
    assert after < before, (before, after)


@pytest.mark.timeout(300)
def test_packed_job_trains_mistral(tmp_path, tmp_path_factory, tiny_tokenizer_dir):
    """The job loads a Mistral checkpoint whose window (5) is shorter than its packed rows and trains it."""
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(0)
    model = MistralForCausalLM(MistralConfig(**TINY_JOB_SHAPE, sliding_window=WINDOW))
    job_learns(model, tmp_path_factory.mktemp("tiny_mistral"), tmp_path, tiny_tokenizer_dir,
               "model.arch.family=mistral", f"+model.arch.sliding_window={WINDOW}", "data.packing=true",
               "data.max_length=128", "trainer.global_batch_size=2")
