"""Our trained LoRA / DoRA / IA3 adapter (adapter.safetensors + adapter.yaml) -> HF PEFT directory.

Writes adapter_config.json (peft_type LORA or IA3, r, lora_alpha, target_modules, use_rslora, use_dora,
fan_in_fan_out, base_model_name_or_path, ...) and adapter_model.safetensors with PEFT's key names for the
model's family (Llama: base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight; GPT-2:
base_model.model.transformer.h.{i}.attn.c_attn.lora_A.weight; Falcon: ...self_attention.query_key_value...),
which ``peft.PeftModel.from_pretrained(base_model, OUT_DIR)`` loads. Every decoder family exports (Mixtral:
attention only, its experts are not adapted). Every key the adapter's config implies must be present once
with its expected shape; anything else is an error naming the tensor.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from converters import run_cli, summary_line  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="adapter_to_hf.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("adapter_dir", help="our adapter directory (adapter.safetensors + adapter.yaml), e.g. "
                                       "RUN/adapters/NAME")
    p.add_argument("out_dir", help="HF PEFT directory to write (written to a temporary sibling and moved into place)")
    p.add_argument("--base-model", default=None, metavar="NAME_OR_PATH",
                   help="base_model_name_or_path for adapter_config.json (default: the base recorded in "
                        "adapter.yaml)")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None,
                   help="dtype of the written tensors (default: as stored)")
    p.add_argument("--force", action="store_true", help="replace OUT_DIR if it exists (default: refuse)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--debug", action="store_true", help="show the full traceback on failure")
    return p


def main(argv=None) -> None:
    from framework.checkpoint.peft_export import export_peft

    a = build_parser().parse_args(argv)
    if Path(a.out_dir).exists() and not a.force:
        raise FileExistsError(f"{a.out_dir} exists; pass --force to replace it")
    r = export_peft(a.adapter_dir, a.out_dir, base_model_name_or_path=a.base_model, dtype=a.dtype,
                    progress=not a.no_progress)
    print(summary_line(f"wrote {a.out_dir}", r["tensors"], r["bytes"], r["seconds"]))


if __name__ == "__main__":
    sys.exit(run_cli(main))
