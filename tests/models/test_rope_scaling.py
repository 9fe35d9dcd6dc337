"""Scaled RoPE (Llama 3.1's llama3, and linear): frequencies bitwise transformers', logits equal transformers'
at positions beyond original_max_position_embeddings at TP=1, TP=2+SP and PP=2, both config formats read,
HF -> ours -> HF keeps the scaling, unsupported types and bad parameters refused by key."""

from __future__ import annotations

import json

import pytest
import torch

from launch.spawn import run_distributed
from tests.family_cases import TOL, check_parity, check_roundtrip, logits_of, randomized, tokens_for

SEQ = 48  # > ORIGINAL: the scaled low frequencies matter
ORIGINAL = 32
# head_dim 16, theta 1e4: wavelengths 2 pi 10^(k/2) = 6.3, 19.9, 62.8, ... With L = 32, low 1, high 4, the first
# frequency is kept (6.3 < 32/4), the second smoothed (8 <= 19.9 <= 32), the rest divided by the factor.
LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": ORIGINAL, "rope_theta": 10000.0}
LINEAR = {"rope_type": "linear", "factor": 4.0, "rope_theta": 50000.0}


def _llama(seed: int, rope_parameters: dict, **shape):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, head_dim=16, max_position_embeddings=256,
                      num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                      rope_parameters=dict(rope_parameters), **shape)
    torch.manual_seed(seed)
    return randomized(LlamaForCausalLM(cfg), seed)


@pytest.fixture(scope="module")
def models():
    return {"llama3": _llama(0, LLAMA3), "linear_tied": _llama(1, LINEAR, tie_word_embeddings=True)}


@pytest.fixture(scope="module")
def cases(models, tmp_path_factory):
    root = tmp_path_factory.mktemp("rope_scaling")
    out = []
    for name, model in models.items():
        model.save_pretrained(root / name)
        tokens = tokens_for(256, seq=SEQ)
        out.append((name, str(root / name), tokens, logits_of(model, tokens)))
    return out


def _config_json(hf_dir) -> dict:
    from pathlib import Path

    return json.loads(Path(hf_dir, "config.json").read_text())


def test_frequencies_are_transformers_bitwise(cases, models):
    """rope.inv_freq of the ModelConfig read from config.json is HF's inv_freq, bit for bit, and it is
    really scaled (differs from the unscaled frequencies in the low band, equals them in the high band)."""
    from framework.models import rope
    from framework.models.registry import config_from_hf

    for name, hf_dir, _tokens, _logits in cases:
        cfg = config_from_hf(_config_json(hf_dir))
        ours = rope.inv_freq(cfg.kv_channels, cfg.rotary_percent, cfg.rotary_base, cfg.rope_scaling)
        ref = models[name].model.rotary_emb.inv_freq
        assert ours.dtype == ref.dtype == torch.float32 and torch.equal(ours, ref), name
        plain = rope.inv_freq(cfg.kv_channels, cfg.rotary_percent, cfg.rotary_base, None)
        assert not torch.equal(ours[-1], plain[-1]), name
    llama3 = config_from_hf(_config_json(cases[0][1]))
    assert llama3.rope_scaling == {k: v for k, v in LLAMA3.items() if k != "rope_theta"}


def test_scaling_matters_at_these_positions(models):
    """Non-vacuity: the same weights with unscaled RoPE give logits more than 10x the parity tolerance away
    from the scaled model's (tiny random weights attend almost uniformly, so the effect is small but clear)."""
    from transformers import LlamaForCausalLM

    for name, model in models.items():
        cfg = model.config.to_dict()
        cfg["rope_parameters"] = {"rope_type": "default", "rope_theta": cfg["rope_parameters"]["rope_theta"]}
        plain = LlamaForCausalLM(type(model.config).from_dict(cfg)).eval()
        plain.load_state_dict(model.state_dict())
        tokens = tokens_for(256, seq=SEQ)
        assert (logits_of(plain, tokens) - logits_of(model, tokens)).abs().max() > 10 * TOL, name


def _megatron_rope_worker(hf_dir):
    """megatron's own RoPE path (rotary_pos_emb(seq), used with a KV-cache inference context) after build."""
    from framework.models.gpt import build_gpt, rope_from_position_ids
    from framework.models.registry import config_from_hf
    from framework.runtime.distributed import initialize

    initialize(tp=1, pp=1)
    gpt = build_gpt(config_from_hf(_config_json(hf_dir)))
    own = gpt.rotary_pos_emb(SEQ)
    by_positions = rope_from_position_ids(gpt.rotary_pos_emb, torch.arange(SEQ)[None])
    return own, by_positions


