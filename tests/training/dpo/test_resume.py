"""Checkpoints and resume of preference tuning (launch/dpo.py), with every kind of reference.

The reference of each test is the same DPO job run without interruption: a run paused after step 3 of 4
(``trainer.steps_per_run=3``, a checkpoint written) and started again with the same command must give the
same per-step DPO metrics (loss, rewards, accuracy, log-probs, lr, grad norm) within 1e-6 and the same
validation. Modes: LoRA with dropout (the RNG streams matter) and the adapters-disabled reference; full
parameters with the frozen copy (a resume that built the copy from the *restored* weights would see zero
rewards at step 4); full parameters with precomputed reference log-probabilities, read back from the
checkpoint, and recomputed (deterministically, from the starting weights) when the checkpoint lacks them;
LoRA on packed pairs. Keep-last/best and early stopping follow the rules written here from the logged
validation losses.

At another data-parallel size: one run carried through DP=2 (two processes, steps 1-2), DP=1 (step 3) and
DP=2 again (step 4) gives the uninterrupted single process's metrics, validations and adapter within the
rounding of reordered fp32 sums (the reduction order differs between layouts; tests/tolerances.py), for
LoRA (unpacked and packed) and for full parameters with precomputed reference log-probabilities and
megatron's distributed optimizer (Adam state sharded over the DP ranks, resharded at each change). Packed
LoRA trained at TP=2+SP x DP=2 gives the same single-process run.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import pytest

from launch.spawn import run_distributed
from tests.dpo_cases import ROOT, tiny_dpo
from tests.sft_jobs import assert_same_adapter, checkpoint_steps, pointer
from tests.tolerances import DPO_ATOL, TRAINED_ATOL

STEPS = 4
METRICS = ("loss", "pair_loss", "reward_chosen", "reward_rejected", "reward_margin", "reward_accuracy", "logp_chosen",
           "logp_rejected", "nll_chosen", "pairs", "lr", "grad_norm")
MODES = {
    "lora-dropout": ["peft.dropout=0.1"],
    "full-frozen_copy": ["peft=none", "dpo.reference=frozen_copy"],
    "full-precomputed": ["peft=none", "dpo.reference=precomputed", "dpo.sft_weight=0.3"],
    "lora-packed": ["peft.dropout=0.1", "data.packing=true", "trainer.global_batch_size=2",
                    "trainer.micro_batch_size=1"],
    # optimizer state written in megatron's background writer, published on finalize
    "lora-async_save": ["trainer.async_save=true"],
}


def dpo_cfg(tiny_hf, tokenizer_dir, out, *extra):
    return tiny_dpo(tiny_hf, tokenizer_dir, out, f"trainer.max_steps={STEPS}", "trainer.eval_interval=2",
                    "trainer.save_interval=2", "trainer.eval_samples=8", "trainer.lr=5e-3", "trainer.warmup_steps=1",
                    *extra)


class Messages(logging.Handler):
    """Collects the messages of the job's loggers at INFO and above."""

    def __init__(self, *names):
        super().__init__()
        self.messages = []
        for name in names:
            logging.getLogger(name).addHandler(self)
            logging.getLogger(name).setLevel(logging.INFO)

    def emit(self, record):
        self.messages.append(record.getMessage())


def _job(cfg, scripted_validation=None):
    """The DPO job in this (spawned) process: (DPOResult, its messages). ``scripted_validation``: the
    validation DPO losses, in order, instead of measured ones."""
    os.chdir(ROOT)
    from framework.runtime.logs import setup_logging
    from framework.training import dpo_job, dpo_task
    from framework.training.dpo import DPOMetrics

    setup_logging("WARNING")
    collected = Messages("framework.dpo", "framework.finetune")
    if scripted_validation is not None:
        losses = iter(scripted_validation)
        dpo_task._validator = lambda *_a, **_k: lambda: DPOMetrics(*(next(losses),) * 9, pairs=8)
    return dpo_job.run(cfg), collected.messages


def run_job(cfg, world=1, **kwargs):
    """Rank 0's (DPOResult, messages); with ``world`` > 1 every rank must report the same history."""
    results = run_distributed(_job, world, cfg, timeout=200, **kwargs)
    for rank, (result, _) in enumerate(results[1:], 1):
        assert result.history == results[0][0].history, f"rank {rank} logged other metrics than rank 0"
    return results[0]


def _sign_of_rounding(k, ref_metrics, tol):
    """reward_accuracy counts the pairs whose margin is > 0. While the policy still equals the reference (every
    reward within rounding of 0: before training, and at step 2, since the first step's warmup lr is 0) each
    margin is rounding alone, and another layout or CPU gives it another sign."""
    return k == "reward_accuracy" and max(abs(ref_metrics["reward_chosen"]), abs(ref_metrics["reward_rejected"])) <= tol


