"""Submit a job to Slurm: mft submit [COMMAND] [OPTIONS] [ARGS ...]   (= python launch/submit.py ...)

COMMAND is the mft command the job runs (default finetune): finetune, dpo, generate, evaluate, prepare-data,
merge, plan, params, or convert hf-to-ckpt|ckpt-to-hf|adapter-to-hf|adapter-from-hf. Renders
slurm/one_node.sbatch (or slurm/multi_node.sbatch when --nodes > 1) with the options below, saves the
script in the run's directory as slurm-job.sbatch (the job's log goes beside it as slurm-JOBID.out) and
submits it with sbatch. In the job, srun starts one rank per GPU (CPU: --tasks-per-node ranks), and each
runs the command's entry point (launch/finetune.py, launch/dpo.py, ...; converters/*.py) with the ARGS
given here: the Hydra overrides of the jobs (checked to compose before anything is submitted), or the
tool's own arguments. The run's directory is the job's output_dir (finetune, dpo, prepare-data) or
--output-dir (required for the others). The tools (prepare-data, plan, params, convert) run as one task;
the converters start their own ranks with their --tp/--pp.

Options of submit come before or after COMMAND; every other argument goes to the command, in order. An
option the command shares with submit (e.g. plan's --gpus-per-node) goes after `--`. Examples:

  mft submit --gpus-per-node 8 --partition gpu --time 04:00:00 parallel.tensor=8
  mft submit dpo --nodes 4 --gpus-per-node 8 model=llama3_70b parallel.tensor=8 parallel.pipeline=4
  mft submit evaluate --gpus-per-node 2 --output-dir runs/eval input=qa.jsonl parallel.tensor=2
  mft submit merge --gpus-per-node 8 --output-dir runs/NAME/merge runs/NAME --to hf --out merged --tp 8
  mft submit convert hf-to-ckpt --output-dir logs/convert /models/llama3-8b ckpt/llama3-8b
  mft submit --tasks-per-node 2 --dry-run trainer.max_steps=10    # CPU, print the script only
"""

from __future__ import annotations

import argparse
import dataclasses
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


@dataclasses.dataclass(frozen=True)
class Entry:
    """What one mft command runs in the job."""
    script: str                # run by every task, relative to the repository root (the job's working dir)
    config: str | None = None  # conf/CONFIG.yaml that its Hydra overrides compose; None: its own arguments
    fixed: tuple = ()          # overrides it always adds (evaluate: mode=eval), for the composition check
    run_dir: bool = False      # the config's output_dir is the run's directory (else --output-dir is)
    ranks: bool = True         # runs as several ranks (srun tasks); False: one task


ENTRIES = {
    "finetune": Entry("launch/finetune.py", "finetune", run_dir=True),
    "dpo": Entry("launch/dpo.py", "dpo", run_dir=True),
    "reward": Entry("launch/reward.py", "reward", run_dir=True),
    "generate": Entry("launch/generate.py", "generate"),
    "evaluate": Entry("launch/evaluate.py", "generate", fixed=("mode=eval",)),
    "prepare-data": Entry("launch/prepare_data.py", "finetune", run_dir=True, ranks=False),
    "merge": Entry("launch/merge.py"),
    "plan": Entry("launch/plan.py", ranks=False),
    "params": Entry("launch/param_count.py", ranks=False),
    "convert hf-to-ckpt": Entry("converters/hf_to_ckpt.py", ranks=False),
    "convert ckpt-to-hf": Entry("converters/ckpt_to_hf.py", ranks=False),
    "convert adapter-to-hf": Entry("converters/adapter_to_hf.py", ranks=False),
    "convert adapter-from-hf": Entry("converters/adapter_from_hf.py", ranks=False),
}
DEFAULT_COMMAND = "finetune"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="mft submit", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,
        epilog="Relative paths (--output-dir, output_dir=, data.train=...) are relative to the repository "
               "root, where the job runs, exactly as for the command run directly.")
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
    p.add_argument("--job-name", default=None, help="job name shown by squeue (default: the command, e.g. dpo)")
    p.add_argument("--output-dir", default=None,
                   help="the run's directory: this job script and its log, and for finetune/dpo the run itself "
                        "(default there: the config's output_dir, e.g. runs/smollm2-135m-instruct-lora; "
                        "required for the other commands)")
    p.add_argument("--python", default=sys.executable,
                   help="Python the ranks run on the compute nodes (default: this one, %(default)s)")
    p.add_argument("--template", type=Path, default=None,
                   help="your own sbatch template with the same {{...}} fields (default: slurm/one_node.sbatch, "
                        "or slurm/multi_node.sbatch when --nodes > 1)")
    p.add_argument("--dry-run", action="store_true",
                   help="print the rendered script and submit nothing (no sbatch needed, nothing written)")
    p.add_argument("--wait", action="store_true",
                   help="wait for the job to end and exit with its exit status (sbatch --wait)")
    return p


