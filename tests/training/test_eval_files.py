"""Validation split and test file in a real (tiny) job, checked against Hugging Face transformers + PEFT:
the job's validation loss is the base model's loss on the held-out samples, and its test loss, taken after
training at DP=2 with a test set that does not fill the last micro-batch group, is the trained adapter's
loss over every test sample."""

import json
import math
import os
import types
from pathlib import Path

import pytest
import torch

from launch.spawn import run_distributed
from tests.hf_models import save_tiny_job_llama
from tests.sft_jobs import tiny_job

ROOT = Path(__file__).resolve().parents[2]

TEST_RECORDS = [  # 5 samples: at DP=2 x micro-batch 1 the last evaluation group needs one filler
    {"prompt": "def add(a, b):\n", "completion": "    return a + b\n"},
    {"prompt": "def is_even(n):\n", "completion": "    return n % 2 == 0\n"},
    {"prompt": "# square every item\n", "completion": "squares = [x * x for x in items]\n"},
    {"prompt": "def first(xs):\n    \"\"\"The first element.\"\"\"\n", "completion": "    return xs[0]\n"},
    {"prompt": "", "completion": "print('hello, world')\n"},
]


def _run(cfg):
    os.chdir(ROOT)
    from framework.runtime.logs import setup_logging
    from framework.training.finetune import run

    setup_logging("WARNING")
    return run(cfg)


@torch.no_grad()
def hf_mean_loss(model, samples) -> float:
    """Mean cross entropy per target token, in plain PyTorch: position t predicts ids[t+1] where
    loss_mask[t+1] == 1."""
    total, count = 0.0, 0
    for s in samples:
        ids = torch.tensor(s.input_ids)
        logits = model(input_ids=ids[None]).logits[0, :-1].double()
        mask = torch.tensor(s.loss_mask[1:], dtype=torch.bool)
        total += torch.nn.functional.cross_entropy(logits[mask], ids[1:][mask], reduction="sum").item()
        count += int(mask.sum())
    return total / count


@pytest.mark.timeout(400)
def test_split_and_test_file_match_hugging_face(tmp_path, tiny_tokenizer_dir):
    from peft import PeftModel
    from transformers import LlamaForCausalLM

    from framework.checkpoint.peft_export import export_peft
    from framework.data.prepare import prepare_config, prepare_one
    from framework.data.tokenizer import Tokenizer
    from framework.training.sft import summary_table

    hf_dir = save_tiny_job_llama(tmp_path / "hf")
    test_file = tmp_path / "test.jsonl"
    test_file.write_text("".join(json.dumps(r) + "\n" for r in TEST_RECORDS))
    cfg = tiny_job(hf_dir, tiny_tokenizer_dir, tmp_path / "run", "data.validation=null",
                   "data.validation_split=0.05", f"data.test={test_file}", f"data.cache_dir={tmp_path / 'cache'}")
    result = run_distributed(_run, 2, cfg, timeout=350)[0]  # DP=2

    tok = Tokenizer.from_dir(tiny_tokenizer_dir)
    test_samples, _ = prepare_one(test_file, tok, int(cfg.data.max_length))
    assert len(test_samples) == 5
    os.chdir(ROOT)
    prepared = prepare_config(cfg.data, tok, seed=int(cfg.seed))
    held_out, kept = prepared.validation, prepared.reports[0].kept
    assert len(held_out) == round(0.05 * kept) == prepared.reports[0].held_out  # 5% of the kept training samples
    assert len(prepared.train) == kept - len(held_out)

    base = LlamaForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    # before training LoRA B = 0: the job's validation loss is the base model's over the first
    # trainer.eval_samples held-out samples
    first_held_out = [held_out[i] for i in range(min(int(cfg.trainer.eval_samples), len(held_out)))]
    assert result.val_loss_before == pytest.approx(hf_mean_loss(base, first_held_out), rel=1e-4)
    peft_dir = tmp_path / "peft"
    export_peft(result.adapter_dir, peft_dir)
    tuned = PeftModel.from_pretrained(base, str(peft_dir)).eval()
    reference = hf_mean_loss(tuned, test_samples)
    assert result.test_loss == pytest.approx(reference, rel=1e-4)
    assert result.test_loss != pytest.approx(hf_mean_loss(tuned, list(test_samples)[:4]), rel=1e-4)  # all 5 count

    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["test_loss"] == result.test_loss
    rt = types.SimpleNamespace(tp=1, pp=1, dp=2, sp=False, backend="gloo", device=torch.device("cpu"))
    table = summary_table(result, rt)
    assert f"| test loss (perplexity)          | {result.test_loss:.4f} ({math.exp(result.test_loss):.2f})" in table
