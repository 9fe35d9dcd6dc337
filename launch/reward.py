"""Train a reward model: mft reward [KEY=VALUE ...]   (= python launch/reward.py ...; the same under torchrun
and srun, which run this file)

Examples:
  python launch/reward.py                                       # LoRA reward model of SmolLM2-135M on arithmetic pairs
  python launch/reward.py reward.center_rewards_coefficient=0.01
  python launch/reward.py peft=none trainer.lr=1e-5               # full-parameter reward model
  torchrun --nproc-per-node 2 launch/reward.py parallel.tensor=2 parallel.sequence=true
  python launch/reward.py --cfg job                             # print the resolved configuration

Keys (conf/reward.yaml and the groups in conf/, with comments):
  reward.center_rewards_coefficient (null or >= 0)
  data.train (JSONL: {"prompt", "chosen", "rejected"} or {"messages", "chosen", "rejected"}, each with an optional
  "margin"), data.validation or data.validation_split, data.max_length, data.truncation_side, data.bad_records
  trainer.save_interval, trainer.keep_last, trainer.resume=auto|never|PATH, trainer.steps_per_run,
  trainer.early_stopping.* (checkpoints and resume as launch/finetune.py: re-run the command to continue)
  model=... (a causal LM, or an HF ...ForSequenceClassification with num_labels=1 to continue training),
  peft=lora|dora|ia3|adapter|qlora|none (the score head is always trained), parallel.tensor/pipeline/sequence,
  trainer.*, precision
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from launch.hydra_entry import hydra_entry  # noqa: E402


def _run(cfg) -> None:
    from framework.training.reward_task import run

    run(cfg)


main = hydra_entry("reward", __doc__, _run)

if __name__ == "__main__":
    main()
