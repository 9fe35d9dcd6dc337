"""Our checkpoint directory -> HF directory of its family that transformers' AutoModelForCausalLM (T5:
AutoModelForSeq2SeqLM) .from_pretrained loads.

Streams the base weights (megatron dist_checkpointing; any layout it was saved at) tensor by tensor: each
parameter is read from CKPT_DIR/weights when its turn comes (through a skeleton model on the meta device at
--tp/--pp, default a single process at TP=1, PP=1), turned back into HF names and layout (q/k/v and
gate/up split out of the fused projections) and appended to its output file, whose safetensors header
was written first. Then config.json and the tokenizer files from CKPT_DIR/tokenizer. With the dtype the
HF source had (recorded in config.yaml), HF -> ours -> HF is bitwise identical.

Memory: no model is ever materialised: one parameter (all its TP shards on the writing rank) and the HF
tensor(s) made of it at a time; --max-shard-size only splits the files. See framework/checkpoint/streaming.py.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from converters import import_megatron_uncompiled, parse_size, run_cli, summary_line  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="ckpt_to_hf.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("ckpt_dir", help="our checkpoint directory (config.yaml, weights/, tokenizer/), or a .tar of it")
    p.add_argument("out_dir", help="HF directory to write (written to a temporary sibling and moved into place)")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None,
                   help="dtype of the written tensors (default: the HF source's, from config.yaml; else float32)")
    p.add_argument("--max-shard-size", default="5GB", metavar="SIZE",
                   help="largest safetensors file, e.g. 5GB, 500MB (default 5GB); above it the weights are split "
                        "into model-0000k-of-0000n.safetensors with model.safetensors.index.json")
    p.add_argument("--tokenizer", default=None, metavar="DIR",
                   help="copy the tokenizer files from DIR (default: CKPT_DIR/tokenizer when present)")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel size to load through (default 1)")
    p.add_argument("--pp", type=int, default=1, help="pipeline-parallel size to load through (default 1)")
    p.add_argument("--force", action="store_true", help="replace OUT_DIR if it exists (default: refuse)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--debug", action="store_true", help="show the full traceback on failure")
    return p


def _worker(ckpt_dir, out_dir, tp, pp, tokenizer, dtype, max_shard_bytes, progress):
    from framework.checkpoint.ckpt_format import WEIGHTS_DIR, model_config_of
    from framework.checkpoint.hf_export import DTYPES, base_params, export_hf
    from framework.checkpoint.streaming import CheckpointParams, skeleton
    from framework.runtime.distributed import initialize

    cfg = model_config_of(ckpt_dir)  # convert() checked config.yaml and the files
    initialize(tp=tp, pp=pp)
    model = skeleton(cfg, tp=tp, pp=pp, dtype=DTYPES[dtype])
    params = CheckpointParams(model, Path(ckpt_dir) / WEIGHTS_DIR, params=base_params(model))
    return export_hf(model, out_dir, cfg, tokenizer_dir=tokenizer, dtype=dtype, max_shard_bytes=max_shard_bytes,
                     progress=progress, params=params)


def convert(ckpt_dir, out_dir, dtype=None, max_shard_size="5GB", tokenizer=None, tp=1, pp=1, force=False,
            progress=True) -> dict:
    import shutil
    import threading

    from framework.checkpoint import ckpt_format
    from framework.checkpoint.archive import unpacked
    from framework.runtime.atomic import publish, temp_dir_beside

    t0 = time.perf_counter()
    ckpt_dir, out_dir = unpacked(ckpt_dir), Path(out_dir)  # a .tar is unpacked (once) and read from there
    # config.yaml and the weights files' presence and sizes, before any process starts
    meta = ckpt_format.verify_checkpoint(ckpt_dir, check_hashes=False)
    if out_dir.exists() and not force:
        raise FileExistsError(f"{out_dir} exists; pass --force to replace it")
    if tp < 1 or pp < 1:
        raise ValueError(f"--tp and --pp must be >= 1 (got {tp}, {pp})")
    dtype = dtype or meta.get("hf_dtype") or "float32"
    if tokenizer is None:
        tok = ckpt_format.tokenizer_dir(ckpt_dir)
        tokenizer = str(tok) if tok is not None else None
    # The SHA-256 check reads every weights file once; it runs beside the export (hashing and reading
    # release the GIL), whose result is published only once the check has passed.
    hash_error: list = []

    def check():
        try:
            ckpt_format.check_sha256(ckpt_dir, meta)
        except Exception as e:
            hash_error.append(e)

    hashing = threading.Thread(target=check, name="sha256", daemon=True)
    hashing.start()
    staging = temp_dir_beside(out_dir)
    try:
        args = (str(ckpt_dir), str(staging / "hf"), tp, pp, tokenizer, dtype, parse_size(max_shard_size), progress)
        if tp * pp == 1:
            from framework.runtime.distributed import shutdown

            try:
                r = _worker(*args)
            finally:
                shutdown()
        else:
            import importlib

            from launch.spawn import run_distributed

            worker = importlib.import_module("converters.ckpt_to_hf")._worker
            r = run_distributed(worker, tp * pp, *args, timeout=24 * 3600)[0]
        hashing.join()
        if hash_error:
            raise hash_error[0]
        publish(staging / "hf", out_dir)
    finally:
        hashing.join()
        shutil.rmtree(staging, ignore_errors=True)
    r["seconds"] = time.perf_counter() - t0
    return r


def main(argv=None) -> None:
    a = build_parser().parse_args(argv)
    import_megatron_uncompiled()
    r = convert(a.ckpt_dir, a.out_dir, a.dtype, a.max_shard_size, a.tokenizer, a.tp, a.pp, a.force,
                not a.no_progress)
    print(summary_line(f"wrote {a.out_dir} ({len(r['files'])} file(s))", r["tensors"], r["bytes"], r["seconds"]))


if __name__ == "__main__":
    sys.exit(run_cli(main))
