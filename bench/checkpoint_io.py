"""Checkpoint save and load throughput (GB/s) of megatron dist_checkpointing vs a plain file copy.

    python bench/checkpoint_io.py                 # ~1.2 GB fp32 Llama-shaped GPT (hidden 1536, 8 layers), /tmp
    python bench/checkpoint_io.py --layers 2 --dir DIR    # smaller / on another disk

A Llama-shaped GPT with random weights is built with framework/models/gpt.py ``build_gpt`` (fp32; the
bytes are the sum of its parameters' bytes, what the checkpoint holds) and timed on one disk:

  save (ours)        framework/checkpoint/ckpt_format.py ``save_checkpoint``: dist_checkpointing torch_dist
                     with our streaming strategy (no staging copy; every file's SHA-256 computed as it
                     is written), config.yaml, atomic rename
  save (megatron)    ``dist_checkpointing.save`` with megatron's default torch_dist strategy (no hashes)
  load               ``load_checkpoint_into`` into a freshly built model, without / with the SHA-256
                     check of every file (``check_hashes``; one more read of the files)
  cp                 ``cp -r`` of the saved weights directory: the floor for reading + writing those bytes
  reshard TP=2->1    saved by 2 ranks at TP=2 (each its shards), loaded by 1 rank at TP=1 (dist_checkpointing
                     reassembles every tensor); checked: the sum of every parameter equals the saved one

Reads start cold: the files are dropped from the page cache first (``posix_fadvise(DONTNEED)`` on our
own files only). Writes are timed up to the return of the call (the kernel may still be flushing dirty
pages; ``cp`` is timed the same way). Every operation runs ``--repeats`` times (default 2; the first
load of a process also pays one-time set-up) and the fastest counts. Throughput = checkpoint bytes /
wall seconds, 1 GB = 1e9 bytes.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hidden", type=int, default=1536, help="hidden size (default 1536)")
    p.add_argument("--layers", type=int, default=8, help="transformer layers (default 8)")
    p.add_argument("--heads", type=int, default=12, help="attention heads (default 12)")
    p.add_argument("--kv-heads", type=int, default=4, help="KV heads (default 4)")
    p.add_argument("--ffn", type=int, default=4096, help="MLP intermediate size (default 4096)")
    p.add_argument("--vocab", type=int, default=32000, help="vocabulary size (default 32000)")
    p.add_argument("--dir", default=tempfile.gettempdir(), help="where to write (default the temp dir)")
    p.add_argument("--repeats", type=int, default=2, help="runs of each operation; the fastest counts (default 2)")
    p.add_argument("--no-reshard", action="store_true", help="skip the TP=2 -> TP=1 run")
    return p.parse_args(argv)


def model_config(a):
    from framework.models.config import ModelConfig

    return ModelConfig(vocab_size=a.vocab, hidden_size=a.hidden, num_layers=a.layers, num_attention_heads=a.heads,
                       num_query_groups=a.kv_heads, ffn_hidden_size=a.ffn, max_position_embeddings=4096)


def drop_cache(path: Path) -> None:
    """Evict our files under ``path`` from the page cache, so the next read comes from the disk."""
    for f in [path] if path.is_file() else path.rglob("*"):
        if f.is_file():
            fd = os.open(f, os.O_RDONLY)
            try:
                os.fsync(fd)  # dirty pages cannot be dropped
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def param_sums(model) -> dict[str, tuple[float, bool]]:
    """name -> (sum of this rank's tensor in float64, whether it is sharded over TP)."""
    return {n: (p.detach().double().sum().item(), bool(getattr(p, "tensor_model_parallel", False)))
            for n, p in model.named_parameters()}


def _build(a, tp: int):
    from framework.models.gpt import build_gpt
    from framework.runtime import initialize

    initialize(tp=tp, pp=1, seed=0)
    return build_gpt(model_config(a), tp=tp)


def _best(fn, repeats: int, before=None, after=None) -> float:
    """Fastest of ``repeats`` timed calls of ``fn``; ``before`` / ``after`` run untimed around each."""
    best = float("inf")
    for _ in range(repeats):
        if before:
            before()
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
        if after:
            after()
    return best


def _single_process(a, work: Path) -> dict:
    """Save (ours, megatron's), cp, load (with / without hashes) in this process at TP=1."""
    import torch
    from megatron.core import dist_checkpointing

    from framework.checkpoint.ckpt_format import WEIGHTS_DIR, base_sharded_state_dict, load_checkpoint_into, save_checkpoint

    cfg = model_config(a)
    model = _build(a, 1)
    nbytes = sum(p.numel() * p.element_size() for p in model.parameters())
    out = {"bytes": nbytes, "params": sum(p.numel() for p in model.parameters())}
    ours, theirs, copy = work / "ours", work / "megatron", work / "copy"
    r = a.repeats

    def clear(*paths):
        return lambda: [shutil.rmtree(x) for x in paths if x.exists()]

    out["save (ours)"] = _best(lambda: save_checkpoint(model, ours, cfg), r, before=clear(ours))
    out["save (megatron)"] = _best(lambda: dist_checkpointing.save(base_sharded_state_dict(model), str(theirs)), r,
                                   before=lambda: (clear(theirs)(), theirs.mkdir()), after=clear(theirs))
    out["files"] = dir_bytes(ours / WEIGHTS_DIR)
    out["cp"] = _best(lambda: subprocess.run(["cp", "-r", str(ours / WEIGHTS_DIR), str(copy)], check=True), r,
                      before=lambda: (clear(copy)(), drop_cache(ours)), after=clear(copy))
    want = param_sums(model)
    del model
    fresh = _build(a, 1)
    with torch.no_grad():
        for p in fresh.parameters():
            p.zero_()
    out["load"] = _best(lambda: load_checkpoint_into(fresh, ours, cfg, check_hashes=False), r,
                        before=lambda: drop_cache(ours))
    out["load + SHA-256 check"] = _best(lambda: load_checkpoint_into(fresh, ours, cfg, check_hashes=True), r,
                                        before=lambda: drop_cache(ours))
    got = param_sums(fresh)
    out["load ok"] = all(abs(got[n][0] - s) <= 1e-6 * max(1.0, abs(s)) for n, (s, _) in want.items())
    shutil.rmtree(ours)
    return out


def _save_tp2(a, ckpt: str) -> dict:
    from framework.checkpoint.ckpt_format import save_checkpoint

    model = _build(a, 2)
    sums = param_sums(model)
    seconds = _best(lambda: save_checkpoint(model, ckpt, model_config(a)), a.repeats)
    return {"sums": sums, "seconds": seconds}


def _load_tp1(a, ckpt: str) -> dict:
    from framework.checkpoint.ckpt_format import load_checkpoint_into

    model = _build(a, 1)
    seconds = _best(lambda: load_checkpoint_into(model, ckpt, model_config(a), check_hashes=False), a.repeats,
                    before=lambda: drop_cache(Path(ckpt)))
    return {"sums": param_sums(model), "seconds": seconds}


def _reshard(a, work: Path) -> dict:
    from launch.spawn import run_distributed

    ckpt = str(work / "tp2")
    saved = run_distributed(_save_tp2, 2, a, ckpt, timeout=1800)
    loaded = run_distributed(_load_tp1, 1, a, ckpt, timeout=1800)[0]
    want = {n: s0 + (s1 if sharded else 0.0) for (n, (s0, sharded)), (_, (s1, _)) in
            zip(saved[0]["sums"].items(), saved[1]["sums"].items())}
    ok = all(abs(loaded["sums"][n][0] - s) <= 1e-6 * max(1.0, abs(s)) for n, s in want.items())
    files = dir_bytes(Path(ckpt))
    shutil.rmtree(ckpt)
    return {"save TP=2 (2 ranks)": max(r["seconds"] for r in saved), "load TP=2 -> TP=1": loaded["seconds"],
            "reshard ok": ok, "reshard files": files}


def table(res: dict, a) -> str:
    gb = res["bytes"] / 1e9
    lines = [f"checkpoint I/O: Llama-shaped GPT hidden {a.hidden}, {a.layers} layers, vocab {a.vocab}, fp32: "
             f"{res['params'] / 1e6:.0f}M parameters = {gb:.2f} GB ({res['files'] / 1e9:.2f} GB of files), in {a.dir}",
             f"{'operation':<28}{'seconds':>9}{'GB/s':>8}{'vs cp':>8}"]
    for key in ("cp", "save (ours)", "save (megatron)", "load", "load + SHA-256 check", "save TP=2 (2 ranks)",
                "load TP=2 -> TP=1"):
        if key in res:
            lines.append(f"{key:<28}{res[key]:>9.2f}{gb / res[key]:>8.2f}{res['cp'] / res[key]:>7.2f}x")
    lines.append(f"loaded weights equal the saved ones: TP=1 {'yes' if res['load ok'] else 'NO'}"
                 + (f", TP=2 -> TP=1 {'yes' if res['reshard ok'] else 'NO'}" if "reshard ok" in res else ""))
    return "\n".join(lines)


def main(argv=None):
    a = parse_args(argv)
    from framework.runtime.logs import setup_logging
    from launch.spawn import run_distributed

    setup_logging("WARNING")
    with tempfile.TemporaryDirectory(dir=a.dir, prefix="ckpt-io-") as d:
        work = Path(d)
        # One spawned process each, so every measurement starts from a fresh interpreter and heap.
        res = run_distributed(_single_process, 1, a, work, timeout=1800)[0]
        if not a.no_reshard:
            res.update(_reshard(a, work))
    print()
    print(table(res, a))


if __name__ == "__main__":
    main()
