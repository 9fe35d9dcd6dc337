"""Estimate per-GPU memory of a fine-tuning configuration at every TP x PP x DP layout and recommend one:
mft plan [KEY=VALUE ...] [--gpus N] ...   (= python launch/plan.py ...)

    python launch/plan.py model=llama2_70b peft=lora precision=bf16 --gpus 8
    python launch/plan.py model=llama3_8b peft=none data.max_length=4096 --gpus 16 --gpu-memory 80 --all

Positional arguments are the job's Hydra overrides (the same as launch/finetune.py takes: model, peft,
precision, data.max_length, trainer.micro_batch_size, ...); the architecture comes from model.arch. For
each layout and activation-recompute option the table gives weights, gradients, optimizer state,
activations and logits per GPU (on the pipeline stage that needs most) and whether it fits; the formulas
are in framework/planner/memory.py. Nothing is allocated and no weights are read.
"""

from __future__ import annotations

import argparse
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="plan.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("overrides", nargs="*", help="Hydra overrides of conf/finetune.yaml, e.g. model=llama2_70b peft=lora")
    p.add_argument("--gpus", type=int, default=8, help="GPUs in the job (default 8)")
    p.add_argument("--gpus-per-node", type=int, default=8, help="GPUs per node; TP stays within a node (default 8)")
    p.add_argument("--gpu-memory", type=float, default=80.0, help="memory per GPU in GiB (default 80)")
    p.add_argument("--seq", type=int, default=None, help="sequence length (default data.max_length)")
    p.add_argument("--all", action="store_true", help="print every layout, not only the best 12")
    return p


def main(argv=None) -> None:
    a = build_parser().parse_args(argv)  # --help before the imports below
    from launch.errors import exit_on_user_error

    with exit_on_user_error():
        _plan(a)


def _plan(a) -> None:
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from framework.planner.memory import GiB, job_from_config, plan, table
    from framework.runtime.errors import ConfigError

    try:
        with initialize_config_dir(config_dir=os.path.join(ROOT, "conf"), version_base="1.3"):
            cfg = compose(config_name="finetune", overrides=a.overrides)
    except (HydraException, OmegaConfBaseException) as e:
        raise ConfigError(f"the overrides {a.overrides} do not compose conf/finetune.yaml: "
                          f"{str(e).splitlines()[0]}") from None
    job = job_from_config(cfg, a.seq)
    rows = plan(job, a.gpus, a.gpu_memory, a.gpus_per_node)
    m = job.model
    print(f"{cfg.model.name}: {m.num_layers} layers, hidden {m.hidden_size}, {m.num_attention_heads} heads / "
          f"{m.num_query_groups} KV; peft={job.method} precision={job.precision} seq={job.seq_length}"
          f"{'' if job.decoder_seq_length is None else f' decoder-seq={job.decoder_seq_length}'} micro-batch={job.micro_batch_size}; {a.gpus} GPUs of {a.gpu_memory:g} GiB")
    print(table(rows, None if a.all else 12))
    best = rows[0][0] if rows and rows[0][1] else None
    if best is None:
        print(f"\nno layout fits in {a.gpu_memory:g} GiB per GPU on {a.gpus} GPUs")
        sys.exit(1)
    print(f"\nrecommended: parallel.tensor={best.tp} parallel.pipeline={best.pp} "
          f"parallel.sequence={str(best.sp).lower()} (DP={best.dp}), recompute={best.recompute}: "
          f"{best.total / GiB:.1f} GiB per GPU")


if __name__ == "__main__":
    main()
