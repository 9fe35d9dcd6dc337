"""Merge a trained adapter into its base model: mft merge SOURCE --to hf|ckpt --out DIR [KEY=VALUE ...]

SOURCE is a run directory (its config.yaml names the base model and adapter_name; the adapter is
RUN/adapters/NAME) or an adapter directory (adapter.yaml + adapter.safetensors: RUN/adapters/NAME, or a
checkpoint's RUN/checkpoints/step-N/adapters/NAME), whose run's config.yaml is found above it. The base model
is the ``model`` of that config; KEY=VALUE overrides change it (e.g. model.path=... when the base has moved).
Without a run config the overrides compose conf/finetune.yaml, as for mft finetune (model=..., model.source=,
model.path=). The adapter may have been trained at any TP/PP: adapters are stored unsharded.

  --to hf     an HF directory of the model's family: config.json, model.safetensors, tokenizer files;
              transformers' AutoModelForCausalLM.from_pretrained gives the base + adapter logits
  --to ckpt   our checkpoint (config.yaml, weights/, tokenizer/): model.source=ckpt model.path=OUT

LoRA (rsLoRA), DoRA and IA3 (and QLoRA's LoRA, into the full-precision base) merge. Refused, with the
reason: prompt tuning and P-tuning (virtual tokens, no weight changes), Houlsby adapters (extra layers),
full fine-tuning (already whole weights: mft convert ckpt-to-hf RUN/weights OUT), an adapted output layer
tied to the embedding, and model.source=random (the base weights were never saved).

Examples:
  mft merge runs/smollm2-135m-instruct-lora --to hf --out merged-hf
  mft merge runs/NAME/adapters/default --to ckpt --out merged-ckpt --dtype bfloat16
  mft merge adapters/mine --to hf --out out model=llama3_8b model.source=hf model.path=/models/llama3-8b
  torchrun --nproc-per-node 8 launch/merge.py runs/NAME --to hf --out out --tp 8   # a model too big for one GPU
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from launch.errors import exit_on_user_error  # noqa: E402

JOB_CONFIG = "config.yaml"
ADAPTERS_DIR = "adapters"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mft merge", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("source", metavar="SOURCE", help="a run directory, or an adapter directory (RUN/adapters/NAME)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help="changes to the run's config (model.path=...), or Hydra overrides of conf/finetune.yaml "
                        "when SOURCE has no run config")
    p.add_argument("--to", required=True, choices=("hf", "ckpt"), help="output format: hf or ckpt (ours)")
    p.add_argument("--out", required=True, metavar="DIR", help="directory to write (moved into place when complete)")
    p.add_argument("--config", default=None, metavar="FILE",
                   help="the job's config.yaml (default: the one in SOURCE's run directory)")
    p.add_argument("--adapter-name", default=None, metavar="NAME",
                   help="which RUN/adapters/NAME to merge when SOURCE is a run (default: the config's adapter_name)")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None,
                   help="dtype of the written weights (default: the base model's); the merge itself is float32")
    p.add_argument("--tp", type=int, default=None,
                   help="tensor-parallel size to merge at (default: every process, under torchrun)")
    p.add_argument("--pp", type=int, default=1, help="pipeline-parallel size to merge at (default 1)")
    p.add_argument("--force", action="store_true", help="replace --out if it exists (default: refuse)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def _is_job_config(path: Path) -> bool:
    import yaml

    try:
        cfg = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError):
        return False
    return isinstance(cfg, dict) and isinstance(cfg.get("model"), dict) and isinstance(cfg.get("peft"), dict)


def find_job_config(source: Path) -> Path | None:
    """The config.yaml a job saved in its run directory: SOURCE's own, or one up to four levels above it
    (RUN/checkpoints/step-N/adapters/NAME). Our checkpoint's config.yaml (no ``peft``) is not one."""
    for d in [source, *source.parents][:5]:
        if _is_job_config(d / JOB_CONFIG):
            return d / JOB_CONFIG
    return None


def _dotted(overrides: list[str], config: Path) -> list[str]:
    from framework.runtime.errors import ConfigError  # torch comes with framework.runtime: not for --help

    for o in overrides:
        key = o.split("=", 1)[0].lstrip("+~")
        if "=" not in o or "." not in key:
            raise ConfigError(f"{o!r}: with a run's config ({config}) give KEY.SUBKEY=VALUE changes "
                             f"(e.g. model.path=/models/base); a group choice such as model=NAME needs "
                             f"--config none")
    return overrides


