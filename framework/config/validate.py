"""Check a job's configuration before any process group starts; every failure names the key and a fix."""

from __future__ import annotations

from omegaconf import DictConfig, OmegaConf

from framework.config.errors import ConfigError
from framework.models.config import ModelConfig
from framework.models.layout import LayoutError, check_layout

PRECISIONS = ("fp32", "bf16")


def model_config(cfg: DictConfig) -> ModelConfig:
    try:
        return ModelConfig.from_dict(OmegaConf.to_container(cfg.model.arch, resolve=True))
    except (TypeError, ValueError) as e:
        raise ConfigError(f"model.arch: {e}") from None


def validate(cfg: DictConfig, world_size: int) -> ModelConfig:
    """Raise ConfigError (one message listing every problem) or return the model architecture."""
    problems: list[str] = []
    model = model_config(cfg)
    from framework.models.registry import FAMILIES

    if model.family not in FAMILIES:
        problems.append(f"model.arch.family={model.family!r} is not a known family; known: {sorted(FAMILIES)}")
    par = cfg.parallel
    if not cfg.data.get("validation"):
        problems.append("data.validation: a validation file is required (a split fraction of the training "
                        "file is not supported yet)")
    try:
        check_layout(model, int(par.tensor), int(par.pipeline), bool(par.sequence), world_size)
    except LayoutError as e:
        problems.append(str(e).replace("invalid parallel layout:\n  - ", "").replace("\n  - ", "\n"))
    tr = cfg.trainer
    dp = max(1, world_size // max(1, int(par.tensor) * int(par.pipeline)))
    if int(tr.micro_batch_size) < 1:
        problems.append(f"trainer.micro_batch_size={tr.micro_batch_size} must be >= 1")
    elif int(tr.global_batch_size) % (int(tr.micro_batch_size) * dp):
        problems.append(
            f"trainer.global_batch_size={tr.global_batch_size} is not divisible by trainer.micro_batch_size "
            f"x data-parallel size = {tr.micro_batch_size} x {dp}; use a multiple of "
            f"{int(tr.micro_batch_size) * dp}")
    if int(tr.max_steps) < 1:
        problems.append(f"trainer.max_steps={tr.max_steps} must be >= 1")
    if cfg.precision not in PRECISIONS:
        problems.append(f"precision={cfg.precision!r} is not one of {PRECISIONS} (fp8 arrives with the GPU path)")
    from framework.peft.registry import METHODS

    if cfg.peft.method not in METHODS:
        problems.append(f"peft.method={cfg.peft.method!r} is not one of {sorted(METHODS)}")
    if cfg.model.source not in ("smollm2", "hf", "random"):
        problems.append(f"model.source={cfg.model.source!r} is not one of smollm2, hf, random")
    from framework.data.prepare import check_options

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
