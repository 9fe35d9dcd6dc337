"""Hugging Face Mixtral <-> our GPTModel with megatron-core MoE layers: a Llama whose MLP is a router
over ``num_local_experts`` SwiGLU experts, ``num_experts_per_tok`` of them per token.

HF checkpoints keep the per-expert layout ``block_sparse_moe.experts.{e}.w1/w3/w2`` (gate, up, down;
transformers 5 fuses them in memory but writes this layout back on save) and the router
``block_sparse_moe.gate``. Ours: ``mlp.router.weight`` (replicated) and
``mlp.experts.local_experts.{e}.linear_fc1/linear_fc2`` (gate/up fused per TP rank, down row-parallel),
the routing settings in framework/models/gpt.py ``_moe_fields``. Mixtral's sliding window is null in the
released models; a set one is read into ``sliding_window``.
"""

from __future__ import annotations

from framework.models.config import ModelConfig
from framework.models import peft_names
from framework.models.families import llama
from framework.models.weight_table import WeightRule

HF_MODEL_TYPES = ("mixtral",)


def config_from_hf(hf: dict) -> ModelConfig:
    llama.check_model_type(hf, HF_MODEL_TYPES, "mixtral")
    llama.require(hf, ("num_local_experts",))
    act = hf.get("hidden_act", "silu")
    if act != "silu":
        raise ValueError(f"config.json: hidden_act={act!r} is not implemented; only 'silu' (SwiGLU) is")
    if hf.get("output_router_logits"):
        raise ValueError("config.json: output_router_logits=true (training with the router's auxiliary loss) is "
                         "not implemented; set it to false")
    return llama.llama_like_config(hf, "mixtral", num_experts=int(hf["num_local_experts"]),
                                   moe_router_topk=int(hf.get("num_experts_per_tok", 2)),
                                   sliding_window=hf.get("sliding_window") or None)


def hf_config(cfg: ModelConfig, dtype: str = "float32") -> dict:
    return {**llama.llama_like_hf_config(cfg, dtype, "MixtralForCausalLM", "mixtral"),
            "num_local_experts": cfg.num_experts, "num_experts_per_tok": cfg.moe_router_topk,
            "output_router_logits": False, "router_aux_loss_coef": 0.0, "sliding_window": cfg.sliding_window}


def _moe_shapes(cfg: ModelConfig, prefix: str) -> dict:
    h, f = cfg.hidden_size, cfg.ffn_hidden_size
    out = {prefix + "block_sparse_moe.gate.weight": (cfg.num_experts, h)}
    for e in range(cfg.num_experts):
        p = f"{prefix}block_sparse_moe.experts.{e}."
        out.update({p + "w1.weight": (f, h), p + "w2.weight": (h, f), p + "w3.weight": (f, h)})
    return out


def hf_shapes(cfg: ModelConfig) -> dict:
    return llama.hf_shapes(cfg, mlp_shapes=_moe_shapes)


_E = llama.L + "block_sparse_moe.experts.{e}."
_X = llama.D + "mlp.experts.local_experts.{e}."
MOE: tuple[WeightRule, ...] = (
    WeightRule((llama.L + "block_sparse_moe.gate.weight",), llama.D + "mlp.router.weight", "replicate"),
    WeightRule((_E + "w1.weight", _E + "w3.weight"), _X + "linear_fc1.weight", "gate_up"),
    WeightRule((_E + "w2.weight",), _X + "linear_fc2.weight", "row"),
)

WEIGHTS = llama.EMBEDDING_AND_HEAD[:1] + llama.ATTENTION + MOE + llama.EMBEDDING_AND_HEAD[1:]
IGNORED = llama.IGNORED

# HF PEFT names: attention and embedding/lm_head as Llama's. Our PEFT wraps a layer's dense linear_fc1 /
# linear_fc2 only; an MoE layer has none (megatron's experts.local_experts.{e}.linear_fc1/2 and the router are
# never wrapped), so LoRA/DoRA on fc1/fc2 and IA3 on fc2 have no Mixtral counterpart, nor do HF adapters on
# the experts (w1/w2/w3) or the router (gate).
_MOE = ("Mixtral's MLP is a mixture of experts: our PEFT methods wrap dense MLPs only (linear_fc1/linear_fc2), "
        "not the experts (block_sparse_moe.experts.{e}.w1/w2/w3) or the router; adapt qkv/proj (q/k/v/o_proj)")
PEFT = peft_names.llama_names(
    targets={t: m for t, m in llama.PEFT.targets.items() if t in ("qkv", "proj")}, plain_fc1=None,
    ia3={"k": "self_attn.k_proj", "v": "self_attn.v_proj"}, refused={"fc1": _MOE, "fc2": _MOE},
    unsupported={"w1": _MOE, "w2": _MOE, "w3": _MOE, "gate": _MOE, "block_sparse_moe": _MOE})
