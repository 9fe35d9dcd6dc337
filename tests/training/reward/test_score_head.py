"""HF sequence classifiers (``LlamaForSequenceClassification``, ``Qwen2ForSequenceClassification`` with tied
embeddings; num_labels=1) imported into our model with a score head give transformers' scores at every
position and its pooled score at the last token (1e-4, the issue's bound; FORWARD_REL of the largest score in
practice) at TP=1, TP=2+SP and PP=2, and export back (framework/checkpoint/score_head.py) to a directory
transformers loads with the same tensors, bitwise. Refusals: a classifier of several labels."""

from __future__ import annotations

import json

import pytest
import torch

from launch.spawn import run_distributed
from tests.training.reward.cases import PAD, tiny_reward_model

FAMILIES = {"llama": False, "qwen2": True}  # family -> tied embeddings


def _tokens():
    g = torch.Generator().manual_seed(7)
    return torch.randint(3, 256, (2, 12), generator=g)


def parity_worker(tp, pp, sp, root):
    """Our scores [b, s] per family on the last stage (None elsewhere), and each family exported to root/export-F."""
    from framework.checkpoint.score_head import export_hf_score
    from framework.runtime.distributed import initialize
    from tests.training.reward.cases import build_reward_model

    initialize(tp=tp, pp=pp, sp=sp, seed=0)
    out = {}
    for family in FAMILIES:
        model, cfg = build_reward_model(f"{root}/{family}", tp, pp, sp)
        tokens = _tokens()
        with torch.no_grad():
            if pp == 1:
                scores = model(tokens, torch.arange(12).expand(2, 12), None)
            else:
                scores = _pipelined(model, tokens)
        out[family] = None if scores is None else scores[..., 0].clone()
        export_hf_score(model, f"{root}/export-{family}-{tp}-{pp}", cfg, pad_token_id=PAD)
    return out


def _pipelined(model, tokens):
    from megatron.core.pipeline_parallel import get_forward_backward_func

    kept = []

    def step(it, m):
        b = next(it)
        out = m(b["tokens"], b["position_ids"], None)

        def loss(o):
            kept.append(o.detach())
            return o.sum() * 0, torch.tensor(1, dtype=torch.int), {}
        return out, loss

    batch = {"tokens": tokens, "position_ids": torch.arange(12).expand(2, 12).contiguous()}
    get_forward_backward_func()(forward_step_func=step, data_iterator=iter([batch]), model=[model],
                                num_microbatches=1, seq_length=12, micro_batch_size=2, forward_only=True)
    return kept[0] if kept else None


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("score_head")
    for i, (family, tied) in enumerate(FAMILIES.items()):
        tiny_reward_model(10 + i, family, tied).save_pretrained(root / family)
    return root


@pytest.mark.timeout(300)
@pytest.mark.parametrize("tp,pp,sp,world", [(1, 1, False, 1), (2, 1, True, 2), (1, 2, False, 2)],
                         ids=["single", "tp2-sp", "pp2"])
def test_import_scores_and_export(hf_dirs, tp, pp, sp, world):
    from safetensors.torch import load_file
    from transformers import AutoModelForSequenceClassification

    results = run_distributed(parity_worker, world, tp, pp, sp, str(hf_dirs), timeout=250)
    tokens = _tokens()
    for family in FAMILIES:
        hf = AutoModelForSequenceClassification.from_pretrained(hf_dirs / family, dtype=torch.float32).eval()
        with torch.no_grad():
            every = hf.score(hf.model(input_ids=tokens).last_hidden_state)[..., 0]
            pooled = hf(input_ids=tokens).logits[:, 0]
        scale = every.abs().max().item()
        assert scale > 1  # the head is not ~0
        held = [r[family] for r in results if r[family] is not None]
        assert held
        for ours in held:
            assert (ours - every).abs().max().item() <= 1e-4 * max(scale, 1), family
            assert torch.allclose(ours[:, -1], pooled, rtol=0, atol=1e-4 * scale), family
        # the export loads in transformers with the same tensors
        out = hf_dirs / f"export-{family}-{tp}-{pp}"
        config = json.loads((out / "config.json").read_text())
        assert config["architectures"][0].endswith("ForSequenceClassification") and config["num_labels"] == 1
        back = AutoModelForSequenceClassification.from_pretrained(out, dtype=torch.float32)
        want = hf.state_dict()
        got = back.state_dict()
        assert sorted(got) == sorted(want)
        for k, v in want.items():
            assert torch.equal(got[k], v), f"{family}: {k} differs after import and export"
        stored = {}
        for f in out.glob("*.safetensors"):
            stored |= load_file(str(f))
        assert "score.weight" in stored and "lm_head.weight" not in stored


def test_several_labels_refused(tmp_path):
    from framework.checkpoint.score_head import is_sequence_classifier
    from framework.runtime.errors import CheckpointError

    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["LlamaForSequenceClassification"],
                                                     "id2label": {"0": "a", "1": "b"}}))
    with pytest.raises(CheckpointError, match="num_labels=2"):
        is_sequence_classifier(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
    assert not is_sequence_classifier(tmp_path)
