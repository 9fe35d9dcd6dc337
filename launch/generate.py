"""Generate completions (or evaluate against references): mft generate input=FILE [KEY=VALUE ...]

The same as python launch/generate.py input=FILE ..., and under torchrun and srun (which run that file): every
rank runs the loop; TP/PP split the model, data parallel ranks (world / (TP x PP)) share the prompts.
Configuration: conf/generate.yaml (groups model/ and parallel/ as for launch/finetune.py).

Examples:
  python launch/generate.py input=prompts.jsonl output=completions.jsonl
  python launch/generate.py input=prompts.jsonl adapter=runs/smollm2-135m-instruct-lora/adapters/default
  python launch/generate.py input=prompts.jsonl generate.do_sample=true generate.temperature=0.7 generate.top_p=0.9
  torchrun --nproc-per-node 2 launch/generate.py input=prompts.jsonl parallel.pipeline=2
  python launch/generate.py mode=eval input=qa.jsonl           # = python launch/evaluate.py input=qa.jsonl
  python launch/generate.py --cfg job input=x.jsonl            # print the resolved configuration

Input (JSONL, one object per line; other keys are kept in the output):
  {"prompt": "..."}                          completed after [bos] + the prompt's tokens, as training saw it
  {"messages": [{"role": "user", ...}]}      rendered with the tokenizer's chat template, add_generation_prompt
  mode=eval also needs the reference: "completion" (a string, or a list of strings) with "prompt"; with
  "messages", the last message is the assistant's reference answer.
  T5 (model=t5_base|t5_large|t5_tiny, encoder-decoder): "prompt" records only; the encoder input is the
  prompt + EOS (encoded once per batch), the decoder re-runs over its whole prefix for every new token (no
  KV cache); TP and DP, not PP.

Output:
  generate: output (default INPUT.completions.jsonl) = each input record + "completion" (generated text)
            + "finish_reason" (stop | length); an input "completion" is kept as "reference".
  eval:     output (default INPUT.eval.jsonl) = each record + "generated", "exact_match", "f1", "loss",
            "target_tokens"; report (default OUTPUT.report.json) = loss and perplexity of the reference
            tokens (teacher forced: completion tokens + EOS only, as validation), exact match and token F1
            in % (SQuAD normalisation: lowercase, punctuation and the articles a/an/the removed, whitespace
            collapsed; the best over a record's references); a table is printed.

Keys:
  model=smollm2_135m|tiny_llama|...   model.source, model.path, model.tokenizer (the base model)
  adapter=PATH            RUN/adapters/NAME (LoRA, DoRA, IA3, prompt tuning, ... as trained) or RUN/weights
  input, output, report, mode=generate|eval, batch_size, seed, precision=fp32|bf16, progress=true|false
  generate.max_new_tokens, generate.do_sample, generate.temperature, generate.top_k, generate.top_p,
  generate.stop_tokens=[...], generate.padding_side=auto|left|right, generate.use_cache, generate.micro_batch_size
  eval.max_length         longest prompt + reference the loss scores (prompt cut from the left)
  parallel.tensor, parallel.pipeline (parallel.sequence must stay false: decoding is one token at a time)
"""

import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import hydra  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from launch.errors import exit_on_user_error  # noqa: E402


def run_job(cfg: DictConfig) -> None:
    from framework.runtime.logs import setup_logging

    setup_logging()
    from framework.inference.job import run

    with exit_on_user_error():
        run(cfg)


@hydra.main(version_base="1.3", config_path=os.path.join(ROOT, "conf"), config_name="generate")
def _main(cfg: DictConfig) -> None:
    run_job(cfg)


def main():
    if "--help" in sys.argv[1:] or "-h" in sys.argv[1:]:
        print(__doc__)
    _main()


if __name__ == "__main__":
    main()