def parse_args(argv):
    """argparse.Namespace of submit's options, plus ``command`` (a key of ENTRIES) and ``overrides`` (every
    other argument, in the order given: the command's own)."""
    parser = build_parser()
    takes_value = {o: a.nargs != 0 for a in parser._actions for o in a.option_strings}
    mine, theirs, rest = [], [], list(argv)
    while rest:
        arg = rest.pop(0)
        if arg == "--":  # everything after it is the command's
            theirs += rest
            break
        name = arg.split("=", 1)[0]
        if name in takes_value:
            mine.append(arg)
            if takes_value[name] and "=" not in arg and rest:
                mine.append(rest.pop(0))
        else:
            theirs.append(arg)
    args = parser.parse_args(mine)
    args.command = DEFAULT_COMMAND
    if theirs and theirs[0] == "convert":
        which = f"convert {theirs[1]}" if len(theirs) > 1 else "convert"
        if which not in ENTRIES:
            converters = [c.split()[1] for c in ENTRIES if c.startswith("convert ")]
            parser.error(f"{which!r}: give one of convert {'|'.join(converters)}")
        args.command, theirs = which, theirs[2:]
    elif theirs and theirs[0] in ENTRIES:
        args.command, theirs = theirs[0], theirs[1:]
    args.overrides = theirs
    if args.job_name is None:
        args.job_name = args.command.replace(" ", "-")
    return args


def tasks_per_node(args) -> int:
    if args.nodes < 1:
        raise SubmitError(f"--nodes={args.nodes}: need at least 1")
    if args.gpus_per_node < 0:
        raise SubmitError(f"--gpus-per-node={args.gpus_per_node}: need 0 (CPU) or more")
    if not ENTRIES[args.command].ranks:  # a tool: one process, which may start its own ranks (--tp)
        if args.nodes > 1 or (args.tasks_per_node or 1) > 1:
            given = f"--nodes={args.nodes}" if args.nodes > 1 else f"--tasks-per-node={args.tasks_per_node}"
            raise SubmitError(f"{given}: {args.command} runs as one task (--nodes 1, --tasks-per-node 1); "
                              f"its own options start any ranks it needs")
        return 1
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

    entry = ENTRIES[args.command]
    out = args.output_dir
    if entry.config is not None:
        try:
            with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
                cfg = compose(config_name=entry.config, overrides=[*entry.fixed, *args.overrides])
            if entry.run_dir:
                out = out or OmegaConf.select(cfg, "output_dir")
        except (HydraException, OmegaConfBaseException) as e:
            raise SubmitError(f"the Hydra overrides {args.overrides} do not compose conf/{entry.config}.yaml "
                              f"({args.command}): {e}") from None
    if not out:
        raise SubmitError(f"--output-dir is needed for {args.command}: the directory for the job script and "
                          f"its log (only finetune, dpo and prepare-data have a run directory of their own)")
    if entry.run_dir and args.output_dir and any(o.split("=", 1)[0].lstrip("+~") == "output_dir"
                                                 for o in args.overrides):
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
    overrides = list(args.overrides)
    if ENTRIES[args.command].run_dir:
        overrides = [o for o in overrides if o.split("=", 1)[0] != "output_dir"] + [f"output_dir={out}"]
    return sbatch_values | {
        "command": args.command,
        "entry": shlex.quote(ENTRIES[args.command].script),
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
        if args.command != DEFAULT_COMMAND and "{{entry}}" not in template.read_text():
            raise SubmitError(f"--template {template} has no {{{{entry}}}} field, so its job cannot run "
                              f"{args.command}; put {{{{entry}}}} where it runs launch/finetune.py")
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
