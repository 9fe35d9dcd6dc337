"""Fixtures the training tests share: the uninterrupted reference run of the resume tests."""

import pytest

from tests.sft_jobs import DROPOUT, job_cfg, run_job


@pytest.fixture(scope="module")
def uninterrupted(tiny_tokenizer_dir, tmp_path_factory):
    """The resume tests' job (tests/sft_jobs.job_cfg, LoRA dropout on) run to the end without a pause, with
    synchronous saves: (RunResult, its run directory)."""
    out = tmp_path_factory.mktemp("uninterrupted")
    return run_job(job_cfg(tiny_tokenizer_dir, out, DROPOUT))[0], out
