"""The preference-tuning job (launch/dpo.py) as a user runs it: a short LoRA run on the bundled arithmetic
pairs raises the reward accuracy well above chance, the two full-parameter references give the same run,
SmolLM2 generalises to held-out pairs, and bad settings are refused by key before anything starts."""

from __future__ import annotations

import os

import pytest

from launch.spawn import run_distributed
from tests.dpo_cases import ROOT, compose, run_dpo, tiny_dpo


@pytest.mark.timeout(600)
def test_short_run_raises_reward_accuracy(tiny_hf, tiny_tokenizer_dir, tmp_path):
    """LoRA DPO of the tiny random model on 32 of the bundled arithmetic pairs (the tiny model knows no
    arithmetic, so the signal is these pairs themselves): after 20 steps (5 epochs) the reward accuracy over
    the pairs is well above chance (it starts at 0: policy = reference, all rewards 0), the margin is positive
    and the adapter is written."""
    pairs = tmp_path / "pairs.jsonl"
    with open(os.path.join(ROOT, "data", "preference", "arithmetic.jsonl")) as f:
        pairs.write_text("".join(f.readlines()[:32]))
    cfg = tiny_dpo(tiny_hf, tiny_tokenizer_dir, tmp_path / "run", f"data.train={pairs}", f"data.validation={pairs}",
                   "data.validation_split=null", "trainer.eval_samples=32", "trainer.max_steps=20",
                   "trainer.eval_interval=100", "trainer.lr=5e-3")
    history, before, after, trained = run_distributed(run_dpo, 1, cfg, timeout=550)[0]
    assert before["reward_accuracy"] == 0 and before["loss"] == pytest.approx(0.693147, abs=1e-5)
    assert after["reward_accuracy"] >= 0.8, after
    assert after["reward_margin"] > 0 and after["loss"] < before["loss"]
    assert os.path.isfile(os.path.join(trained, "adapter.safetensors"))
    assert (tmp_path / "run" / "summary.json").is_file()
    assert any(f.startswith("events") for f in os.listdir(tmp_path / "run" / "tensorboard"))


@pytest.mark.timeout(600)
def test_full_parameter_references_agree(tiny_hf, tiny_tokenizer_dir, tmp_path):
    """peft=none: the frozen copy (built and filled from the policy) and the precomputed table give the same
    run; the first step, before any update, has loss log 2 and zero rewards."""
    runs = {}
    for ref in ("frozen_copy", "precomputed"):
        cfg = tiny_dpo(tiny_hf, tiny_tokenizer_dir, tmp_path / ref, "peft=none", f"dpo.reference={ref}",
                       "trainer.max_steps=2", "trainer.eval_samples=8", "trainer.eval_interval=100", "trainer.lr=1e-3",
                       "dpo.sft_weight=0.3")
        runs[ref] = run_distributed(run_dpo, 1, cfg, timeout=280)[0]
    (h1, b1, a1, trained), (h2, b2, a2, _) = runs["frozen_copy"], runs["precomputed"]
    assert b1["loss"] == pytest.approx(b2["loss"], rel=1e-6) and b1["reward_margin"] == b2["reward_margin"] == 0
    assert h1[0]["pair_loss"] == pytest.approx(0.693147, abs=1e-5) and h1[0]["reward_margin"] == 0
    assert h1[1]["reward_margin"] != 0
    for x, y in zip(h1 + [a1], h2 + [a2]):
        for k in ("loss", "reward_chosen", "reward_rejected", "reward_accuracy", "logp_chosen", "nll_chosen"):
            assert x[k] == pytest.approx(y[k], rel=1e-5, abs=1e-6), k
    assert os.path.basename(trained) == "weights"


@pytest.mark.real_model
@pytest.mark.slow
@pytest.mark.timeout(600)
def test_smollm2_generalises_to_held_out_pairs(tmp_path):
    """The default job (LoRA on SmolLM2-135M-Instruct, bundled arithmetic pairs), a few steps: the reward
    accuracy on held-out validation pairs rises well above chance."""
    from tests.real_model import require_smollm2

    require_smollm2()
    cfg = compose([f"output_dir={tmp_path}", "trainer.max_steps=4", "trainer.global_batch_size=8",
                   "trainer.micro_batch_size=4", "trainer.eval_samples=16", "trainer.eval_interval=100",
                   "data.max_length=32"])
    _history, before, after, _ = run_distributed(run_dpo, 1, cfg, timeout=550)[0]
    assert before["reward_accuracy"] == 0
    assert after["reward_accuracy"] >= 0.75 and after["reward_margin"] > 0, after


@pytest.mark.parametrize("overrides,needle", [
    (["dpo.loss=kto"], "dpo.loss='kto': expected one of sigmoid, robust, ipo"),
    (["dpo.beta=0"], "dpo.beta=0: expected a number > 0"),
    (["dpo.loss=robust", "dpo.label_smoothing=0.5"], "dpo.label_smoothing=0.5: expected a number in [0, 0.5)"),
    (["dpo.loss=ipo", "dpo.label_smoothing=0.1"], "IPO has no label smoothing"),
    (["dpo.sft_weight=-1"], "dpo.sft_weight=-1: expected a number >= 0"),
    (["peft=none", "dpo.reference=adapters_disabled"], "dpo.reference=adapters_disabled needs an adapter method"),
    (["peft=prompt_tuning"], "preference tuning supports full fine-tuning (none) and the layer-wrapping adapters"),
    (["data.bad_records=ignore"], "data.bad_records='ignore': expected one of error, skip"),
    (["data=humaneval"], "launch/dpo.py trains on preference pairs (data.format=preference"),
])
def test_bad_dpo_config_is_refused(tiny_tokenizer_dir, overrides, needle):
    from framework.runtime.errors import ConfigError
    from framework.training.job_config import validate

    cfg = compose(["model=tiny_llama", f"model.tokenizer={tiny_tokenizer_dir}", *overrides])
    with pytest.raises(ConfigError) as e:
        validate(cfg, 1)
    assert needle in str(e.value)


def test_sft_job_refuses_preference_data(tiny_tokenizer_dir):
    from framework.runtime.errors import ConfigError
    from framework.training.job_config import validate

    cfg = compose(["model=tiny_llama", f"model.tokenizer={tiny_tokenizer_dir}", "data=preference_arithmetic"],
                  config_name="finetune")
    with pytest.raises(ConfigError, match="preference pairs train with launch/dpo.py"):
        validate(cfg, 1)