@pytest.mark.timeout(120)
def test_megatrons_own_rope_path_is_scaled(cases, models):
    """The angles megatron computes itself (inference with a KV cache) and the ones from position_ids
    (training, packing) both equal position x HF's scaled inv_freq."""
    name, hf_dir = cases[0][0], cases[0][1]
    own, by_positions = run_distributed(_megatron_rope_worker, 1, hf_dir, timeout=100)[0]
    freqs = torch.outer(torch.arange(SEQ, dtype=torch.float32), models[name].model.rotary_emb.inv_freq)
    ref = torch.cat((freqs, freqs), dim=-1)[:, None, None, :]
    assert torch.equal(own.cpu(), ref) and torch.equal(by_positions.cpu(), ref)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("tp,pp,sp", [(1, 1, False), (2, 1, True), (1, 2, False)], ids=["tp1", "tp2-sp", "pp2"])
def test_scaled_rope_logits_match_transformers(cases, tp, pp, sp):
    check_parity(cases, tp, pp, sp)


@pytest.mark.timeout(300)
def test_scaled_rope_roundtrip(cases, tmp_path):
    """Bitwise tensors, and transformers gives the original logits from the exported config.json (so the
    scaling was written back)."""
    check_roundtrip(cases, tmp_path)
    back = _config_json(tmp_path / "llama3-back")
    assert back["rope_scaling"]["rope_type"] == "llama3"


# ---- config formats and refusals -------------------------------------------------------------------------

def _hf_dict(**over):
    base = {"model_type": "llama", "vocab_size": 256, "hidden_size": 64, "intermediate_size": 128,
            "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
            "max_position_embeddings": 256}
    return {**base, **over}


def test_old_and_new_config_formats_agree():
    """transformers 4 files (rope_scaling with 'type' or 'rope_type', rope_theta at the top level) and
    transformers 5 files (rope_parameters) give the same ModelConfig; llama3 without
    original_max_position_embeddings takes max_position_embeddings, as transformers does."""
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from framework.models import rope
    from framework.models.registry import config_from_hf

    params = {k: v for k, v in LLAMA3.items() if k != "rope_theta"}
    new = config_from_hf(_hf_dict(rope_parameters=LLAMA3))
    old = config_from_hf(_hf_dict(rope_theta=10000.0, rope_scaling=params))
    legacy = {k: v for k, v in params.items() if k != "rope_type"} | {"type": "llama3"}
    legacy = config_from_hf(_hf_dict(rope_theta=10000.0, rope_scaling=legacy))
    assert new == old == legacy and new.rope_scaling["factor"] == 8.0
    no_original = {k: v for k, v in params.items() if k != "original_max_position_embeddings"}
    for hf in (_hf_dict(rope_theta=5e5, rope_scaling=no_original),
               _hf_dict(rope_theta=5e5, rope_scaling=params, original_max_position_embeddings=64)):
        cfg = config_from_hf(hf)
        ref = LlamaConfig(**{k: v for k, v in hf.items() if k != "model_type"}, head_dim=16)
        ref_freq, _ = ROPE_INIT_FUNCTIONS["llama3"](ref)
        assert cfg.rope_scaling["original_max_position_embeddings"] == ref.rope_parameters[
            "original_max_position_embeddings"]
        assert torch.equal(rope.inv_freq(cfg.kv_channels, 1.0, cfg.rotary_base, cfg.rope_scaling), ref_freq)


@pytest.mark.parametrize("over,match", [
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, r"rope_scaling.rope_type='yarn' is not implemented"),
    ({"rope_parameters": {"rope_type": "dynamic", "factor": 2.0}}, r"rope_parameters.rope_type='dynamic'"),
    ({"rope_scaling": {"type": "longrope", "factor": 2.0}}, r"rope_type='longrope'"),
    ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "high_freq_factor": 4.0}}, r"missing \['low_freq_factor'\]"),
    ({"rope_scaling": {"rope_type": "linear", "factor": "4"}}, r"rope_scaling.factor='4' must be a positive number"),
    ({"rope_scaling": {"rope_type": "linear", "factor": 4.0, "beta_fast": 32}}, r"\['beta_fast'\] are not parameters"),
    ({"rope_scaling": {**LLAMA3, "low_freq_factor": 4.0}}, "high_freq_factor=4.0 must be greater"),
    ({"rope_scaling": "llama3"}, "rope_scaling must be a mapping"),
])
def test_bad_rope_config_names_the_key(over, match):
    from framework.models.registry import config_from_hf

    with pytest.raises(ValueError, match=match):
        config_from_hf(_hf_dict(**over))


def test_job_arch_rope_scaling_is_checked():
    """model.arch.rope_scaling in a job config goes through the same checks (ConfigError names the key)."""
    from omegaconf import OmegaConf

    from framework.runtime.errors import ConfigError
    from framework.checkpoint.model_checks import model_config

    cfg = OmegaConf.create({"model": {"arch": {"rope_scaling": {"rope_type": "yarn", "factor": 2.0}}}})
    with pytest.raises(ConfigError, match=r"model.arch: rope_scaling.rope_type='yarn'"):
        model_config(cfg)
    cfg = OmegaConf.create({"model": {"arch": {"rope_scaling": {"rope_type": "linear", "factor": 2}}}})
    assert model_config(cfg).rope_scaling == {"rope_type": "linear", "factor": 2.0}
