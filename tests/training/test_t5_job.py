"""T5 fine-tuning (issue 6): the encoder-decoder data, loss, LoRA and job path, proved against Hugging Face.

* Loss and gradients on a fixed batch equal transformers' ``T5ForConditionalGeneration(labels=...)`` (its
  own decoder-input shift and -100 masking; mean over the label tokens): LoRA gradients against HF PEFT
  LoRA on q, k, v, o, wi (wi_0/wi_1), wo of both stacks and the cross-attention, every base weight's
  gradient under full fine-tuning; at TP=1, TP=2, TP=2+SP and DP=2 (with two micro-batches), for a T5 v1.0
  (tied, ReLU) and a v1.1 (untied, gated GELU) layout. The LoRA factors travel through our adapter files
  (HF PEFT names in, gradients out), so the adapter format is checked too.
* The seq2seq samples: encoder = prompt + eos, labels = completion + eos, the decoder input against
  transformers' ``_shift_right``; truncation per side, counted in the data report.
* The job (framework.training.finetune.run, and launch/finetune.py): LoRA and full fine-tuning lower the
  validation loss, TP=2 gives the TP=1 losses, the adapter saves and reloads, full weights save and reload.
* Parameter counts of t5-base / t5-large equal transformers' models of the same configs and the published sizes.
* What the job does not do for T5 is refused by key, before any process group starts.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from framework.models.config import ModelConfig
from launch.spawn import run_distributed
from tests.family_cases import read_tensors
from tests.sft_jobs import ROOT, compose
from tests.t5_cases import BASE, EOS, PAD, TOKENIZER_PAD, VARIANTS, hf_t5, write_jsonl
from tests.tolerances import FORWARD_REL, GRAD_REL

RANK, ALPHA = 4, 8.0
# loss: relative; gradients: relative to the largest reference value. The layouts and transformers add the same
# fp32 terms in other orders: the rounding of reordered sums (tests/tolerances.py)
LOSS_TOL, GRAD_TOL = FORWARD_REL, GRAD_REL
TARGETS = ("qkv", "proj", "fc1", "fc2", "cross_q", "cross_kv", "cross_proj")


def _samples(vocab: int, seed: int, n: int = 4):
    """Flat seq2seq samples (framework/data/seq2seq.py) of random prompts and completions, lengths differing
    so that both sides are padded."""
    from framework.data.seq2seq import build_seq2seq

    g = torch.Generator().manual_seed(seed)
    out = []
    for k in range(n):
        prompt = torch.randint(2, vocab, (7 + 3 * k,), generator=g).tolist()
        completion = torch.randint(2, vocab, (9 - 2 * k,), generator=g).tolist()
        out.append(build_seq2seq(prompt, completion, EOS, max_length=64, decoder_max_length=64)[0])
    return out


def _hf_batch(samples, pad: int = PAD):
    """transformers' inputs of the same samples: it shifts the labels into decoder inputs itself."""
    from framework.data.seq2seq import collate_seq2seq

    b = collate_seq2seq(samples, pad, pad)
    labels = b["labels"].masked_fill(b["loss_mask"] == 0, -100)
    return {"input_ids": b["encoder_tokens"], "attention_mask": b["encoder_mask"], "labels": labels}


def _lora_groups(name: str) -> str:
    """The HF PEFT LoRA A that our fused layers share with ``name``'s (q/k/v of self-attention, k/v of the
    cross-attention, wi_0/wi_1): the name of the group's first module."""
    for group, first in ((("SelfAttention.q", "SelfAttention.k", "SelfAttention.v"), "SelfAttention.q"),
                         (("EncDecAttention.k", "EncDecAttention.v"), "EncDecAttention.k"),
                         (("DenseReluDense.wi_0", "DenseReluDense.wi_1"), "DenseReluDense.wi_0")):
        for member in group:
            if f".{member}.lora_A" in name:
                return name.replace(member, first)
    return name


