"""Checkpoints as .tar archives (DESIGN.md checkpoint layout) and our checkpoint as the job's base model:
HF -> ours.tar -> HF bitwise; a damaged or unsafe archive is a clear error; model.source=ckpt (directory or
.tar) gives the job exactly the weights model.source=hf gives it."""

from __future__ import annotations

import io
import tarfile

import pytest
import torch

from launch.spawn import run_distributed
from tests.family_cases import read_tensors
from tests.hf_models import save_tiny_job_llama
from tests.sft_jobs import run_sft, tiny_job


def _convert_worker(hf_dir, tar_path, back_dir):
    from converters import ckpt_to_hf, hf_to_ckpt

    hf_to_ckpt.convert(hf_dir, tar_path, progress=False)
    ckpt_to_hf.convert(tar_path, back_dir, progress=False)
    return True


@pytest.fixture(scope="module")
def converted(tmp_path_factory, tiny_tokenizer_dir):
    import shutil

    root = tmp_path_factory.mktemp("archive")
    hf = save_tiny_job_llama(root / "hf")
    for f in tiny_tokenizer_dir.iterdir():
        shutil.copy2(f, hf / f.name)
    tar, back = root / "ckpt.tar", root / "back"
    run_distributed(_convert_worker, 1, str(hf), str(tar), str(back), timeout=150)
    return hf, tar, back


@pytest.mark.timeout(200)
def test_hf_to_tar_to_hf_is_bitwise(converted, tmp_path, monkeypatch):
    from framework.checkpoint.archive import unpacked

    hf, tar, back = converted
    assert tarfile.is_tarfile(tar) and not list(tar.parent.glob(".ckpt.tar.tmp*"))
    names = tarfile.open(tar).getnames()
    assert "config.yaml" in names and any(n.startswith("weights/") for n in names)
    a, b = read_tensors(hf), read_tensors(back)
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)
    # unpacked once per archive version, reused afterwards
    monkeypatch.setenv("FRAMEWORK_CACHE", str(tmp_path))
    first = unpacked(tar)
    assert unpacked(tar) == first and (first / "config.yaml").is_file()


def test_damaged_or_unsafe_archive_is_refused(converted, tmp_path, monkeypatch):
    from framework.checkpoint.archive import ArchiveError, unpacked

    monkeypatch.setenv("FRAMEWORK_CACHE", str(tmp_path / "cache"))
    _, tar, _ = converted
    cut = tmp_path / "cut.tar"
    cut.write_bytes(tar.read_bytes()[: tar.stat().st_size // 3])
    with pytest.raises(ArchiveError, match="cut.tar"):
        unpacked(cut)
    evil = tmp_path / "evil.tar"
    with tarfile.open(evil, "w") as t:
        info = tarfile.TarInfo("../outside.txt")
        info.size = 3
        t.addfile(info, io.BytesIO(b"bad"))
    with pytest.raises(ArchiveError, match="unsafe member"):
        unpacked(evil)
    assert not (tmp_path / "cache" / "outside.txt").exists()


@pytest.mark.timeout(300)
def test_job_on_our_checkpoint_sees_the_hf_weights(converted, tiny_tokenizer_dir, tmp_path):
    hf, tar, _ = converted
    common = ("trainer.max_steps=1",)
    from_hf = tiny_job(hf, tiny_tokenizer_dir, tmp_path / "hf", *common)
    from_tar = tiny_job(hf, tiny_tokenizer_dir, tmp_path / "tar", "model.source=ckpt", f"model.path={tar}",
                        "model.tokenizer=null", *common)
    r_hf = run_distributed(run_sft, 1, from_hf, timeout=200)[0]
    r_tar = run_distributed(run_sft, 2, from_tar, timeout=200)[0]  # DP=2: loaded on every rank
    assert r_hf[1] == pytest.approx(r_tar[1], rel=1e-6, abs=0)  # validation loss before training
