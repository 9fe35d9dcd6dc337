"""Rank and world size come from torchrun's variables, else Slurm's, else a single process."""

import pytest

from framework.runtime.distributed import launcher_env

LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID", "MASTER_ADDR")


@pytest.fixture
def clean_env(monkeypatch):
    for k in LAUNCH_VARS:
        monkeypatch.delenv(k, raising=False)
    return monkeypatch


def test_single_process_by_default(clean_env):
    assert launcher_env() == (0, 1, 0)


def test_torchrun_variables(clean_env):
    clean_env.setenv("RANK", "5")
    clean_env.setenv("WORLD_SIZE", "8")
    clean_env.setenv("LOCAL_RANK", "1")
    assert launcher_env() == (5, 8, 1)


def test_slurm_variables(clean_env):
    for k, v in {"SLURM_PROCID": "3", "SLURM_NTASKS": "4", "SLURM_LOCALID": "3", "MASTER_ADDR": "node1"}.items():
        clean_env.setenv(k, v)
    assert launcher_env() == (3, 4, 3)


def test_torchrun_wins_over_slurm(clean_env):
    # torchrun inside a Slurm allocation: the agent's RANK/WORLD_SIZE describe the processes it started.
    for k, v in {"SLURM_PROCID": "0", "SLURM_NTASKS": "1", "MASTER_ADDR": "node1", "RANK": "1", "WORLD_SIZE": "2"}.items():
        clean_env.setenv(k, v)
    assert launcher_env() == (1, 2, 0)
