"""Check a training job's configuration (SFT, DPO) before any process group starts: every section's
problems in one message, each naming the key and a fix."""

from __future__ import annotations

from omegaconf import DictConfig

from framework.checkpoint.model_checks import model_config, model_problems
from framework.models.config import ModelConfig
from framework.runtime.errors import ConfigError


def validate(cfg: DictConfig, world_size: int) -> ModelConfig:
    """Raise ConfigError (one message listing every problem) or return the model architecture."""
    problems: list[str] = []
    model = model_config(cfg)
    problems += model_problems(cfg, model, world_size)  # family, layout, precision, model.source
    par = cfg.parallel
    from framework.data.prepare import check_files

    try:  # exactly one of data.validation / data.validation_split; test and cache_dir paths
        check_files(cfg.data, require_validation=True)
    except ValueError as e:
        problems.append(str(e))
    tr = cfg.trainer
    dp = max(1, world_size // max(1, int(par.tensor) * int(par.pipeline)))
    if int(tr.micro_batch_size) < 1:
        problems.append(f"trainer.micro_batch_size={tr.micro_batch_size} must be >= 1")
    elif int(tr.global_batch_size) % (int(tr.micro_batch_size) * dp):
        problems.append(
            f"trainer.global_batch_size={tr.global_batch_size} is not divisible by trainer.micro_batch_size "
            f"x data-parallel size = {tr.micro_batch_size} x {dp}; use a multiple of "
            f"{int(tr.micro_batch_size) * dp}")
    from framework.training.options import trainer_problems

    problems += trainer_problems(tr)  # steps/epochs, intervals, checkpoints, resume, early stopping, logging
    if not isinstance(tr.get("distributed_optimizer", False), bool):
        problems.append(f"trainer.distributed_optimizer={tr.distributed_optimizer!r}: expected true or false")
    from framework.peft.registry import METHODS, config_problems

    if cfg.peft.method not in METHODS:
        problems.append(f"peft.method={cfg.peft.method!r} is not one of {sorted(METHODS)}")
    problems += config_problems(cfg, model)  # the method's own keys (e.g. peft.num_virtual_tokens); MLP targets on MoE
    from framework.data.seq2seq import problems as seq2seq_problems

    problems += seq2seq_problems(cfg)  # data.format / packing / decoder_max_length against the model's kind
    if model.num_decoder_layers is not None:  # encoder-decoder (T5): what the job does not do for it
        from framework.models.t5_support import job_problems

        problems += job_problems(cfg, model)
    from framework.data.prepare import check_options

    if "dpo" in cfg or cfg.data.get("format") == "preference":  # preference tuning (launch/dpo.py)
        from framework.training.dpo import job_problems

        problems += job_problems(cfg)
    else:
        try:
            check_options(cfg.data.max_length, cfg.data.truncation_side, cfg.data.get("format", "prompt_completion"),
                          cfg.data.get("loss_on", "assistant"))
        except ValueError as e:
            problems.append(str(e))
    if not isinstance(cfg.data.get("packing", False), bool):
        problems.append(f"data.packing={cfg.data.packing!r}: expected true or false")
    if isinstance(cfg.data.max_length, int) and cfg.data.max_length > model.max_position_embeddings:
        problems.append(f"data.max_length={cfg.data.max_length} exceeds the model's "
                        f"max_position_embeddings={model.max_position_embeddings}")
    if problems:
        raise ConfigError("invalid configuration:\n  - " + "\n  - ".join(problems))
    return model
