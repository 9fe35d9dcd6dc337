"""Check a training job's configuration (SFT, DPO) before any process group starts: every section's
problems in one message, each naming the key and a fix.

First the sections themselves (framework/config/: types, unknown keys, ranges and choices; the job's
``cfg`` holds typed sections from then on), then what needs another layer: the model's architecture and
layout (framework/checkpoint/model_checks.py), the batch sizes over the data-parallel size
(:class:`~framework.config.job.Layout`), the PEFT method's targets against the model, the data format
against the model's kind, and the job kind's own checks (DPO, encoder-decoder).
"""

from __future__ import annotations

from omegaconf import DictConfig

from framework.checkpoint.model_checks import model_config, model_problems
from framework.config.job import Layout, typed
from framework.data.prepare import check_options
from framework.data.seq2seq import problems as seq2seq_problems
from framework.models.config import ModelConfig
from framework.models.registry import kind_of
from framework.peft.registry import METHODS, config_problems
from framework.runtime.errors import ConfigError
from framework.training.dpo import job_problems


def _raise(problems: list[str]) -> None:
    if problems:
        raise ConfigError("invalid configuration:\n  - " + "\n  - ".join(problems))


def validate(cfg: DictConfig, world_size: int) -> ModelConfig:
    """Raise ConfigError (one message listing every problem) or return the model architecture."""
    problems, all_typed = typed(cfg, require_validation=True)
    if not all_typed:  # the checks below read typed values
        _raise(problems)
    model = model_config(cfg)
    problems += model_problems(cfg, model, world_size)  # family, layout, fp8 on this machine
    problems += Layout.of(cfg.parallel, cfg.trainer, world_size).batch_problems(cfg.trainer)
    if cfg.peft.method not in METHODS:
        problems.append(f"peft.method={cfg.peft.method!r} is not one of {sorted(METHODS)}")
    problems += config_problems(cfg, model)  # the method's targets against the model; MLP targets on MoE
    problems += seq2seq_problems(cfg)  # data.format / packing / decoder_max_length against the model's kind
    dpo = "dpo" in cfg or cfg.data.format == "preference"  # preference tuning (launch/dpo.py)
    problems += kind_of(model).problems(cfg, model, "dpo" if dpo else "train")  # e.g. T5: no PP, LoRA or full only
    if dpo:
        problems += job_problems(cfg)
    else:
        try:  # the formats the SFT reader takes
            check_options(cfg.data.max_length, cfg.data.truncation_side, cfg.data.format, cfg.data.loss_on)
        except ValueError as e:
            problems.append(str(e))
    if cfg.data.max_length > model.max_position_embeddings:
        problems.append(f"data.max_length={cfg.data.max_length} exceeds the model's "
                        f"max_position_embeddings={model.max_position_embeddings}")
    _raise(list(dict.fromkeys(problems)))  # a problem found by two checks is listed once
    return model
