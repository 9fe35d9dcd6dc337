"""Command-line converters between Hugging Face checkpoints and ours (see each module's --help).

    python converters/hf_to_ckpt.py HF_DIR OUT_DIR        HF safetensors -> our checkpoint directory
    python converters/ckpt_to_hf.py CKPT_DIR OUT_DIR      our checkpoint -> HF directory (transformers loads it)
    python converters/adapter_to_hf.py ADAPTER OUT_DIR    our LoRA adapter -> HF PEFT directory

Shared here: the one-line summary and the error convention (a failure prints ``error: ...`` on one line to
stderr and exits with status 1; ``--debug`` shows the traceback instead).
"""

from __future__ import annotations

import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def ensure_root_on_path() -> None:
    if ROOT not in sys.path:
        sys.path.insert(0, ROOT)


def import_megatron_uncompiled() -> None:
    """Import megatron-core with ``torch.compile`` as the identity (call first thing in a converter process).

    megatron-core decorates its fused activation functions with ``megatron.core.jit.jit_fuser``, which is
    ``torch.compile``; each decoration at import loads torch._dynamo and torch._inductor: about 4-6 s of
    the converters' start-up on this machine and 70 MB of resident memory. A converter never runs those
    functions, so they stay plain (eager) functions in this process: ``jit_fuser`` keeps the identity
    for modules imported later, and ``torch.compile`` itself is restored at once.
    """
    import torch

    real = torch.compile
    torch.compile = lambda model=None, **_kw: model if model is not None else (lambda fn: fn)
    try:
        import megatron.core  # noqa: F401  (imports megatron.core.jit, binding jit_fuser)
    finally:
        torch.compile = real


def summary_line(what: str, tensors: int, nbytes: int, seconds: float) -> str:
    gbps = nbytes / 1e9 / seconds if seconds > 0 else float("inf")
    return (f"{what}: {tensors} tensors, {nbytes / 1e6:.2f} MB, {seconds:.2f} s, {gbps:.3g} GB/s")


def parse_size(text: str) -> int:
    """'5GB', '500MB', '40KB', '1024' -> bytes (decimal units, as transformers' max_shard_size)."""
    t = text.strip().upper()
    for suffix, mult in (("GIB", 2**30), ("MIB", 2**20), ("KIB", 2**10), ("GB", 10**9), ("MB", 10**6),
                         ("KB", 10**3), ("B", 1)):
        if t.endswith(suffix):
            return int(float(t[: -len(suffix)]) * mult)
    return int(t)


def _one_line(e: BaseException) -> str:
    import re

    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    # a failure inside a spawned rank arrives as a traceback: keep the exception (its last raise line on)
    if len(lines) > 1 and lines[0].startswith(("rank", "Traceback")):
        starts = [i for i, ln in enumerate(lines) if re.match(r"^[A-Za-z_][\w.]*(Error|Exception)\b:", ln)]
        if starts:
            lines = lines[starts[-1]:]
    return " | ".join(lines) or type(e).__name__


def run_cli(main, argv=None) -> int:
    """Call main(argv); turn any failure into one 'error: ...' line and exit status 1."""
    debug = "--debug" in (argv if argv is not None else sys.argv[1:])
    try:
        main(argv)
        return 0
    except SystemExit as e:  # argparse: --help (0) and usage errors (2)
        return e.code if isinstance(e.code, int) else 1
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        if debug:
            raise
        print(f"error: {_one_line(e)}", file=sys.stderr)
        return 1
