"""Which parallel layouts a model can take, checked before any process group starts."""

from __future__ import annotations

from framework.models.config import ModelConfig
from framework.models.kv_replication import layout_problem


class LayoutError(ValueError):
    """A parallel layout that the model's shapes cannot be split into."""


def divisors(n: int) -> list[int]:
    return [k for k in range(1, n + 1) if n % k == 0]


def pipeline_split(num_layers: int, pp: int) -> tuple[int | None, int | None]:
    """(layers on the first stage, layers on the last stage) when ``pp`` does not divide ``num_layers``;
    (None, None) when it does. megatron-core can size only the first and last stage differently, so the
    remainder goes to them (the first gets the odd one) and every middle stage keeps num_layers // pp.
    The embedding sits on the first stage and the output layer on the last, so they take extra layers."""
    if pp <= 1 or num_layers % pp == 0:
        return None, None
    base, rem = divmod(num_layers, pp)
    if pp == 2:
        return base + rem, None  # megatron: with two stages, size one and the other takes the rest
    return base + (rem + 1) // 2, base + rem // 2


def stage_layers(num_layers: int, pp: int, first: int | None = None, last: int | None = None) -> list[int]:
    """Layers on each of the ``pp`` pipeline stages: the explicit split (parallel.first_stage_layers /
    last_stage_layers, checked by ``split_problems``) or, when neither is set, megatron's own
    (``pipeline_split``); every middle stage takes an equal share of the rest."""
    if pp <= 1:
        return [num_layers]
    if first is None and last is None:
        first, last = pipeline_split(num_layers, pp)
    middle = pp - (first is not None) - (last is not None)
    each = (num_layers - (first or 0) - (last or 0)) // middle if middle else 0
    return [each if first is None else first] + [each] * (pp - 2) + [each if last is None else last]


def split_problems(num_layers: int, pp: int, first: int | None, last: int | None) -> list[str]:
    """What is wrong with an explicit uneven split (parallel.first_stage_layers / last_stage_layers):
    the first and last stage take the given counts, every middle stage an equal share of the rest."""
    if first is None and last is None:
        return []
    if pp < 2:
        return ["parallel.first_stage_layers / last_stage_layers need parallel.pipeline >= 2"]
    if any(k is not None and k < 1 for k in (first, last)):
        return [f"parallel.first_stage_layers={first} and last_stage_layers={last} must be >= 1 when set"]
    rest = num_layers - (first or 0) - (last or 0)
    middle = pp - (first is not None) - (last is not None)
    if (middle == 0 and rest != 0) or (middle > 0 and (rest < middle or rest % middle)):
        return [f"parallel.first_stage_layers={first}, last_stage_layers={last} leave {rest} of the model's "
                f"{num_layers} layers for {middle} other stage(s) of parallel.pipeline={pp}; they must split "
                f"evenly, at least one layer each"]
    return []


def tp_sizes(model: ModelConfig) -> list[int]:
    """Tensor-parallel sizes the model's shapes split into: dividing the query heads, the vocabulary and the
    MLP, and dividing the KV heads or a multiple of them (framework/models/kv_replication.py)."""
    return [k for k in divisors(model.num_attention_heads)
            if not layout_problem(model.num_attention_heads, model.num_query_groups, k)
            and model.vocab_size % k == 0 and model.ffn_hidden_size % k == 0]


def check_layout(model: ModelConfig, tp: int, pp: int, sp: bool = False, world_size: int | None = None,
                 first_stage_layers: int | None = None, last_stage_layers: int | None = None) -> None:
    """Raise LayoutError naming the parallel.* key, why, and which sizes would work."""
    problems = split_problems(model.num_layers, pp, first_stage_layers, last_stage_layers)
    heads, groups = model.num_attention_heads, model.num_query_groups
    if tp < 1 or pp < 1:
        problems.append(f"parallel.tensor={tp} and parallel.pipeline={pp} must be >= 1")
    elif layout_problem(heads, groups, tp):
        problems.append(f"{layout_problem(heads, groups, tp)}; tensor-parallel sizes that work: {tp_sizes(model)}")
    elif model.vocab_size % tp:
        problems.append(f"parallel.tensor={tp} does not divide the vocabulary size {model.vocab_size}; "
                        f"sizes that work: {tp_sizes(model)}")
    elif model.ffn_hidden_size % tp:
        problems.append(f"parallel.tensor={tp} does not divide ffn_hidden_size={model.ffn_hidden_size}; "
                        f"sizes that work: {tp_sizes(model)}")
    if pp > model.num_layers:
        problems.append(f"parallel.pipeline={pp} exceeds the model's {model.num_layers} layers (every stage "
                        f"needs at least one)")
    if sp and tp == 1:
        problems.append("parallel.sequence=true needs parallel.tensor > 1 (sequence parallelism splits along the "
                        "tensor-parallel group)")
    if world_size is not None and tp >= 1 and pp >= 1 and world_size % (tp * pp):
        problems.append(f"world size {world_size} is not a multiple of parallel.tensor x parallel.pipeline = {tp * pp}; "
                        f"launch a multiple of {tp * pp} processes")
    if problems:
        raise LayoutError("invalid parallel layout:\n  - " + "\n  - ".join(problems))
