"""Slurm launch: the sbatch templates as launch/submit.py renders them.

Everywhere: the rendered script run under a fake `srun`/`scontrol` (the variables Slurm would set, one
process per task) must start ranks whose torch.distributed rank, world size and local rank come out right
and form one working gloo group. Where Slurm can start (root + Debian's slurmctld/slurmd/munge; required
when CI is set, as .ci/run installs them): a real one-node cluster on localhost (slurm/local_cluster.sh)
runs the fine-tuning job with 2 tasks through submit.py and sbatch.
"""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SUBMIT = [sys.executable, str(ROOT / "launch" / "submit.py")]
LOCAL_CLUSTER = ROOT / "slurm" / "local_cluster.sh"
SLURM_COMMANDS = ("munged", "mungekey", "slurmctld", "slurmd", "sbatch", "srun", "scontrol", "sinfo")
APT = "apt-get install -y --no-install-recommends slurmctld slurmd slurm-client munge"


def tiny_job(tokenizer_dir):
    """The tiny random Llama on the bundled data: a couple of steps, a few seconds of training."""
    return ["model=tiny_llama", "model.source=random", f"model.tokenizer={tokenizer_dir}", "data.max_length=64",
            "trainer.max_steps=2", "trainer.global_batch_size=4", "trainer.micro_batch_size=1",
            "trainer.eval_samples=4", "trainer.eval_interval=100", "generate.max_new_tokens=0"]


