"""The train state holds no pickle of ours and runs no code it is handed.

RNG states round-trip exactly through their safetensors file (every stream continues with the same draws,
read with every unpickler disabled). A saved train state holds only JSON and safetensors besides megatron's
optimizer directory, whose pickles pass the check that refuses code. A train state of the old format (RNG
states as ``rng/*.pt`` pickles) is refused, naming the file and what to do; code planted in it, in an
optimizer ``.metadata``, in a byte item of a ``.distcp`` file or in ``common.pt`` never runs. Each planted
payload is first shown to run under the unchecked loader, so that the refusals are not vacuous.
"""

import contextlib
import json
import pickle
import random
import shutil

import numpy as np
import pytest
import torch
import torch.distributed.checkpoint as dcp

from framework.checkpoint.dcp_pickles import check_dcp_pickles
from framework.runtime.errors import CheckpointError, ConfigError
from framework.training import train_state
from framework.training.rng_state import read_rng_file, rng_state, save_rng_file, set_rng_state
from tests.sft_jobs import job_cfg, run_job


class PlantedCode:
    """Pickles as a call to ``open(path, "w")``: unpickling it creates ``path``."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


@contextlib.contextmanager
def unpickling_refused():
    """Every loader that unpickles raises inside the block (this process only)."""
    def refuse(*_a, **_k):
        raise AssertionError("something was unpickled")

    with pytest.MonkeyPatch.context() as m:
        for module, name in ((torch, "load"), (pickle, "load"), (pickle, "loads"), (pickle, "Unpickler")):
            m.setattr(module, name, refuse)
        yield


@pytest.fixture
def tracker():
    """megatron's RNG tracker with both kinds of entry (a state tensor; a Generator, as megatron's graph-safe
    tracker keeps); this process's RNG states are put back afterwards."""
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    t = get_cuda_rng_tracker()
    kept = (t.get_states(), random.getstate(), np.random.get_state(), torch.get_rng_state())
    t.set_states({"model-parallel-rng": torch.Generator().manual_seed(11).get_state(),
                  "graph-safe-rng": torch.Generator().manual_seed(12)})
    yield t
    t.set_states(kept[0])
    random.setstate(kept[1])
    np.random.set_state(kept[2])
    torch.set_rng_state(kept[3])


def draws(tracker) -> dict:
    """The next numbers of every stream (the tracker's drawn from copies, leaving its states as they are)."""
    out = {"python": [random.random() for _ in range(3)] + [random.gauss(0, 1)],
           "numpy": np.random.rand(3).tolist() + [np.random.standard_normal()],
           "torch": torch.rand(4).tolist()}
    for name, value in sorted(tracker.get_states().items()):
        g = torch.Generator()
        g.set_state(value.get_state() if isinstance(value, torch.Generator) else value)
        out[name] = torch.rand(4, generator=g).tolist()
    return out


def test_rng_states_round_trip_exactly(tracker, tmp_path):
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    random.gauss(0, 1)           # leaves python's gauss_next set: a float in the JSON
    np.random.standard_normal()  # leaves numpy's cached gaussian set
    assert random.getstate()[2] is not None and np.random.get_state()[3] == 1
    path = tmp_path / "tp0-pp0-dp0.safetensors"
    save_rng_file(path, rng_state())
    expected = draws(tracker)

    random.seed(99)
    np.random.seed(99)
    torch.manual_seed(99)
    tracker.set_states({"model-parallel-rng": torch.Generator().manual_seed(99).get_state(),
                        "graph-safe-rng": torch.Generator().manual_seed(99)})
    assert draws(tracker) != expected
    with unpickling_refused():
        state = read_rng_file(path)
    set_rng_state(state)
    assert draws(tracker) == expected  # exactly: the same floats, not close ones
    assert isinstance(tracker.get_states()["graph-safe-rng"], torch.Generator)


