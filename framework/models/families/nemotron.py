"""Hugging Face Nemotron (Nemotron-4, Minitron) <-> our GPTModel.

Llama's names and GQA/RoPE attention with three differences, all config:

    LayerNorm1p    layer_norm(x) * (1 + w) + b, w stored zero-centred    -> LayerNorm, zero_centered_gamma
    MLP            down(relu(up x)^2), not gated (``hidden_act: relu2``)  -> activation squared_relu
    partial RoPE   the first ``partial_rotary_factor`` of each head's dims rotate (0.5 in the released
                   models, HF's default when the key is absent)         -> rotary_percent

Config keys otherwise as Llama's (framework/models/families/llama.py), with ``norm_eps`` for the
epsilon. ``partial_rotary_factor`` is read from ``rope_parameters`` (transformers 5) or the top level
(older files). Biases: ``attention_bias`` and ``mlp_bias`` (false in the released models) must agree,
since megatron has one switch for the biases of every linear layer; mixed values are refused by key.

Weights: Starcoder2's table (framework/models/families/starcoder2.py) with ``mlp.up_proj``/``mlp.down_proj``
for the MLP. The LayerNorm1p weights are stored as HF stores them (w, not 1 + w).
"""

from __future__ import annotations

from framework.models.config import ModelConfig
from framework.models.families import gpt2, llama, starcoder2
from framework.models.weight_table import WeightRule

HF_MODEL_TYPES = ("nemotron",)

ACTIVATIONS = {"relu2": "squared_relu", **gpt2.ACTIVATIONS}


def _partial_rotary(hf: dict) -> tuple[float, dict]:
    """(partial_rotary_factor, hf without it), so the RoPE reader sees only RoPE scaling parameters."""
    params = dict(hf.get("rope_parameters") or {})
    factor = params.pop("partial_rotary_factor", None)
    if factor is None:
        factor = hf.get("partial_rotary_factor", 0.5)
    if isinstance(factor, bool) or not isinstance(factor, (int, float)) or not 0 < factor <= 1:
        raise ValueError(f"config.json: partial_rotary_factor={factor!r} must be in (0, 1]")
    return float(factor), {**hf, "rope_parameters": params}


def config_from_hf(hf: dict) -> ModelConfig:
    llama.check_model_type(hf, HF_MODEL_TYPES, "nemotron")
    attention_bias, mlp_bias = bool(hf.get("attention_bias", False)), bool(hf.get("mlp_bias", False))
    if attention_bias != mlp_bias:
        raise ValueError(f"config.json: attention_bias={attention_bias} with mlp_bias={mlp_bias} is not "
                         f"implemented; biases are on every linear layer or on none")
    act = hf.get("hidden_act", "relu2")
    if act not in ACTIVATIONS:
        raise ValueError(f"config.json: hidden_act={act!r} is not implemented; supported: {sorted(ACTIVATIONS)}")
    factor, hf = _partial_rotary(hf)
    return llama.llama_like_config(
        hf, "nemotron",
        norm_eps=float(hf.get("norm_eps", 1e-5)),
        normalization="LayerNorm",
        zero_centered_gamma=True,
        activation=ACTIVATIONS[act],
        gated_linear_unit=False,
        add_bias_linear=attention_bias,
        rotary_percent=factor,
    )


def hf_config(cfg: ModelConfig, dtype: str = "float32") -> dict:
    out = llama.llama_like_hf_config(cfg, dtype, "NemotronForCausalLM", "nemotron")
    del out["rms_norm_eps"]
    act = "relu2" if cfg.activation == "squared_relu" else gpt2.activation_name(cfg, "gelu_pytorch_tanh")
    return {**out, "hidden_act": act, "norm_eps": cfg.norm_eps, "partial_rotary_factor": cfg.rotary_percent,
            "rope_parameters": {**out["rope_parameters"], "partial_rotary_factor": cfg.rotary_percent},
            "attention_bias": cfg.add_bias_linear, "mlp_bias": cfg.add_bias_linear}


def hf_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    return starcoder2.layernorm_llama_shapes(cfg, "mlp.up_proj", "mlp.down_proj")


def weights_for(cfg: ModelConfig) -> tuple[WeightRule, ...]:
    return starcoder2.layernorm_llama_table(cfg.add_bias_linear, "mlp.up_proj", "mlp.down_proj")


# Every rule (with biases); the registry takes a config's own from weights_for.
WEIGHTS = starcoder2.layernorm_llama_table(True, "mlp.up_proj", "mlp.down_proj")
IGNORED = llama.IGNORED
PEFT = starcoder2.layernorm_llama_peft("mlp.up_proj", "mlp.down_proj")
