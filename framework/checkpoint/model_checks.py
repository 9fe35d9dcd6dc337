"""What every job (training, generation, planning) needs of ``model.*``, ``parallel.*`` and ``precision``,
checked before any process group starts; every failure names the key and a fix."""

from __future__ import annotations

from omegaconf import DictConfig, OmegaConf

from framework.checkpoint.hub import SOURCES
from framework.models.config import ModelConfig
from framework.models.layout import LayoutError, check_layout
from framework.models.precision import precision_problems
from framework.models.registry import FAMILIES
from framework.runtime.errors import ConfigError


def model_config(cfg: DictConfig) -> ModelConfig:
    try:
        return ModelConfig.from_dict(OmegaConf.to_container(cfg.model.arch, resolve=True))
    except (TypeError, ValueError) as e:
        raise ConfigError(f"model.arch: {e}") from None


def model_problems(cfg: DictConfig, model: ModelConfig, world_size: int) -> list[str]:
    """What any job needs of model.*, parallel.* and precision: a known family, a layout the model can take
    on ``world_size`` processes, a known precision and model source."""
    problems = []
    if model.family not in FAMILIES:
        problems.append(f"model.arch.family={model.family!r} is not a known family; known: {sorted(FAMILIES)}")
    par = cfg.parallel
    try:
        check_layout(model, par.tensor, par.pipeline, par.sequence, world_size,
                     par.get("first_stage_layers"), par.get("last_stage_layers"))
    except LayoutError as e:
        problems.append(str(e).replace("invalid parallel layout:\n  - ", "").replace("\n  - ", "\n"))
    problems += precision_problems(cfg)  # fp8 only with TE on a Hopper-class GPU; trainer.recompute
    if cfg.model.source not in SOURCES:
        problems.append(f"model.source={cfg.model.source!r} is not one of {', '.join(SOURCES)}")
    return problems
