"""Check and tokenise the data of a run without training: mft prepare-data [KEY=VALUE ...]

The same as python launch/prepare_data.py [KEY=VALUE ...]. Reads the same configuration as launch/finetune.py
(conf/finetune.yaml), tokenises data.train, data.validation (or holds out data.validation_split of data.train,
by seed) and data.test with the model's tokenizer exactly as training will, and prints what happened to every
sample (kept / truncated / dropped by reason, held out, tokens). The tokenised files go into the data cache
(data.cache_dir; null: none), so a later training run with the same files, tokenizer and options maps them
instead of tokenising again. On the first invalid record it prints one line, `error: FILE:LINE: message`, and
exits with status 2.

Examples:
  python launch/prepare_data.py                                             # the bundled HumanEval files
  python launch/prepare_data.py data.train=my.jsonl data.validation=null data.max_length=1024
  python launch/prepare_data.py model=tiny_llama model.tokenizer=DIR data.truncation_side=right
  python launch/prepare_data.py data.validation=null data.validation_split=0.05 data.test=test.jsonl

Keys used: data.train, data.validation, data.validation_split, data.test, data.max_length,
data.truncation_side=left|right, data.format, data.loss_on, data.chat_template, data.cache_dir, seed,
data.decoder_max_length (encoder-decoder models: T5 samples, framework/data/seq2seq.py), and model.* to find
the tokenizer (and whether the model is an encoder-decoder).
"""

import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import hydra  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from launch.errors import exit_on_user_error  # noqa: E402

# A checking tool should leave nothing behind: no Hydra run directory, no log file.
_QUIET_HYDRA = {"hydra.run.dir": ".", "hydra/job_logging": "stdout"}


@hydra.main(version_base="1.3", config_path=os.path.join(ROOT, "conf"), config_name="finetune")
def _main(cfg: DictConfig) -> None:
    from framework.runtime.logs import setup_logging

    setup_logging()
    with exit_on_user_error():
        run(cfg)


def run(cfg: DictConfig) -> None:
    from framework.runtime.errors import DataError
    from framework.data.prepare import cache_dir, check_files, check_options, prepare_config
    from framework.data.report import format_reports
    from framework.data.tokenizer import Tokenizer
    from framework.checkpoint import hub

    from framework.data.seq2seq import use_seq2seq_format

    use_seq2seq_format(cfg)  # an encoder-decoder model (T5): prompt/completion records become seq2seq samples
    data = cfg.data
    data_format = data.get("format", "prompt_completion")
    try:  # a bad option rather than a bad file: the message names the key, the same one-line treatment
        check_options(data.max_length, data.truncation_side, data_format, data.get("loss_on", "assistant"))
        check_files(data, require_validation=False)  # checking one file needs no validation source
        tok_dir = hub.tokenizer_dir(cfg.model)
    except DataError:
        raise
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)
    tokenizer = Tokenizer.from_dir(tok_dir)
    prepared = prepare_config(data, tokenizer, seed=int(cfg.seed))
    print(f"tokenizer: {tokenizer}")
    print(f"format: {data_format}, max_length: {data.max_length}, truncation_side: {data.truncation_side}")
    print(f"data cache: {cache_dir(data) or 'off (data.cache_dir=null)'}")
    print(format_reports(prepared.reports), flush=True)


def main():
    args = sys.argv[1:]
    if "--help" in args or "-h" in args:
        print(__doc__)
    for key, value in _QUIET_HYDRA.items():
        if not any(a.lstrip("+~").split("=", 1)[0] == key for a in args):
            sys.argv.append(f"{key}={value}")
    _main()


if __name__ == "__main__":
    main()
