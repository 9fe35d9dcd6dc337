"""Background checkpoint saves (``trainer.async_save``): megatron's async dist_checkpointing on CPU/gloo.

The reference is the same job with synchronous saves: a paused run writes the same checkpoint files
(adapter, optimizer tensors read back by torch.distributed.checkpoint's own converter, RNG states,
state.json), and its continuation gives the uninterrupted run's losses. That the save really happened in
the background is observed at the moment ``Checkpoints.save`` returned: the new checkpoint was not yet
published (``latest`` still named the previous one) and its write was pending. A process killed after the
background write finished but before the checkpoint was finalized leaves the previous checkpoint as
``latest``, and the restarted job continues from it with the uninterrupted losses.
"""

import json
import logging
import os
import time
from pathlib import Path

import pytest
import torch

from launch.spawn import run_distributed
from tests.job_process import capture_messages, kill_when_blocked
from tests.sft_jobs import DROPOUT, ROOT, STEPS, assert_same_adapter, checkpoint_steps, job_cfg, pointer, run_job

# The fixture ``uninterrupted`` (tests/training/conftest.py): the same job, synchronous saves, no pause.

ASYNC = "trainer.async_save=true"


def _job_watching_saves(cfg):
    """The job, recording for each save what was on disk when ``Checkpoints.save`` returned, and the
    checkpointing module's log."""
    from framework.runtime.logs import setup_logging
    from framework.training import checkpointing, finetune

    os.chdir(ROOT)
    setup_logging("WARNING")
    messages = capture_messages("framework.checkpointing", logging.INFO)
    seen = []
    real_save = checkpointing.Checkpoints.save

    def save(self, step, write, **kwargs):
        target = real_save(self, step, write, **kwargs)
        seen.append({"step": step, "latest": (self.root / checkpointing.LATEST).read_text().strip()
                     if (self.root / checkpointing.LATEST).exists() else None,
                     "published": target.is_dir(), "pending": self.pending})
        return target

    checkpointing.Checkpoints.save = save
    result = finetune.run(cfg)
    return result, seen, messages


