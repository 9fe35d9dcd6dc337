"""The ``mft`` command: every job and tool of the framework behind one name, ``mft COMMAND [ARGS ...]``.

Each command is the entry point it names (launch/*.py, converters/*.py) with the same arguments: the Hydra
jobs take KEY=VALUE overrides of their conf/*.yaml, the tools their options, and ``mft COMMAND --help``
prints that entry point's own help. A tiny dispatcher rather than argparse sub-parsers: the Hydra commands
must see their arguments untouched (``--cfg job``, ``+key=value``, ``~key``). The console script is a
plain Python script, so the multi-process jobs start the same way as the launch/*.py files do:

    torchrun --nproc-per-node 2 $(which mft) finetune parallel.tensor=2
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # the launch/*.py files and converters/ import each other from the repository root
    sys.path.insert(0, ROOT)

PROG = "mft"


@dataclasses.dataclass(frozen=True)
class Command:
    name: str
    summary: str   # one line in ``mft --help``
    module: str    # the entry point: its main() does the work and prints --help
    style: str     # how main() takes its arguments: hydra (reads sys.argv), argv (main(argv)), converter


COMMANDS = {c.name: c for c in (
    Command("finetune", "fine-tune a model: LoRA, DoRA, IA3, QLoRA, prompt tuning, full (conf/finetune.yaml)",
            "launch.finetune", "hydra"),
    Command("dpo", "preference-tune a model: DPO, IPO, robust DPO, with any PEFT method (conf/dpo.yaml)",
            "launch.dpo", "hydra"),
    Command("reward", "train a reward model: a score head, Bradley-Terry loss on preference pairs (conf/reward.yaml)",
            "launch.reward", "hydra"),
    Command("generate", "complete the prompts of a JSONL file, with or without an adapter (conf/generate.yaml)",
            "launch.generate", "hydra"),
    Command("evaluate", "score a model or adapter against references: loss, perplexity, exact match, F1",
            "launch.evaluate", "hydra"),
    Command("prepare-data", "check and tokenise a run's data without training; report every sample's fate",
            "launch.prepare_data", "hydra"),
    Command("plan", "per-GPU memory of a job at every TP x PP x DP layout, and the layout to use",
            "launch.plan", "argv"),
    Command("params", "trainable parameters per PEFT method for a model, without allocating it",
            "launch.param_count", "argv"),
    Command("convert", "convert checkpoints and adapters: hf-to-ckpt, ckpt-to-hf, adapter-to-hf, adapter-from-hf",
            "", "convert"),
    Command("merge", "merge a trained adapter into its base model: an HF directory or our checkpoint",
            "launch.merge", "argv"),
    Command("submit", "run any of these as a Slurm job: renders slurm/*.sbatch and calls sbatch",
            "launch.submit", "argv"),
)}

CONVERTERS = {c.name: c for c in (
    Command("hf-to-ckpt", "HF model directory -> our checkpoint (any TP/PP loads it)", "converters.hf_to_ckpt",
            "converter"),
    Command("ckpt-to-hf", "our checkpoint -> HF directory that transformers loads", "converters.ckpt_to_hf",
            "converter"),
    Command("adapter-to-hf", "our LoRA / DoRA / IA3 adapter -> HF PEFT directory (PeftModel.from_pretrained)",
            "converters.adapter_to_hf", "converter"),
    Command("adapter-from-hf", "HF PEFT adapter directory -> our adapter (loads at any TP/PP)",
            "converters.adapter_from_hf", "converter"),
)}


def _table(commands: dict) -> str:
    width = max(map(len, commands)) + 2
    return "\n".join(f"  {name:<{width}}{c.summary}" for name, c in commands.items())


def usage() -> str:
    return f"""usage: {PROG} COMMAND [ARGS ...]

Megatron-native LLM fine-tuning, every job and tool under one command. `{PROG} COMMAND --help` prints a
command's own help; the jobs take Hydra overrides (KEY=VALUE) of conf/*.yaml.

commands:
{_table(COMMANDS)}

examples:
  {PROG} finetune trainer.max_steps=50 peft.rank=16
  {PROG} dpo dpo.loss=ipo
  {PROG} generate input=prompts.jsonl adapter=runs/NAME/adapters/default
  {PROG} evaluate input=qa.jsonl adapter=runs/NAME/adapters/default
  {PROG} prepare-data data.train=my.jsonl
  {PROG} plan model=llama3_8b peft=lora --gpus 8
  {PROG} params model=llama3_8b
  {PROG} convert hf-to-ckpt HF_DIR CKPT_DIR
  {PROG} merge runs/NAME --to hf --out merged
  {PROG} submit dpo --gpus-per-node 8 --time 04:00:00 parallel.tensor=8

Several processes (the jobs, and merge): torchrun --nproc-per-node N $(which {PROG}) COMMAND ...,
or the launch/*.py file of the same name."""


def convert_usage() -> str:
    return f"""usage: {PROG} convert CONVERTER [ARGS ...]

converters ({PROG} convert CONVERTER --help for each one's options):
{_table(CONVERTERS)}"""


def _unknown(what: str, name: str, known) -> int:
    close = difflib.get_close_matches(name, list(known), n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    print(f"{PROG}: unknown {what} {name!r}{hint} (one of: {', '.join(known)})", file=sys.stderr)
    return 2


def run(command: Command, args: list[str]) -> int:
    """Call the command's entry point with ``args`` as its own command line; returns the exit status."""
    module = importlib.import_module(command.module)
    if command.style == "hydra":  # Hydra reads sys.argv; argv[0] is the script, as under torchrun
        sys.argv = [module.__file__, *args]
        rc = module.main()
    elif command.style == "converter":
        from converters import run_cli

        rc = run_cli(module.main, args)
    else:  # each turns the errors a user can fix into one line itself
        rc = module.main(args)
    return rc if isinstance(rc, int) else 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv:
        print(usage(), file=sys.stderr)
        return 2
    name, args = argv[0], argv[1:]
    if name in ("-h", "--help", "help"):
        print(usage())
        return 0
    if name == "--version":
        from importlib.metadata import PackageNotFoundError, version

        try:
            print(f"{PROG} {version('megatron-finetune')}")
        except PackageNotFoundError:
            print(f"{PROG} (not installed)")
        return 0
    if name not in COMMANDS:
        return _unknown("command", name, COMMANDS)
    if name == "convert":
        if not args or args[0] in ("-h", "--help"):
            print(convert_usage(), file=sys.stdout if args else sys.stderr)
            return 0 if args else 2
        if args[0] not in CONVERTERS:
            return _unknown("converter", args[0], CONVERTERS)
        return run(CONVERTERS[args[0]], args[1:])
    return run(COMMANDS[name], args)


if __name__ == "__main__":
    sys.exit(main())
