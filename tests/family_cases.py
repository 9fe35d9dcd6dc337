"""The proof every model family gives (issue 3), as reusable pieces:

1. logits of our model, loaded from an HF checkpoint at TP=1, TP=2 (+SP) and PP=2, equal the HF model's
   within ``TOL`` (fp32);
2. HF -> our checkpoint -> HF through the converter CLIs' ``convert`` functions is bitwise, and
   transformers loads the result.

tests/models/test_families.py builds tiny random HF models from configs (tests/family_models.py;
``randomized`` makes the norms and biases non-trivial, which would otherwise hide a misplaced tensor) and
calls :func:`check_parity` and :func:`check_roundtrip` for each family of its table.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from launch.spawn import run_distributed

TOL = 1e-4
SEQ = 16


@torch.no_grad()
def randomized(model, seed: int = 0):
    """``model`` in fp32 eval mode with norm weights in [0.5, 1.5] and every bias and zero-initialised
    vector random (initial ones and zeros would let a transposed or misplaced tensor pass)."""
    g = torch.Generator().manual_seed(seed + 1000)
    model = model.float().eval()
    for n, p in model.named_parameters():
        if p.dim() == 1 and ("norm" in n or "ln" in n):
            if n.endswith("bias"):
                p.copy_(torch.rand(p.shape, generator=g) * 0.2 - 0.1)
            elif torch.all(p == 0):  # zero-centred norm weight (Gemma, Nemotron): small around 0
                p.copy_(torch.rand(p.shape, generator=g) * 0.5 - 0.25)
            else:
                p.copy_(torch.rand(p.shape, generator=g) + 0.5)
        elif p.dim() == 1:
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return model


@torch.no_grad()
def logits_of(model, tokens):
    return model(input_ids=tokens).logits.float()


def tokens_for(vocab_size: int, batch: int = 2, seq: int = SEQ, seed: int = 0):
    return torch.randint(0, vocab_size, (batch, seq), generator=torch.Generator().manual_seed(seed))


def save_cases(root: Path, models: dict, shard_one: str | None = None) -> list:
    """Save each HF model under root/name (``shard_one`` is saved in several files with an index) and
    return the cases [(name, hf_dir, tokens, hf_logits)] the workers take."""
    cases = []
    for name, model in models.items():
        out = Path(root) / name
        model.save_pretrained(out, max_shard_size="40KB" if name == shard_one else "2GB")
        if name == shard_one:
            assert (out / "model.safetensors.index.json").is_file()
        tokens = tokens_for(model.config.vocab_size)
        cases.append((name, str(out), tokens, logits_of(model, tokens)))
    return cases


def parity_worker(tp: int, pp: int, cases, sp: bool = False, micro_batch_size: int | None = None):
    """Each rank: build our stage for each case's config.json, load the HF weights, return max |diff|
    (``micro_batch_size``: the forward's micro-batches, by default the whole batch in one)."""
    from framework.checkpoint.hf_import import load_hf_into_gpt
    from framework.inference.logits import forward_logits
    from framework.models.registry import build_model, config_from_hf
    from framework.runtime.distributed import initialize

    initialize(tp=tp, pp=pp, sp=sp)
    diffs = {}
    for name, hf_dir, tokens, expected in cases:
        cfg = config_from_hf(json.loads(Path(hf_dir, "config.json").read_text()))
        model = build_model(cfg, tp=tp, pp=pp, sp=sp)
        load_hf_into_gpt(model, hf_dir, cfg)
        model.eval()
        logits = forward_logits(model, tokens, micro_batch_size=micro_batch_size)
        assert logits.shape == expected.shape, (name, tuple(logits.shape), tuple(expected.shape))
        diffs[name] = (logits - expected).abs().max().item()
    return diffs


def check_parity(cases, tp: int, pp: int, sp: bool = False, timeout: float = 200,
                 micro_batch_size: int | None = None) -> None:
    world = tp * pp
    results = run_distributed(parity_worker, world, tp, pp, cases, sp, micro_batch_size, timeout=timeout)
    assert len(results) == world
    for rank, diffs in enumerate(results):
        for name, diff in diffs.items():
            assert diff < TOL, f"TP={tp} PP={pp} SP={sp} rank {rank}, {name}: max |logit diff| {diff:.3g} >= {TOL}"


def _roundtrip_worker(jobs):
    from converters import ckpt_to_hf, hf_to_ckpt

    for hf_dir, ckpt_dir, back_dir in jobs:
        hf_to_ckpt.convert(hf_dir, ckpt_dir, progress=False)
        ckpt_to_hf.convert(ckpt_dir, back_dir, progress=False)
    return True


def read_tensors(hf_dir) -> dict:
    from safetensors.torch import load_file

    out = {}
    for f in sorted(Path(hf_dir).glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def check_roundtrip(cases, root: Path, auto_class=None, timeout: float = 200, logits=logits_of) -> None:
    """HF -> ours -> HF for every case: same tensor names, dtypes, shapes and bytes; transformers loads the
    result and gives the original logits exactly (``logits(model, tokens)``: an encoder-decoder's inputs
    differ)."""
    if auto_class is None:
        from transformers import AutoModelForCausalLM as auto_class

    jobs = [(hf, str(Path(root) / f"{name}-ckpt"), str(Path(root) / f"{name}-back"))
            for name, hf, _tokens, _logits in cases]
    run_distributed(_roundtrip_worker, 1, jobs, timeout=timeout)
    for (name, hf, tokens, expected), (_, _, back) in zip(cases, jobs):
        a, b = read_tensors(hf), read_tensors(back)
        assert sorted(a) == sorted(b), (name, sorted(set(a) ^ set(b)))
        for k in a:
            assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, (name, k)
            assert torch.equal(a[k], b[k]), (name, k)
        model = auto_class.from_pretrained(back, dtype=torch.float32).eval()
        assert torch.equal(logits(model, tokens), expected), name
