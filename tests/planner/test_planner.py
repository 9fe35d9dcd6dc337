"""The memory planner (issue 6): parameter counts equal what megatron builds and the published sizes of
real models, per TP rank too (a Falcon-7B-like multi-query model's KV head replicated at TP=2 and 4); the
estimate's parts follow their formulas; Llama 2 70B LoRA in bf16 on 80 GiB GPUs does not fit at TP=1
(PP=1) and does at TP=2; the CLI recommends a layout."""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import pytest

from framework.models.config import ModelConfig
from launch.spawn import run_distributed
from tests.sft_jobs import ROOT, compose

TINY = {
    "llama_untied": dict(),
    "llama_tied_gqa": dict(num_query_groups=2, tie_word_embeddings=True),
    "qwen2_qkv_bias": dict(family="qwen2", add_qkv_bias=True),
    "mixtral_experts": dict(family="mixtral", num_experts=4, moe_router_topk=2),
}


def _built_counts(configs):
    from framework.models.registry import build_model
    from framework.runtime.distributed import initialize

    initialize(tp=1, pp=1)
    return {name: sum(p.numel() for p in build_model(ModelConfig(**c)).parameters()) for name, c in configs.items()}


@pytest.mark.timeout(120)
def test_parameter_counts_equal_the_built_models():
    from framework.planner.params import count

    base = dict(vocab_size=256, hidden_size=64, num_layers=3, num_attention_heads=4, ffn_hidden_size=96)
    configs = {k: {**base, **v} for k, v in TINY.items()}
    built = run_distributed(_built_counts, 1, configs, timeout=100)[0]
    for name, c in configs.items():
        cfg = ModelConfig(**c)
        assert count(cfg).total(cfg.num_layers) == built[name], name


def _falcon_7b_like():
    """conf/model/falcon_7b.yaml (multi-query: 1 KV head; LayerNorm, GELU, parallel attention/MLP, tied
    embeddings), shrunk to 4 heads so that TP=2 and TP=4 replicate its KV head 2 and 4 times."""
    from framework.checkpoint.model_checks import model_config

    arch = dict(vocab_size=256, hidden_size=64, num_layers=2, num_attention_heads=4, ffn_hidden_size=256,
                kv_channels=16, max_position_embeddings=64)
    cfg = model_config(compose(["model=falcon_7b", *(f"model.arch.{k}={v}" for k, v in arch.items())]))
    assert cfg.family == "falcon" and cfg.num_query_groups == 1 and cfg.parallel_attention_mlp
    return cfg


def _targets(cfg) -> tuple:
    """Every linear of the layer; the attention only on a mixture of experts (MLP targets are refused there)."""
    return ("qkv", "proj") if cfg.num_experts else ("qkv", "proj", "fc1", "fc2")


def _rank_counts(tp: int, configs: dict):
    """{name: (this rank's parameters, its LoRA-trainable ones, its DoRA-trainable ones)} of each config
    built at TP=``tp`` (rank 2 LoRA/DoRA on :func:`_targets`)."""
    from framework.models.registry import build_model
    from framework.peft.dora import apply_dora
    from framework.peft.lora import apply_lora
    from framework.runtime.distributed import initialize

    initialize(tp=tp, pp=1)
    out = {}
    for name, cfg in configs.items():
        counts = [sum(p.numel() for p in build_model(cfg, tp=tp).parameters())]
        for apply in (apply_lora, apply_dora):
            model = build_model(cfg, tp=tp)
            apply(model, targets=_targets(cfg), rank=2)
            counts.append(sum(p.numel() for p in model.parameters() if p.requires_grad))
        out[name] = tuple(counts)
    return out


