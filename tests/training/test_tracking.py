"""Weights & Biases logging of the job (framework/training/tracking.py), for real, in W&B's offline mode.

wandb writes an offline run as a transaction log, ``OUTPUT_DIR/wandb/offline-run-*/run-ID.wandb``: W&B's
LevelDB-style record log (a 7-byte ``:W&B`` header, then 32 KiB blocks of records, each with a 7-byte
header: CRC, length, type full/first/middle/last) of ``wandb_internal_pb2.Record`` messages. The test reads
them back with wandb's own protobuf classes and checks the history (the scalars, per step) against the
job's result and TensorBoard, and the run's config against the resolved job config.
"""

import importlib
import json
import struct
from pathlib import Path

import pytest

from tests.sft_jobs import job_cfg, run_job, tensorboard_scalars

BLOCK, HEADER = 32768, 7
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def wandb_records(path):
    """The Record messages of one offline run file, in order."""
    from wandb.proto import wandb_internal_pb2

    data = Path(path).read_bytes()
    ident, magic, _version = struct.unpack("<4sHB", data[:HEADER])
    assert ident == b":W&B" and magic == 0xBEE1, (ident, magic)
    pos, chunks = HEADER, []
    while pos + HEADER <= len(data):
        left = BLOCK - pos % BLOCK
        if left < HEADER:  # a block's tail too short for a record header is padding
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + HEADER])
        if kind == 0:  # zero padding to the end of the block
            pos += left
            continue
        chunks.append(data[pos + HEADER:pos + HEADER + length])
        pos += HEADER + length
        if kind in (FULL, LAST):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(b"".join(chunks))
            chunks = []
            yield record


def offline_runs(out):
    """{run file: [records]} of every offline W&B run under OUTPUT_DIR/wandb, oldest first."""
    files = sorted((Path(out) / "wandb").glob("offline-run-*/run-*.wandb"))
    return {f: list(wandb_records(f)) for f in files}


def history(records):
    """{step: {key: value}} of the logged scalars (W&B's own _step/_runtime/_timestamp left out)."""
    out = {}
    for r in records:
        if r.WhichOneof("record_type") == "history":
            items = {(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in r.history.item}
            out.setdefault(r.history.step.num, {}).update({k: v for k, v in items.items() if not k.startswith("_")})
    return out


def run_record(records):
    (run,) = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    return run


@pytest.fixture
def offline_wandb(monkeypatch, tmp_path):
    importlib.import_module("wandb")  # pinned in the test extra: a missing wandb fails here, it is not skipped

    for var, sub in (("WANDB_DIR", "dir"), ("WANDB_CONFIG_DIR", "config"), ("WANDB_CACHE_DIR", "cache"),
                     ("WANDB_DATA_DIR", "data")):
        (tmp_path / "wandb_env" / sub).mkdir(parents=True)
        monkeypatch.setenv(var, str(tmp_path / "wandb_env" / sub))
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")


@pytest.mark.timeout(420)
def test_wandb_offline_run_holds_the_scalars_and_the_resolved_config(offline_wandb, tiny_tokenizer_dir, tmp_path):
    from omegaconf import OmegaConf

    out = tmp_path / "run"
    extra = ("trainer.wandb.project=mft-test", "trainer.wandb.run_name=tiny", "trainer.max_steps=4",
             "trainer.eval_interval=2", "trainer.save_interval=null")
    cfg = job_cfg(tiny_tokenizer_dir, out, *extra, "trainer.steps_per_run=2")
    first, _ = run_job(cfg)
    assert first.status == "paused"
    resumed, _ = run_job(job_cfg(tiny_tokenizer_dir, out, *extra))
    assert resumed.status == "completed" and resumed.steps == 4

    runs = offline_runs(out)
    assert len(runs) == 2, list(runs)  # one offline run directory per invocation ...
    heads = [run_record(records) for records in runs.values()]
    assert heads[0].run_id == heads[1].run_id  # ... of the same W&B run: the resumed invocation continues it
    assert {h.project for h in heads} == {"mft-test"} and {h.display_name for h in heads} == {"tiny"}

    logged = {}
    for records in runs.values():
        for step, values in history(records).items():
            logged.setdefault(step, {}).update(values)
    assert sorted(logged) == [0, 1, 2, 3, 4]
    assert [logged[s]["train/loss"] for s in (1, 2, 3, 4)] == pytest.approx(resumed.train_losses, rel=1e-12)
    assert logged[0]["val/loss"] == pytest.approx(resumed.val_loss_before, rel=1e-12)
    assert logged[4]["val/loss"] == pytest.approx(resumed.val_loss_after, rel=1e-12)
    for step in (1, 2, 3, 4):
        assert {"train/lr", "train/grad_norm", "train/tokens_per_s", "train/memory_gib",
                "train/tflops_per_gpu"} <= set(logged[step]), logged[step]
    # the same values TensorBoard got (float32 there)
    assert [logged[s]["train/lr"] for s, _ in tensorboard_scalars(out, "train/lr")] == pytest.approx(
        [v for _, v in tensorboard_scalars(out, "train/lr")], rel=1e-6)

    # the run's config is the job's resolved config (no ${...} left, every section's defaults filled in by
    # its typed schema), as the job saved it in OUTPUT_DIR/config.yaml
    config = {i.key: json.loads(i.value_json) for i in heads[0].config.update if i.key != "_wandb"}
    expected = OmegaConf.to_container(OmegaConf.load(out / "config.yaml"), resolve=True)  # the second invocation's
    expected["trainer"]["steps_per_run"] = 2  # ... which the first invocation had
    assert config == json.loads(json.dumps(expected))
    assert config["trainer"]["max_steps"] == 4 and config["model"]["source"] == cfg.model.source
    assert config["trainer"]["wandb"]["project"] == "mft-test" and config["output_dir"] == str(out)
