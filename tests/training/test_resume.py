"""Checkpoints, resume and early stopping of the fine-tuning job (tiny random Llama, a few steps).

The reference of every resume test is the same job run without interruption in one process: a run
stopped after k steps and restarted must produce the same per-step losses, at the same and at another
data-parallel size, and after a process is killed in the middle of writing a checkpoint. Early stopping and
pruning are checked against a scripted validation-loss sequence, so the expected stop step and best
checkpoint follow from the rule written in the test, not from the job's own output.
"""

import json
import os
import time
from pathlib import Path

import pytest

from tests.job_process import kill_when_blocked
from tests.sft_jobs import (DROPOUT, ROOT, STEPS, assert_same_adapter, checkpoint_steps, job_cfg, job_in_process,
                             pointer, run_job, tensorboard_scalars)
from tests.tolerances import FORWARD_REL

# The reference run (the fixture ``uninterrupted``, tests/training/conftest.py) is the job of sft_jobs.job_cfg
# with LoRA dropout on, run to the end without a pause.


@pytest.mark.timeout(420)
def test_stop_and_resume_gives_the_uninterrupted_losses(tiny_tokenizer_dir, uninterrupted, tmp_path):
    ref, ref_dir = uninterrupted
    first, _ = run_job(job_cfg(tiny_tokenizer_dir, tmp_path, DROPOUT, "trainer.steps_per_run=3"))
    assert first.status == "paused" and first.steps == 3
    assert pointer(tmp_path, "latest") == "step-000003"
    resumed, _ = run_job(job_cfg(tiny_tokenizer_dir, tmp_path, DROPOUT))  # the same command again
    assert resumed.resumed_from.endswith("step-000003")
    assert resumed.status == "completed" and resumed.steps == STEPS
    assert resumed.train_losses == pytest.approx(ref.train_losses, abs=1e-6, rel=0)
    assert resumed.val_loss_after == pytest.approx(ref.val_loss_after, abs=1e-6, rel=0)
    assert_same_adapter(tmp_path, ref_dir, atol=1e-6)
    # TensorBoard holds each step once, with the logged losses (float32), across both invocations.
    logged = tensorboard_scalars(tmp_path, "train/loss")
    assert [s for s, _ in logged] == list(range(1, STEPS + 1))
    assert [v for _, v in logged] == pytest.approx(ref.train_losses, rel=1e-6)
    assert [s for s, _ in tensorboard_scalars(tmp_path, "val/loss")] == [0, 2, 4, 6]
    for tag in ("train/lr", "train/grad_norm", "train/tokens_per_s", "train/memory_gib"):
        assert len(tensorboard_scalars(tmp_path, tag)) == STEPS, tag

    # Running the finished command again changes nothing and says so.
    before = {p: p.stat().st_mtime_ns for p in (tmp_path / "checkpoints").rglob("*")}
    again, messages = run_job(job_cfg(tiny_tokenizer_dir, tmp_path, DROPOUT))
    assert any("already finished at step 6" in m for m in messages), messages
    assert again.train_losses == resumed.train_losses
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "checkpoints").rglob("*")} == before

    # A resume with settings that would make it another training run is refused, naming the key.
    with pytest.raises(Exception, match=r"trainer\.lr: checkpoint 0\.005, now 0\.001"):
        run_job(job_cfg(tiny_tokenizer_dir, tmp_path, DROPOUT, "trainer.lr=1e-3"))


@pytest.mark.timeout(420)
@pytest.mark.parametrize("overrides", [["peft.method=lora"], ["peft.method=none", "trainer.distributed_optimizer=true"]],
                         ids=["lora", "full-distributed-optimizer"])
