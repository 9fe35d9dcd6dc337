"""The reward model at every layout: the same loss, metrics, LoRA gradients and score-head gradient at
TP=2+SP (the head replicated, its scores all-gathered over TP), PP=2 (the head on the last stage, four
micro-batches through the pipeline) and DP=2 as in one process (tests/training/reward/cases.py's fixed batch),
within the rounding of reordered fp32 sums (tests/tolerances.py: FORWARD_REL for the metrics, GRAD_REL for
the gradients)."""

from __future__ import annotations

import pytest

from launch.spawn import run_distributed
from tests.tolerances import FORWARD_REL, GRAD_REL
from tests.training.reward.cases import VARIANTS, assert_grads, lora_grads, ours_worker


@pytest.mark.timeout(300)
@pytest.mark.parametrize("tp,pp,sp,world,micro", [
    (2, 1, True, 2, 2),    # TP=2 + SP
    (1, 2, False, 2, 1),   # PP=2
    (1, 1, False, 2, 1),   # DP=2
], ids=["tp2-sp", "pp2", "dp2"])
def test_layouts_match_single_process(models, lora_single, tmp_path, tp, pp, sp, world, micro):
    variants = list(VARIANTS)
    what = f"TP={tp} PP={pp} SP={sp} DP={world // (tp * pp)}"
    results = run_distributed(ours_worker, world, tp, pp, sp, micro, str(models / "rm"), variants, str(tmp_path),
                              adapter_dir=str(models / "adapter"), timeout=250)
    for rank, res in enumerate(results):
        for variant in variants:
            for k, v in lora_single[variant].items():
                # scores are ~1-10 here: FORWARD_REL of the largest, absolute
                assert res[variant][k] == pytest.approx(v, rel=FORWARD_REL, abs=10 * FORWARD_REL), \
                    f"{what} rank {rank} {variant} {k}"
    for variant in variants:
        assert_grads(lora_grads(tmp_path / variant), lora_grads(models / "lora_single" / variant),
                     f"{variant} at {what}", rel=GRAD_REL)
