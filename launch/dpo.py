"""Preference-tune a model (DPO): mft dpo [KEY=VALUE ...]   (= python launch/dpo.py ...; the same under
torchrun and srun, which run this file)

Examples:
  python launch/dpo.py                                          # LoRA DPO of SmolLM2-135M on arithmetic pairs
  python launch/dpo.py dpo.loss=ipo dpo.beta=0.5
  python launch/dpo.py dpo.label_smoothing=0.1                  # conservative DPO
  python launch/dpo.py dpo.sft_weight=1.0                       # + NLL on the chosen responses
  python launch/dpo.py peft=none dpo.reference=precomputed      # full-parameter DPO, reference computed once
  torchrun --nproc-per-node 3 launch/dpo.py parallel.tensor=3 parallel.sequence=true
  python launch/dpo.py --cfg job                                # print the resolved configuration

Keys (conf/dpo.yaml and the groups in conf/, with comments):
  dpo.loss=sigmoid|robust|ipo, dpo.beta, dpo.label_smoothing, dpo.sft_weight,
  dpo.reference=auto|adapters_disabled|frozen_copy|precomputed
  data.train (JSONL: {"prompt", "chosen", "rejected"} or {"messages", "chosen", "rejected"}), data.validation
  or data.validation_split, data.max_length, data.truncation_side, data.bad_records=error|skip,
  data.packing (whole pairs packed into rows of 2 x data.max_length)
  trainer.save_interval, trainer.keep_last, trainer.resume=auto|never|PATH, trainer.steps_per_run,
  trainer.early_stopping.* (checkpoints and resume as launch/finetune.py: re-run the command to continue)
  model=..., peft=lora|dora|ia3|adapter|qlora|none, parallel.tensor/pipeline/sequence, trainer.*, precision
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from launch.hydra_entry import hydra_entry  # noqa: E402


def _run(cfg) -> None:
    from framework.training.dpo_job import run

    run(cfg)


main = hydra_entry("dpo", __doc__, _run)

if __name__ == "__main__":
    main()