@pytest.fixture(scope="module")
def cases(tmp_path_factory):
    """Per variant: HF directory, our adapter directory (HF PEFT's factors, A shared where our layers are
    fused), the samples, and HF's loss, LoRA gradients (A summed over a shared group) and full gradients."""
    from peft import LoraConfig, get_peft_model

    from framework.checkpoint.adapter import CONFIG_NAME, FORMAT_VERSION, WEIGHTS_NAME

    root = tmp_path_factory.mktemp("t5_job")
    out = {}
    for k, (name, shape) in enumerate(VARIANTS.items()):
        cfg = ModelConfig(**BASE, **shape)
        hf = hf_t5(cfg, seed=k)
        hf_dir = root / name
        hf.save_pretrained(hf_dir)
        samples = _samples(cfg.vocab_size, seed=10 + k)
        batch = _hf_batch(samples)

        full = hf(**batch)  # full fine-tuning: every weight's gradient
        full.loss.backward()
        full_grads = {n: p.grad.clone() for n, p in hf.named_parameters()}
        hf.zero_grad()

        wi = ["wi_0", "wi_1"] if cfg.gated_linear_unit else ["wi"]
        peft = get_peft_model(hf, LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=0.0,
                                             target_modules=["q", "k", "v", "o", *wi, "wo"]))
        g = torch.Generator().manual_seed(100 + k)
        params = {n.replace("base_model.model.", "").replace(".default", ""): p
                  for n, p in peft.named_parameters() if "lora_" in n}
        with torch.no_grad():
            for n in sorted(params, key=lambda n: _lora_groups(n) != n):  # a group's first A before the others
                first = _lora_groups(n)
                params[n].copy_(params[first] if first != n else torch.randn(params[n].shape, generator=g) * 0.1)
        lora = peft(**batch)
        lora.loss.backward()
        grads = {}
        for n, p in params.items():
            grads[_lora_groups(n)] = grads.get(_lora_groups(n), 0) + p.grad
        lora_grads = {n: grads[_lora_groups(n)].clone() for n in params}

        adapter = root / f"{name}-adapter"
        adapter.mkdir()
        from safetensors.torch import save_file

        save_file({n: p.detach().clone().contiguous() for n, p in params.items()}, str(adapter / WEIGHTS_NAME))
        (adapter / CONFIG_NAME).write_text(json.dumps({
            "format_version": FORMAT_VERSION, "method": "lora", "rank": RANK, "alpha": ALPHA, "dropout": 0.0,
            "rslora": False, "targets": list(TARGETS)}))
        out[name] = dict(cfg=cfg, hf_dir=str(hf_dir), adapter=str(adapter), samples=samples,
                         full_loss=full.loss.item(), full_grads=full_grads, lora_loss=lora.loss.item(),
                         lora_grads=lora_grads)
    return out


