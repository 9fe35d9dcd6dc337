"""PEFT targets in a mixture-of-experts MLP (Mixtral: megatron's MoELayer has no dense linear_fc1/linear_fc2)
are refused with the config key before any process group starts, and with a clear error (not megatron's
AttributeError) when a library caller wraps such a model; attention targets still work
(framework/peft/moe.py)."""

from __future__ import annotations

import re

import pytest

from launch.spawn import run_distributed

#: method -> (an override putting an MLP target in peft.targets, the suggested attention-only list)
MLP_CASES = {
    "lora": ("peft.targets=[qkv,fc1]", "peft.targets=[qkv]"),
    "dora": ("peft.targets=[proj,fc2]", "peft.targets=[proj]"),
    "qlora": ("peft.targets=[fc1,fc2]", "peft.targets=[qkv,proj]"),
    "ia3": ("peft.targets=[k,v,fc2]", "peft.targets=[k,v]"),
    "adapter": ("peft.targets=[mlp]", "peft.targets=[attention]"),
}


def _cfg(tokenizer_dir, *overrides):
    from tests.sft_jobs import compose

    return compose(["model=tiny_llama", f"model.tokenizer={tokenizer_dir}", "model.arch.family=mixtral",
                    "+model.arch.num_experts=4", "+model.arch.moe_router_topk=2", *overrides])


@pytest.mark.parametrize("method", list(MLP_CASES))
def test_mlp_targets_on_moe_refused_by_key_before_start(method, tiny_tokenizer_dir):
    import torch.distributed as dist

    from framework.runtime.errors import ConfigError
    from framework.training.job_config import validate

    override, suggestion = MLP_CASES[method]
    with pytest.raises(ConfigError) as err:
        validate(_cfg(tiny_tokenizer_dir, f"peft={method}", override), 1)
    msg = str(err.value)
    assert re.search(r"peft\.targets=\[.*\]: \[.*\] adapt the MLP, but model\.arch\.num_experts=4", msg), msg
    assert "the MLP is a mixture of experts" in msg and "only attention targets are" in msg, msg
    assert f"use {suggestion}" in msg, msg
    assert msg.count("\n  - ") == 1, msg  # the one problem, nothing else wrong with the config
    assert not dist.is_initialized()


@pytest.mark.parametrize("method,targets", [("lora", "[qkv,proj]"), ("dora", "[qkv,proj]"), ("qlora", "[qkv]"),
                                            ("ia3", "[k,v]"), ("adapter", "[attention]")])
def test_attention_targets_on_moe_and_mlp_targets_on_dense_pass(method, targets, tiny_tokenizer_dir):
    from framework.training.job_config import validate
    from tests.sft_jobs import compose

    validate(_cfg(tiny_tokenizer_dir, f"peft={method}", f"peft.targets={targets}"), 1)
    # the shipped mixtral yaml with attention targets; a dense model keeps its MLP targets (the yaml defaults)
    validate(compose(["model=mixtral_8x7b", f"model.tokenizer={tiny_tokenizer_dir}", f"peft={method}",
                      f"peft.targets={targets}"]), 1)
    validate(compose(["model=tiny_llama", f"model.tokenizer={tiny_tokenizer_dir}", f"peft={method}"]), 1)


def _wrap_worker():
    """Each method's library call with an MLP target on a tiny Mixtral: the error it raises and whether the
    model was left untouched; then LoRA on the attention, which wraps."""
    from framework.models.config import ModelConfig
    from framework.models.registry import build_model
    from framework.peft.adapters import apply_adapters
    from framework.peft.dora import apply_dora
    from framework.peft.ia3 import apply_ia3
    from framework.peft.lora import apply_lora
    from framework.peft.qlora import apply_qlora
    from framework.runtime.distributed import initialize

    initialize(seed=0)
    cfg = ModelConfig(family="mixtral", vocab_size=256, hidden_size=64, num_layers=2, num_attention_heads=4,
                      num_query_groups=2, ffn_hidden_size=96, num_experts=4, moe_router_topk=2)
    model = build_model(cfg)
    calls = {"lora": lambda: apply_lora(model, targets=("qkv", "fc1"), rank=4),
             "dora": lambda: apply_dora(model, targets=("fc2",), rank=4),
             "qlora": lambda: apply_qlora(model, targets=("proj", "fc1", "fc2"), rank=4),
             "ia3": lambda: apply_ia3(model, targets=("k", "fc2")),
             "adapter": lambda: apply_adapters(model, targets=("mlp",), bottleneck=4)}
    out = {}
    for name, call in calls.items():
        try:
            call()
            out[name] = (None, None)
        except Exception as e:  # noqa: BLE001 -- the type is what the test checks
            untouched = all(p.requires_grad for p in model.parameters()) and \
                not any(hasattr(m, "base_layer") for m in model.modules())
            out[name] = (f"{type(e).__name__}: {e}", untouched)
    wrapped = apply_lora(model, targets=("qkv", "proj"), rank=4)
    trainable = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    return out, wrapped, trainable


@pytest.mark.timeout(120)
def test_wrapping_an_moe_mlp_raises_a_clear_error():
    errors, wrapped, trainable = run_distributed(_wrap_worker, 1, timeout=100)[0]
    for method, (error, untouched) in errors.items():
        assert error is not None, f"{method}: wrapping a mixture-of-experts MLP did not fail"
        assert error.startswith("ValueError: PEFT targets ['fc"), (method, error)
        assert re.search(r"layer 1: the MLP is a mixture of experts \(4 experts behind a router", error), error
        assert "only attention targets are" in error, error
        assert untouched, f"{method}: the refused call changed the model"
    assert wrapped == [f"layer {i} {t}" for i in (1, 2) for t in ("qkv", "proj")]
    assert trainable == sorted(f"decoder.layers.{i}.self_attention.{t}.lora_{f}.weight"
                               for i in (0, 1) for t in ("linear_qkv", "linear_proj") for f in "AB")


def test_memory_planner_refuses_what_the_job_refuses():
    """launch/plan.py plans only jobs that can run: LoRA on the experts is refused like the job refuses it."""
    from framework.runtime.errors import ConfigError
    from framework.planner.memory import job_from_config
    from framework.planner.params import lora_per_layer
    from tests.sft_jobs import compose

    with pytest.raises(ConfigError, match=r"peft\.targets=.*mixture of experts.*use peft\.targets=\[qkv,proj\]"):
        job_from_config(compose(["model=mixtral_8x7b"]))
    job = job_from_config(compose(["model=mixtral_8x7b", "peft.targets=[qkv,proj]"]))
    assert job.lora_targets == ("qkv", "proj")
    with pytest.raises(ValueError, match="mixture of experts"):
        lora_per_layer(job.model, 8, ("qkv", "fc1"))