@pytest.mark.timeout(300)
@pytest.mark.parametrize("tp", [2, 4])
def test_per_rank_counts_equal_the_built_ranks_kv_copies_included(tp):
    """Each TP rank's parameters, LoRA and DoRA factors as the planner counts them equal those of the model
    built at that layout; for the Falcon-7B-like multi-query model every rank holds a copy of the KV head, so
    a rank has 2 (1 - 1/t) d h K/V weights per layer more than 1/t of the model (and LoRA's B / DoRA's
    magnitude 2 (1 - 1/t) d rows more per layer), which the estimate's weights, gradients and optimizer
    state include."""
    from framework.planner.memory import Job, estimate
    from framework.planner.params import count, lora_per_layer

    base = dict(vocab_size=256, hidden_size=64, num_layers=2, num_attention_heads=4, ffn_hidden_size=96)
    configs = {"falcon_7b_like": _falcon_7b_like()}
    if tp == 2:  # whole KV heads per rank, replicated biases, experts, learned positions
        configs.update({name: ModelConfig(**base, **extra) for name, extra in TINY.items()})
        configs["gpt2_biases"] = ModelConfig(**base, family="gpt2", add_bias_linear=True, normalization="LayerNorm",
                                             activation="gelu", gated_linear_unit=False,
                                             position_embedding_type="learned_absolute", max_position_embeddings=64)
    built = run_distributed(_rank_counts, tp, tp, configs, timeout=250)
    for name, cfg in configs.items():
        planned = (count(cfg, tp).total(cfg.num_layers), *(cfg.num_layers * lora_per_layer(
            cfg, 2, _targets(cfg), tp, magnitude=dora) for dora in (False, True)))
        assert all(b[name] == planned for b in built), (name, planned, [b[name] for b in built])

    # the copies, analytically: per layer 2 d h weights (rank-2 LoRA: 2 x 2 d B rows, DoRA: 2 d more) on each
    # rank beyond what an even split of the true model gives
    cfg, L = configs["falcon_7b_like"], configs["falcon_7b_like"].num_layers
    d, h = cfg.kv_channels, cfg.hidden_size
    whole, rank = count(cfg), count(cfg, tp)
    assert rank.linear_per_layer - whole.linear_per_layer / tp == 2 * d * h * (1 - 1 / tp)
    assert lora_per_layer(cfg, 2, ("qkv",), tp) - (2 * h + 2 * (4 + 2) * d / tp) == 2 * 2 * d * (1 - 1 / tp)
    rank_params, rank_lora, _ = built[0]["falcon_7b_like"]
    full = estimate(Job(model=cfg, method="none", precision="fp32", seq_length=16, global_batch_size=1,
                        distributed_optimizer=False), tp=tp, pp=1, dp=1)
    assert (full.weights, full.gradients, full.optimizer) == (rank_params * 4, rank_params * 4, rank_params * 8)
    lora = estimate(Job(model=cfg, method="lora", lora_rank=2, precision="bf16", seq_length=16, global_batch_size=1,
                        distributed_optimizer=False), tp=tp, pp=1, dp=1)
    assert (lora.weights, lora.gradients, lora.optimizer) == (rank_params * 2, rank_lora * 4, rank_lora * 12)


@pytest.mark.parametrize("model,published", [
    ("llama2_7b", 6_738_415_616),    # meta-llama/Llama-2-7b-hf
    ("llama2_13b", 13_015_864_320),  # meta-llama/Llama-2-13b-hf
    ("llama2_70b", 68_976_648_192),  # meta-llama/Llama-2-70b-hf
    ("llama3_8b", 8_030_261_248),    # meta-llama/Meta-Llama-3-8B
    ("mistral_7b", 7_241_732_096),   # mistralai/Mistral-7B-v0.1
    ("mixtral_8x7b", 46_702_792_704),  # mistralai/Mixtral-8x7B-v0.1
])
def test_parameter_counts_of_real_models(model, published):
    from framework.checkpoint.model_checks import model_config
    from framework.planner.params import count

    cfg = model_config(compose([f"model={model}"]))
    assert count(cfg).total(cfg.num_layers) == published


