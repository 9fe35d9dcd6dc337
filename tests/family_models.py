"""Tiny random Hugging Face models of every decoder-only family, built the same way for every test.

``hf_config(family, **kw)`` is the family's transformers config at the tiny shape below (256 tokens, hidden
64; ``kw`` overrides any of it) and ``hf_model(family, seed, **kw)`` a model of it, seeded, in fp32 eval
mode, with norms and biases made non-trivial by tests/family_cases.randomized (initial ones and zeros
would let a misplaced tensor pass). Llama is tests/hf_models.tiny_llama. ``job_learns`` runs the tiny
fine-tuning job on such a model in another family (TINY_JOB_SHAPE: the tiny job model's shape).
"""

from __future__ import annotations

import torch

from launch.spawn import run_distributed
from tests.family_cases import randomized
from tests.hf_models import tiny_llama
from tests.sft_jobs import run_sft, tiny_job

# family -> (transformers config class, model class, the tiny shape)
TINY = {
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM",
              dict(vocab_size=256, hidden_size=64, intermediate_size=128, max_position_embeddings=128,
                   num_hidden_layers=3)),
    "mistral": ("MistralConfig", "MistralForCausalLM",
                dict(vocab_size=256, hidden_size=64, intermediate_size=128, max_position_embeddings=128,
                     num_hidden_layers=3, head_dim=16)),
    # head_dim 32 with hidden 64: kv_channels != hidden / heads, as in the released models (256 vs 2048/8).
    "gemma": ("GemmaConfig", "GemmaForCausalLM",
              dict(vocab_size=256, hidden_size=64, intermediate_size=128, max_position_embeddings=128,
                   head_dim=32)),
    "mixtral": ("MixtralConfig", "MixtralForCausalLM",
                dict(vocab_size=256, hidden_size=64, intermediate_size=96, max_position_embeddings=128,
                     num_local_experts=4, num_experts_per_tok=2)),
    "gpt2": ("GPT2Config", "GPT2LMHeadModel", dict(vocab_size=256, n_embd=64, n_positions=64, n_layer=3, n_head=4)),
    "gpt_bigcode": ("GPTBigCodeConfig", "GPTBigCodeForCausalLM",
                    dict(vocab_size=256, n_embd=64, n_positions=64, n_layer=3, n_head=4)),
    "starcoder2": ("Starcoder2Config", "Starcoder2ForCausalLM",
                   dict(vocab_size=256, hidden_size=64, intermediate_size=128, max_position_embeddings=64,
                        num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2)),
    "nemotron": ("NemotronConfig", "NemotronForCausalLM",
                 dict(vocab_size=256, hidden_size=64, intermediate_size=128, max_position_embeddings=64,
                      num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2)),
    "falcon": ("FalconConfig", "FalconForCausalLM",
               dict(vocab_size=256, hidden_size=64, max_position_embeddings=64, num_hidden_layers=3,
                    num_attention_heads=4)),
}


def hf_config(family: str, **kw):
    import transformers

    config_class, _model_class, shape = TINY[family]
    return getattr(transformers, config_class)(**{**shape, **kw})


def hf_model(family: str, seed: int, **kw):
    if family == "llama":
        return tiny_llama(seed, **kw)
    import transformers

    model_class = getattr(transformers, TINY[family][1])
    torch.manual_seed(seed)
    return randomized(model_class(hf_config(family, **kw)), seed)


# The tiny job model's shape (tests/hf_models.save_tiny_job_llama, conf/model/tiny_llama.yaml: the vocabulary
# fits the tiny test tokenizer), here in other families.
TINY_JOB_SHAPE = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=1024,
                      rms_norm_eps=1e-5, rope_theta=10000.0)


def job_learns(model, hf_dir, out, tokenizer_dir, *overrides):
    """Save ``model`` to ``hf_dir``, run the tiny fine-tuning job (3 LoRA steps) on it from that directory
    with ``overrides`` (the arch fields that differ from tiny_llama's), and check it learns."""
    model.save_pretrained(hf_dir)
    cfg = tiny_job(hf_dir, tokenizer_dir, out, *overrides)
    losses, before, after, _ = run_distributed(run_sft, 1, cfg, timeout=250)[0]
    assert len(losses) == 3 and all(torch.isfinite(torch.tensor(losses)))
    assert after < before, (before, after)