def assert_same_run(ours, ref, tol=1e-6, layouts_differ=False):
    assert len(ours.history) == len(ref.history) == STEPS
    for step, (a, b) in enumerate(zip(ours.history, ref.history), 1):
        for k in METRICS:
            if not (layouts_differ and _sign_of_rounding(k, b, tol)):
                assert a[k] == pytest.approx(b[k], abs=tol, rel=0), f"step {step}: {k} {a[k]} vs {b[k]}"
    for k in METRICS[:-3]:
        assert ours.val_after[k] == pytest.approx(ref.val_after[k], abs=tol, rel=0), k


@pytest.mark.timeout(400)
@pytest.mark.parametrize("mode", list(MODES))
def test_stop_and_resume_gives_the_uninterrupted_run(tiny_hf, tiny_tokenizer_dir, tmp_path, mode):
    extra = MODES[mode]
    ref, _ = run_job(dpo_cfg(tiny_hf, tiny_tokenizer_dir, tmp_path / "ref", *extra))
    assert ref.status == "completed" and ref.history[0]["pair_loss"] == pytest.approx(0.693147, abs=1e-5)
    assert ref.history[-1]["reward_margin"] != 0  # the reference really differs from the policy by then
    run = tmp_path / "run"
    first, _ = run_job(dpo_cfg(tiny_hf, tiny_tokenizer_dir, run, *extra, "trainer.steps_per_run=3"))
    assert first.status == "paused" and first.steps == 3 and first.trained_dir is None
    assert pointer(run, "latest") == "step-000003"
    if mode == "full-precomputed":  # a copy of the paused run whose checkpoint lacks the reference tables
        shutil.copytree(run, tmp_path / "recompute")
        (tmp_path / "recompute" / "checkpoints" / "step-000003" / "reference_logps.safetensors").unlink()

    resumed, messages = run_job(dpo_cfg(tiny_hf, tiny_tokenizer_dir, run, *extra))  # the same command again
    assert resumed.resumed_from.endswith("step-000003") and resumed.status == "completed"
    assert_same_run(resumed, ref)
    if mode.startswith("lora"):
        assert_same_adapter(run, tmp_path / "ref", atol=1e-6)
    if mode == "lora-packed":
        assert any("packing:" in m and "pairs into" in m for m in messages), messages
        assert resumed.history[0]["pairs"] > 2  # a global batch of 2 bins holds more than 2 pairs
    if mode == "full-precomputed":
        assert any("reference log-probabilities read from" in m for m in messages), messages
        again, messages = run_job(dpo_cfg(tiny_hf, tiny_tokenizer_dir, tmp_path / "recompute", *extra))
        assert any("precomputed in" in m for m in messages), messages
        assert_same_run(again, ref)

    # keep_last=2 and the best: the two newest and the step of the lowest validation loss
    state = json.loads((run / "checkpoints" / "step-000004" / "train_state" / "state.json").read_text())
    best = min(state["validations"], key=lambda v: v[1])[0]
    assert [s for s, _ in state["validations"]] == [2, 4]
    assert set(checkpoint_steps(run)) == {3, 4, best} and pointer(run, "best") == f"step-{best:06d}"
    assert resumed.best_step == best

    if mode == "lora-dropout":
        # the finished command again: nothing to do, and it says so
        again, messages = run_job(dpo_cfg(tiny_hf, tiny_tokenizer_dir, run, *extra))
        assert any("already finished at step 4" in m for m in messages), messages
        assert again.history == resumed.history
        # a resume with another DPO loss is refused, naming it
        with pytest.raises(Exception, match=r"\n  - dpo: checkpoint .*'beta': 0\.1.*now .*'beta': 0\.2"):
            run_job(dpo_cfg(tiny_hf, tiny_tokenizer_dir, run, *extra, "dpo.beta=0.2"))


@pytest.mark.timeout(200)
def test_early_stopping_and_the_best_checkpoint(tiny_hf, tiny_tokenizer_dir, tmp_path):
    """patience=1, validations every 2 steps scripted as: before 0.69, step 2: 0.5 (best), step 4: 0.6 (no
    improvement: 1 = patience) -> stop after step 4 of 8, best step 2, whose checkpoint is kept."""
    cfg = dpo_cfg(tiny_hf, tiny_tokenizer_dir, tmp_path, "trainer.max_steps=8", "trainer.save_interval=null",
                  "trainer.keep_last=1", "trainer.early_stopping.patience=1")
    result, _ = run_job(cfg, scripted_validation=[0.69, 0.5, 0.6, 0.1, 0.1])
    assert result.status == "stopped_early" and result.steps == 4 and len(result.history) == 4
    assert result.best_step == 2 and result.best_val_loss == 0.5 and result.val_after["loss"] == 0.6
    assert checkpoint_steps(tmp_path) == [2, 4] and pointer(tmp_path, "best") == "step-000002"
    assert Path(result.trained_dir).is_dir()
    assert json.loads((tmp_path / "summary.json").read_text())["status"] == "stopped_early"


