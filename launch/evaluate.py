"""Evaluate against references: mft evaluate input=FILE [KEY=VALUE ...]   (= python launch/evaluate.py ...)

The same as ``python launch/generate.py mode=eval ...``: the loss and perplexity of each record's reference
(teacher forced, completion tokens only, as validation) and exact match / token F1 of the completion
generated from its prompt (SQuAD normalisation). Writes per-record results (output) and a JSON report
(report), and prints a table. ``mft generate --help`` lists every key. A T5 (encoder-decoder)
scores its seq2seq samples (encoder input = prompt + EOS, targets = completion + EOS), as its training does.

Examples:
  python launch/evaluate.py input=data/humaneval/val.jsonl generate.max_new_tokens=256
  python launch/evaluate.py input=qa.jsonl adapter=runs/NAME/adapters/default report=qa-report.json
  torchrun --nproc-per-node 2 launch/evaluate.py input=qa.jsonl parallel.tensor=2
"""

import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import hydra  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from launch.generate import run_job  # noqa: E402


@hydra.main(version_base="1.3", config_path=os.path.join(ROOT, "conf"), config_name="generate")
def _main(cfg: DictConfig) -> None:
    run_job(cfg)


def main():
    if "--help" in sys.argv[1:] or "-h" in sys.argv[1:]:
        print(__doc__)
    sys.argv.insert(1, "mode=eval")
    _main()


if __name__ == "__main__":
    main()