def test_estimate_parts_follow_their_formulas():
    from framework.planner.memory import OVERHEAD, Job, estimate
    from framework.planner.params import count, lora_per_layer

    m = ModelConfig(vocab_size=1000, hidden_size=512, num_layers=8, num_attention_heads=8, num_query_groups=4,
                    ffn_hidden_size=1024)
    job = Job(model=m, method="lora", lora_rank=8, precision="bf16", seq_length=256, micro_batch_size=2,
              global_batch_size=16)
    e = estimate(job, tp=2, pp=1, dp=2)
    c = count(m)
    assert e.weights == pytest.approx(count(m, tp=2).total(8) * 2)  # this rank's share (checked below)
    assert count(m, tp=2).total(8) == pytest.approx(c.total(8) / 2, rel=1e-3)  # norms alone are whole per rank
    trainable = 8 * lora_per_layer(m, 8, tp=2)
    assert e.gradients == pytest.approx(trainable * 4)
    assert e.optimizer == pytest.approx(trainable * 12 / 2)  # distributed optimizer over DP=2
    d, n, g, f = 64, 8, 4, 1024
    per_layer = 2 * 256 * 2 * (4 * 512 / 2 + ((n + 2 * g) * d + n * d + 2 * f + f) / 2)
    assert e.activations == pytest.approx(8 * per_layer)
    assert e.logits == pytest.approx(256 * 2 * 1000 / 2 * 4 * 2)
    assert e.total == pytest.approx(e.weights + e.gradients + e.optimizer + e.activations + e.logits + OVERHEAD)
    # full fine-tuning trains every parameter; full recompute keeps one hidden state per layer
    full = estimate(Job(model=m, method="none", precision="bf16", seq_length=256, micro_batch_size=2,
                        recompute="full", distributed_optimizer=False), tp=1, pp=2, dp=1)
    # the last stage needs most here: 4 layers + final norm + output layer (untied), plus the logits
    assert full.gradients == pytest.approx((4 * c.per_layer + c.final) * 4)
    assert full.activations < e.activations


def test_llama2_70b_lora_needs_tp2_on_80gib():
    from framework.planner.memory import GiB, estimate, job_from_config, plan

    job = job_from_config(compose(["model=llama2_70b", "peft=lora", "precision=bf16", "data.max_length=4096",
                                   "trainer.micro_batch_size=1"]))
    for rc in ("none", "full"):
        import dataclasses

        tp1 = estimate(dataclasses.replace(job, recompute=rc), tp=1, pp=1, dp=8)
        assert tp1.weights > 80 * GiB and tp1.total > 80 * GiB  # 69B parameters x 2 bytes alone
    rows = plan(job, gpus=8, gpu_memory_gib=80)
    fitting = [e for e, fits in rows if fits]
    assert any(e.tp == 2 and e.pp == 1 for e in fitting)
    assert not any(e.tp == 1 and e.pp == 1 for e in fitting)


@pytest.mark.timeout(120)
def test_plan_cli_recommends_a_layout():
    p = subprocess.run([sys.executable, "launch/plan.py", "model=llama2_70b", "peft=lora", "precision=bf16",
                        "data.max_length=4096", "trainer.micro_batch_size=1", "--gpus", "8"],
                       cwd=ROOT, capture_output=True, text=True, timeout=100)
    assert p.returncode == 0, p.stderr[-2000:]
    assert "recommended: parallel.tensor=2 parallel.pipeline=1" in p.stdout
    p = subprocess.run([sys.executable, "launch/plan.py", "model=llama2_70b", "peft=none", "--gpus", "1"],
                       cwd=ROOT, capture_output=True, text=True, timeout=100)
    assert p.returncode == 1 and "no layout fits" in p.stdout


def _t5_adapter_counts(tp: int, cfgs: list, target_sets: list):
    """[[(LoRA-trainable, DoRA-trainable) per target set] per config] of this rank, built at TP=``tp``
    (rank 2)."""
    from framework.models.registry import build_model
    from framework.peft.dora import apply_dora
    from framework.peft.lora import apply_lora
    from framework.runtime.distributed import initialize

    initialize(tp=tp, pp=1)
    out = []
    for cfg in cfgs:
        row = []
        for targets in target_sets:
            counts = []
            for apply in (apply_lora, apply_dora):
                model = build_model(cfg, tp=tp)
                apply(model, targets=targets, rank=2)
                counts.append(sum(p.numel() for p in model.parameters() if p.requires_grad))
            row.append(tuple(counts))
        out.append(row)
    return out


