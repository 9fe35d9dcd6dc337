"""Preference tuning at every layout: the same loss, metrics and LoRA gradients at TP=2+SP, PP=2 and DP=2 as
in one process (tests/dpo_cases.py's fixed batch), within the rounding of reordered fp32 sums
(tests/tolerances.py: DPO_ATOL for the metrics, GRAD_REL for gradients)."""

from __future__ import annotations

import pytest

from launch.spawn import run_distributed
from tests.dpo_cases import assert_same_as_single, ours_worker


@pytest.mark.timeout(300)
@pytest.mark.parametrize("tp,pp,sp,world,micro", [
    (2, 1, True, 2, 2),    # TP=2 + SP
    (1, 2, False, 2, 1),   # PP=2, four micro-batches through the pipeline
    (1, 1, False, 2, 1),   # DP=2
], ids=["tp2-sp", "pp2", "dp2"])
def test_layouts_match_single_process(models, lora_single, tmp_path, tp, pp, sp, world, micro):
    variants = ["sigmoid", "ipo"]
    results = run_distributed(ours_worker, world, tp, pp, sp, micro, str(models / "base"), variants, str(tmp_path),
                              adapter_dir=str(models / "adapter"), timeout=250)
    assert_same_as_single(results, lora_single, models, tmp_path, variants,
                           f"TP={tp} PP={pp} SP={sp} DP={world // (tp * pp)}")
