"""Conversion throughput and memory: HF -> ours -> HF for a >= 1 GB Llama-shaped model, against `cp`.

    python bench/convert.py                       # ~1.3 GB bf16 model (hidden 1536, 20 layers), in /tmp
    python bench/convert.py --layers 4 --dir DIR  # smaller / elsewhere (same disk as you care about)

Random weights are generated on the fly, written as an HF directory (sharded safetensors + config.json),
then timed on the same disk:
  cp        `cp -r` of the safetensors files (the floor: read + write the same bytes)
  import    converters/hf_to_ckpt.py  (HF -> our dist_checkpointing directory)
  export    converters/ckpt_to_hf.py  (ours -> HF; verified bitwise against the source)
  start-up  a process that only imports what a converter imports and starts its process group: the fixed
            cost inside both converter rows (python, torch, megatron-core), whatever the model's size
Each step runs as its own process; its peak resident memory (the process tree's, sampled every 20 ms)
is reported as a ratio to the largest single tensor of the model. The table is printed last, then each
step's CPU seconds (user + system of the process tree), which a machine shared with other jobs
distorts less than wall time.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def write_random_hf(out: Path, cfg, shard_bytes: int = 512 * 2**20) -> tuple[int, int]:
    """Random bf16 tensors for every HF name of ``cfg``, one shard in memory at a time.
    Returns (total bytes, largest tensor bytes)."""
    import torch
    from safetensors.torch import save_file

    from framework.checkpoint.hf_export import hf_config_dict, hf_shapes

    out.mkdir(parents=True, exist_ok=True)
    shapes = hf_shapes(cfg)
    g = torch.Generator().manual_seed(0)
    files, current, size, total, largest, weight_map = [], {}, 0, 0, 0, {}

    def flush():
        nonlocal current, size
        if current:
            name = f"part-{len(files)}.safetensors"
            save_file(current, str(out / name), metadata={"format": "pt"})
            files.append((name, list(current)))
            current, size = {}, 0

    for name, shape in shapes.items():
        t = (torch.randn(shape, generator=g) * 0.02).to(torch.bfloat16)
        nbytes = t.numel() * 2
        if current and size + nbytes > shard_bytes:
            flush()
        current[name], size = t, size + nbytes
        total, largest = total + nbytes, max(largest, nbytes)
    flush()
    n = len(files)
    for k, (tmp_name, keys) in enumerate(files):
        final = f"model-{k + 1:05d}-of-{n:05d}.safetensors"
        os.replace(out / tmp_name, out / final)
        weight_map.update({key: final for key in keys})
    (out / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    (out / "config.json").write_text(json.dumps(hf_config_dict(cfg, "bfloat16")))
    return total, largest


def _tree_rss(pid: int) -> int:
    import psutil

    try:
        p = psutil.Process(pid)
        procs = [p] + p.children(recursive=True)
    except psutil.NoSuchProcess:
        return 0
    total = 0
    for q in procs:
        try:
            total += q.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return total


STARTUP = ("import sys; sys.path.insert(0, '.'); import converters; "
           "getattr(converters, 'import_megatron_uncompiled', lambda: None)(); "
           "import converters.hf_to_ckpt, converters.ckpt_to_hf, framework.checkpoint.ckpt_format, "
           "framework.checkpoint.hf_import, framework.checkpoint.hf_export, megatron.core.models.gpt, "
           "megatron.core.dist_checkpointing; from framework.runtime.distributed import initialize, shutdown; "
           "initialize(); shutdown()")


def timed(cmd: list[str]) -> tuple[float, int, float]:
    """(seconds, peak resident bytes of the process tree, CPU seconds of the tree) of running ``cmd``."""
    import resource

    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    peak = 0
    done = threading.Event()

    def sample():
        nonlocal peak
        while not done.is_set():
            peak = max(peak, _tree_rss(proc.pid))
            time.sleep(0.02)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    _, err = proc.communicate()
    done.set()
    th.join()
    seconds = time.perf_counter() - t0
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{err[-3000:]}")
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    return seconds, peak, cpu


def same_tensors(a: Path, b: Path) -> bool:
    from safetensors import safe_open

    def index(d):
        return {k: f for f in sorted(d.glob("*.safetensors")) for k in safe_open(str(f), "pt").keys()}

    ia, ib = index(a), index(b)
    if sorted(ia) != sorted(ib):
        return False
    for k in ia:  # one tensor of each side at a time
        with safe_open(str(ia[k]), "pt") as fa, safe_open(str(ib[k]), "pt") as fb:
            if not fa.get_tensor(k).equal(fb.get_tensor(k)):
                return False
    return True


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hidden", type=int, default=1536, help="hidden size (default 1536)")
    p.add_argument("--layers", type=int, default=20, help="layers (default 20: ~1.3 GB in bf16)")
    p.add_argument("--ffn", type=int, default=4096, help="MLP width (default 4096)")
    p.add_argument("--vocab", type=int, default=32000, help="vocabulary (default 32000)")
    p.add_argument("--dir", default=None, help="scratch directory (default: a new one under $TMPDIR)")
    a = p.parse_args(argv)

    from framework.models.config import ModelConfig

    cfg = ModelConfig(vocab_size=a.vocab, hidden_size=a.hidden, num_layers=a.layers, num_attention_heads=12,
                      num_query_groups=4, ffn_hidden_size=a.ffn, kv_channels=a.hidden // 12,
                      max_position_embeddings=4096)
    scratch = Path(a.dir or tempfile.mkdtemp(prefix="bench-convert-"))
    scratch.mkdir(parents=True, exist_ok=True)
    hf, ours, back, copy = scratch / "hf", scratch / "ours", scratch / "back", scratch / "cp"
    for d in (hf, ours, back, copy):
        shutil.rmtree(d, ignore_errors=True)
    try:
        total, largest = write_random_hf(hf, cfg)
        print(f"model: {total / 2**30:.2f} GiB bf16 in {len(list(hf.glob('*.safetensors')))} files, largest tensor "
              f"{largest / 2**20:.0f} MiB; scratch {scratch}", flush=True)
        subprocess.run(["sync"], check=False)
        py = sys.executable
        rows = [("cp -r (safetensors)", *timed(["cp", "-r", str(hf), str(copy)])),
                ("HF -> ours (hf_to_ckpt)",
                 *timed([py, "converters/hf_to_ckpt.py", str(hf), str(ours), "--no-progress"])),
                ("ours -> HF (ckpt_to_hf)",
                 *timed([py, "converters/ckpt_to_hf.py", str(ours), str(back), "--no-progress"])),
                ("start-up only (no model)", *timed([py, "-c", STARTUP]))]
        bitwise = same_tensors(hf, back)
        t_cp = rows[0][1]
        print(f"\n{'step':<26}{'seconds':>9}{'GB/s':>8}{'time / cp':>11}{'peak RSS GiB':>14}{'RSS / largest tensor':>22}")
        for name, t, m, _ in rows:
            gbps = f"{total / t / 1e9:>8.2f}" if "start-up" not in name else f"{'-':>8}"
            print(f"{name:<26}{t:>9.1f}{gbps}{t / t_cp:>11.1f}{m / 2**30:>14.2f}{m / largest:>22.1f}")
        print("CPU seconds: " + ", ".join(f"{name.split(' (')[0]} {cpu:.1f}" for name, _, _, cpu in rows))
        print(f"round trip bitwise: {bitwise}")
    finally:
        if a.dir is None:
            shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
