"""The reward-model job (launch/reward.py, the job engine with framework/training/reward_task.py) as a user runs
it on the tiny random causal LM (its LM head dropped, a fresh score head): LoRA on 32 bundled arithmetic pairs
raises the accuracy over them well above chance and writes the adapter with score_head.safetensors; a paused run
resumed (the head read back from its checkpoint) ends where the uninterrupted one does; full parameters train
the head inside the weights checkpoint; bad settings are refused by key before anything starts."""

from __future__ import annotations

import os

import pytest

from launch.spawn import run_distributed
from tests.dpo_cases import ROOT, compose
from tests.hf_models import save_tiny_job_llama


@pytest.fixture(scope="module")
def tiny_hf(tmp_path_factory):
    return save_tiny_job_llama(tmp_path_factory.mktemp("tiny_hf"))


def run_reward(cfg):
    os.chdir(ROOT)
    from framework.runtime.logs import setup_logging
    from framework.training.reward_task import run

    setup_logging("WARNING")
    r = run(cfg)
    return r.history, r.val_before, r.val_after, r.trained_dir, r.status


def tiny_reward(tiny_hf, tokenizer_dir, out, pairs, *extra):
    return compose(["model=tiny_llama", "model.source=hf", f"model.path={tiny_hf}", f"model.tokenizer={tokenizer_dir}",
                    "trainer.global_batch_size=8", "trainer.micro_batch_size=4", "trainer.warmup_steps=0",
                    "trainer.log_interval=100", f"output_dir={out}", f"data.train={pairs}",
                    f"data.validation={pairs}", "data.validation_split=null", "trainer.eval_samples=32",
                    "trainer.eval_interval=100", *extra], config_name="reward")


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    path = tmp_path_factory.mktemp("pairs") / "pairs.jsonl"
    with open(os.path.join(ROOT, "data", "preference", "arithmetic.jsonl")) as f:
        path.write_text("".join(f.readlines()[:32]))
    return path


@pytest.mark.timeout(600)
def test_lora_run_learns_and_resumes(tiny_hf, tiny_tokenizer_dir, pairs, tmp_path):
    cfg = tiny_reward(tiny_hf, tiny_tokenizer_dir, tmp_path / "run", pairs, "trainer.max_steps=60", "trainer.lr=3e-3")
    history, before, after, trained, status = run_distributed(run_reward, 1, cfg, timeout=550)[0]
    assert status == "completed" and len(history) == 60
    assert after["accuracy"] >= 0.8 > before["accuracy"] - 0.3, (before, after)
    assert after["loss"] < before["loss"] and after["margin"] > 0
    assert {"chosen", "rejected", "std", "margin"} <= set(history[-1])
    assert os.path.isfile(os.path.join(trained, "adapter.safetensors"))
    assert os.path.isfile(os.path.join(trained, "score_head.safetensors"))
    # the same run paused after 3 of 5 steps and resumed ends with the same metrics
    runs = {}
    for name, extra in (("whole", []), ("paused", ["trainer.steps_per_run=3"])):
        c = tiny_reward(tiny_hf, tiny_tokenizer_dir, tmp_path / name, pairs, "trainer.max_steps=5", "trainer.lr=5e-3",
                        *extra)
        runs[name] = run_distributed(run_reward, 1, c, timeout=300)[0]
    assert runs["paused"][4] == "paused"
    again = run_distributed(run_reward, 1, tiny_reward(tiny_hf, tiny_tokenizer_dir, tmp_path / "paused", pairs,
                                                        "trainer.max_steps=5", "trainer.lr=5e-3"), timeout=300)[0]
    assert again[4] == "completed"
    for a, b in zip(runs["whole"][0], again[0]):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5, abs=1e-6)
    assert again[2]["loss"] == pytest.approx(runs["whole"][2]["loss"], rel=1e-5, abs=1e-6)


@pytest.mark.timeout(600)
def test_full_parameters(tiny_hf, tiny_tokenizer_dir, pairs, tmp_path):
    cfg = tiny_reward(tiny_hf, tiny_tokenizer_dir, tmp_path / "full", pairs, "peft=none", "trainer.max_steps=2",
                      "trainer.lr=1e-3")
    history, before, after, trained, status = run_distributed(run_reward, 1, cfg, timeout=300)[0]
    assert status == "completed" and os.path.basename(trained) == "weights"
    assert os.path.isfile(os.path.join(trained, "score_head.safetensors"))
    assert history[1]["loss"] != history[0]["loss"]


@pytest.mark.parametrize("override,message", [
    ("data.packing=true", "data.packing=true is not supported for reward models"),
    ("peft=prompt_tuning", "prompt methods are not supported for reward models"),
    ("reward.center_rewards_coefficient=-1", "reward.center_rewards_coefficient=-1"),
    ("head=lm", "a reward model needs head=score"),
])
def test_refusals(tiny_hf, tiny_tokenizer_dir, pairs, tmp_path, override, message):
    from framework.runtime.errors import ConfigError
    from framework.training.reward_task import validate

    cfg = tiny_reward(tiny_hf, tiny_tokenizer_dir, tmp_path / "x", pairs, override)
    with pytest.raises(ConfigError, match=message.replace("=", "=").replace(".", r"\.")):
        validate(cfg, 1)