def _gradients_worker(tp: int, sp: bool, cases: dict, out_dir: str):
    """Our loss on the fixed batch and the gradients, per variant: LoRA (written as an adapter through
    save_adapter, so with HF PEFT names) and full fine-tuning (written as an HF checkpoint by export_hf)."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from framework.checkpoint.adapter import load_adapter, save_adapter
    from framework.checkpoint.hf_export import base_params, export_hf
    from framework.checkpoint.hf_import import load_hf_into_gpt
    from framework.data.batching import micro_batches
    from framework.data.seq2seq import collate_seq2seq, lengths
    from framework.models.registry import build_model
    from framework.peft.lora import apply_lora
    from framework.runtime.distributed import initialize
    from framework.training.optim import wrap_ddp
    from framework.training.step import forward_backward

    rt = initialize(tp=tp, pp=1, sp=sp, seed=0)
    results = {}
    for name, case in cases.items():
        cfg, samples = case["cfg"], case["samples"]
        se, sd = lengths(samples)
        mine = micro_batches(list(range(len(samples))), ps.get_data_parallel_rank(), rt.dp, 1)
        batches = [collate_seq2seq([samples[i] for i in mb], PAD, PAD, tp if sp else 1, se, sd) for mb in mine]
        for method in ("lora", "full"):
            model = build_model(cfg, tp=tp, sp=sp)
            load_hf_into_gpt(model, case["hf_dir"], cfg)
            if method == "lora":
                apply_lora(model, targets=TARGETS, rank=RANK, alpha=ALPHA)
                load_adapter(model, case["adapter"], cfg)
            ddp = wrap_ddp(model)
            loss, n = forward_backward(ddp, batches)
            results[(name, method)] = (loss, n)
            grads = {k: p.main_grad.view_as(p) for k, p in model.named_parameters() if p.requires_grad}
            target = f"{out_dir}/{name}-{method}"
            if method == "lora":
                with torch.no_grad():
                    for k, p in model.named_parameters():
                        if p.requires_grad:
                            p.copy_(grads[k])
                save_adapter(model, target, {"targets": list(TARGETS)}, cfg)
            else:
                names = set(base_params(model))
                export_hf(model, target, cfg, params={k: v for k, v in grads.items() if k in names})
            dist.barrier()
    return results


def _rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item()


@pytest.mark.timeout(600)
@pytest.mark.parametrize("tp,sp,world", [(1, False, 1), (2, False, 2), (2, True, 2), (1, False, 2)],
                         ids=["tp1", "tp2", "tp2-sp", "dp2"])
def test_loss_and_gradients_match_transformers_and_peft(cases, tmp_path, tp, sp, world):
    from framework.checkpoint.adapter import read_adapter_tensors

    inputs = {name: {k: c[k] for k in ("cfg", "hf_dir", "adapter", "samples")} for name, c in cases.items()}
    results = run_distributed(_gradients_worker, world, tp, sp, inputs, str(tmp_path), timeout=550)
    for name, case in cases.items():
        for method, want in (("lora", case["lora_loss"]), ("full", case["full_loss"])):
            for rank, r in enumerate(results):
                loss, n = r[(name, method)]
                assert n == sum(s.num_targets for s in case["samples"])
                assert loss == pytest.approx(want, rel=LOSS_TOL), (name, method, rank)
        ours = read_adapter_tensors(tmp_path / f"{name}-lora")
        assert sorted(ours) == sorted(case["lora_grads"]), name
        for k, want in case["lora_grads"].items():
            assert _rel_diff(ours[k], want) < GRAD_TOL, (name, k, _rel_diff(ours[k], want))
        ours = read_tensors(tmp_path / f"{name}-full")
        want = case["full_grads"]  # shared (= lm_head when tied), relative-bias tables, every layer's weights
        assert sorted(ours) == sorted(want), (name, sorted(set(ours) ^ set(want)))
        for k, w in want.items():
            assert _rel_diff(ours[k], w) < GRAD_TOL, (name, k, _rel_diff(ours[k], w))


def _greedy_worker(tp: int, sp: bool, cfg: ModelConfig, hf_dir: str, prompts: list, n: int):
    from framework.checkpoint.hf_import import load_hf_into_gpt
    from framework.models.registry import build_model
    from framework.inference.generate import t5_greedy
    from framework.runtime.distributed import initialize

    initialize(tp=tp, pp=1, sp=sp)
    model = build_model(cfg, tp=tp, sp=sp)
    load_hf_into_gpt(model, hf_dir, cfg)
    return [t5_greedy(model, p, n, PAD, EOS, pad_multiple=tp if sp else 1) for p in prompts]


@pytest.mark.timeout(300)
def test_greedy_completion_matches_transformers_generate(cases):
    """The job's before/after completion (t5_greedy, no KV cache) is transformers' greedy ``generate``, also
    with the encoder input padded for sequence parallelism."""
    case = cases["v1_1_untied_gated"]
    from transformers import T5ForConditionalGeneration

    hf = T5ForConditionalGeneration.from_pretrained(case["hf_dir"]).eval()
    prompts = [list(s.input_ids[:s.loss_mask.index(1)]) for s in case["samples"][:2]]
    want = []
    for p in prompts:
        # use_cache=False: transformers 5.23's cache has the encoder's depth, too few for a deeper decoder
        out = hf.generate(torch.tensor([p]), max_new_tokens=6, do_sample=False, num_beams=1, use_cache=False)
        want.append(out[0, 1:].tolist())  # without the decoder start
    ours = run_distributed(_greedy_worker, 2, 2, True, case["cfg"], case["hf_dir"], prompts, 6, timeout=250)
    assert ours[0] == ours[1] == want


def test_seq2seq_samples_truncation_and_report(tiny_tokenizer_dir, tmp_path):
    """Encoder = prompt + eos (prompt cut from data.truncation_side), labels = completion + eos (cut to
    data.decoder_max_length, no eos at a cut); the decoder input is transformers' shift of the labels;
    every truncation is counted, also through the tokenise-once cache."""
    from transformers import T5Config, T5ForConditionalGeneration

    from framework.data.prepare import prepare_one
    from framework.data.seq2seq import collate_seq2seq, split
    from framework.data.tokenizer import Tokenizer

    tok = Tokenizer.from_dir(tiny_tokenizer_dir)
    long_prompt = "def f(x):\n    return x * 2 + 1  # a prompt longer than the encoder's budget"
    long_completion = "    return sorted(set(values), reverse=True)[:3]"
    records = [{"prompt": "hi", "completion": "ok"},
               {"prompt": long_prompt, "completion": "ok"},
               {"prompt": "hi", "completion": long_completion}]
    path = write_jsonl(tmp_path / "d.jsonl", records)
    enc = {k: [tok.encode(r[k]) for r in records] for k in ("prompt", "completion")}
    max_len, dec_max = 8, 6
    assert len(enc["prompt"][1]) + 1 > max_len and len(enc["completion"][2]) + 1 > dec_max
    for side in ("left", "right"):
        for cache in (None, tmp_path / "cache", tmp_path / "cache"):  # no cache, cache miss, cache hit
            samples, report = prepare_one(path, tok, max_len, side, "seq2seq", cache_dir=cache,
                                          decoder_max_length=dec_max)
            got = [split(s) for s in samples]
            prompt_kept = enc["prompt"][1][-(max_len - 1):] if side == "left" else enc["prompt"][1][:max_len - 1]
            assert got[0] == (enc["prompt"][0] + [tok.eos_id], enc["completion"][0] + [tok.eos_id])
            assert got[1] == (prompt_kept + [tok.eos_id], enc["completion"][1] + [tok.eos_id])
            assert got[2] == (enc["prompt"][2] + [tok.eos_id], enc["completion"][2][:dec_max])  # no eos
            assert (report.read, report.kept, report.truncated, report.dropped_total) == (3, 3, 2, 0)
            assert report.prompt_tokens_cut == len(enc["prompt"][1]) + 1 - max_len
            assert report.completion_tokens_cut == len(enc["completion"][2]) + 1 - dec_max
            assert report.target_tokens == sum(len(y) for _, y in got)
            assert "completion tokens (eos included) cut by data.decoder_max_length" in report.format()

    # the decoder input is transformers' shift of the labels (decoder start = pad), where it carries loss
    batch = collate_seq2seq(list(samples), tok.pad_id, tok.pad_id, multiple=4)
    assert batch["encoder_tokens"].shape[1] % 4 == 0 and batch["tokens"].shape[1] % 4 == 0
    hf = T5ForConditionalGeneration(T5Config(vocab_size=512, d_model=8, d_ff=8, d_kv=4, num_layers=1, num_heads=2,
                                             pad_token_id=tok.pad_id, decoder_start_token_id=tok.pad_id))
    shifted = hf._shift_right(batch["labels"].masked_fill(batch["loss_mask"] == 0, -100))
    mask = batch["loss_mask"].bool()
    assert torch.equal(batch["tokens"][mask], shifted[mask])
    assert torch.equal(batch["encoder_mask"].sum(1), torch.tensor([len(e) for e, _ in (split(s) for s in samples)]))


@pytest.mark.timeout(120)
def test_parameter_counts_of_t5_base_and_large():
    """The planner's counts (framework/planner/params.py) of conf/model/t5_{base,large}.yaml equal
    transformers' T5ForConditionalGeneration of the same config (built on the meta device) and the published
    sizes of google-t5/t5-base (223M) and t5-large (738M)."""
    from transformers import T5Config, T5ForConditionalGeneration

    from framework.checkpoint.model_checks import model_config
    from framework.models.families import t5
    from framework.planner.params import count

    for model, published in (("t5_base", 222_903_552), ("t5_large", 737_668_096)):
        cfg = model_config(compose([f"model={model}"]))
        with torch.device("meta"):
            hf = T5ForConditionalGeneration(T5Config(**t5.hf_config(cfg)))
        assert sum(p.numel() for p in hf.parameters()) == published, model
        assert count(cfg).total(cfg.num_layers) == published, model


def _built_count(cfgs):
    from framework.models.registry import build_model
    from framework.runtime.distributed import initialize

    initialize(tp=1, pp=1)
    return [sum(p.numel() for p in build_model(c).parameters()) for c in cfgs]


@pytest.mark.timeout(120)
def test_parameter_counts_equal_the_built_t5_models():
    from framework.planner.params import count

    cfgs = [ModelConfig(**BASE, **shape) for shape in VARIANTS.values()]
    built = run_distributed(_built_count, 1, cfgs, timeout=100)[0]
    assert [count(c).total(c.num_layers) for c in cfgs] == built


# -- the job ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_t5_hf(tmp_path_factory):
    """conf/model/t5_tiny.yaml as a random HF T5 (vocabulary 512 and pad/decoder start: the tiny test
    tokenizer's)."""
    from framework.checkpoint.model_checks import model_config

    cfg = model_config(compose(["model=t5_tiny", "model.tokenizer=unused"]))
    path = tmp_path_factory.mktemp("tiny_t5_hf")
    hf_t5(cfg, seed=3, pad=TOKENIZER_PAD).save_pretrained(path)
    return path


def t5_job(hf_dir, tokenizer_dir, out, *extra):
    return compose(["model=t5_tiny", "model.source=hf", f"model.path={hf_dir}", f"model.tokenizer={tokenizer_dir}",
                    "data.max_length=96", "data.decoder_max_length=64", "trainer.max_steps=4",
                    "trainer.global_batch_size=4", "trainer.micro_batch_size=2", "trainer.eval_samples=4",
                    "trainer.eval_interval=100", "trainer.lr=5e-3", "generate.max_new_tokens=4",
                    "data.cache_dir=null", f"output_dir={out}", *extra])


def _run_job(cfg):
    os.chdir(ROOT)  # data paths in conf/ are relative to the repository root
    from framework.runtime.logs import setup_logging
    from framework.training.finetune import run

    setup_logging("WARNING")
    r = run(cfg)
    return (r.train_losses, r.val_loss_before, r.val_loss_after, r.adapter_dir, r.completion_before,
            r.completion_after, r.trainable_params, r.total_params, r.test_loss)


def _evaluate(cfg, trained_dir):
    os.chdir(ROOT)
    from framework.training.sft import evaluate_adapter

    return evaluate_adapter(cfg, trained_dir)


LORA_JOB = ("peft=lora", "peft.targets=[qkv,proj,fc1,fc2,cross_q,cross_kv,cross_proj]")


@pytest.fixture(scope="module")
def lora_tp1(tiny_t5_hf, tiny_tokenizer_dir, tmp_path_factory):
    cfg = t5_job(tiny_t5_hf, tiny_tokenizer_dir, tmp_path_factory.mktemp("t5_lora_tp1"), *LORA_JOB,
                 "data.test=data/humaneval/val.jsonl")  # 17 samples: the last micro-batch gets a zero-target filler
    return cfg, run_distributed(_run_job, 1, cfg, timeout=280)[0]


@pytest.mark.timeout(300)
def test_lora_job_learns_and_its_adapter_reloads(lora_tp1, tiny_t5_hf, tiny_tokenizer_dir, tmp_path):
    """A short LoRA job lowers the validation loss; its adapter (HF PEFT names of both stacks and the
    cross-attention) loads into a fresh model with the same validation loss, and, exported to HF PEFT
    (converters/adapter_to_hf.py's export_peft), into transformers' T5 with that loss again."""
    from peft import PeftModel
    from transformers import T5ForConditionalGeneration

    from framework.checkpoint.adapter import read_adapter_config, read_adapter_tensors
    from framework.checkpoint.peft_export import export_peft
    from framework.data.prepare import prepare_one
    from framework.data.tokenizer import Tokenizer

    cfg, (losses, before, after, adapter_dir, c_before, c_after, trainable, total, test_loss) = lora_tp1
    assert after < before - 0.05, (before, after)
    assert isinstance(c_before, str) and isinstance(c_after, str)  # greedy completions ran (t5_greedy)
    keys = read_adapter_tensors(adapter_dir)
    layers = {"encoder": 2, "decoder": 2}
    want = set()
    for stack, n in layers.items():
        for i in range(n):
            mods = ["0.SelfAttention." + m for m in "qkvo"] + [f"{2 if stack == 'decoder' else 1}.DenseReluDense.{m}"
                                                               for m in ("wi", "wo")]
            mods += ["1.EncDecAttention." + m for m in "qkvo"] if stack == "decoder" else []
            want |= {f"{stack}.block.{i}.layer.{m}.lora_{f}.weight" for m in mods for f in "AB"}
    assert set(keys) == want
    meta = read_adapter_config(adapter_dir)
    assert sorted(meta["target_modules"]) == sorted(["SelfAttention.q", "SelfAttention.k", "SelfAttention.v",
                                                     "SelfAttention.o", "DenseReluDense.wi", "DenseReluDense.wo",
                                                     "EncDecAttention.q", "EncDecAttention.k", "EncDecAttention.v",
                                                     "EncDecAttention.o"])
    r, h, inner, f = 8, 64, 4 * 16, 128  # conf/peft/lora.yaml rank, conf/model/t5_tiny.yaml shapes
    fused = r * ((h + 3 * inner) + (inner + h) + (h + f) + (f + h))  # qkv, o, wi, wo: one A per fused layer
    cross = r * ((h + inner) + (h + 2 * inner) + (inner + h))       # q, kv (one A), o
    assert trainable == 4 * fused + 2 * cross
    reloaded = run_distributed(_evaluate, 1, cfg, adapter_dir, timeout=250)[0]
    assert reloaded == pytest.approx(after, abs=1e-6)

    export_peft(adapter_dir, tmp_path / "peft")
    hf = PeftModel.from_pretrained(T5ForConditionalGeneration.from_pretrained(tiny_t5_hf), tmp_path / "peft").eval()
    tok = Tokenizer.from_dir(tiny_tokenizer_dir)
    val, _ = prepare_one(os.path.join(ROOT, cfg.data.validation), tok, int(cfg.data.max_length), "left", "seq2seq",
                         decoder_max_length=int(cfg.data.decoder_max_length))
    with torch.no_grad():  # the job's validation: the first trainer.eval_samples samples, mean over their labels
        hf_loss = hf(**_hf_batch([val[i] for i in range(int(cfg.trainer.eval_samples))], TOKENIZER_PAD)).loss
        hf_test = hf(**_hf_batch(list(val), TOKENIZER_PAD)).loss  # data.test: every sample of the file
    assert hf_loss.item() == pytest.approx(after, rel=1e-5)
    assert hf_test.item() == pytest.approx(test_loss, rel=1e-5)


@pytest.mark.timeout(300)
def test_lora_job_tp2_matches_tp1(lora_tp1, tiny_t5_hf, tiny_tokenizer_dir, tmp_path):
    _, (ref_losses, ref_before, ref_after, *_) = lora_tp1
    cfg = t5_job(tiny_t5_hf, tiny_tokenizer_dir, tmp_path, *LORA_JOB, "parallel.tensor=2", "parallel.sequence=true")
    losses, before, after, *_ = run_distributed(_run_job, 2, cfg, timeout=280)[0]
    assert before == pytest.approx(ref_before, rel=FORWARD_REL)
    assert losses == pytest.approx(ref_losses, rel=FORWARD_REL)
    assert after == pytest.approx(ref_after, rel=FORWARD_REL)


@pytest.mark.timeout(500)
def test_full_finetuning_job_tp2_matches_tp1_and_weights_reload(tiny_t5_hf, tiny_tokenizer_dir, tmp_path):
    """peft=none trains every weight (embedding, relative-position tables included): the validation loss
    falls, TP=2 gives the TP=1 losses, and the saved weights (dist_checkpointing, written at TP=2) load at
    TP=1 with the same validation loss."""
    runs = {}
    for tp in (1, 2):
        cfg = t5_job(tiny_t5_hf, tiny_tokenizer_dir, tmp_path / f"tp{tp}", "peft=none", "trainer.lr=1e-3",
                     f"parallel.tensor={tp}")
        runs[tp] = cfg, run_distributed(_run_job, tp, cfg, timeout=230)[0]
    (cfg1, r1), (_, r2) = runs[1], runs[2]
    assert r1[2] < r1[1] - 0.05, (r1[1], r1[2])
    assert r1[6] == r1[7]  # every parameter trained
    for a, b in zip(r1[:3], r2[:3]):
        assert a == pytest.approx(b, rel=FORWARD_REL)
    weights = r2[3]
    assert weights.endswith("weights")
    reloaded = run_distributed(_evaluate, 1, cfg1, weights, timeout=200)[0]
    assert reloaded == pytest.approx(r2[2], rel=FORWARD_REL)


def _refusals(cfg, world: int = 1) -> str:
    from framework.runtime.errors import ConfigError
    from framework.training.job_config import validate

    with pytest.raises(ConfigError) as e:
        validate(cfg, world)
    return str(e.value)


def test_what_the_job_does_not_do_for_t5_is_refused_by_key(tiny_tokenizer_dir, tmp_path):
    from framework.inference.options import validate_generation
    from tests.generate_cases import compose as compose_generate

    def job(*extra):
        return compose(["model=t5_tiny", f"model.tokenizer={tiny_tokenizer_dir}", *extra])

    assert "not supported for the encoder-decoder T5" in _refusals(job("parallel.pipeline=2"), 2)
    assert "data.format='messages'" in _refusals(job("data=chat_example"))
    assert "data.packing=true is not supported for encoder-decoder" in _refusals(job("data.packing=true"))
    assert "peft.method='dora' is not supported for encoder-decoder" in _refusals(job("peft=dora"))
    assert "peft.targets: ['embedding']" in _refusals(job("peft.targets=[qkv,embedding]"))
    assert "data.decoder_max_length=0" in _refusals(job("data.decoder_max_length=0"))
    llama = ["model=tiny_llama", f"model.tokenizer={tiny_tokenizer_dir}"]
    assert "['cross_q'] are cross-attention targets" in _refusals(compose([*llama, "peft.targets=[qkv,cross_q]"]))
    assert "data.format=seq2seq needs an encoder-decoder model" in _refusals(compose([*llama, "data.format=seq2seq"]))
    from framework.runtime.errors import ConfigError

    # generation and evaluation (tests/inference/test_t5_generate.py) refuse what the job refuses: PP, fp8
    gen = compose_generate(["model=t5_tiny", f"model.tokenizer={tiny_tokenizer_dir}", "input=x.jsonl",
                            "parallel.pipeline=2"])
    with pytest.raises(ConfigError, match="parallel.pipeline=2: pipeline parallelism is not supported for the "
                                          "encoder-decoder T5"):
        validate_generation(gen, 2)


@pytest.mark.timeout(120)
def test_real_entry_refuses_pipeline_parallel_t5_before_starting(tiny_tokenizer_dir, tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_ADDR")}
    p = subprocess.run([sys.executable, "launch/finetune.py", "model=t5_tiny", f"model.tokenizer={tiny_tokenizer_dir}",
                        "parallel.pipeline=2", f"output_dir={tmp_path}"], cwd=ROOT, capture_output=True, text=True,
                       env=env, timeout=100)
    assert p.returncode == 2, p.stderr[-2000:]
    assert "parallel.pipeline=2: pipeline parallelism is not supported for the encoder-decoder T5" in p.stderr
    assert "Traceback" not in p.stderr
    assert not (tmp_path / "config.yaml").exists()