def test_resume_at_another_data_parallel_size(tiny_tokenizer_dir, tmp_path, overrides):
    """3 steps at DP=2 (2 processes), then the rest at DP=1: the losses of the uninterrupted single process
    (FORWARD_REL: the reduction order differs between layouts; tests/tolerances.py). Full fine-tuning resumes
    every weight and megatron's distributed optimizer, whose Adam state and fp32 main weights were sharded over
    the two DP ranks and are whole on the one rank after the restart. Only the checkpoints of the pause and the
    end, for time."""
    common = (*overrides, "trainer.save_interval=null", "trainer.eval_interval=100")
    ref, _ = run_job(job_cfg(tiny_tokenizer_dir, tmp_path / "ref", *common))
    first, _ = run_job(job_cfg(tiny_tokenizer_dir, tmp_path / "run", *common, "trainer.steps_per_run=3"), world=2)
    assert first.status == "paused"
    resumed, _ = run_job(job_cfg(tiny_tokenizer_dir, tmp_path / "run", *common))
    assert resumed.resumed_from.endswith("step-000003")
    assert resumed.train_losses == pytest.approx(ref.train_losses, abs=0, rel=FORWARD_REL)
    assert resumed.val_loss_after == pytest.approx(ref.val_loss_after, abs=0, rel=FORWARD_REL)
    # a resume that did not restore the optimizer (Adam moments, step) or the schedule would differ by far more
    assert resumed.train_losses[-1] != pytest.approx(first.train_losses[-1], abs=1e-3)


def _job_killed_in_save(cfg, blocked_marker, block_at):
    """The job, with the optimizer writer of checkpoint ``block_at`` blocking after writing its files: the
    checkpoint is half written when the parent kills this process."""
    from framework.training import train_state

    real_save = train_state.save_optimizer

    def save_then_block(model, optimizer, directory):
        real_save(model, optimizer, directory)
        if f".step-{block_at:06d}.tmp-" in str(directory):
            Path(blocked_marker).write_text(str(directory))
            time.sleep(3600)

    train_state.save_optimizer = save_then_block
    job_in_process(cfg)


@pytest.mark.timeout(360)
def test_kill_during_checkpoint_save_keeps_the_previous_one(tiny_tokenizer_dir, uninterrupted, tmp_path):
    ref, _ = uninterrupted
    out, marker = tmp_path / "run", tmp_path / "blocked"
    kill_when_blocked(_job_killed_in_save, (job_cfg(tiny_tokenizer_dir, out, DROPOUT), str(marker), 4), marker,
                      "blocking in the save of step 4")
    ckpts = out / "checkpoints"
    assert checkpoint_steps(out) == [2]
    assert pointer(out, "latest") == "step-000002"
    partial = [p.name for p in ckpts.iterdir() if p.name.startswith(".step-000004.tmp-")]
    assert partial and Path(marker.read_text()).is_dir()  # killed with the half-written checkpoint on disk

    resumed, messages = run_job(job_cfg(tiny_tokenizer_dir, out, DROPOUT))
    assert resumed.resumed_from.endswith("step-000002")
    assert resumed.train_losses == pytest.approx(ref.train_losses, abs=1e-6, rel=0)
    assert any("interrupted checkpoint save" in m for m in messages), messages
    assert not [p for p in ckpts.iterdir() if p.name.startswith(".")]  # the partial directory is gone
    assert checkpoint_steps(out)[-2:] == [4, 6]
    # the killed invocation had logged steps 3 and 4 to TensorBoard; the resumed one replaced them
    assert [s for s, _ in tensorboard_scalars(out, "train/loss")] == list(range(1, STEPS + 1))


@pytest.mark.timeout(240)
def test_keep_last_prunes_old_checkpoints_but_keeps_the_best(tiny_tokenizer_dir, tmp_path):
    """A checkpoint every step, keep_last=2, validations after steps 2, 4, 6 scripted to be best at step 2:
    left are the two newest (5, 6) and the best (2)."""
    script = [5.0, 4.0, 4.5, 4.6]  # before training, then after steps 2, 4, 6
    cfg = job_cfg(tiny_tokenizer_dir, tmp_path, "trainer.save_interval=1", "trainer.keep_last=2")
    result, _ = run_job(cfg, scripted_validation=script)
    assert checkpoint_steps(tmp_path) == [2, 5, 6]
    assert pointer(tmp_path, "best") == "step-000002" and pointer(tmp_path, "latest") == "step-000006"
    assert result.best_step == 2 and result.best_val_loss == 4.0
    assert result.best_checkpoint.endswith("step-000002")
    state = json.loads((tmp_path / "checkpoints" / "step-000002" / "train_state" / "state.json").read_text())
    assert state["step"] == 2 and len(state["losses"]) == 2


