"""Pipeline stages of unequal size (framework/models/layout.py): layers that do not divide by PP go to the
first and last stages, and ``parallel.first_stage_layers`` / ``last_stage_layers`` place them explicitly; the
logits stay transformers' (tiny random Llamas, TOL of tests/family_cases.py), and splits that cannot work
are refused with the reason.
"""

from __future__ import annotations

import json

import pytest

from framework.models.families import llama as hf_llama
from launch.spawn import run_distributed
from tests.family_cases import TOL, check_parity, save_cases
from tests.hf_models import tiny_llama


@pytest.mark.timeout(200)
@pytest.mark.parametrize("layers,pp", [(5, 2), (5, 3), (7, 4)], ids=["5-layers-pp2", "5-layers-pp3", "7-layers-pp4"])
def test_pipeline_with_uneven_layers(tmp_path, layers, pp):
    """Layers that do not divide by PP: the first and last stages take the remainder; logits unchanged."""
    from framework.models.layout import pipeline_split

    first, last = pipeline_split(layers, pp)
    middle = (layers - (first or 0) - (last or 0)) // (pp - (first is not None) - (last is not None))
    assert first + (last if last is not None else middle) + middle * (pp - 2) == layers
    model = tiny_llama(7, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=layers)
    check_parity(save_cases(tmp_path, {f"llama_{layers}": model}), tp=1, pp=pp)


def _explicit_split_worker(hf_dir, tokens, first, last):
    from framework.checkpoint.hf_import import load_hf_into_gpt
    from framework.inference.logits import forward_logits
    from framework.models.gpt import build_gpt
    from framework.runtime.distributed import initialize

    initialize(tp=1, pp=2)
    cfg = hf_llama.config_from_hf(json.loads(open(f"{hf_dir}/config.json").read()))
    gpt = build_gpt(cfg, pp=2, num_layers_in_first_pipeline_stage=first, num_layers_in_last_pipeline_stage=last)
    load_hf_into_gpt(gpt, hf_dir, cfg)
    return len(gpt.decoder.layers), forward_logits(gpt.eval(), tokens)


@pytest.mark.timeout(200)
def test_explicit_pipeline_split(tmp_path):
    """parallel.first_stage_layers=1 on a 5-layer model at PP=2: stages of 1 and 4 layers, logits unchanged."""
    from framework.models.layout import split_problems

    model = tiny_llama(8, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=5)
    (_, hf_dir, tokens, expected), = save_cases(tmp_path, {"llama_5": model})
    results = run_distributed(_explicit_split_worker, 2, hf_dir, tokens, 1, None, timeout=150)
    assert [n for n, _ in results] == [1, 4]
    assert (results[1][1] - expected).abs().max().item() < TOL
    assert split_problems(5, 2, 1, None) == [] and split_problems(6, 3, 2, 2) == []
    assert split_problems(6, 4, 2, 2) == []
    assert "leave 1 of the model's 6 layers for 2 other stage(s)" in split_problems(6, 4, 2, 3)[0]
    assert "need parallel.pipeline >= 2" in split_problems(6, 1, 2, None)[0]


@pytest.mark.parametrize("layers,pp,first,last", [(5, 2, None, None), (5, 3, None, None), (7, 4, None, None),
                                                  (8, 4, None, None), (5, 2, 1, None), (6, 3, 2, 2),
                                                  (6, 4, 2, 2), (9, 4, None, 3), (4, 1, None, None)])
def test_stage_layers_are_megatrons(layers, pp, first, last):
    """``stage_layers`` (what the planner sizes) is the count megatron-core builds on each stage, for
    the automatic split and for explicit ones."""
    from megatron.core.transformer.transformer_block import get_num_layers_to_build

    from framework.models.config import ModelConfig
    from framework.models.gpt import transformer_config
    from framework.models.layout import stage_layers

    settings = {} if first is None and last is None else dict(num_layers_in_first_pipeline_stage=first,
                                                               num_layers_in_last_pipeline_stage=last)
    config = transformer_config(ModelConfig(num_layers=layers), pp=pp, **settings)
    built = [get_num_layers_to_build(config, pp_rank=r) for r in range(pp)]
    assert stage_layers(layers, pp, first, last) == built
    assert sum(built) == layers