def test_rng_file_is_safetensors_and_damage_is_named(tracker, tmp_path):
    path = tmp_path / "rng.safetensors"
    save_rng_file(path, rng_state())
    raw = path.read_bytes()
    header = int.from_bytes(raw[:8], "little")  # safetensors: a little-endian header length, a JSON header
    assert json.loads(raw[8:8 + header])["__metadata__"]["format"] == "framework-rng-state"
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # the temporary file was renamed into place
    path.write_bytes(raw[:8 + header - 10])
    with pytest.raises(CheckpointError, match=r"rng\.safetensors: not an RNG state file"):
        read_rng_file(path)


def old_format_train_state(state_dir, marker):
    """A train state as the code before safetensors wrote it (state.json format_version 1, RNG states
    torch.save'd), with code planted in the pickle."""
    (state_dir / "rng").mkdir(parents=True)
    (state_dir / "optimizer").mkdir()
    torch.save({"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
                "tracker": {"model-parallel-rng": torch.get_rng_state()}, "planted": PlantedCode(marker)},
               state_dir / "rng" / "tp0-pp0-dp0.pt")
    (state_dir / "state.json").write_text(json.dumps({
        "format_version": 1, "step": 2, "total_steps": 6, "losses": [1.0, 1.0], "validations": [],
        "scheduler": {}, "data_order": {}, "early_stopping": {}, "layout": {"tp": 1, "pp": 1, "dp": 1},
        "optimizer": {"distributed": False}, "settings": {}}))


def test_old_format_is_refused_without_unpickling(tmp_path):
    state_dir, marker = tmp_path / "step-000002" / "train_state", tmp_path / "marker"
    old_format_train_state(state_dir, marker)
    torch.load(state_dir / "rng" / "tp0-pp0-dp0.pt", weights_only=False)  # the payload works when unpickled
    assert marker.exists()
    marker.unlink()

    with unpickling_refused():
        for read in (lambda: train_state.read_state(state_dir),
                     lambda: train_state.load_train_state(state_dir, model=None, optimizer=None, scheduler=None,
                                                          order=None, stopper=None, rt=None)):
            with pytest.raises(ConfigError) as e:
                read()
            message = str(e.value)
            assert str(state_dir / "state.json") in message and str(state_dir / "rng") + "/*.pt" in message
            assert "the version that wrote it" in message and "another output_dir" in message
            assert "trainer.resume=never" in message
    assert not marker.exists()


@pytest.mark.timeout(300)
def test_the_job_refuses_an_old_format_checkpoint(tiny_tokenizer_dir, tmp_path):
    marker = tmp_path / "marker"
    old_format_train_state(tmp_path / "checkpoints" / "step-000002" / "train_state", marker)
    (tmp_path / "checkpoints" / "latest").write_text("step-000002\n")
    with pytest.raises(Exception) as e:
        run_job(job_cfg(tiny_tokenizer_dir, tmp_path))
    assert "ConfigError: trainer.resume:" in str(e.value) and "format_version 1" in str(e.value)
    assert not marker.exists()


