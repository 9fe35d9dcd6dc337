"""Our checkpoint directory -> HF Llama directory that transformers' AutoModelForCausalLM.from_pretrained loads.

Loads OUT weights (megatron dist_checkpointing; any layout it was saved at) into a model at --tp/--pp
(default a single process at TP=1, PP=1), then writes the base weights tensor by tensor in HF names and
layout (q/k/v and gate/up split back out of the fused projections), config.json, and the tokenizer files
from CKPT_DIR/tokenizer. With the dtype the HF source had (recorded in config.yaml), HF -> ours -> HF is
bitwise identical.

Memory: one copy of the model (each rank's stage with --tp/--pp > 1) plus one output file of at most
--max-shard-size on the writing rank.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from converters import parse_size, run_cli, summary_line  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="ckpt_to_hf.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("ckpt_dir", help="our checkpoint directory (config.yaml, weights/, tokenizer/)")
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
    from framework.checkpoint.ckpt_format import load_checkpoint_into, model_config_of
    from framework.checkpoint.hf_export import export_hf
    from framework.models.registry import build_model
    from framework.runtime.distributed import initialize

    cfg = model_config_of(ckpt_dir)
    initialize(tp=tp, pp=pp)
    gpt = build_model(cfg, tp=tp, pp=pp)
    load_checkpoint_into(gpt, ckpt_dir, cfg, check_hashes=False)  # convert() checked them
    return export_hf(gpt, out_dir, cfg, tokenizer_dir=tokenizer, dtype=dtype, max_shard_bytes=max_shard_bytes,
                     progress=progress)


def convert(ckpt_dir, out_dir, dtype=None, max_shard_size="5GB", tokenizer=None, tp=1, pp=1, force=False,
            progress=True) -> dict:
    from framework.checkpoint import ckpt_format

    t0 = time.perf_counter()
    ckpt_dir, out_dir = Path(ckpt_dir), Path(out_dir)
    meta = ckpt_format.verify_checkpoint(ckpt_dir)  # config.yaml and weights files, before any process starts
    if out_dir.exists() and not force:
        raise FileExistsError(f"{out_dir} exists; pass --force to replace it")
    if tp < 1 or pp < 1:
        raise ValueError(f"--tp and --pp must be >= 1 (got {tp}, {pp})")
    dtype = dtype or meta.get("hf_dtype") or "float32"
    if tokenizer is None:
        tok = ckpt_format.tokenizer_dir(ckpt_dir)
        tokenizer = str(tok) if tok is not None else None
    args = (str(ckpt_dir), str(out_dir), tp, pp, tokenizer, dtype, parse_size(max_shard_size), progress)
    if tp * pp == 1:
        from framework.runtime.distributed import shutdown

        try:
            r = _worker(*args)
        finally:
            shutdown()
    else:
        import importlib

        from framework.runtime.spawn import run_distributed

        worker = importlib.import_module("converters.ckpt_to_hf")._worker
        r = run_distributed(worker, tp * pp, *args, timeout=24 * 3600)[0]
    r["seconds"] = time.perf_counter() - t0
    return r


def main(argv=None) -> None:
    a = build_parser().parse_args(argv)
    r = convert(a.ckpt_dir, a.out_dir, a.dtype, a.max_shard_size, a.tokenizer, a.tp, a.pp, a.force,
                not a.no_progress)
    print(summary_line(f"wrote {a.out_dir} ({len(r['files'])} file(s))", r["tensors"], r["bytes"], r["seconds"]))


if __name__ == "__main__":
    sys.exit(run_cli(main))
