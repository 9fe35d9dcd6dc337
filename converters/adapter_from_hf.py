"""HF PEFT adapter directory (adapter_config.json + adapter_model.safetensors) -> our adapter directory.

LoRA (incl. rsLoRA and DoRA) and IA3. HF's separate q/k/v (gate/up) LoRA pairs become our fused layers'
shared-A form exactly: identical A's are kept, different ones are stacked into a LoRA of 3x (2x) the rank
with block-diagonal B (see framework/checkpoint/peft_import.py). Module names are the model family's
(GPT-2's c_attn/c_proj/c_fc, Falcon's query_key_value/dense/..., Starcoder2's, Nemotron's, Mixtral's
attention; T5's SelfAttention/EncDecAttention/DenseReluDense modules of both stacks, the cross-attention's
q, k/v, o becoming our cross_q, cross_kv, cross_proj; framework/models/peft_names.py); a fused HF module
(c_attn, query_key_value) maps to our fused layer as it is. The architecture comes from --model: an
HF model directory (config.json) or our checkpoint (config.yaml, or a .tar of it). The result loads with
framework/checkpoint/adapter.py load_adapter at any TP/PP, or as a job's adapter.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from converters import run_cli, summary_line  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="adapter_from_hf.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("peft_dir", help="HF PEFT adapter directory (adapter_config.json + adapter_model.safetensors)")
    p.add_argument("out_dir", help="our adapter directory to write, e.g. RUN/adapters/NAME (written atomically)")
    p.add_argument("--model", required=True, metavar="DIR",
                   help="the base model: an HF directory with config.json, or our checkpoint directory / .tar")
    p.add_argument("--force", action="store_true", help="replace OUT_DIR if it exists (default: refuse)")
    p.add_argument("--debug", action="store_true", help="show the full traceback on failure")
    return p


def model_config_of(path):
    """ModelConfig of an HF directory (config.json) or of our checkpoint (config.yaml / .tar)."""
    from framework.checkpoint.archive import unpacked
    from framework.checkpoint.ckpt_format import model_config_of as ours
    from framework.models.registry import config_from_hf

    path = unpacked(Path(path))
    if (path / "config.json").is_file():
        return config_from_hf(json.loads((path / "config.json").read_text()))
    return ours(path)


def main(argv=None) -> None:
    from framework.checkpoint.peft_import import import_peft

    a = build_parser().parse_args(argv)
    if Path(a.out_dir).exists() and not a.force:
        raise FileExistsError(f"{a.out_dir} exists; pass --force to replace it")
    t0 = time.perf_counter()
    hf_base = a.model if (Path(a.model) / "config.json").is_file() else None  # DoRA fillers read its row norms
    meta = import_peft(a.peft_dir, a.out_dir, model_config_of(a.model), base_dir=hf_base)
    from framework.checkpoint.adapter import read_adapter_tensors

    tensors = read_adapter_tensors(a.out_dir)
    nbytes = sum(t.numel() * t.element_size() for t in tensors.values())
    note = f" (rank {meta['rank']}: HF rank {meta['hf_rank']} stacked)" if meta.get("rank") != meta.get("hf_rank", meta.get("rank")) else ""
    print(summary_line(f"wrote {a.out_dir}{note}", len(tensors), nbytes, time.perf_counter() - t0))


if __name__ == "__main__":
    sys.exit(run_cli(main))