def test_dcp_check_passes_plain_data_and_refuses_planted_code(tmp_path):
    marker = tmp_path / "marker"
    good, bad_item = tmp_path / "good", tmp_path / "bad_item"
    dcp.save({"t": torch.arange(4.0), "obj": [1, {"a": (2, 3.5)}], "dtype": torch.bfloat16},
             storage_writer=dcp.FileSystemWriter(str(good)), no_dist=True)
    check_dcp_pickles(good)

    # a byte item (how megatron's distributed optimizer stores its param groups) planted with code
    dcp.save({"t": torch.arange(4.0), "obj": PlantedCode(marker)}, storage_writer=dcp.FileSystemWriter(str(bad_item)),
             no_dist=True)
    dcp.load({"t": torch.zeros(4), "obj": None}, storage_reader=dcp.FileSystemReader(str(bad_item)), no_dist=True)
    assert marker.exists()  # torch's own loader runs it
    marker.unlink()
    with pytest.raises(CheckpointError, match=r"__0_0\.distcp \(item 'obj'\): .*GLOBAL io\.open"):
        check_dcp_pickles(bad_item)

    bad_metadata = tmp_path / "bad_metadata"
    shutil.copytree(good, bad_metadata)
    (bad_metadata / ".metadata").write_bytes(pickle.dumps(PlantedCode(marker)))
    with pytest.raises(CheckpointError, match=r"\.metadata: not a torch distributed-checkpoint metadata.*io\.open"):
        check_dcp_pickles(bad_metadata)

    bad_common = tmp_path / "bad_common"
    shutil.copytree(good, bad_common)
    torch.save({"planted": PlantedCode(marker)}, bad_common / "common.pt")
    with pytest.raises(CheckpointError, match=r"common\.pt: holds a pickle .*io\.open"):
        check_dcp_pickles(bad_common)
    assert not marker.exists()


@pytest.mark.timeout(400)
def test_saved_train_state_holds_no_pickle_of_ours_and_resume_checks_megatrons(tiny_tokenizer_dir, tmp_path):
    # two DP ranks with megatron's distributed optimizer: two RNG files, and byte items in the .distcp files
    overrides = ("trainer.max_steps=2", "trainer.steps_per_run=1", "trainer.save_interval=1", "peft=none",
                 "trainer.distributed_optimizer=true")
    first, _ = run_job(job_cfg(tiny_tokenizer_dir, tmp_path, *overrides), world=2)
    assert first.status == "paused"
    state_dir = tmp_path / "checkpoints" / "step-000001" / "train_state"
    ours = sorted(p for p in state_dir.rglob("*") if p.is_file()
                  and train_state.OPTIMIZER_DIR not in p.relative_to(state_dir).parts)
    assert [p.relative_to(state_dir).as_posix() for p in ours] == [
        "rng/tp0-pp0-dp0.safetensors", "rng/tp0-pp0-dp1.safetensors", "state.json"]
    for p in ours:
        head = p.read_bytes()[:2]  # a pickle starts with the PROTO opcode 0x80, a torch.save file is a zip
        assert head[:1] != b"\x80" and head != b"PK", p
    with unpickling_refused():
        assert train_state.read_state(state_dir)["format_version"] == train_state.FORMAT_VERSION
        assert read_rng_file(ours[0])["tracker"] and read_rng_file(ours[1])["tracker"]
    check_dcp_pickles(state_dir / train_state.OPTIMIZER_DIR)  # megatron's own pickles hold plain data

    # code planted in the optimizer's .metadata: the resume refuses it before megatron unpickles it
    metadata = state_dir / train_state.OPTIMIZER_DIR / ".metadata"
    kept = metadata.read_bytes()
    marker = tmp_path / "marker"
    metadata.write_bytes(pickle.dumps(PlantedCode(marker)))
    with pytest.raises(Exception) as e:
        run_job(job_cfg(tiny_tokenizer_dir, tmp_path, *overrides), world=2)
    assert "CheckpointError" in str(e.value) and "optimizer/.metadata: not a torch distributed-checkpoint" \
        in str(e.value)
    assert not marker.exists()
    metadata.write_bytes(kept)  # and the untouched checkpoint resumes
    resumed, _ = run_job(job_cfg(tiny_tokenizer_dir, tmp_path, *overrides), world=2)
    assert resumed.status == "completed" and resumed.resumed_from.endswith("step-000001")


def test_loop_state_reads_the_units_of_either_name():
    """``LoopState.units`` was ``tokens`` in format-2 state.json files written before the rename."""
    assert train_state.loop_state({"step": 3, "tokens": 120, "unknown": 1}).units == 120
    assert train_state.loop_state({"step": 3, "units": 7}).units == 7
    assert train_state.loop_state({"step": 3}).units == 0
