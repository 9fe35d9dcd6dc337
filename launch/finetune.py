"""Fine-tune a model: python launch/finetune.py [KEY=VALUE ...]   (same under torchrun and srun)

Examples:
  python launch/finetune.py                                    # LoRA on SmolLM2-135M, HumanEval, CPU
  python launch/finetune.py trainer.max_steps=50 peft.rank=16
  torchrun --nproc-per-node 3 launch/finetune.py parallel.tensor=3
  torchrun --nproc-per-node 2 launch/finetune.py parallel.pipeline=2
  torchrun --nproc-per-node 4 launch/finetune.py parallel.tensor=3 ...   # refused: 4 is not a multiple of 3
  python launch/finetune.py --cfg job                          # print the resolved configuration

Keys (see conf/ for all, with comments):
  model=smollm2_135m|tiny_llama   model.source, model.path, model.tokenizer
  peft.rank, peft.alpha, peft.dropout, peft.rslora, peft.targets=[qkv,proj,fc1,fc2]
  data.train, data.validation, data.max_length, data.truncation_side=left|right
  parallel.tensor (TP), parallel.pipeline (PP), parallel.sequence (SP); data parallel = world / (TP x PP)
  trainer.max_steps, trainer.global_batch_size, trainer.micro_batch_size, trainer.lr, trainer.min_lr,
  trainer.warmup_steps, trainer.weight_decay, trainer.clip_grad, trainer.eval_interval, trainer.eval_samples
  precision=fp32|bf16, seed, output_dir, adapter_name, generate.max_new_tokens, generate.sample
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import hydra  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from launch.errors import exit_on_user_error  # noqa: E402


@hydra.main(version_base="1.3", config_path="../conf", config_name="finetune")
def _main(cfg: DictConfig) -> None:
    from framework.runtime.logs import setup_logging

    setup_logging()
    from framework.training.finetune import run

    with exit_on_user_error():
        run(cfg)


def main():
    if "--help" in sys.argv[1:] or "-h" in sys.argv[1:]:
        print(__doc__)
    _main()


if __name__ == "__main__":
    main()
