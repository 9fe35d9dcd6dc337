"""Hugging Face GPTBigCode (StarCoder, SantaCoder) <-> our GPTModel: GPT-2 with multi-query attention.

Config as GPT-2 (framework/models/families/gpt2.py), plus ``multi_query`` -> ``num_query_groups`` (1 KV
head when true, one per query head when false); the default activation is ``gelu_pytorch_tanh``.

Weights as GPT-2's but ``nn.Linear`` ([out, in], no transposes). ``c_attn`` needs no reordering: with
``multi_query`` its rows are [q (n heads); k; v] (one KV head), which is megatron's fused layout with one
query group; without, HF views them per head as [q_h; k_h; v_h], megatron's layout with n groups. So
``c_attn`` is sharded like any column-parallel weight. At TP > 1 the multi-query KV head is replicated on
every rank (framework/models/kv_replication.py).
"""

from __future__ import annotations

from framework.models.config import ModelConfig
from framework.models.families import gpt2, llama

HF_MODEL_TYPES = ("gpt_bigcode",)


def config_from_hf(hf: dict) -> ModelConfig:
    llama.check_model_type(hf, HF_MODEL_TYPES, "gpt_bigcode")
    multi_query = bool(hf.get("multi_query", True))
    cfg = gpt2.gpt2_like_config(hf, "gpt_bigcode", "gelu_pytorch_tanh")
    if multi_query:
        cfg.num_query_groups = 1
    return cfg


def hf_config(cfg: ModelConfig, dtype: str = "float32") -> dict:
    if cfg.num_query_groups not in (1, cfg.num_attention_heads):
        raise ValueError(f"gpt_bigcode has multi-query (1 KV head) or multi-head attention; "
                         f"num_query_groups={cfg.num_query_groups} with {cfg.num_attention_heads} heads is neither")
    return {**gpt2.gpt2_like_hf_config(cfg, dtype, "GPTBigCodeForCausalLM", "gpt_bigcode", "gelu_pytorch_tanh"),
            "multi_query": cfg.num_query_groups == 1, "attention_softmax_in_fp32": True,
            "scale_attention_softmax_in_fp32": True}


def hf_shapes(cfg: ModelConfig) -> dict:
    return gpt2.gpt2_like_shapes(cfg, conv1d=False)


WEIGHTS = gpt2.gpt2_like_table("column", "column", "column", "row")
IGNORED = gpt2.IGNORED
BASE_MODEL_PREFIX = gpt2.BASE_MODEL_PREFIX
# c_attn is already in megatron's order: its LoRA B rows shard like the weight ("column")
PEFT = gpt2.gpt2_like_peft("column", fan_in_fan_out=False)
