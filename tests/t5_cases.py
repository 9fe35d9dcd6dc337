"""The T5 models the encoder-decoder tests share: our ModelConfig of the two T5 layouts (v1.0: ReLU, tied;
v1.1 / flan-t5: gated GELU, untied), a random HF T5 of such a config, the token ids, and a JSONL writer."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from framework.models.config import ModelConfig
from tests.family_cases import randomized

PAD, EOS = 0, 1          # T5's pad (= decoder start) and eos ids
TOKENIZER_PAD = 2  # tests/tokenizer_fixture.py: <pad> = 2, </s> = 1 = EOS

BASE = dict(family="t5", vocab_size=256, hidden_size=64, ffn_hidden_size=96, norm_eps=1e-6,
            normalization="RMSNorm", add_bias_linear=False, position_embedding_type="relative",
            relative_attention_num_buckets=8, relative_attention_max_distance=20)
VARIANTS = {
    # t5 v1.0: ReLU MLP, tied embeddings (decoder output scaled by d_model ** -0.5)
    "v1_0_tied_relu": dict(num_layers=3, num_decoder_layers=2, num_attention_heads=4, kv_channels=16,
                           activation="relu", gated_linear_unit=False, tie_word_embeddings=True),
    # t5 v1.1 / flan-t5: gated GELU (tanh), separate lm_head; heads x d_kv = 96 != d_model
    "v1_1_untied_gated": dict(num_layers=2, num_decoder_layers=3, num_attention_heads=4, kv_channels=24,
                              activation="gelu_tanh", gated_linear_unit=True, tie_word_embeddings=False),
}


def hf_t5(cfg: ModelConfig, seed: int, pad: int = PAD):
    """A random HF T5ForConditionalGeneration of ``cfg`` (dropout off, pad = decoder start = ``pad``)."""
    from transformers import T5Config, T5ForConditionalGeneration

    from framework.models.families import t5

    hf = {**t5.hf_config(cfg), "dropout_rate": 0.0, "pad_token_id": pad, "decoder_start_token_id": pad,
          "eos_token_id": EOS}
    torch.manual_seed(seed)
    model = T5ForConditionalGeneration(T5Config(**hf))
    if not cfg.tie_word_embeddings:  # transformers 5 ties lm_head whatever the config says; v1.1 has its own
        model.lm_head.weight = torch.nn.Parameter(torch.randn(cfg.vocab_size, cfg.hidden_size) * 0.05)
    return randomized(model, seed)


def write_jsonl(path: Path, records) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path
