"""The ``mft`` command as installed (the console script next to this Python): its help, Slurm submission of
any command, and ``mft merge``.

Merge is proved against HF PEFT: a LoRA trained at TP=2 by ``mft finetune`` under torchrun, merged by
``mft merge --to hf``, loads in transformers with the logits HF PEFT gives for the base model plus the
same adapter (exported by ``mft convert adapter-to-hf``); merged by ``mft merge --to ckpt``, our model
loaded from it at TP=1 gives those logits too.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from launch.cli import COMMANDS, CONVERTERS
from launch.spawn import run_distributed
from tests.family_cases import tokens_for
from tests.hf_models import save_tiny_job_llama

ROOT = Path(__file__).resolve().parents[2]
MFT = Path(sys.executable).parent / "mft"
# fp32 throughout: merged W + s B A and the unmerged W x + s B (A x) differ by reordered fp32 sums over the
# hidden size (64) and rank, ~1e-6 relative on logits of order 1; 1e-4 is the outside-reference tolerance
# the family parity tests use (tests/family_cases.py)
TOL = 1e-4


def mft(*args, ranks: int = 0, timeout=120) -> subprocess.CompletedProcess:
    """Run the installed `mft` with ``args``; ``ranks`` > 0: under torchrun with that many processes."""
    if not MFT.is_file():
        pytest.fail(f"{MFT} is missing: install the project (pip install -e .) to get the mft console script")
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(ranks)]
    return subprocess.run([*(launcher if ranks else []), str(MFT), *map(str, args)], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout, env=env)


# ----------------------------------------------------------------------------------------------------------
# Help

def test_help_lists_every_command():
    """`mft --help` names every command the issue asks for, each with a one-line description; a typo is refused
    with the nearest command."""
    p = mft("--help")
    assert p.returncode == 0, p.stderr
    listed = dict(re.findall(r"^  ([a-z-]+)  +(\S.*)$", p.stdout.split("commands:")[1].split("\n\n")[0], re.M))
    assert list(listed) == ["finetune", "dpo", "reward", "generate", "evaluate", "prepare-data", "plan", "params",
                            "convert", "merge", "submit"]
    assert all(len(line) > 20 for line in listed.values())
    p = mft("convert", "--help")
    assert p.returncode == 0 and all(name in p.stdout for name in
                                     ("hf-to-ckpt", "ckpt-to-hf", "adapter-to-hf", "adapter-from-hf"))
    p = mft("finetun")
    assert p.returncode == 2 and "did you mean 'finetune'" in p.stderr


HELP_CASES = [[name] for name in COMMANDS if name != "convert"] + [["convert", name] for name in CONVERTERS]


@pytest.mark.parametrize("command", HELP_CASES, ids=[" ".join(c) for c in HELP_CASES])
def test_each_command_prints_its_help(command):
    """`mft COMMAND --help` exits 0 and prints its entry point's own help (the module docstring)."""
    import importlib

    entry = CONVERTERS[command[1]] if command[0] == "convert" else COMMANDS[command[0]]
    doc = importlib.import_module(entry.module).__doc__
    p = mft(*command, "--help")
    assert p.returncode == 0, p.stderr[-2000:]
    first = doc.strip().splitlines()[0]
    assert first in p.stdout, (first, p.stdout[:500])


# ----------------------------------------------------------------------------------------------------------
# Submit

def srun_argv(script: str) -> list[str]:
    """The arguments the rendered script's srun line gets (srun replaced by a function printing them)."""
    lines = [ln for ln in script.splitlines() if ln.startswith(("OVERRIDES=", "srun "))]
    assert len(lines) == 2, script
    shell = "srun() { printf '%s\\n' \"$@\"; }\nPYTHON=python\n" + "\n".join(lines) + "\n"
    p = subprocess.run(["bash", "-c", shell], capture_output=True, text=True, timeout=30)
    assert p.returncode == 0, p.stderr
    return p.stdout.splitlines()