@pytest.mark.timeout(240)
def test_early_stopping_stops_at_the_validation_the_rule_names(tiny_tokenizer_dir, tmp_path):
    """patience=2, min_delta=0.01, a validation every 2 steps with scripted losses:
    step 2: 4.0 (best), 4: 3.0 (best), 6: 2.995 (falls by only 0.005: 1 without improvement),
    8: 2.9 (best, counter reset), 10: 2.95 (1), 12: 2.895 (only 0.005 below the best: 2 = patience) -> stop
    after step 12 of 20, best step 8."""
    script = [5.0, 4.0, 3.0, 2.995, 2.9, 2.95, 2.895] + [1.0] * 5  # a run that did not stop would see 1.0
    cfg = job_cfg(tiny_tokenizer_dir, tmp_path, "trainer.max_steps=20", "trainer.save_interval=null",
                  "trainer.keep_last=1", "trainer.early_stopping.patience=2", "trainer.early_stopping.min_delta=0.01")
    result, _ = run_job(cfg, scripted_validation=script)
    assert result.status == "stopped_early"
    assert result.steps == 12 and len(result.train_losses) == 12
    assert result.best_step == 8 and result.best_val_loss == 2.9
    assert result.val_loss_after == 2.895
    assert checkpoint_steps(tmp_path) == [8, 12]  # keep_last=1 keeps the last, and the best
    assert pointer(tmp_path, "best") == "step-000008"
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["status"] == "stopped_early" and summary["steps"] == 12


def test_early_stopping_counters_survive_a_restart():
    """Feeding a loss sequence in one go, or in two halves with the state passed through JSON in between
    (what a checkpoint does), stops at the same validation with the same best."""
    from framework.training.early_stopping import EarlyStopping

    losses = [4.0, 3.0, 2.995, 2.9, 2.95, 2.895, 1.0]
    whole = EarlyStopping(patience=2, min_delta=0.01)
    for step, loss in enumerate(losses, 1):
        whole.update(step, loss)
        if whole.should_stop:
            break
    first = EarlyStopping(patience=2, min_delta=0.01)
    for step, loss in enumerate(losses[:4], 1):
        first.update(step, loss)
    second = EarlyStopping(patience=2, min_delta=0.01)
    second.load_state_dict(json.loads(json.dumps(first.state_dict())))
    for step, loss in enumerate(losses[4:], 5):
        second.update(step, loss)
        if second.should_stop:
            break
    assert (whole.stopped_step, whole.best_step, whole.best_loss) == (6, 4, 2.9)
    assert (second.stopped_step, second.best_step, second.best_loss) == (6, 4, 2.9)
    assert EarlyStopping().state_dict()["best_loss"] is None  # no best yet: JSON has no infinity


def test_data_position_refuses_another_sample_order():
    """The saved data position carries a digest of the epoch's order; a regenerated order that differs
    (another torch, another data file of the same length) is refused rather than silently resumed."""
    from framework.data.batching import BatchOrder

    order = BatchOrder(10, 4, seed=1)
    batches = [next(order) for _ in range(3)]  # into epoch 1
    state = order.state_dict()
    resumed = BatchOrder(10, 4, seed=1)
    resumed.load_state_dict(json.loads(json.dumps(state)))
    assert next(resumed) == next(order)
    assert batches[2][:2] == BatchOrder(10, 4, seed=1).permutation(0)[8:]  # the batch that crossed the epoch
    state["permutation_sha256"] = "0" * 64
    with pytest.raises(ValueError, match="differs from the saved one"):
        BatchOrder(10, 4, seed=1).load_state_dict(state)


def test_trainer_options_are_checked_before_the_job_starts(tmp_path):
    from omegaconf import OmegaConf

    from framework.config.job import section_problems

    base = OmegaConf.load(os.path.join(ROOT, "conf", "trainer", "default.yaml"))
    assert section_problems("trainer", base) == []

    def problems(**changes):
        return "\n".join(section_problems("trainer", OmegaConf.merge(base, changes)))

    assert "trainer.early_stopping.patience=0" in problems(early_stopping={"patience": 0})
    assert "trainer.early_stopping.min_delta=-1" in problems(early_stopping={"min_delta": -1})
    assert "trainer.keep_last=0" in problems(keep_last=0)
    assert "trainer.max_steps is required" in problems(max_steps=None)
    assert problems(max_steps=None, max_epochs=2) == ""
    assert "trainer.max_epochs=0" in problems(max_epochs=0)
    assert "trainer.resume=" in problems(resume=str(tmp_path / "missing"))
    assert problems(resume=str(tmp_path)) == ""
    import importlib.util

    if importlib.util.find_spec("wandb") is None:
        assert "pip install wandb" in problems(wandb={"project": "demo"})
