"""PEFT and a mixture-of-experts MLP: targets inside the MLP are refused, by config key before any process
group starts (:func:`config_problems`) and by layer when a library caller wraps a model (:func:`check_dense_mlp`).

megatron's MoELayer (Mixtral, ``model.arch.num_experts`` > 0) is a router plus ``num_experts`` experts, each
with its own ``linear_fc1`` / ``linear_fc2`` (``mlp.experts.local_experts.{e}``); the layer itself has no
dense ``linear_fc1`` / ``linear_fc2``. Our wrappers adapt one dense linear per target (LoRA, DoRA and QLoRA
on fc1 / fc2, IA3 on fc2's input, Houlsby adapters after fc2), so an MLP target has nothing to wrap there
(wrapping each expert, and the router, is not implemented). Attention targets work as on a dense model.
"""

from __future__ import annotations

#: the layer targets of framework/peft/wrapping.py that sit in the MLP
MLP_TARGETS = ("fc1", "fc2")


def _why(num_experts: int) -> str:
    return (f"the MLP is a mixture of experts ({num_experts} experts behind a router, no dense "
            f"linear_fc1/linear_fc2) and PEFT on it is not supported: only attention targets are")


def config_problems(peft, model_cfg, mlp_targets, attention_targets) -> list[str]:
    """The problem with ``peft.targets`` (a method's names; ``mlp_targets`` of them adapt the MLP) on a
    mixture-of-experts model, suggesting the attention-only list."""
    targets = peft.get("targets")
    if not model_cfg.num_experts or isinstance(targets, str) or not hasattr(targets, "__iter__"):
        return []  # dense MLP, or a malformed list (reported by the method's own check)
    targets = list(targets)
    mlp = [t for t in targets if t in mlp_targets]
    if not mlp:
        return []
    keep = [t for t in targets if t not in mlp_targets] or list(attention_targets)
    return [f"peft.targets={targets}: {mlp} adapt the MLP, but model.arch.num_experts={model_cfg.num_experts}: "
            f"{_why(model_cfg.num_experts)}; use peft.targets=[{','.join(keep)}]"]


def check_dense_mlp(gpt, targets) -> None:
    """ValueError when ``targets`` (layer targets of framework/peft/wrapping.py) include an MLP target and a
    layer of ``gpt`` (megatron's GPTModel, this pipeline stage) has a mixture-of-experts MLP."""
    mlp = [t for t in targets if t in MLP_TARGETS]
    if not mlp:
        return
    from megatron.core.transformer.moe.moe_layer import MoELayer

    for layer in gpt.decoder.layers:
        if isinstance(getattr(layer, "mlp", None), MoELayer):
            why = _why(layer.mlp.config.num_moe_experts)
            raise ValueError(f"PEFT targets {mlp}: layer {layer.layer_number}: {why} (LoRA/DoRA/QLoRA: qkv, proj; "
                             f"IA3: k, v; adapters: attention)")
