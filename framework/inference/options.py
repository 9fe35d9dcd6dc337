"""conf/generate.yaml's own keys -> typed settings, and what is wrong with them (before any process starts)."""

from __future__ import annotations

from framework.inference.generate import GenerationConfig
from framework.inference.sampling import Sampling
from framework.checkpoint.model_checks import model_config, model_problems
from framework.config.job import typed
from framework.models.config import ModelConfig
from framework.models.registry import kind_of
from framework.runtime.errors import ConfigError

MODES = ("generate", "eval")


def generation_config(node, stop_ids: tuple[int, ...] = (), seed: int = 1234) -> GenerationConfig:
    """The ``generate:`` section as a GenerationConfig (values as given: check them with ``problems``)."""
    return GenerationConfig(
        max_new_tokens=node.get("max_new_tokens"),
        sampling=Sampling(do_sample=node.get("do_sample", False), temperature=node.get("temperature", 1.0),
                          top_k=node.get("top_k", 0), top_p=node.get("top_p", 1.0)),
        stop_ids=tuple(stop_ids), padding_side=node.get("padding_side", "auto"),
        use_cache=node.get("use_cache", True), micro_batch_size=node.get("micro_batch_size"), seed=seed)


def _positive_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def generation_problems(cfg, model) -> list[str]:
    """Problems with mode, input, batch_size, generate.* and eval.* (``model``: the ModelConfig)."""
    problems = []
    if cfg.get("mode") not in MODES:
        problems.append(f"mode={cfg.get('mode')!r}: expected one of {list(MODES)}")
    if not cfg.get("input"):
        problems.append("input: give the JSONL of prompts, e.g. input=prompts.jsonl")
    if not _positive_int(cfg.get("batch_size")):
        problems.append(f"batch_size={cfg.get('batch_size')!r}: expected an integer >= 1")
    if cfg.parallel.get("sequence"):
        problems.append("parallel.sequence=true: generation decodes one token at a time, which cannot be split "
                        "over TP ranks; use parallel.sequence=false (the weights are the same)")
    gen = cfg.generate
    problems += generation_config(gen).problems("generate.")
    if not isinstance(gen.get("use_cache", True), bool):
        problems.append(f"generate.use_cache={gen.get('use_cache')!r}: expected true or false")
    stops = gen.get("stop_tokens") or []
    if not all(isinstance(s, str) and s for s in stops):
        problems.append(f"generate.stop_tokens={list(stops)!r}: expected a list of token strings")
    n = gen.get("max_new_tokens")
    if _positive_int(n) and n >= model.max_position_embeddings:
        problems.append(f"generate.max_new_tokens={n} leaves no room for a prompt in the model's "
                        f"max_position_embeddings={model.max_position_embeddings}")
    problems += kind_of(model).problems(cfg, model, "generate")  # T5: no PP, no fp8
    max_length = (cfg.get("eval") or {}).get("max_length")
    if max_length is not None and (not _positive_int(max_length) or max_length < 2
                                   or max_length > model.max_position_embeddings):
        problems.append(f"eval.max_length={max_length!r}: expected an integer from 2 to the model's "
                        f"max_position_embeddings={model.max_position_embeddings}, or null")
    return problems


def validate_generation(cfg, world_size: int) -> ModelConfig:
    """The checks of conf/generate.yaml (launch/generate.py, launch/evaluate.py): model, layout and precision
    as for training, then mode, input, batch_size, generate.* and eval.* (framework/inference/options.py)."""
    problems, all_typed = typed(cfg, require_validation=False)  # model, parallel, precision sections
    if not all_typed:
        raise ConfigError("invalid configuration:\n  - " + "\n  - ".join(problems))
    model = model_config(cfg)
    problems += model_problems(cfg, model, world_size) + generation_problems(cfg, model)  # T5: no PP, no fp8
    if problems:
        raise ConfigError("invalid configuration:\n  - " + "\n  - ".join(problems))
    return model