def resolve(args) -> tuple:
    """(job config, adapter directory) from SOURCE, --config, --adapter-name and the overrides."""
    from omegaconf import OmegaConf

    from framework.runtime.errors import ConfigError

    source = Path(args.source)
    if not source.exists():
        raise ConfigError(f"SOURCE={source} does not exist")
    config = None if args.config == "none" else Path(args.config) if args.config else find_job_config(source)
    if config is not None:
        if not config.is_file():
            raise ConfigError(f"--config={config}: no such file")
        cfg = OmegaConf.merge(OmegaConf.load(config), OmegaConf.from_dotlist(_dotted(args.overrides, config)))
    else:
        from hydra import compose, initialize_config_dir
        from hydra.errors import HydraException
        from omegaconf.errors import OmegaConfBaseException

        try:
            with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
                cfg = compose(config_name="finetune", overrides=args.overrides)
        except (HydraException, OmegaConfBaseException) as e:
            raise ConfigError(f"the overrides {args.overrides} do not compose conf/finetune.yaml: {e}") from None
    is_run = _is_job_config(source / JOB_CONFIG)
    relora = OmegaConf.select(cfg, "peft.method") == "relora"
    if (source / "adapter.yaml").is_file() or (not is_run and (source / "weights").is_dir()):
        adapter = source  # an adapter, or full fine-tuned weights (refused with the reason)
    elif relora:  # a ReLoRA run: its merged base and last adapter (framework/checkpoint/trained.py)
        adapter = source / "weights" / "adapter"
    else:  # a run directory
        trained_base = OmegaConf.select(cfg, "peft.method") in ("none", "full")
        name = args.adapter_name or OmegaConf.select(cfg, "adapter_name", default="default")
        adapter = source / "weights" if trained_base else source / ADAPTERS_DIR / name
        if not adapter.exists():
            raise ConfigError(f"SOURCE={source} has no {ADAPTERS_DIR}/{name} (the run's adapter_name; "
                             f"choose another with --adapter-name)")
    if relora:
        cfg = relora_base(cfg, adapter)
    return cfg, adapter


def relora_base(cfg, adapter: Path):
    """A ReLoRA run's model is its merged base (ADAPTER/../base, our checkpoint format) plus ADAPTER: the base
    replaces the run's starting model, whose tokenizer it keeps."""
    from framework.checkpoint import hub
    from framework.runtime.errors import ConfigError

    base = adapter.parent / "base"
    if not base.is_dir():
        raise ConfigError(f"{adapter}: a ReLoRA adapter (peft.method=relora) is merged with the base its run "
                          f"merged its restarts into, {base}, which does not exist")
    cfg.model.tokenizer = str(hub.tokenizer_dir(cfg.model))
    cfg.model.source, cfg.model.path = "ckpt", str(base)
    return cfg


def main(argv=None) -> int:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    from framework.checkpoint.merged_model import write_merged  # torch and megatron: after --help
    from framework.runtime.distributed import shutdown, world_size_from_env
    from framework.runtime.errors import CheckpointError
    from framework.runtime.logs import setup_logging

    setup_logging()
    t0 = time.perf_counter()
    with exit_on_user_error():
        cfg, adapter = resolve(args)
        tp = args.tp or max(1, world_size_from_env() // args.pp)
        try:
            r = write_merged(cfg.model, adapter, args.out, to=args.to, dtype=args.dtype, tp=tp, pp=args.pp,
                             force=args.force, progress=not args.no_progress)
        except (CheckpointError, FileExistsError) as e:
            print(f"error: {e}", file=sys.stderr, flush=True)
            return 2
        finally:
            shutdown()
    if r is not None:
        size = f", {r['tensors']} tensors, {r['bytes'] / 1e6:.2f} MB" if "tensors" in r else ""
        print(f"merged the {r['method']} adapter {adapter} into {cfg.model.name}: wrote {args.out} "
              f"({args.to}, {r['dtype']}{size}, {time.perf_counter() - t0:.1f} s)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
