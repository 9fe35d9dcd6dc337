"""A job's configuration as typed sections, and the sizes derived from them, computed once.

``typed(cfg)`` merges each group of the composed Hydra config onto its section's structured schema
(OmegaConf structured configs): values are converted to the declared types ("8" -> 8), a value of the wrong
type or an unknown key becomes a problem naming the key, and the job's ``cfg`` then holds the typed nodes, so
code below reads ``cfg.trainer.max_steps`` as an int without casting. Every section's own ``problems()``
runs here too; the checks that need another layer (the model's heads, the data files, a method's targets)
are gathered with these by framework/training/job_config.py and framework/inference/options.py.
"""

from __future__ import annotations

import dataclasses
import typing

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from framework.config.data import DataSection
from framework.config.model import ModelSection
from framework.config.parallel import ParallelSection
from framework.config.peft import SECTIONS as PEFT_SECTIONS
from framework.config.precision import Fp8Section, precision_problems
from framework.config.trainer import TrainerSection
from framework.runtime.distributed import data_parallel_size

#: config group -> its schema (peft: by method)
GROUPS = {"model": ModelSection, "data": DataSection, "parallel": ParallelSection, "trainer": TrainerSection}


def _schema(group: str, node):
    if group == "peft":
        return PEFT_SECTIONS.get(str(node.get("method")))
    return GROUPS.get(group)


def _other_methods_keys(schema, node) -> list[str]:
    """Keys of ``node`` that another PEFT method's section has but ``schema`` lacks: what a group file leaves
    behind when ``peft.method`` is overridden (``peft.method=none`` over conf/peft/lora.yaml keeps rank,
    alpha, ...). They mean nothing to this method and are dropped; a key no method has is still refused."""
    own = {f.name for f in dataclasses.fields(schema)}
    known = {f.name for s in PEFT_SECTIONS.values() for f in dataclasses.fields(s)}
    return [k for k in node if k not in own and k in known]


_WHAT = {int: "an integer", float: "a number", bool: "true or false", str: "a string", list: "a list",
         dict: "a mapping"}


def _expected(schema, dotted: str) -> str:
    """'an integer', 'a number or null', ... for the field at ``dotted`` of ``schema`` (nested sections too)."""
    hint = schema
    for name in dotted.split("."):
        if not dataclasses.is_dataclass(hint):
            return "another type"
        hint = typing.get_type_hints(hint).get(name)
    args = typing.get_args(hint)
    nullable = type(None) in args
    base = next((a for a in args if a is not type(None)), hint) if args and nullable else hint
    base = typing.get_origin(base) or base
    what = _WHAT.get(base, getattr(base, "__name__", str(base)))
    return f"{what} or null" if nullable else what


def _merge(group: str, schema, node) -> tuple[DictConfig | None, str | None]:
    if group == "peft" and OmegaConf.is_config(node) and _other_methods_keys(schema, node):
        dropped = set(_other_methods_keys(schema, node))
        node = OmegaConf.create({k: v for k, v in OmegaConf.to_container(node).items() if k not in dropped})
    try:
        return OmegaConf.merge(OmegaConf.structured(schema), node), None
    except OmegaConfBaseException as e:
        where = getattr(e, "full_key", None)
        if not where:
            return None, f"{group}: {str(e).splitlines()[0]}"
        key = f"{group}.{where}"
        value = OmegaConf.select(node, where) if OmegaConf.is_config(node) else None
        if "not in struct" in str(e) or "Key '" in str(e) and "not in" in str(e):
            return None, f"{key}: not a key of {group} ({schema.__name__}); check its spelling"
        shown = OmegaConf.to_container(value) if OmegaConf.is_config(value) else value
        return None, f"{key}={shown!r}: expected {_expected(schema, where)}"


def section_problems(group: str, node, require_validation: bool = True) -> list[str]:
    """The problems of one group's node (its types, then its own checks), e.g. ``section_problems("trainer",
    cfg.trainer)``."""
    schema = _schema(group, node)
    if schema is None:
        return []
    typed_node, problem = _merge(group, schema, node)
    if problem:
        return [problem]
    section = OmegaConf.to_object(typed_node)
    return section.problems(require_validation) if group == "data" else section.problems()


def typed(cfg: DictConfig, require_validation: bool = True) -> tuple[list[str], bool]:
    """Type ``cfg``'s sections in place (the groups it has) and return (every problem found in them, whether
    each group could be typed). Later checks read typed values only when the second is True."""
    problems: list[str] = []
    all_typed = True
    for group in ("model", "peft", "data", "parallel", "trainer"):
        if group not in cfg or _schema(group, cfg[group]) is None:  # an unknown peft.method: the registry says
            continue
        node, problem = _merge(group, _schema(group, cfg[group]), cfg[group])
        if problem:
            problems.append(problem)
            all_typed = False
            continue
        with _writable(cfg):
            cfg[group] = node
        problems += section_problems(group, node, require_validation)
    fp8 = None
    if cfg.get("fp8") is not None:
        node, problem = _merge("fp8", Fp8Section, cfg.fp8)
        problems += [problem] if problem else []
        fp8 = None if problem else OmegaConf.to_object(node)
    if "precision" in cfg:
        problems += precision_problems(cfg.precision, fp8)
    return problems, all_typed


class _writable:
    """Lift Hydra's struct/readonly flags for the replacement of whole groups."""

    def __init__(self, cfg):
        self.cfg = cfg

    def __enter__(self):
        self.struct, self.readonly = OmegaConf.is_struct(self.cfg), OmegaConf.is_readonly(self.cfg)
        OmegaConf.set_struct(self.cfg, False)
        OmegaConf.set_readonly(self.cfg, False)

    def __exit__(self, *exc):
        OmegaConf.set_readonly(self.cfg, self.readonly)
        OmegaConf.set_struct(self.cfg, self.struct)


@dataclasses.dataclass(frozen=True)
class Layout:
    """The sizes derived from ``parallel.*``, ``trainer.*`` and the world size, computed once."""
    world: int
    tp: int
    pp: int
    dp: int          # data-parallel size: world / (tp x pp)
    sp: bool
    accumulation: int  # micro-batches per DP rank and step: global_batch_size / (micro_batch_size x dp)

    @classmethod
    def of(cls, parallel, trainer, world_size: int) -> "Layout":
        tp, pp = int(parallel.tensor), int(parallel.pipeline)
        dp = data_parallel_size(world_size, tp, pp)
        gbs, mbs = int(trainer.global_batch_size), int(trainer.micro_batch_size)
        return cls(world=world_size, tp=tp, pp=pp, dp=dp, sp=bool(parallel.sequence),
                   accumulation=max(1, gbs // max(1, mbs * dp)))

    def batch_problems(self, trainer) -> list[str]:
        gbs, mbs = int(trainer.global_batch_size), int(trainer.micro_batch_size)
        if mbs >= 1 and gbs % (mbs * self.dp):
            return [f"trainer.global_batch_size={gbs} is not divisible by trainer.micro_batch_size x data-parallel "
                    f"size = {mbs} x {self.dp}; use a multiple of {mbs * self.dp}"]
        return []