def test_submit_dpo_renders_a_dpo_job(tmp_path):
    """`mft submit dpo --dry-run ...` renders an sbatch whose srun line runs launch/dpo.py with the overrides
    (quoting kept) and the run directory; the overrides are checked against conf/dpo.yaml (dpo.beta is a DPO
    key that fine-tuning refuses), and the default command stays fine-tuning."""
    out = tmp_path / "run"
    p = mft("submit", "dpo", "--dry-run", "--tasks-per-node", 2, "--output-dir", out, "dpo.beta=0.5",
            "data.train=my file.jsonl")
    assert p.returncode == 0, p.stderr
    assert "#SBATCH --job-name=dpo " in p.stdout and "#SBATCH --ntasks-per-node=2 " in p.stdout
    assert srun_argv(p.stdout) == ["--kill-on-bad-exit=1", "--label", "python", "launch/dpo.py", "dpo.beta=0.5",
                                   "data.train=my file.jsonl", f"output_dir={out}"]
    assert subprocess.run(["bash", "-n"], input=p.stdout, text=True).returncode == 0

    p = mft("submit", "--dry-run", "--output-dir", out, "dpo.beta=0.5")  # fine-tuning has no dpo.*
    assert p.returncode == 2 and "dpo.beta" in p.stderr and "conf/finetune.yaml" in p.stderr
    p = mft("submit", "--dry-run", "--output-dir", out, "trainer.max_steps=3")
    assert p.returncode == 0 and srun_argv(p.stdout)[3:] == ["launch/finetune.py", "trainer.max_steps=3",
                                                             f"output_dir={out}"]


def test_submit_tools_and_generation(tmp_path):
    """Commands without a run directory need --output-dir; a converter runs as one task with its own options
    (one shared with submit after `--`); evaluate composes conf/generate.yaml with mode=eval."""
    p = mft("submit", "evaluate", "--dry-run", "input=qa.jsonl")
    assert p.returncode == 2 and "--output-dir is needed for evaluate" in p.stderr
    p = mft("submit", "evaluate", "--dry-run", "--gpus-per-node", 2, "--output-dir", tmp_path, "input=qa.jsonl",
            "parallel.tensor=2")
    assert p.returncode == 0, p.stderr
    assert srun_argv(p.stdout)[3:] == ["launch/evaluate.py", "input=qa.jsonl", "parallel.tensor=2"]
    p = mft("submit", "convert", "ckpt-to-hf", "--dry-run", "--output-dir", tmp_path, "ck", "hf", "--tp", 2,
            "--", "--time", "x")
    assert p.returncode == 0, p.stderr
    assert "#SBATCH --ntasks-per-node=1 " in p.stdout and "#SBATCH --time" not in p.stdout
    assert srun_argv(p.stdout)[3:] == ["converters/ckpt_to_hf.py", "ck", "hf", "--tp", "2", "--time", "x"]
    p = mft("submit", "plan", "--dry-run", "--tasks-per-node", 2, "--output-dir", tmp_path)
    assert p.returncode == 2 and "plan runs as one task" in p.stderr


# ----------------------------------------------------------------------------------------------------------
# Merge

@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, tiny_tokenizer_dir):
    """A LoRA on every layer target of a tiny random Llama (GQA 4:2, untied), trained by `mft finetune` at
    TP=2 under torchrun for three steps at a high learning rate (so that it moves the logits clearly)."""
    root = tmp_path_factory.mktemp("cli_merge")
    hf = save_tiny_job_llama(root / "base")
    run = root / "run"
    p = mft("finetune", "model=tiny_llama", "model.source=hf", f"model.path={hf}",
            f"model.tokenizer={tiny_tokenizer_dir}", "parallel.tensor=2", "peft.targets=[qkv,proj,fc1,fc2]",
            "data.max_length=64", "trainer.max_steps=3", "trainer.global_batch_size=4", "trainer.micro_batch_size=1",
            "trainer.eval_samples=2", "trainer.eval_interval=100", "trainer.lr=1e-2", "generate.max_new_tokens=0",
            f"output_dir={run}", ranks=2, timeout=400)
    assert p.returncode == 0, (p.stdout[-3000:], p.stderr[-3000:])
    assert (run / "adapters" / "default" / "adapter.safetensors").is_file()
    return hf, run


