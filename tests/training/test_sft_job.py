"""The fine-tuning job as a user runs it: layout refusal, every layout agreeing, the default job end to end."""

import os
import subprocess
import sys

import pytest

from launch.spawn import run_distributed
from tests.hf_models import save_tiny_job_llama
from tests.real_model import require_smollm2
from tests.sft_jobs import ROOT, compose, evaluate_adapter, run_sft, tiny_job
from tests.tolerances import FORWARD_REL


@pytest.mark.timeout(120)
def test_layout_the_model_cannot_take_is_refused_before_process_groups_start(tmp_path):
    """SmolLM2 has 9 query and 3 KV heads: TP=2 is refused with the sizes that would work."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_ADDR")}
    p = subprocess.run([sys.executable, "launch/finetune.py", "parallel.tensor=2", f"output_dir={tmp_path}"],
                       cwd=ROOT, capture_output=True, text=True, env=env, timeout=100)
    assert p.returncode == 2, p.stderr[-2000:]
    assert "parallel.tensor=2 does not divide the model's 9 query heads and 3 KV heads" in p.stderr
    assert "tensor-parallel sizes that work: [1, 3]" in p.stderr
    assert "Traceback" not in p.stderr
    assert not (tmp_path / "config.yaml").exists()  # the job never started


@pytest.fixture(scope="module")
def tiny_hf(tmp_path_factory, tiny_tokenizer_dir):
    """A tiny random Llama in Hugging Face format whose vocabulary fits the tiny test tokenizer."""
    return save_tiny_job_llama(tmp_path_factory.mktemp("tiny_hf"))


@pytest.fixture(scope="module")
def tiny_single(tiny_hf, tiny_tokenizer_dir, tmp_path_factory):
    cfg = tiny_job(tiny_hf, tiny_tokenizer_dir, tmp_path_factory.mktemp("single"))
    return run_distributed(run_sft, 1, cfg, timeout=200)[0]


@pytest.mark.timeout(300)
@pytest.mark.parametrize("overrides,world", [
    (["parallel.tensor=2"], 2),
    (["parallel.tensor=2", "parallel.sequence=true"], 2),
    (["parallel.pipeline=2"], 2),
    ([], 2),  # DP=2
], ids=["tp2", "tp2-sp", "pp2", "dp2"])
def test_job_losses_match_single_process(tiny_hf, tiny_tokenizer_dir, tiny_single, tmp_path, overrides, world):
    """Same data order, weights and LoRA init: three optimiser steps give the same losses (fp32; FORWARD_REL,
    the rounding of reordered sums, tests/tolerances.py: Adam's step hardly depends on it), and the
    same validation loss over the same 5 samples (not a multiple of micro-batch x DP)."""
    cfg = tiny_job(tiny_hf, tiny_tokenizer_dir, tmp_path, *overrides)
    losses, before, after, _ = run_distributed(run_sft, world, cfg, timeout=250)[0]
    ref_losses, ref_before, ref_after, _ = tiny_single
    assert before == pytest.approx(ref_before, rel=FORWARD_REL)
    assert losses == pytest.approx(ref_losses, rel=FORWARD_REL)
    assert after == pytest.approx(ref_after, rel=FORWARD_REL)
    assert after < before  # it does learn


@pytest.mark.timeout(200)
def test_bf16_autocast_tracks_fp32(tiny_hf, tiny_tokenizer_dir, tiny_single, tmp_path):
    """precision=bf16 on CPU autocasts the matmuls (fp32 weights and grads): it learns, and its losses stay
    within bf16 rounding (2e-2 relative) of the fp32 run."""
    cfg = tiny_job(tiny_hf, tiny_tokenizer_dir, tmp_path, "precision=bf16")
    losses, before, after, _ = run_distributed(run_sft, 1, cfg, timeout=180)[0]
    ref_losses, ref_before, ref_after, _ = tiny_single
    assert losses == pytest.approx(ref_losses, rel=2e-2)
    assert losses != ref_losses  # bf16 really ran
    assert after < before


@pytest.mark.real_model
@pytest.mark.timeout(600)
def test_default_job_short(tmp_path):
    """The default job (SmolLM2-135M + HumanEval), a few steps: validation loss falls, and the saved
    adapter reloads into a fresh model with the identical validation loss."""
    require_smollm2()
    cfg = compose(["trainer.max_steps=4", "trainer.global_batch_size=4", "trainer.eval_samples=4",
                   "data.max_length=160", "generate.max_new_tokens=4", f"output_dir={tmp_path}"])
    losses, before, after, adapter_dir = run_distributed(run_sft, 1, cfg, timeout=550)[0]
    assert after < before - 0.05, (before, after)
    assert os.path.isfile(os.path.join(adapter_dir, "adapter.safetensors"))
    assert (tmp_path / "config.yaml").is_file()
    reloaded = run_distributed(evaluate_adapter, 1, cfg, adapter_dir, timeout=300)[0]
    assert reloaded == pytest.approx(after, abs=1e-6)


@pytest.mark.real_model
@pytest.mark.timeout(300)
def test_chat_messages_job_short(tmp_path):
    """data=chat_example: OpenAI-style conversations rendered with SmolLM2's chat template, loss on the
    assistant turns; two steps run and the validation loss falls."""
    require_smollm2()
    cfg = compose(["data=chat_example", "trainer.max_steps=3", "trainer.global_batch_size=4",
                   "trainer.eval_samples=8", "data.max_length=128", "generate.max_new_tokens=0",
                   f"output_dir={tmp_path}"])
    losses, before, after, _ = run_distributed(run_sft, 1, cfg, timeout=280)[0]
    assert after < before, (before, after)
