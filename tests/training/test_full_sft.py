"""Full-parameter fine-tuning (peft=none) with megatron's distributed optimizer across data-parallel ranks.

The job trains every weight of a tiny HF Llama for three steps, once in a single process and once at DP=2
with ``trainer.distributed_optimizer=true`` (Adam state and fp32 main weights sharded over the two ranks,
gradients reduce-scattered, updated weights all-gathered). Same data order and starting weights: the losses
and every updated weight agree within the rounding of reordered fp32 sums (tests/tolerances.py); the
weights saved at DP=2 (dist_checkpointing) reload at TP=2 and give the single process's validation loss.
"""

from __future__ import annotations

import os

import pytest
import torch

from launch.spawn import run_distributed
from tests.hf_models import save_tiny_job_llama
from tests.portable import to_numpy, to_torch
from tests.sft_jobs import ROOT, compose, evaluate_adapter, run_sft
from tests.tolerances import FORWARD_REL, TRAINED_ATOL


def _job_cfg(tiny_hf, tokenizer_dir, out, *extra):
    return compose(["model=tiny_llama", "model.source=hf", f"model.path={tiny_hf}", f"model.tokenizer={tokenizer_dir}",
                    "peft=none", "data.max_length=64", "trainer.max_steps=3", "trainer.global_batch_size=4",
                    "trainer.micro_batch_size=1", "trainer.eval_samples=4", "trainer.eval_interval=100",
                    "trainer.lr=1e-3", "generate.max_new_tokens=0", f"output_dir={out}", *extra])


def _weights_worker(hf_dir, ckpt_dirs):
    """Every tensor of the HF start and of each saved checkpoint, loaded into a single-process model."""
    import json

    from framework.checkpoint.ckpt_format import load_checkpoint_into
    from framework.checkpoint.hf_import import load_hf_into_gpt
    from framework.models.gpt import build_gpt
    from framework.models.registry import config_from_hf
    from framework.runtime import initialize

    initialize(seed=0)
    model_cfg = config_from_hf(json.loads(open(os.path.join(hf_dir, "config.json")).read()))
    states = []
    for src in [None, *ckpt_dirs]:
        model = build_gpt(model_cfg)
        if src is None:
            load_hf_into_gpt(model, hf_dir, model_cfg)
        else:
            load_checkpoint_into(model, src, model_cfg)
        states.append({k: v.detach().clone() for k, v in model.state_dict().items() if not k.endswith("_extra_state")})
    return to_numpy(states)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_tokenizer_dir):
    root = tmp_path_factory.mktemp("full_sft")
    hf = str(save_tiny_job_llama(root / "hf"))
    single = run_distributed(run_sft, 1, _job_cfg(hf, tiny_tokenizer_dir, root / "single"), timeout=280)[0]
    dp2_cfg = _job_cfg(hf, tiny_tokenizer_dir, root / "dp2", "trainer.distributed_optimizer=true")
    dp2 = run_distributed(run_sft, 2, dp2_cfg, timeout=280)[0]
    return hf, root, single, dp2


@pytest.mark.timeout(900)
def test_dp2_distributed_optimizer_matches_single_process(runs):
    hf, _, single, dp2 = runs
    losses, before, after, weights = dp2
    ref_losses, ref_before, ref_after, ref_weights = single
    assert os.path.basename(weights) == "weights" and os.path.isfile(os.path.join(weights, "config.yaml"))
    assert before == pytest.approx(ref_before, rel=FORWARD_REL)
    assert losses == pytest.approx(ref_losses, rel=FORWARD_REL)
    assert after == pytest.approx(ref_after, rel=FORWARD_REL)
    assert after < before
    start, ref, got = to_torch(run_distributed(_weights_worker, 1, hf, [ref_weights, weights], timeout=200)[0])
    assert ref.keys() == got.keys() == start.keys()
    for k in ref:
        assert not torch.equal(ref[k], start[k]), f"{k} was not trained"  # every parameter is trainable
        torch.testing.assert_close(got[k], ref[k], atol=TRAINED_ATOL, rtol=0, msg=lambda m: f"{k}: {m}")


@pytest.mark.timeout(300)
def test_saved_weights_reload_at_another_tensor_parallel_size(runs, tiny_tokenizer_dir):
    """The DP=2 run's weights (written by dist_checkpointing) loaded at TP=2 give the single process's final
    validation loss."""
    hf, root, single, dp2 = runs
    cfg = _job_cfg(hf, tiny_tokenizer_dir, root / "eval_tp2", "parallel.tensor=2")
    reloaded = run_distributed(evaluate_adapter, 2, cfg, dp2[3], timeout=250)[0]
    assert reloaded == pytest.approx(single[2], rel=FORWARD_REL)


def _sharding_worker():
    from omegaconf import OmegaConf

    from framework.models.config import ModelConfig
    from framework.models.gpt import build_gpt
    from framework.peft.registry import apply_peft
    from framework.runtime import initialize
    from framework.training.optim import build_optimizer, wrap_ddp

    initialize(seed=0)
    model_cfg = ModelConfig(num_layers=2)
    model = build_gpt(model_cfg)
    apply_peft(model, OmegaConf.create({"method": "none"}), model_cfg)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    tr = OmegaConf.load(os.path.join(ROOT, "conf/trainer/default.yaml"))
    opt, _ = build_optimizer(wrap_ddp(model, use_distributed_optimizer=True), tr)
    inner = [type(o).__name__ for o in getattr(opt, "chained_optimizers", [opt])]
    held = sum(p.numel() for o in getattr(opt, "chained_optimizers", [opt]) for g in o.shard_fp32_groups for p in g)
    return inner, held, trainable, total


@pytest.mark.timeout(120)
def test_distributed_optimizer_shards_the_state_over_dp():
    """peft=none trains every parameter; with the distributed optimizer each DP rank keeps the fp32 main
    weights (and so Adam's moments) of its half of them only."""
    results = run_distributed(_sharding_worker, 2, timeout=110)
    held = [r[1] for r in results]
    for inner, _, trainable, total in results:
        assert inner == ["DistributedOptimizer"] and trainable == total
    assert sum(held) == results[0][2]
    assert all(h < 0.51 * results[0][2] for h in held)


def _run_full(cfg):

    os.chdir(ROOT)
    from framework.runtime.logs import setup_logging
    from framework.training.finetune import run

    setup_logging("WARNING")
    r = run(cfg)
    return r.status, r.train_losses, r.val_loss_after, r.resumed_from


@pytest.mark.timeout(600)
def test_resume_with_the_distributed_optimizer_at_another_dp_size(runs, tiny_tokenizer_dir):
    """Two steps at DP=2 with the distributed optimizer, paused (checkpoint: weights + sharded Adam state),
    then the last step at DP=1: the uninterrupted single process's losses."""
    hf, root, single, _ = runs
    args = (hf, tiny_tokenizer_dir, root / "resumed", "trainer.distributed_optimizer=true", "trainer.save_interval=null")
    status, first, _, _ = run_distributed(_run_full, 2, _job_cfg(*args, "trainer.steps_per_run=2"), timeout=280)[0]
    assert status == "paused" and len(first) == 2
    status, losses, after, resumed_from = run_distributed(_run_full, 1, _job_cfg(*args), timeout=280)[0]
    assert status == "completed" and resumed_from.endswith("step-000002")
    assert losses == pytest.approx(single[0], rel=FORWARD_REL)
    assert after == pytest.approx(single[2], rel=FORWARD_REL)
