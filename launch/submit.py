"""Submit a fine-tuning job to Slurm: python launch/submit.py [OPTIONS] [HYDRA OVERRIDES ...]

Renders slurm/one_node.sbatch (or slurm/multi_node.sbatch when --nodes > 1) with the options below, saves
the script in the run's directory as slurm-job.sbatch (the job's log goes beside it as slurm-JOBID.out) and
submits it with sbatch. In the job, srun starts one rank per GPU (CPU: --tasks-per-node ranks), and each
runs launch/finetune.py with the Hydra overrides given here. Examples:

  python launch/submit.py --gpus-per-node 8 --partition gpu --time 04:00:00 parallel.tensor=8
  python launch/submit.py --nodes 4 --gpus-per-node 8 model=llama3_70b parallel.tensor=8 parallel.pipeline=4
  python launch/submit.py --tasks-per-node 2 --dry-run trainer.max_steps=10    # CPU, print the script only
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TEMPLATES = {"one": ROOT / "slurm" / "one_node.sbatch", "many": ROOT / "slurm" / "multi_node.sbatch"}
SCRIPT_NAME = "slurm-job.sbatch"
LOG_NAME = "slurm-%j.out"
FIELD = re.compile(r"\{\{(\w+)\}\}")


class SubmitError(Exception):
    """A choice that cannot make a job; the message names the option and what would work."""


def parse_args(argv):
    p = argparse.ArgumentParser(
        prog="launch/submit.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Relative paths (--output-dir, output_dir=, data.train=...) are relative to the repository "
               "root, where the job runs, exactly as for launch/finetune.py.")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help="Hydra overrides passed to launch/finetune.py in every rank, e.g. parallel.tensor=8")
    p.add_argument("--nodes", type=int, default=1,
                   help="machines to run on (default 1); more than 1 uses slurm/multi_node.sbatch")
    p.add_argument("--gpus-per-node", type=int, default=0,
                   help="GPUs per machine; one rank per GPU (default 0: a CPU job)")
    p.add_argument("--tasks-per-node", type=int, default=None,
                   help="ranks per machine; must equal --gpus-per-node on GPUs (the default there), "
                        "default 1 on CPU")
    p.add_argument("--cpus-per-task", type=int, default=None, help="CPU cores per rank (default: the cluster's)")
    p.add_argument("--partition", default="", help="Slurm partition (default: the cluster's default)")
    p.add_argument("--time", default="", help="wall-clock limit, e.g. 04:00:00 or 2-00:00:00 "
                                              "(default: the partition's)")
    p.add_argument("--account", default="", help="account charged for the job (default: none asked for)")
    p.add_argument("--job-name", default="finetune", help="job name shown by squeue (default finetune)")
    p.add_argument("--output-dir", default=None,
                   help="the run's directory: checkpoints, summary, this job script and its log "
                        "(default: the config's output_dir, e.g. runs/smollm2-135m-instruct-lora)")
    p.add_argument("--python", default=sys.executable,
                   help="Python the ranks run on the compute nodes (default: this one, %(default)s)")
    p.add_argument("--template", type=Path, default=None,
                   help="your own sbatch template with the same {{...}} fields (default: slurm/one_node.sbatch, "
                        "or slurm/multi_node.sbatch when --nodes > 1)")
    p.add_argument("--dry-run", action="store_true",
                   help="print the rendered script and submit nothing (no sbatch needed, nothing written)")
    p.add_argument("--wait", action="store_true",
                   help="wait for the job to end and exit with its exit status (sbatch --wait)")
    return p.parse_args(argv)


def tasks_per_node(args) -> int:
    if args.nodes < 1:
        raise SubmitError(f"--nodes={args.nodes}: need at least 1")
    if args.gpus_per_node < 0:
        raise SubmitError(f"--gpus-per-node={args.gpus_per_node}: need 0 (CPU) or more")
    if args.gpus_per_node == 0:
        tasks = 1 if args.tasks_per_node is None else args.tasks_per_node
    else:
        tasks = args.gpus_per_node if args.tasks_per_node is None else args.tasks_per_node
        if tasks != args.gpus_per_node:
            raise SubmitError(f"--tasks-per-node={tasks} with --gpus-per-node={args.gpus_per_node}: the templates "
                              "start one rank per GPU; give the same number or leave --tasks-per-node out")
    if tasks < 1:
        raise SubmitError(f"--tasks-per-node={tasks}: need at least 1")
    return tasks


def resolve_output_dir(args) -> Path:
    """The run's directory as an absolute path: --output-dir, else the composed config's output_dir.

    Composing the config also refuses a malformed or unknown override now, not after the job has queued."""
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    try:
        with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
            cfg = compose(config_name="finetune", overrides=args.overrides)
        out = args.output_dir or OmegaConf.select(cfg, "output_dir")
    except (HydraException, OmegaConfBaseException) as e:
        raise SubmitError(f"the Hydra overrides {args.overrides} do not compose: {e}") from None
    if args.output_dir and any(o.split("=", 1)[0].lstrip("+~") == "output_dir" for o in args.overrides):
        raise SubmitError("both --output-dir and the override output_dir= were given; keep one")
    return ROOT / out if not os.path.isabs(out) else Path(out)


def fields(args, out: Path) -> dict[str, str]:
    """Template field -> text. Paths and overrides are shell-quoted; #SBATCH values must be one word."""
    sbatch_values = {"job_name": args.job_name, "partition": args.partition, "time": args.time,
                     "account": args.account}
    for name, value in sbatch_values.items():
        if re.search(r"\s", value):
            raise SubmitError(f"--{name.replace('_', '-')}={value!r}: no spaces allowed in an #SBATCH value")
    if re.search(r"\s", str(out)):
        raise SubmitError(f"output directory {str(out)!r}: Slurm's --output cannot take a path with spaces")
    overrides = [o for o in args.overrides if o.split("=", 1)[0] != "output_dir"] + [f"output_dir={out}"]
    return sbatch_values | {
        "nodes": str(args.nodes),
        "tasks_per_node": str(tasks_per_node(args)),
        "gpus_per_node": str(args.gpus_per_node) if args.gpus_per_node else "",
        "cpus_per_task": str(args.cpus_per_task) if args.cpus_per_task else "",
        "log": str(out / LOG_NAME),
        "workdir": shlex.quote(str(ROOT)),
        "python": shlex.quote(args.python),
        "overrides": " ".join(shlex.quote(o) for o in overrides),
    }


