"""Print trainable-parameter counts per PEFT method for a model config, without allocating the model:
mft params [KEY=VALUE ...]   (= python launch/param_count.py ...)

  python launch/param_count.py model=llama3_8b                   # every method in conf/peft/, defaults
  python launch/param_count.py model=llama3_8b peft=lora peft.rank=16 peft.targets=[qkv,fc1]
  python launch/param_count.py model=smollm2_135m peft=ptuning peft.num_virtual_tokens=50

Arguments are the job's Hydra overrides (conf/finetune.yaml); only ``model.arch`` and ``peft`` matter.
Without a ``peft`` override every conf/peft/*.yaml is counted with its defaults. The model is built on
the meta device (framework/peft/param_count.py): no weights are read or allocated, so an 8B model
counts in seconds on a laptop.
"""

import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from launch.errors import exit_on_user_error  # noqa: E402


def _compose(overrides):
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=os.path.join(ROOT, "conf"), version_base="1.3"):
        return compose(config_name="finetune", overrides=overrides)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--help" in argv or "-h" in argv:
        print(__doc__)
        return 0
    from framework.checkpoint.model_checks import model_config
    from framework.peft.param_count import count_on_meta, format_table
    from framework.runtime.distributed import initialize

    with exit_on_user_error():
        if any(a.split("=", 1)[0].lstrip("+~").startswith("peft") for a in argv):
            configs = [_compose(argv)]
        else:  # one config per method file, in name order
            names = sorted(f[:-5] for f in os.listdir(os.path.join(ROOT, "conf", "peft")) if f.endswith(".yaml"))
            configs = [_compose(argv + [f"peft={n}"]) for n in names]
        model_cfg = model_config(configs[0])
        initialize(tp=1, pp=1, seed=0)  # megatron's process groups, single process
        counts, seen = [], set()
        for cfg in configs:
            c = count_on_meta(model_cfg, cfg.peft)
            key = (c.method, c.trainable, c.total)
            if key not in seen:  # aliases (peft=full is peft=none) print once
                seen.add(key)
                counts.append(c)
        print(format_table(counts, configs[0].model.name), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
