"""HF Llama checkpoint directory -> our checkpoint directory (config.yaml, tokenizer/, weights/).

Reads config.json and the safetensors file(s) (single file or sharded with model.safetensors.index.json),
first checks every HF tensor's name, shape and dtype against the config (from the safetensors headers,
without reading data), then streams: the model is a skeleton on the meta device, and megatron
dist_checkpointing's torch_dist writer (which any TP/PP layout loads, resharding on load) computes each
parameter from its HF tensor(s) when it reaches it. Weights are stored in the HF files' dtype.

Memory: no model is ever materialised. Each of the 2 writer threads (per rank with --tp/--pp > 1) holds one
parameter, the HF tensor(s) it is made of (plain reads, no memory map) and the item being written; the
largest is the embedding (vocab x hidden). See framework/checkpoint/streaming.py.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from converters import import_megatron_uncompiled, run_cli, summary_line  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="hf_to_ckpt.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("hf_dir", help="HF model directory: config.json + model.safetensors (or sharded "
                                  "model-*.safetensors with model.safetensors.index.json) + tokenizer files")
    p.add_argument("out_dir", help="our checkpoint directory to write (written to a temporary sibling and "
                                   "moved into place when complete); a name ending in .tar writes one tar "
                                   "archive of that directory instead")
    p.add_argument("--tokenizer", default=None, metavar="DIR",
                   help="directory whose tokenizer files (tokenizer.json, tokenizer_config.json, ...) are copied "
                        "into OUT_DIR/tokenizer (default: HF_DIR)")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel size to convert through (default 1; the "
                                                     "result loads at any layout regardless)")
    p.add_argument("--pp", type=int, default=1, help="pipeline-parallel size to convert through (default 1)")
    p.add_argument("--force", action="store_true", help="replace OUT_DIR if it exists (default: refuse)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--debug", action="store_true", help="show the full traceback on failure")
    return p


def check_hf_tensors(hf_dir, model_cfg, progress: bool = True) -> dict:
    """Check every HF tensor (name known, shape as the config implies, one float dtype) from the
    safetensors headers only. Returns {'tensors', 'bytes', 'dtype'}; raises HFImportError naming the tensor."""
    from framework.checkpoint.safetensors_files import open_safetensors

    from framework.checkpoint.hf_export import hf_shapes
    from framework.checkpoint.hf_import import HFImportError, deepest_stack, safetensors_index, table_names
    from framework.models import weight_table as wt
    from framework.models.registry import get_family

    want = hf_shapes(model_cfg)
    family = get_family(model_cfg.family)
    index = safetensors_index(hf_dir)
    stored = table_names(index, family)  # the table's names (a bare GPT2Model save lacks 'transformer.')
    index = {name: index[as_stored] for name, as_stored in stored.items()}
    rules = family.rules(model_cfg.tie_word_embeddings, model_cfg)
    by_file: dict = {}
    for name, path in index.items():
        by_file.setdefault(path, []).append(name)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(index), unit="tensor", desc="check", dynamic_ncols=True)
    nbytes, dtypes, seen = 0, set(), set()
    sizes = {"F32": 4, "BF16": 2, "F16": 2, "F64": 8}
    try:
        for path, names in by_file.items():
            with open_safetensors(path, HFImportError) as f:
                present = set(f.keys())
                for name in names:
                    if stored[name] not in present:
                        raise HFImportError(f"HF tensor {name!r} is listed in the index for {path.name} but "
                                            f"that file does not hold it")
                    try:
                        kind = wt.classify_hf_name(name, rules, family.ignored, model_cfg.tie_word_embeddings,
                                                   deepest_stack(model_cfg, rules), model_cfg.num_experts)
                    except ValueError as e:
                        raise HFImportError(f"{e} (in {path.name})") from None
                    if kind is None:
                        raise HFImportError(f"HF tensor {name!r} in {path.name} is not a {family.name} weight "
                                            f"known to the name table (framework/models/families/{family.name}.py)")
                    sl = f.get_slice(stored[name])
                    shape, dtype = tuple(sl.get_shape()), sl.get_dtype()
                    if dtype not in sizes:
                        raise HFImportError(f"HF tensor {name!r} has dtype {dtype}, not a float type")
                    expected = want.get(name)
                    if kind != "ignored" and expected is None:
                        raise HFImportError(f"HF tensor {name!r} in {path.name} is not expected by config.json "
                                            f"(e.g. a layer beyond its stack's depth)")
                    if kind != "ignored" and expected is not None and shape != expected:
                        raise HFImportError(f"HF tensor {name!r} has shape {shape}, config.json implies {expected}")
                    if kind != "ignored":
                        dtypes.add(dtype)
                        seen.add(name)
                    n = 1
                    for s in shape:
                        n *= s
                    nbytes += n * sizes[dtype]
                    if bar is not None:
                        bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    missing = [n for n in want if n not in seen]
    if missing:
        raise HFImportError(f"HF tensor(s) {missing[:5]}{' ...' if len(missing) > 5 else ''} missing from {hf_dir}")
    if len(dtypes) > 1:
        raise HFImportError(f"{hf_dir} mixes tensor dtypes {sorted(dtypes)}")
    dtype = {"F32": "float32", "BF16": "bfloat16", "F16": "float16", "F64": "float32"}[dtypes.pop()]
    return {"tensors": len(index), "bytes": nbytes, "dtype": dtype}


def _worker(hf_dir: str, out_dir: str, tp: int, pp: int, tokenizer: str | None, hf_dtype: str,
            progress: bool = False):
    from framework.checkpoint.ckpt_format import save_checkpoint
    from framework.checkpoint.hf_export import DTYPES
    from framework.checkpoint.hf_import import HFWeights
    from framework.checkpoint.streaming import skeleton
    from framework.models.registry import config_from_hf
    from framework.runtime.distributed import initialize

    cfg = config_from_hf(json.loads((Path(hf_dir) / "config.json").read_text()))
    rt = initialize(tp=tp, pp=pp)
    model = skeleton(cfg, tp=tp, pp=pp, dtype=DTYPES[hf_dtype])
    with HFWeights(model, hf_dir, cfg) as weights:
        bar = None
        if progress and rt.rank == 0:
            from tqdm import tqdm

            bar = tqdm(total=len(weights.plan), unit="param", desc="convert", dynamic_ncols=True)
        try:
            save_checkpoint(model, out_dir, cfg, tokenizer_src=tokenizer, hf_dtype=hf_dtype,
                            source=str(Path(hf_dir).absolute()), values=weights.value,
                            on_value=(lambda _name: bar.update(1)) if bar is not None else None)
        finally:
            if bar is not None:
                bar.close()
    return True


def convert(hf_dir, out_dir, tp: int = 1, pp: int = 1, tokenizer=None, force: bool = False,
            progress: bool = True) -> dict:
    """HF_DIR -> OUT_DIR (a directory, or a .tar archive of one); returns {'tensors', 'bytes', 'seconds'}."""
    from framework.checkpoint.archive import is_archive, pack
    from framework.runtime.atomic import temp_dir_beside
    from framework.checkpoint.hf_import import HFImportError
    from framework.models.registry import config_from_hf

    t0 = time.perf_counter()
    hf_dir, out_dir = Path(hf_dir), Path(out_dir)
    if not (hf_dir / "config.json").is_file():
        raise HFImportError(f"{hf_dir} has no config.json (not an HF model directory)")
    if out_dir.exists() and not force:
        raise FileExistsError(f"{out_dir} exists; pass --force to replace it")
    if tp < 1 or pp < 1:
        raise ValueError(f"--tp and --pp must be >= 1 (got {tp}, {pp})")
    try:
        cfg = config_from_hf(json.loads((hf_dir / "config.json").read_text()))
    except json.JSONDecodeError as e:
        raise HFImportError(f"{hf_dir / 'config.json'} is not valid JSON: {e}") from None
    checked = check_hf_tensors(hf_dir, cfg, progress=progress)
    tok = str(tokenizer) if tokenizer is not None else str(hf_dir)
    final, staging = out_dir, None
    if is_archive(out_dir):  # write the directory beside the archive, then pack it
        staging = temp_dir_beside(out_dir)
        out_dir = staging / "ckpt"
    try:
        _run(hf_dir, out_dir, tp, pp, tok, checked["dtype"], progress)
        if staging is not None:
            pack(out_dir, final)
    finally:
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)
    return {"tensors": checked["tensors"], "bytes": checked["bytes"], "seconds": time.perf_counter() - t0}


def _run(hf_dir, out_dir, tp, pp, tok, dtype, progress) -> None:
    args = (str(hf_dir), str(out_dir), tp, pp, tok, dtype, progress)
    if tp * pp == 1:
        from framework.runtime.distributed import shutdown

        try:
            _worker(*args)
        finally:
            shutdown()
    else:
        import importlib

        from launch.spawn import run_distributed

        worker = importlib.import_module("converters.hf_to_ckpt")._worker  # picklable by module name
        run_distributed(worker, tp * pp, *args, timeout=24 * 3600)


def main(argv=None) -> None:
    args = build_parser().parse_args(argv)
    import_megatron_uncompiled()
    r = convert(args.hf_dir, args.out_dir, args.tp, args.pp, args.tokenizer, args.force, not args.no_progress)
    print(summary_line(f"wrote {args.out_dir}", r["tensors"], r["bytes"], r["seconds"]))


if __name__ == "__main__":
    sys.exit(run_cli(main))