def submit(*args, env=None, timeout=60):
    return subprocess.run([*SUBMIT, *map(str, args)], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


# ----------------------------------------------------------------------------------------------------------
# Rendering and a fake srun (no Slurm needed)

FAKE_SRUN = r"""#!/usr/bin/env bash
# srun inside an allocation: one copy of the command per task, with the task's Slurm variables.
while [[ $1 == -* ]]; do shift; done
per_node=$SLURM_NTASKS_PER_NODE
export SLURM_NTASKS=$((SLURM_NNODES * per_node))
pids=()
for ((i = 0; i < SLURM_NTASKS; i++)); do
    SLURM_PROCID=$i SLURM_LOCALID=$((i % per_node)) SLURM_NODEID=$((i / per_node)) "$@" &
    pids+=($!)
done
rc=0
for p in "${pids[@]}"; do wait "$p" || rc=$?; done
exit $rc
"""

FAKE_SCONTROL = r"""#!/usr/bin/env bash
# scontrol show hostnames LIST: one host per line (our fake node lists are comma-separated).
[[ $1 == show && $2 == hostnames ]] || { echo "fake scontrol: unexpected $*" >&2; exit 1; }
tr ',' '\n' <<< "$3"
"""

# Stands in for each rank's `python launch/finetune.py ...`: records what the rank was given and joins the
# process group the way framework/runtime/distributed.py would.
RECORDER = r"""
import datetime, json, os, sys
sys.path.insert(0, os.getcwd())
import torch
import torch.distributed as dist
from framework.runtime.distributed import launcher_env

rank, world, local = launcher_env()
dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=60))
t = torch.tensor([float(rank)])
dist.all_reduce(t)
record = {"argv": sys.argv[1:], "cwd": os.getcwd(), "launcher_env": [rank, world, local], "rank_sum": t.item(),
          "env": {k: os.environ.get(k) for k in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK")}}
dist.destroy_process_group()
with open(os.path.join(os.environ["RECORD_DIR"], f"rank{rank}.json"), "w") as f:
    json.dump(record, f)
"""


def write_executable(path: Path, text: str) -> Path:
    path.write_text(text)
    path.chmod(0o755)
    return path


def sbatch_options(script: str) -> dict[str, str]:
    """The #SBATCH options of a script, as sbatch reads them (comments after the option ignored)."""
    options = {}
    for line in script.splitlines():
        if line.startswith("#SBATCH"):
            opt = line.split()[1]
            key, _, value = opt.partition("=")
            options[key] = value
    return options


@pytest.mark.timeout(180)
@pytest.mark.parametrize("nodes,tasks_per_node", [(1, 2), (2, 2)], ids=["one-node", "two-nodes"])
def test_rendered_template_starts_ranks_with_slurm_variables(tmp_path, nodes, tasks_per_node):
    """submit.py --dry-run renders the template; run under a fake srun, each task gets rank = SLURM_PROCID,
    world = SLURM_NTASKS, local rank = SLURM_LOCALID, the first node as MASTER_ADDR and one shared port,
    the overrides (plus any given after the script), and torchrun variables from the submitting shell are
    dropped. The ranks then all-reduce in one gloo group."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    write_executable(bin_dir / "srun", FAKE_SRUN)
    write_executable(bin_dir / "scontrol", FAKE_SCONTROL)
    recorder = tmp_path / "recorder.py"
    recorder.write_text(RECORDER)
    fake_python = write_executable(tmp_path / "python", (
        "#!/bin/sh\n# the template's own one-liners (-c) run as they are; a rank runs the recorder\n"
        f'[ "$1" = -c ] && exec {sys.executable} "$@"\nexec {sys.executable} {recorder} "$@"\n'))
    out = tmp_path / "run"
    overrides = ["trainer.max_steps=3", "data.train=my file.jsonl"]  # a space: quoting must survive
    p = submit("--nodes", nodes, "--tasks-per-node", tasks_per_node, "--output-dir", out, "--python", fake_python,
               "--dry-run", *overrides)
    assert p.returncode == 0, p.stderr
    script = p.stdout
    assert not out.exists()  # --dry-run writes nothing

    options = sbatch_options(script)
    assert options["--nodes"] == str(nodes) and options["--ntasks-per-node"] == str(tasks_per_node)
    assert options["--output"] == f"{out}/slurm-%j.out"
    assert "--gpus-per-node" not in options and "--partition" not in options  # not asked for: left out
    # What sbatch would set for this allocation; the node names resolve here, the first one first.
    hosts = ["localhost", "127.0.0.1"][:nodes]
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "RECORD_DIR": str(tmp_path),
           "SLURM_JOB_ID": "42", "SLURM_JOB_NODELIST": ",".join(hosts), "SLURM_NNODES": options["--nodes"],
           "SLURM_NTASKS_PER_NODE": options["--ntasks-per-node"],
           "RANK": "99", "WORLD_SIZE": "99", "LOCAL_RANK": "99"}  # left over from a torchrun shell
    (tmp_path / "job.sbatch").write_text(script)
    run = subprocess.run(["bash", str(tmp_path / "job.sbatch"), "peft.rank=4"], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=150)
    assert run.returncode == 0, run.stderr[-3000:]

    world = nodes * tasks_per_node
    records = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(world)]
    ports = {rec["env"]["MASTER_PORT"] for rec in records}
    assert len(ports) == 1 and ports.pop().isdigit()
    for r, rec in enumerate(records):
        assert rec["launcher_env"] == [r, world, r % tasks_per_node]
        assert rec["rank_sum"] == sum(range(world))
        assert rec["env"]["MASTER_ADDR"] == "localhost"
        assert rec["env"]["RANK"] is None and rec["env"]["WORLD_SIZE"] is None
        assert rec["argv"] == ["launch/finetune.py", *overrides, f"output_dir={out}", "peft.rank=4"]
        assert rec["cwd"] == str(ROOT)


@pytest.mark.timeout(60)
def test_gpu_request_is_rendered():
    """GPUs: one rank per GPU, the GPU, CPU, partition, account and time requests in the script, the
    multi-node template for several nodes; a rank count other than the GPU count is refused."""
    p = submit("--nodes", 2, "--gpus-per-node", 8, "--cpus-per-task", 12, "--partition", "gpu", "--account",
               "proj", "--time", "04:00:00", "--job-name", "llama", "--dry-run", "model=tiny_llama")
    assert p.returncode == 0, p.stderr
    options = sbatch_options(p.stdout)
    assert options == {"--job-name": "llama", "--nodes": "2", "--ntasks-per-node": "8", "--gpus-per-node": "8",
                       "--cpus-per-task": "12", "--exclusive": "", "--partition": "gpu", "--account": "proj",
                       "--time": "04:00:00", "--output": f"{ROOT}/runs/tiny-llama-lora/slurm-%j.out"}
    assert subprocess.run(["bash", "-n"], input=p.stdout, text=True).returncode == 0

    bad = submit("--gpus-per-node", 8, "--tasks-per-node", 4, "--dry-run")
    assert bad.returncode == 2
    assert "--tasks-per-node=4 with --gpus-per-node=8" in bad.stderr and "Traceback" not in bad.stderr


@pytest.mark.timeout(60)
def test_user_errors_are_one_line(tmp_path):
    """No sbatch on PATH, an override Hydra cannot compose, a space in an #SBATCH value: exit 2, one line
    naming the problem, nothing written."""
    env = {**os.environ, "PATH": str(tmp_path)}
    p = submit("--output-dir", tmp_path / "run", env=env)
    assert p.returncode == 2 and "sbatch not found on PATH" in p.stderr and "Traceback" not in p.stderr
    assert not (tmp_path / "run").exists()

    p = submit("--dry-run", "trainer.no_such_key=3")
    assert p.returncode == 2 and "trainer.no_such_key" in p.stderr and "Traceback" not in p.stderr

    p = submit("--dry-run", "--job-name", "my job")
    assert p.returncode == 2 and "--job-name='my job'" in p.stderr


# ----------------------------------------------------------------------------------------------------------
# A real one-node Slurm on localhost

def require_slurm():
    search = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])
    missing = [c for c in SLURM_COMMANDS if shutil.which(c, path=search) is None]
    if missing:
        reason = f"Slurm/munge not installed ({', '.join(missing)} not found): {APT}"
    elif os.geteuid() != 0:
        reason = "the local Slurm cluster's daemons (slurm/local_cluster.sh) need root"
    else:
        return
    if os.environ.get("CI"):
        pytest.fail(f"{reason}; CI must run the Slurm test (.ci/run installs the packages and runs as root)")
    pytest.skip(reason)


@pytest.fixture(scope="module")
def local_slurm(tmp_path_factory):
    """Environment for sbatch & co. pointing at a one-node cluster started for this module, stopped after."""
    require_slurm()
    cluster = tmp_path_factory.mktemp("slurm")
    start = subprocess.run([str(LOCAL_CLUSTER), "start", str(cluster)], capture_output=True, text=True, timeout=120)
    try:
        assert start.returncode == 0, f"local Slurm did not start:\n{start.stdout}\n{start.stderr}"
        yield {**os.environ, "SLURM_CONF": str(cluster / "slurm.conf")}
    finally:
        subprocess.run([str(LOCAL_CLUSTER), "stop", str(cluster)], capture_output=True, timeout=120)


def job_log(out: Path, stdout: str) -> tuple[str, str]:
    """(job id, the job's log) from submit.py's output."""
    job = re.search(r"submitted job (\d+)", stdout)
    assert job, stdout
    return job.group(1), (out / f"slurm-{job.group(1)}.out").read_text()


@pytest.mark.slurm
@pytest.mark.timeout(600)
def test_job_with_two_tasks_on_a_real_slurm(local_slurm, tiny_tokenizer_dir, tmp_path):
    """submit.py --wait through sbatch and srun: exit 0, both ranks ran (their labelled log lines), the
    process group had world size 2 (DP=2 at TP=PP=1), and the summary was printed and written."""
    out = tmp_path / "run"
    p = submit("--tasks-per-node", 2, "--output-dir", out, "--wait", *tiny_job(tiny_tokenizer_dir),
               env=local_slurm, timeout=540)
    _, log = job_log(out, p.stdout)
    assert p.returncode == 0, f"{p.stdout}\n{p.stderr}\n{log[-4000:]}"
    assert "ended with exit status 0" in p.stdout
    assert (out / "slurm-job.sbatch").is_file()
    # srun --label prefixes every line with its task; each rank's logger names the rank it got from Slurm
    # (with data.max_length=64 every rank warns about the samples it drops).
    for rank in (0, 1):
        assert re.search(rf"^{rank}: .*\[rank {rank}\]", log, re.M), log[-4000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["layout"] == {"tp": 1, "pp": 1, "dp": 2, "sp": False}
    assert summary["steps"] == 2 and len(summary["train_losses"]) == 2
    assert re.search(r"^0: .*layout .*TP=1 PP=1 DP=2", log, re.M)
    assert "Run summary" in log
    assert (out / "adapters" / "default" / "adapter.safetensors").is_file()


@pytest.mark.slurm
@pytest.mark.timeout(300)
def test_failing_job_returns_its_exit_status(local_slurm, tiny_tokenizer_dir, tmp_path):
    """A layout the world cannot take (TP=3 on 2 tasks): the ranks refuse it (exit 2), srun ends the job, and
    submit.py --wait exits with the job's exit status as Slurm records it (2, or 143 when srun had to
    terminate a rank that had not exited yet), the reason in the job's log."""
    out = tmp_path / "run"
    p = submit("--tasks-per-node", 2, "--output-dir", out, "--wait", *tiny_job(tiny_tokenizer_dir),
               "parallel.tensor=3", env=local_slurm, timeout=240)
    job_id, log = job_log(out, p.stdout)
    record = subprocess.run(["scontrol", "show", "job", job_id], env=local_slurm, capture_output=True,
                            text=True, timeout=30).stdout
    assert "JobState=FAILED" in record, record
    assert p.returncode != 0 and f"ExitCode={p.returncode}:" in record, f"{p.stdout}\n{record}"
    assert f"ended with exit status {p.returncode}" in p.stdout
    assert re.search(r"^[01]: error: ", log, re.M) and "parallel.tensor=3" in log, log[-4000:]
    assert not (out / "summary.json").exists()