def render(template: str, values: dict[str, str], name: str = "template") -> str:
    """Fill {{field}}s; an #SBATCH line whose fields are all empty is left out (no such request)."""
    lines = []
    for number, line in enumerate(template.splitlines(), 1):
        used = FIELD.findall(line)
        unknown = [f for f in used if f not in values]
        if unknown:
            raise SubmitError(f"{name}:{number}: unknown field {{{{{unknown[0]}}}}}; known: {sorted(values)}")
        if used and line.startswith("#SBATCH") and not any(values[f] for f in used):
            continue
        lines.append(FIELD.sub(lambda m: values[m.group(1)], line))
    return "\n".join(_align_sbatch_comments(lines)) + "\n"


def _align_sbatch_comments(lines: list[str]) -> list[str]:
    """Line up the comments after the #SBATCH options again, whatever the lengths of the filled values."""
    split = [line.partition(" #") if line.startswith("#SBATCH") else None for line in lines]
    width = max((len(s[0].rstrip()) for s in split if s and s[1]), default=0)
    return [line if not s or not s[1] else f"{s[0].rstrip():<{width}}  #{s[2]}" for line, s in zip(lines, split)]


def find_sbatch() -> str:
    sbatch = shutil.which("sbatch")
    if sbatch is None:
        raise SubmitError("sbatch not found on PATH: run this on a Slurm login node, or print the script with "
                          "--dry-run (without Slurm, use torchrun: see README, Launch)")
    return sbatch


def submit(sbatch: str, script: Path, wait: bool) -> int:
    cmd = [sbatch, "--parsable"] + (["--wait"] if wait else []) + [str(script)]
    # --parsable prints "JOBID[;CLUSTER]" as soon as the job is queued; with --wait sbatch then blocks.
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    job_id = proc.stdout.readline().strip().split(";")[0]
    if job_id:
        log = script.parent / LOG_NAME.replace("%j", job_id)
        print(f"submitted job {job_id}: script {script}, log {log}", flush=True)
    rc = proc.wait()
    if wait and job_id:
        print(f"job {job_id} ended with exit status {rc}", flush=True)
    return rc


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        template = args.template or TEMPLATES["one" if args.nodes == 1 else "many"]
        if not template.is_file():
            raise SubmitError(f"--template {template}: no such file")
        out = resolve_output_dir(args)
        script = render(template.read_text(), fields(args, out), name=str(template))
        if args.dry_run:
            print(script, end="")
            return 0
        sbatch = find_sbatch()
        out.mkdir(parents=True, exist_ok=True)  # Slurm does not create the log's directory
        path = out / SCRIPT_NAME
        path.write_text(script)
        return submit(sbatch, path, args.wait)
    except SubmitError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
