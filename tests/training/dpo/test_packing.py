"""Packed preference pairs: pairs packed two to a row give the unpacked loss, metrics and LoRA gradients (as
tight as the layouts: DPO_ATOL, GRAD_REL) at TP=1, TP=2+SP, PP=2, DP=2 and TP=2+SP x DP=2, and the packed
row's layout checked by hand. With full parameters against TRL: tests/training/dpo/test_loss.py."""

from __future__ import annotations

import pytest

from launch.spawn import run_distributed
from tests.dpo_cases import PACKED_LENGTH, assert_same_as_single, ours_worker


@pytest.mark.timeout(300)
@pytest.mark.parametrize("tp,pp,sp,world", [(1, 1, False, 1), (2, 1, True, 2), (1, 2, False, 2), (1, 1, False, 2),
                                            (2, 1, True, 4)],
                         ids=["tp1", "tp2-sp", "pp2", "dp2", "tp2-sp-dp2"])
def test_packed_pairs_match_unpacked(models, lora_single, tmp_path, tp, pp, sp, world):
    """Pairs packed two to a row (one bin a micro-batch, so two micro-batches; at DP=2 one on each DP rank):
    loss, rewards, log-probs and every LoRA gradient equal the unpacked single process (DPO_ATOL, GRAD_REL; so
    the packed single process, ``tp1``), for sigmoid, IPO (per-token means: the target counts are per
    segment) and the SFT term (the chosen segments' NLL, normalised by the global batch's chosen tokens,
    which each DP rank knows); the reference (adapters disabled) is computed on the packed rows too."""
    variants = ["sigmoid", "ipo", "sigmoid+sft"]
    results = run_distributed(ours_worker, world, tp, pp, sp, 1, str(models / "base"), variants, str(tmp_path),
                              adapter_dir=str(models / "adapter"), packed_length=PACKED_LENGTH, timeout=250)
    assert_same_as_single(results, lora_single, models, tmp_path, variants, f"packed, TP={tp} PP={pp} SP={sp}")


def test_packed_pairs_by_hand():
    """Two pairs in one row: sequences side by side (chosen, rejected, chosen, rejected), positions restarting,
    ``sequence_index`` naming the unpacked order (chosen 0, chosen 1, rejected 0, rejected 1), padding the
    discarded slot 4; the mask keeps each sequence to itself."""
    from framework.data.preference import PreferencePair, collate_packed_pairs
    from framework.data.sample import Sample

    a = PreferencePair(Sample([1, 10, 11], [0, 1, 1]), Sample([1, 20], [0, 1]))
    b = PreferencePair(Sample([1, 30], [0, 1]), Sample([1, 40, 41, 42], [0, 1, 1, 1]))
    batch = collate_packed_pairs([[a, b]], pad_id=0, seq_length=9)
    assert batch["tokens"].tolist() == [[1, 10, 1, 1, 1, 40, 41, 0, 0]]
    assert batch["labels"].tolist() == [[10, 11, 20, 30, 40, 41, 42, 0, 0]]
    assert batch["position_ids"].tolist() == [[0, 1, 0, 0, 0, 1, 2, 0, 0]]
    assert batch["sequence_index"].tolist() == [[0, 0, 2, 1, 3, 3, 3, 4, 4]]
    assert int(batch["pairs"]) == 2
    allowed = ~batch["attention_mask"][0, 0]
    assert allowed[6].tolist() == [False] * 4 + [True] * 3 + [False] * 2  # rejected of b sees only itself
