"""A resume that toggles ``trainer.distributed_optimizer`` is refused before megatron reads the optimizer
state, naming the key and both values (framework/training/train_state.py records the layout that saved it)."""

import json
import re

import pytest

from tests.sft_jobs import job_cfg, run_job

FULL = ("peft.method=none", "trainer.save_interval=null", "trainer.eval_interval=100", "trainer.max_steps=2")


@pytest.mark.timeout(300)
def test_toggling_the_distributed_optimizer_on_resume_is_refused(tiny_tokenizer_dir, tmp_path):
    first, _ = run_job(job_cfg(tiny_tokenizer_dir, tmp_path, *FULL, "trainer.distributed_optimizer=false",
                               "trainer.steps_per_run=1"))
    assert first.status == "paused"
    state = json.loads((tmp_path / "checkpoints" / "step-000001" / "train_state" / "state.json").read_text())
    assert state["optimizer"] == {"distributed": False}
    with pytest.raises(Exception) as e:
        run_job(job_cfg(tiny_tokenizer_dir, tmp_path, *FULL, "trainer.distributed_optimizer=true"))
    message = str(e.value)
    assert re.search(r"trainer\.distributed_optimizer: checkpoint \S*step-000001 was saved with "
                     r"trainer\.distributed_optimizer=false, this run has trainer\.distributed_optimizer=true", message)
    assert "resume with trainer.distributed_optimizer=false" in message
    assert "Traceback" not in message.split("ConfigError")[-1]  # our error, not one from inside megatron
    # the same settings resume
    resumed, _ = run_job(job_cfg(tiny_tokenizer_dir, tmp_path, *FULL, "trainer.distributed_optimizer=false"))
    assert resumed.status == "completed" and resumed.resumed_from.endswith("step-000001")


class _PlainOptimizer:
    pass


def test_layout_problem_both_ways_and_for_checkpoints_without_the_record():
    from framework.training.train_state import optimizer_layout_problem

    saved_distributed = {"optimizer": {"distributed": True, "distrib_optim_sharding_type": "dp_reshardable"}}
    problem = optimizer_layout_problem(saved_distributed, _PlainOptimizer(), "run/checkpoints/step-000004")
    assert "was saved with trainer.distributed_optimizer=true, this run has trainer.distributed_optimizer=false" \
        in problem
    assert optimizer_layout_problem({"optimizer": {"distributed": False}}, _PlainOptimizer(), "x") is None
    # written before the layout was recorded: the saving run's setting decides
    assert "=true, this run has" in optimizer_layout_problem(
        {"settings": {"trainer.distributed_optimizer": True}}, _PlainOptimizer(), "x")
    assert optimizer_layout_problem({"settings": {}}, _PlainOptimizer(), "x") is None
