"""Fine-tune a model: mft finetune [KEY=VALUE ...]   (= python launch/finetune.py ...; the same under torchrun
and srun, which run this file)

Examples:
  python launch/finetune.py                                    # LoRA on SmolLM2-135M, HumanEval, CPU
  python launch/finetune.py trainer.max_steps=50 peft.rank=16
  torchrun --nproc-per-node 3 launch/finetune.py parallel.tensor=3
  torchrun --nproc-per-node 2 launch/finetune.py parallel.pipeline=2
  torchrun --nproc-per-node 4 launch/finetune.py parallel.tensor=3 ...   # refused: 4 is not a multiple of 3
  python launch/finetune.py --cfg job                          # print the resolved configuration

Groups and keys (every file in conf/ is commented; `--cfg job` prints the resolved configuration):
  model=smollm2_135m|tiny_llama|llama2_7b|llama3_8b|mistral_7b|mixtral_8x7b|gemma_7b|...
        model.source=smollm2|hf|ckpt|random, model.path (HF dir, or our checkpoint dir/.tar), model.tokenizer
  peft=lora|dora|ia3|adapter|prompt_tuning|ptuning|prefix_tuning|qlora|relora|none (full fine-tuning)
        lora/dora/qlora: peft.rank, peft.alpha, peft.dropout, peft.rslora, peft.targets=[qkv,proj,fc1,fc2,...]
  data=humaneval|chat_example   data.train, data.validation | data.validation_split, data.test, data.format,
        data.max_length, data.truncation_side=left|right, data.loss_on, data.packing, data.cache_dir
  parallel.tensor (TP), parallel.pipeline (PP), parallel.sequence (SP), parallel.first_stage_layers,
        parallel.last_stage_layers; data parallel = world / (TP x PP)
  precision=fp32|bf16|fp8 (fp8.recipe=delayed|current; TE on Hopper only)
  trainer.max_steps | trainer.max_epochs, global_batch_size, micro_batch_size, lr, min_lr, warmup_steps,
        weight_decay, clip_grad, eval_interval, eval_samples, recompute=none|selective|full,
        distributed_optimizer, save_interval, keep_last, resume=auto|never|PATH, early_stopping.patience,
        early_stopping.min_delta, tensorboard, wandb.project
  seed, output_dir, adapter_name, generate.max_new_tokens, generate.sample
Related (mft --help lists them): mft plan (memory per layout), mft params, mft generate, mft evaluate,
mft dpo, mft merge (adapter into the base), mft submit (Slurm), mft prepare-data.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from launch.hydra_entry import hydra_entry  # noqa: E402


def _run(cfg) -> None:
    from framework.training.finetune import run

    run(cfg)


main = hydra_entry("finetune", __doc__, _run)

if __name__ == "__main__":
    main()