@pytest.mark.timeout(300)
@pytest.mark.parametrize("tp", [1, 2])
def test_t5_adapter_state_equals_the_built_models_both_stacks(tp):
    """The estimate's trainable state (gradients / 4 bytes) of a LoRA / DoRA job on a tiny T5 (v1.0 tied ReLU
    and v1.1 untied gated layouts of tests/training/test_t5_job.py) equals the trainable parameters of this rank of the
    model built with LoRA / DoRA: the encoder's layers and the decoder's, with and without the cross-attention
    targets."""
    from framework.peft.wrapping import CROSS_TARGETS as WRAPPED_CROSS
    from framework.planner.memory import Job, estimate
    from framework.planner.params import CROSS_TARGETS
    from tests.t5_cases import BASE, VARIANTS

    assert set(CROSS_TARGETS) == set(WRAPPED_CROSS)
    cfgs = [ModelConfig(**BASE, **shape) for shape in VARIANTS.values()]
    target_sets = [("qkv", "proj", "fc1", "fc2"), ("qkv", "proj", "fc1", "fc2", *CROSS_TARGETS), ("proj", "cross_kv")]
    built = run_distributed(_t5_adapter_counts, tp, tp, cfgs, target_sets, timeout=250)
    for i, (cfg, name) in enumerate(zip(cfgs, VARIANTS)):
        for j, targets in enumerate(target_sets):
            planned = tuple(estimate(Job(model=cfg, method=method, lora_rank=2, lora_targets=targets, seq_length=16,
                                         global_batch_size=1), tp=tp, pp=1, dp=1).gradients / 4
                            for method in ("lora", "dora"))
            assert all(rank[i][j] == planned for rank in built), (name, targets, planned, [r[i][j] for r in built])


def test_t5_activations_follow_the_decoder_length():
    """A T5 job's activations (and logits) grow with data.decoder_max_length, null means data.max_length, and
    they equal the module docstring's formula written out here: the encoder's layers at s, the decoder's at
    s_dec with their cross-attention, and the encoder output kept once."""
    from framework.planner.memory import Job, estimate, job_from_config

    def job(dec, *extra):
        return job_from_config(compose(["model=t5_tiny", "model.tokenizer=unused", "peft=lora", "precision=bf16",
                                        "data.max_length=128", "trainer.micro_batch_size=2",
                                        f"data.decoder_max_length={'null' if dec is None else dec}", *extra]))

    m = job(None).model
    a, s, b, h, n, d, f = 2, 128, 2, m.hidden_size, m.num_attention_heads, m.kv_channels, m.ffn_hidden_size
    g, L, L_dec, V = m.num_query_groups, m.num_layers, m.num_decoder_layers, m.vocab_size
    assert not m.gated_linear_unit and (L, L_dec) == (2, 2)

    def expected(s_dec, t, sp, recompute):
        r = t if sp else 1
        enc = a * s * b * (4 * h / r + ((n + 2 * g) * d + n * d + f + f) / t)
        dec = a * s_dec * b * (4 * h / r + ((n + 2 * g) * d + n * d + f + f) / t) \
            + a * b * (s_dec * (2 * h / r + 2 * n * d / t) + s * 2 * g * d / t)
        enc_out = a * s * b * h / r
        if recompute == "full":
            return L * a * s * b * h / r + L_dec * a * s_dec * b * h / r + enc_out + max(enc, dec)
        return L * enc + L_dec * dec + enc_out

    acts = []
    for dec in (32, 64, 128, 256):
        j = job(dec)
        assert j.decoder_seq_length == dec
        for t, sp, rc in ((1, False, "none"), (2, True, "none"), (2, False, "full")):
            e = estimate(dataclasses.replace(j, recompute=rc), tp=t, pp=1, dp=1, sp=sp)
            assert e.activations == pytest.approx(expected(dec, t, sp, rc)), (dec, t, sp, rc)
            assert e.logits == pytest.approx(dec * b * V / t * 4 * 2)
        acts.append(estimate(j, tp=1, pp=1, dp=1).activations)
    assert acts == sorted(acts) and len(set(acts)) == len(acts)
    null = job(None)
    assert estimate(null, 1, 1, 1).activations == estimate(job(128), 1, 1, 1).activations
    # --seq 256 moves the encoder and, with decoder_max_length null, the decoder too
    assert job_from_config(compose(["model=t5_tiny", "model.tokenizer=unused"]), seq=256).decoder_seq_length is None
    assert estimate(dataclasses.replace(null, seq_length=256), 1, 1, 1).activations == pytest.approx(
        estimate(Job(model=m, precision="bf16", seq_length=256, decoder_seq_length=256, micro_batch_size=2), 1, 1, 1)
        .activations)