DP_MODES = {
    "lora": [],
    "lora-packed": MODES["lora-packed"][1:],
    "full-precomputed-distributed-optimizer": ["peft=none", "dpo.reference=precomputed", "dpo.sft_weight=0.3",
                                               "trainer.distributed_optimizer=true"],
}


def dp_cfg(tiny_hf, tokenizer_dir, out, mode, *extra):
    # 13 validation pairs: no whole number of micro_batch_size x DP groups (unpacked 4 x 2, packed 1 x 2), and
    # the two DP ranks validate unequal numbers of micro-batches in packed mode (7 and 6)
    return dpo_cfg(tiny_hf, tokenizer_dir, out, *DP_MODES[mode], "trainer.save_interval=null",
                   "trainer.eval_samples=13", *extra)


@pytest.fixture(scope="module")
def single_process(tiny_hf, tiny_tokenizer_dir, tmp_path_factory):
    """mode -> (DPOResult, run directory) of the uninterrupted single-process run (each run once)."""
    runs = {}

    def get(mode):
        if mode not in runs:
            out = tmp_path_factory.mktemp(f"single-{mode}")
            runs[mode] = run_job(dp_cfg(tiny_hf, tiny_tokenizer_dir, out, mode))[0], out
        return runs[mode]

    return get


def validations(run_dir):
    state = json.loads((Path(run_dir) / "checkpoints" / f"step-{STEPS:06d}" / "train_state" / "state.json").read_text())
    return state["validations"]


def assert_same_as_single_process(run, run_dir, ref, ref_dir, mode):
    """Per-step metrics, lr and grad norm, the validations (DPO_ATOL) and the trained adapter (TRAINED_ATOL)."""
    # the policy has moved from the reference by far more than the tolerance: equality within it says something
    assert ref.status == "completed" and abs(ref.history[-1]["reward_chosen"]) > 1e-2, ref.history[-1]
    assert run.status == "completed"
    assert_same_run(run, ref, tol=DPO_ATOL, layouts_differ=True)
    for k in METRICS[:-3]:
        if not _sign_of_rounding(k, ref.val_before, DPO_ATOL):
            assert run.val_before[k] == pytest.approx(ref.val_before[k], abs=DPO_ATOL, rel=0), k
    ours, theirs = validations(run_dir), validations(ref_dir)
    assert [s for s, _ in ours] == [s for s, _ in theirs] == [2, 4]
    assert [v for _, v in ours] == pytest.approx([v for _, v in theirs], abs=DPO_ATOL, rel=0)
    if mode.startswith("lora"):
        assert_same_adapter(run_dir, ref_dir, atol=TRAINED_ATOL)


@pytest.mark.timeout(400)
@pytest.mark.parametrize("mode", list(DP_MODES))
def test_resume_at_another_data_parallel_size(tiny_hf, tiny_tokenizer_dir, tmp_path, single_process, mode):
    """Steps 1-2 at DP=2, step 3 at DP=1, step 4 at DP=2 (each invocation resuming the previous one's
    checkpoint) give the uninterrupted single process's run. No dropout: DP ranks draw identical streams, so
    a DP=2 run's dropout masks are not the single process's. The precomputed reference is computed once, at
    DP=2, and read back from the checkpoint by each later invocation."""
    run = tmp_path / "run"
    invocations = [run_job(dp_cfg(tiny_hf, tiny_tokenizer_dir, run, mode, *extra), world=world)
                   for world, extra in ((2, ["trainer.steps_per_run=2"]), (1, ["trainer.steps_per_run=1"]), (2, []))]
    (first, _), (second, messages2), (last, messages3) = invocations
    assert (first.status, first.steps, second.status, second.steps) == ("paused", 2, "paused", 3)
    assert second.resumed_from.endswith("step-000002") and last.resumed_from.endswith("step-000003")
    assert_same_as_single_process(last, run, *single_process(mode), mode)
    if mode.startswith("full-precomputed"):
        assert all(any("reference log-probabilities read from" in m for m in ms) for ms in (messages2, messages3))


@pytest.mark.timeout(300)
def test_packed_job_at_tp2_sp_dp2_gives_the_single_process_run(tiny_hf, tiny_tokenizer_dir, tmp_path,
                                                               single_process):
    """LoRA on packed pairs in four processes (TP=2 + SP, DP=2: each DP rank trains one bin of a global
    batch's two): the single process's per-step metrics, validations and updated adapter."""
    result, _ = run_job(dp_cfg(tiny_hf, tiny_tokenizer_dir, tmp_path, "lora-packed", "parallel.tensor=2",
                               "parallel.sequence=true"), world=4)
    assert_same_as_single_process(result, tmp_path, *single_process("lora-packed"), "lora-packed")