def _hf_logits(path, tokens, adapter=None):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter).eval()
    with torch.no_grad():
        return model(input_ids=tokens).logits.float()


def _our_logits(ckpt_dir, tokens):
    from framework.checkpoint.ckpt_format import load_checkpoint_into, model_config_of
    from framework.inference.logits import forward_logits
    from framework.models.registry import build_model
    from framework.runtime.distributed import initialize

    cfg = model_config_of(ckpt_dir)
    initialize(tp=1, pp=1)
    model = build_model(cfg, 1, 1)
    load_checkpoint_into(model, ckpt_dir, cfg)
    return forward_logits(model.eval(), tokens)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_merged_lora_trained_at_tp2_gives_base_plus_adapter_logits(trained_run, tmp_path):
    """`mft merge RUN --to hf`: transformers loads the result and its logits equal HF PEFT's base + adapter
    (the adapter exported by `mft convert adapter-to-hf`) within TOL, while the adapter moves the logits by
    far more than TOL. `mft merge ADAPTER_DIR --to ckpt` (the run's config found above the adapter): our
    model at TP=1 gives the same logits from it. Merged at TP=2 under torchrun: the same logits again."""
    hf, run = trained_run
    tokens = tokens_for(512, batch=2, seq=16)

    p = mft("merge", run, "--to", "hf", "--out", tmp_path / "merged-hf", "--no-progress", timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "merged the lora adapter" in p.stdout
    p = mft("convert", "adapter-to-hf", run / "adapters" / "default", tmp_path / "peft", "--no-progress")
    assert p.returncode == 0, p.stderr[-3000:]

    merged = _hf_logits(tmp_path / "merged-hf", tokens)
    reference = _hf_logits(hf, tokens, adapter=tmp_path / "peft")
    base = _hf_logits(hf, tokens)
    assert (merged - reference).abs().max().item() < TOL
    assert (reference - base).abs().max().item() > 100 * TOL  # the adapter really changes the model

    p = mft("merge", run / "adapters" / "default", "--to", "ckpt", "--out", tmp_path / "merged-ckpt", timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    ours = run_distributed(_our_logits, 1, str(tmp_path / "merged-ckpt"), tokens, timeout=200)[0]
    assert (ours - merged).abs().max().item() < TOL

    # merged at TP=2 under torchrun (each rank its shards, gathered for writing): the same model
    p = mft("merge", run, "--to", "hf", "--out", tmp_path / "merged-tp2", "--no-progress", ranks=2, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    assert (_hf_logits(tmp_path / "merged-tp2", tokens) - merged).abs().max().item() < TOL


def test_merge_refusals(trained_run, tmp_path):
    """What cannot be merged is refused (exit 2, one line naming the option and why): a prompt-tuning
    adapter, full fine-tuned weights, a base drawn at random, an existing output without --force."""
    hf, run = trained_run
    prompt = tmp_path / "prompt"
    prompt.mkdir()
    (prompt / "adapter.yaml").write_text("format_version: 1\nmethod: prompt_tuning\nnum_virtual_tokens: 8\n")
    weights = tmp_path / "weights"
    (weights / "weights").mkdir(parents=True)
    (weights / "config.yaml").write_text("format_version: 1\n")
    adapter = run / "adapters" / "default"
    cases = [
        ((prompt, "--to", "hf", "--out", tmp_path / "o1", "--config", run / "config.yaml"),
         "peft.method=prompt_tuning): nothing to merge"),
        ((weights, "--to", "ckpt", "--out", tmp_path / "o2", "--config", run / "config.yaml"),
         "full fine-tuned weights (peft.method=none)"),
        ((adapter, "--to", "hf", "--out", tmp_path / "o3", "model.source=random"), "model.source=random"),
        ((adapter, "--to", "hf", "--out", tmp_path), "--force"),
    ]
    for args, message in cases:
        p = mft("merge", *args)
        assert p.returncode == 2, (args, p.stderr[-2000:])
        assert message in p.stderr and "Traceback" not in p.stderr, (args, p.stderr[-2000:])
    assert not any((tmp_path / o).exists() for o in ("o1", "o2", "o3"))