def _optimizer_tensors(train_state_dir):
    """Every tensor of a dist_checkpointing directory, read by torch's own DCP-to-torch.save converter."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    out = Path(train_state_dir).parent / "optimizer.pt"
    dcp_to_torch_save(str(Path(train_state_dir) / "optimizer"), str(out))
    flat = {}

    def walk(prefix, value):
        if isinstance(value, dict):
            for k, v in value.items():
                walk(f"{prefix}/{k}", v)
        elif torch.is_tensor(value):
            flat[prefix] = value

    walk("", torch.load(out, weights_only=False))
    out.unlink()
    return flat


def _rng_states(train_state_dir):
    from framework.training.rng_state import read_rng_file

    found = {p.name: read_rng_file(p) for p in sorted((Path(train_state_dir) / "rng").glob("*.safetensors"))}
    assert found, f"no RNG state files in {train_state_dir}/rng"
    return found


def _same_rng(a, b):
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name]["torch"], b[name]["torch"]), name
        assert a[name]["python"] == b[name]["python"], name
        for k in a[name]["tracker"]:
            assert torch.equal(a[name]["tracker"][k], b[name]["tracker"][k]), (name, k)


@pytest.mark.timeout(600)
def test_background_save_writes_the_same_checkpoint_and_resumes(tiny_tokenizer_dir, uninterrupted, tmp_path):
    ref, ref_dir = uninterrupted
    sync_dir, async_dir = tmp_path / "sync", tmp_path / "async"
    run_job(job_cfg(tiny_tokenizer_dir, sync_dir, DROPOUT, "trainer.steps_per_run=3"))
    first, seen, messages = run_distributed(
        _job_watching_saves, 1, job_cfg(tiny_tokenizer_dir, async_dir, DROPOUT, ASYNC, "trainer.steps_per_run=3"),
        timeout=300)[0]
    assert first.status == "paused"

    # When save() returned, the checkpoint of step 2 was still being written: not published, latest unset.
    # The save of step 3 first finalized step 2's, and the job finalized step 3's before it exited.
    assert seen == [{"step": 2, "latest": None, "published": False, "pending": 1},
                    {"step": 3, "latest": "step-000002", "published": False, "pending": 1}]
    assert sum("written in the background and published" in m for m in messages) == 2, messages
    assert pointer(async_dir, "latest") == "step-000003"
    assert checkpoint_steps(async_dir) == checkpoint_steps(sync_dir) == [2, 3]
    assert not [p for p in (async_dir / "checkpoints").iterdir() if p.name.startswith(".")]

    for step in ("step-000002", "step-000003"):
        a, s = async_dir / "checkpoints" / step, sync_dir / "checkpoints" / step
        assert_same_adapter(a, s, atol=0)
        ta, ts = _optimizer_tensors(a / "train_state"), _optimizer_tensors(s / "train_state")
        assert ta.keys() == ts.keys() and any("exp_avg" in k for k in ta)
        for k in ta:
            assert torch.equal(ta[k], ts[k]), (step, k)
        _same_rng(_rng_states(a / "train_state"), _rng_states(s / "train_state"))
        state_a = json.loads((a / "train_state" / "state.json").read_text())
        state_s = json.loads((s / "train_state" / "state.json").read_text())
        for state in (state_a, state_s):
            state.pop("train_seconds")
        assert state_a == state_s

    # The continuation (still saving in the background) gives the uninterrupted run's losses.
    resumed, _ = run_job(job_cfg(tiny_tokenizer_dir, async_dir, DROPOUT, ASYNC))
    assert resumed.resumed_from.endswith("step-000003") and resumed.steps == STEPS
    assert resumed.train_losses == pytest.approx(ref.train_losses, abs=1e-6, rel=0)
    assert_same_adapter(async_dir, ref_dir, atol=1e-6)
    assert pointer(async_dir, "latest") == f"step-{STEPS:06d}"


def _job_killed_before_finalize(cfg, blocked_marker, block_at):
    """The async job; when checkpoint ``block_at`` is about to be published (its background write done
    and finalized by megatron, state.json written) the publication blocks until the parent kills us."""
    from framework.training import checkpointing
    from tests.sft_jobs import job_in_process

    real_publish = checkpointing.Checkpoints._publish

    def publish_or_block(self, tmp, target, *args):
        if target.name == f"step-{block_at:06d}":
            Path(blocked_marker).write_text(json.dumps({"tmp": str(tmp), "complete": checkpointing.is_complete(tmp)}))
            time.sleep(3600)
        return real_publish(self, tmp, target, *args)

    checkpointing.Checkpoints._publish = publish_or_block
    job_in_process(cfg)


@pytest.mark.timeout(420)
def test_crash_before_finalize_keeps_the_previous_checkpoint(tiny_tokenizer_dir, uninterrupted, tmp_path):
    ref, _ = uninterrupted
    out, marker = tmp_path / "run", tmp_path / "blocked"
    kill_when_blocked(_job_killed_before_finalize, (job_cfg(tiny_tokenizer_dir, out, DROPOUT, ASYNC), str(marker), 4),
                      marker, "the finalization of the save of step 4", timeout=240)
    blocked = json.loads(marker.read_text())
    # everything of step 4 was on disk, only the publication had not happened
    assert blocked["complete"] and Path(blocked["tmp"]).is_dir()
    assert checkpoint_steps(out) == [2]
    assert pointer(out, "latest") == "step-000002"

    resumed, messages = run_job(job_cfg(tiny_tokenizer_dir, out, DROPOUT, ASYNC))
    assert resumed.resumed_from.endswith("step-000002")
    assert resumed.train_losses == pytest.approx(ref.train_losses, abs=1e-6, rel=0)
    assert any("interrupted checkpoint save" in m for m in messages), messages
    assert not [p for p in (out / "checkpoints").iterdir() if p.name.startswith(".")]
    assert checkpoint_steps(out)[-2:] == [4, 6]


def test_async_save_is_a_boolean_option():
    from omegaconf import OmegaConf

    from framework.config.job import section_problems

    base = OmegaConf.load(os.path.join(ROOT, "conf", "trainer", "default.yaml"))
    assert base.async_save is False and section_problems("trainer", base) == []
    assert "trainer.async_save='maybe'" in "\n".join(
        section_problems("trainer", OmegaConf.merge(base, {"async_save": "maybe"})))
    assert "trainer.peak_tflops=-1" in "\n".join(section_problems("trainer", OmegaConf.merge(base, {"peak_tflops": -1})))
