"""T5 generation, evaluation and HF PEFT adapter import, against Hugging Face (transformers and PEFT).

References we did not write: transformers' ``T5ForConditionalGeneration.generate`` (greedy, batched with
right-padded encoder inputs and an attention mask, the same max_new_tokens and eos), HF PEFT's
``PeftModel`` (its logits and its ``generate``), the per-token cross entropy of transformers' ``labels=``
loss, and SQuAD's exact match / F1 written out by hand (tests/inference/test_generate.py).

* Greedy generation (framework/inference/encoder_decoder.py: encoder once, decoder recomputed) of prompts of
  different lengths in one batch equals transformers' for a T5 v1.0 (tied, ReLU) and v1.1 (untied, gated)
  layout at TP=1 and TP=2, with an eos that stops a row early; sampling is seeded: the same on every rank,
  at TP=1 and TP=2, for a prompt alone or in a batch, and other seeds give other tokens.
* HF PEFT LoRA adapters of T5 (q, k, v, o, wi / wi_0 + wi_1, wo; B random; the cross-attention included)
  import (framework/checkpoint/peft_import.py) and give PEFT's logits at TP=1 and TP=2 within 1e-4, also
  for partial groups (q and v only, rsLoRA); the imported adapter generates, through launch/generate.py's
  loading, what PEFT's ``generate`` does at TP=2.
* launch/evaluate.py's job reports transformers' loss and perplexity of the references and the
  hand-computed exact match / F1; the CLI writes transformers' greedy completions for a tiny T5 checkpoint.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch

from framework.models.config import ModelConfig
from launch.spawn import run_distributed
from tests.generate_cases import cli_env, squad_by_hand
from tests.generate_cases import compose as compose_generate
from tests.sft_jobs import ROOT, compose
from tests.t5_cases import BASE, EOS, PAD, TOKENIZER_PAD, VARIANTS, hf_t5, write_jsonl

TOL = 1e-4
N_NEW = 8
PROMPTS = [[5, 17, 33, 2, 90, 11, 7, EOS], [42, 8, EOS], [100, 101, 102, 103, EOS], [EOS]]  # encoder inputs
SAMPLING = dict(do_sample=True, temperature=0.8, top_k=40, top_p=0.9)


def generating_t5(cfg: ModelConfig, seed: int, pad: int = PAD):
    """A random HF T5 (tests/training/test_t5_job.py) whose greedy tokens vary with the prompt and the position: with
    the embedding at its initial scale a random T5 keeps repeating one token (the residual stream is
    dominated by the input token's embedding, which the tied output layer maps back to that token), which
    would let a decoding loop that reads the wrong position pass."""
    model = hf_t5(cfg, seed, pad)
    with torch.no_grad():
        model.shared.weight.mul_(0.05)
    return model


@pytest.fixture(scope="module")
def tiny_t5(tmp_path_factory):
    """conf/model/t5_tiny.yaml as such a T5 (vocabulary 512; pad = decoder start = the tiny tokenizer's)."""
    from framework.checkpoint.model_checks import model_config

    cfg = model_config(compose(["model=t5_tiny", "model.tokenizer=unused"]))
    path = tmp_path_factory.mktemp("tiny_t5")
    generating_t5(cfg, seed=3, pad=TOKENIZER_PAD).save_pretrained(path)
    return path


def hf_t5_greedy(model, prompts, n, eos, pad):
    """transformers' batched greedy generation (right padding + attention mask), cut before the first eos."""
    longest = max(map(len, prompts))
    ids = torch.tensor([p + [pad] * (longest - len(p)) for p in prompts])
    mask = torch.tensor([[1] * len(p) + [0] * (longest - len(p)) for p in prompts])
    model.generation_config.eos_token_id = eos
    with torch.no_grad():
        # use_cache=False: transformers 5.23's cache has the encoder's depth, too few for a deeper decoder
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, do_sample=False, num_beams=1,
                             eos_token_id=eos, pad_token_id=pad, decoder_start_token_id=pad, use_cache=False)
    rows = out[:, 1:].tolist()  # without the decoder start
    return [row[:row.index(eos)] if eos is not None and eos in row else row for row in rows]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Per variant: the model config, the HF directory, the stop id, transformers' greedy completions."""
    from transformers import T5ForConditionalGeneration

    root = tmp_path_factory.mktemp("t5_generate")
    out = {}
    for k, (name, shape) in enumerate(VARIANTS.items()):
        cfg = ModelConfig(**BASE, **shape)
        generating_t5(cfg, seed=20 + k).save_pretrained(root / name)
        hf = T5ForConditionalGeneration.from_pretrained(root / name).eval()
        free = hf_t5_greedy(hf, PROMPTS, N_NEW, None, PAD)
        stop = free[0][3]  # a token the first row generates: it stops there (or earlier), others may not
        out[name] = dict(cfg=cfg, hf_dir=str(root / name), stop=stop,
                         want=hf_t5_greedy(hf, PROMPTS, N_NEW, stop, PAD))
    return out


def _generate_worker(tp: int, models: dict):
    from framework.checkpoint.hf_import import load_hf_into_gpt
    from framework.inference.generate import GenerationConfig, generate
    from framework.inference.sampling import Sampling
    from framework.models.registry import build_model
    from framework.runtime.distributed import initialize

    initialize(tp=tp)
    out = {}
    for name, case in models.items():
        model = build_model(case["cfg"], tp=tp)
        load_hf_into_gpt(model, case["hf_dir"], case["cfg"])
        greedy = GenerationConfig(max_new_tokens=N_NEW, stop_ids=(case["stop"],))
        out[name, "greedy"] = [(c.tokens, c.finish_reason) for c in generate(model, PROMPTS, greedy, pad_id=PAD)]
        sampled = GenerationConfig(max_new_tokens=N_NEW, sampling=Sampling(**SAMPLING), seed=7)
        out[name, "sampled"] = [c.tokens for c in generate(model, PROMPTS, sampled, pad_id=PAD)]
        out[name, "alone"] = [generate(model, [p], sampled, pad_id=PAD, seeds=[7 + i])[0].tokens
                              for i, p in enumerate(PROMPTS)]
        out[name, "other seeds"] = [c.tokens for c in generate(model, PROMPTS, sampled, pad_id=PAD,
                                                               seeds=[100 + i for i in range(len(PROMPTS))])]
    return out


@pytest.fixture(scope="module")
def runs(models):
    return {tp: run_distributed(_generate_worker, tp, tp, models, timeout=250) for tp in (1, 2)}


@pytest.mark.timeout(600)
@pytest.mark.parametrize("tp", [1, 2])
def test_greedy_generation_matches_transformers(models, runs, tp):
    for name, case in models.items():
        for rank, r in enumerate(runs[tp]):
            got = r[name, "greedy"]
            assert [tokens for tokens, _ in got] == case["want"], (name, rank)
            stopped = [len(w) < N_NEW for w in case["want"]]
            assert [reason == "stop" for _, reason in got] == stopped, (name, rank)
        assert stopped[0] and not all(stopped), name  # eos stops a row early, not every row


@pytest.mark.timeout(600)
def test_sampling_is_seeded_and_the_same_on_every_rank_and_layout(models, runs):
    for name in models:
        first = runs[1][0][name, "sampled"]
        for tp, ranks in runs.items():
            for rank, r in enumerate(ranks):
                assert r[name, "sampled"] == first, (name, tp, rank)
                assert r[name, "alone"] == first, (name, tp, rank)  # a prompt draws the same in any batch
        assert runs[1][0][name, "other seeds"] != first, name
        assert all(len(t) == N_NEW for t in first)  # no stop id: every row runs to max_new_tokens


# -- HF PEFT LoRA adapters: import, logits, generation -----------------------------------------------------

def _peft_lora(hf, mlp: list[str], seed: int, targets=("q", "k", "v", "o"), **kw):
    """HF PEFT LoRA on ``hf`` with every factor random (B too, so the adapter changes the output)."""
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(hf, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=[*targets, *mlp],
                                          **kw))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return model.eval()


def _inputs(vocab: int, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(2, 11, dtype=torch.long)
    mask[1, 6:] = 0  # a padded encoder row
    return {"input_ids": torch.randint(2, vocab, (2, 11), generator=g), "attention_mask": mask,
            "decoder_input_ids": torch.randint(2, vocab, (2, 7), generator=g)}


def _logits_with_adapter(tp: int, cfg: ModelConfig, hf_dir: str, adapters: dict, inputs: dict):
    """Our logits at TP=tp with the HF weights and each imported adapter (applied as adapter.yaml says)."""
    from framework.checkpoint.adapter import load_adapter, read_adapter_config
    from framework.checkpoint.hf_import import load_hf_into_gpt
    from framework.models.registry import build_model
    from framework.models.t5 import t5_logits
    from framework.peft.lora import apply_lora
    from framework.runtime.distributed import initialize

    initialize(tp=tp)
    out = {}
    for key, adapter_dir in adapters.items():
        model = build_model(cfg, tp=tp)
        load_hf_into_gpt(model, hf_dir, cfg)
        meta = read_adapter_config(adapter_dir)
        apply_lora(model, targets=meta["targets"], rank=meta["rank"], alpha=meta["alpha"], rslora=meta["rslora"])
        load_adapter(model, adapter_dir, cfg)
        with torch.no_grad():
            out[key] = t5_logits(model.eval(), inputs["input_ids"], inputs["decoder_input_ids"],
                                 inputs["attention_mask"])
    return out


PEFT_CASES = {  # name -> (HF PEFT target_modules besides the MLP's, LoraConfig extras, our targets, our rank)
    "all": (("q", "k", "v", "o"), {}, ["qkv", "proj", "fc1", "fc2", "cross_q", "cross_kv", "cross_proj"], 12),
    "q_v_rslora": (("q", "v"), {"use_rslora": True}, ["qkv", "fc1", "fc2", "cross_q", "cross_kv"], 8),
}


@pytest.mark.timeout(600)
def test_hf_peft_t5_lora_imports_with_its_logits(tmp_path):
    """q/k/v of the self-attention (our fused qkv) and k/v of the cross-attention (our cross_kv) have
    different A's in HF PEFT: they import side by side (3 x 4; q and v alone 2 x 4, k a filler: the rank
    every target is padded to), with the
    scale alpha/r (rsLoRA: alpha/sqrt(r)) kept; gated MLPs' wi_0/wi_1 likewise. Logits equal PEFT's."""
    from framework.checkpoint.peft_import import import_peft

    for k, (name, shape) in enumerate(VARIANTS.items()):
        cfg = ModelConfig(**BASE, **shape)
        hf_dir = tmp_path / name
        hf_t5(cfg, seed=30 + k).save_pretrained(hf_dir)
        mlp = ["wi_0", "wi_1", "wo"] if cfg.gated_linear_unit else ["wi", "wo"]
        inputs = _inputs(cfg.vocab_size, k)
        expected, adapters = {}, {}
        for j, (case, (attention, extra, targets, rank)) in enumerate(PEFT_CASES.items()):
            from transformers import T5ForConditionalGeneration

            peft = _peft_lora(T5ForConditionalGeneration.from_pretrained(hf_dir), mlp, 40 + j, attention, **extra)
            peft.save_pretrained(tmp_path / f"{name}-{case}-peft")
            with torch.no_grad():
                expected[case] = peft(**inputs).logits.float()
            meta = import_peft(tmp_path / f"{name}-{case}-peft", tmp_path / f"{name}-{case}", cfg)
            assert (meta["targets"], meta["rank"], meta["hf_rank"]) == (targets, rank, 4), (name, case)
            adapters[case] = str(tmp_path / f"{name}-{case}")
        for tp in (1, 2):
            got = run_distributed(_logits_with_adapter, tp, tp, cfg, str(hf_dir), adapters, inputs, timeout=250)
            for rank, logits in enumerate(got):
                for case, want in expected.items():
                    diff = (logits[case] - want).abs().max().item()
                    assert diff < TOL, f"{name} {case} TP={tp} rank {rank}: max |logit diff| {diff:.3g}"


def test_t5_peft_adapters_that_do_not_fit_are_refused(tmp_path):
    """Selecting a module in one stack only (our targets cover both), DoRA and IA3 are refused by name."""
    from peft import IA3Config, LoraConfig, get_peft_model
    from transformers import T5ForConditionalGeneration

    from framework.checkpoint.peft_import import PeftImportError, import_peft

    cfg = ModelConfig(**BASE, **VARIANTS["v1_0_tied_relu"])
    hf_t5(cfg, seed=1).save_pretrained(tmp_path / "hf")
    encoder_q = [f"encoder.block.{i}.layer.0.SelfAttention.q" for i in range(cfg.num_layers)]
    for name, peft_cfg, match in [
        ("encoder-only", LoraConfig(r=4, target_modules=encoder_q),
         "select SelfAttention.q in the encoder but not the decoder"),
        ("dora", LoraConfig(r=4, target_modules=["q", "v"], use_dora=True), "DoRA adapters of the encoder-decoder t5"),
        ("ia3", IA3Config(target_modules=["k", "v", "wo"], feedforward_modules=["wo"]),
         "IA3 adapters of the encoder-decoder t5"),
    ]:
        model = get_peft_model(T5ForConditionalGeneration.from_pretrained(tmp_path / "hf"), peft_cfg)
        model.save_pretrained(tmp_path / name)
        with pytest.raises(PeftImportError, match=match):
            import_peft(tmp_path / name, tmp_path / f"{name}-ours", cfg)
        assert not (tmp_path / f"{name}-ours").exists()


def _generate_with_adapter(cfg, prompts):
    """What launch/generate.py does with adapter=...: the registry applies and loads the adapter."""
    from framework.checkpoint.model_checks import model_config
    from framework.inference.generate import GenerationConfig, generate
    from framework.inference.loading import load_model
    from framework.runtime import distributed as rtd

    rt = rtd.initialize(tp=int(cfg.parallel.tensor), pp=int(cfg.parallel.pipeline))
    model = load_model(cfg, model_config(cfg), rt, cfg.adapter)
    gen = GenerationConfig(max_new_tokens=N_NEW, stop_ids=(EOS,))
    return [c.tokens for c in generate(model, prompts, gen, pad_id=TOKENIZER_PAD)]


@pytest.mark.timeout(500)
def test_imported_lora_generates_what_hf_peft_generates(tiny_t5, tiny_tokenizer_dir, tmp_path):
    """An HF PEFT LoRA on the tiny T5 (q, k, v, o, wi, wo: the cross-attention too), imported by
    converters/adapter_from_hf.py, then loaded as launch/generate.py loads adapter=...: at TP=2 its greedy
    tokens are PEFT's ``generate``'s, which differ from the base model's."""
    from transformers import T5ForConditionalGeneration

    from converters.adapter_from_hf import main as adapter_from_hf

    base = T5ForConditionalGeneration.from_pretrained(tiny_t5).eval()
    prompts = [[p % 512 for p in prompt] for prompt in PROMPTS]
    without = hf_t5_greedy(base, prompts, N_NEW, EOS, TOKENIZER_PAD)
    peft = _peft_lora(T5ForConditionalGeneration.from_pretrained(tiny_t5), ["wi", "wo"], seed=9)
    peft.save_pretrained(tmp_path / "peft")
    expected = hf_t5_greedy(peft, prompts, N_NEW, EOS, TOKENIZER_PAD)
    assert expected != without  # the adapter changes what is generated
    adapter = tmp_path / "adapters" / "imported"
    adapter_from_hf([str(tmp_path / "peft"), str(adapter), "--model", str(tiny_t5)])
    cfg = compose_generate(["model=t5_tiny", "model.source=hf", f"model.path={tiny_t5}",
                            f"model.tokenizer={tiny_tokenizer_dir}", f"adapter={adapter}", "parallel.tensor=2",
                            "input=x"])
    for rank, got in enumerate(run_distributed(_generate_with_adapter, 2, cfg, prompts, timeout=250)):
        assert got == expected, rank


# -- the evaluation job and the CLI -------------------------------------------------------------------------

def _run_job(cfg):
    import os

    os.chdir(ROOT)
    from framework.inference.job import run
    from framework.runtime.logs import setup_logging

    setup_logging("WARNING")
    return run(cfg)


def _hf_greedy_text(hf, tok, prompt: str, n: int) -> str:
    return tok.decode(hf_t5_greedy(hf, [tok.encode(prompt) + [tok.eos_id]], n, tok.eos_id, tok.pad_id)[0])


@pytest.mark.timeout(500)
def test_eval_reports_hf_loss_and_squad_scores(tiny_t5, tiny_tokenizer_dir, tmp_path):
    """mode=eval (launch/evaluate.py) at TP=2: the loss is the mean over completion + eos tokens of
    transformers' teacher-forced cross entropy (encoder input = prompt + eos); record 1's reference is
    transformers' greedy completion (exact match 1); EM / F1 as SQuAD defines them."""
    import torch.nn.functional as F
    from transformers import T5ForConditionalGeneration

    from framework.data.tokenizer import Tokenizer

    tok = Tokenizer.from_dir(tiny_tokenizer_dir)
    hf = T5ForConditionalGeneration.from_pretrained(tiny_t5).eval()
    prompts = ["def add(a, b):", "Hello there", "x = 1"]
    n_new = 6
    greedy_text = _hf_greedy_text(hf, tok, prompts[0], n_new)
    refs = [greedy_text, "    return a + b", "y = 2"]
    inp = tmp_path / "refs.jsonl"
    inp.write_text("".join(json.dumps({"prompt": p, "completion": r}) + "\n" for p, r in zip(prompts, refs)))
    total, count = 0.0, 0
    for prompt, ref in zip(prompts, refs):
        labels = torch.tensor([tok.encode(ref) + [tok.eos_id]])
        with torch.no_grad():
            logits = hf(input_ids=torch.tensor([tok.encode(prompt) + [tok.eos_id]]), labels=labels).logits[0]
        total += F.cross_entropy(logits, labels[0], reduction="sum").item()
        count += labels.shape[1]
    out = tmp_path / "eval.jsonl"
    cfg = compose_generate(["model=t5_tiny", "model.source=hf", f"model.path={tiny_t5}", "mode=eval",
                            f"model.tokenizer={tiny_tokenizer_dir}", f"input={inp}", f"output={out}",
                            "progress=false", f"generate.max_new_tokens={n_new}", "parallel.tensor=2", "batch_size=2"])
    summary = run_distributed(_run_job, 2, cfg, timeout=300)[0]
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert lines[0]["generated"] == greedy_text
    by_hand = [squad_by_hand(line["generated"], ref) for line, ref in zip(lines, refs)]
    assert by_hand[0] == (1.0, 1.0)
    assert [(line["exact_match"], line["f1"]) for line in lines] == [pytest.approx(x) for x in by_hand]
    want = {"loss": total / count, "perplexity": math.exp(total / count), "target_tokens": count,
            "exact_match": 100 * sum(e for e, _ in by_hand) / len(refs),
            "f1": 100 * sum(f for _, f in by_hand) / len(refs)}
    report = json.loads((tmp_path / "eval.report.json").read_text())
    assert report == json.loads(json.dumps(summary))
    assert {k: report[k] for k in want} == pytest.approx(want, rel=1e-5)


def _generate_cli(*overrides, timeout: int = 350) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "launch/generate.py", "model=t5_tiny", "model.source=hf", *overrides],
                          cwd=ROOT, capture_output=True, text=True, env=cli_env(), timeout=timeout)


@pytest.mark.timeout(400)
def test_cli_writes_completions_for_a_tiny_t5(tiny_t5, tiny_tokenizer_dir, tmp_path):
    """launch/generate.py on a tiny T5 checkpoint: transformers' greedy completions in input order; a chat
    record is refused by file:line before anything runs (pipeline parallelism: tests/training/test_t5_job.py)."""
    from transformers import T5ForConditionalGeneration

    from framework.data.tokenizer import Tokenizer

    tok = Tokenizer.from_dir(tiny_tokenizer_dir)
    hf = T5ForConditionalGeneration.from_pretrained(tiny_t5).eval()
    records = [{"prompt": "def add(a, b):", "id": 1}, {"prompt": "Hello", "id": 2},
               {"prompt": "import os\nimport sys", "completion": "the reference"}]
    inp, out = write_jsonl(tmp_path / "prompts.jsonl", records), tmp_path / "out" / "completions.jsonl"
    model = [f"model.path={tiny_t5}", f"model.tokenizer={tiny_tokenizer_dir}"]
    p = _generate_cli(*model, f"input={inp}", f"output={out}", "generate.max_new_tokens=5", "batch_size=2",
                      "progress=false")
    assert p.returncode == 0, p.stderr[-3000:]
    assert "Generation" in p.stdout and str(out) in p.stdout
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r.get("id") for r in lines] == [1, 2, None]  # input order
    assert [r["completion"] for r in lines] == [_hf_greedy_text(hf, tok, r["prompt"], 5) for r in records]
    assert lines[2]["reference"] == "the reference"
    assert all(r["finish_reason"] in ("stop", "length") for r in lines)

    chat = write_jsonl(tmp_path / "chat.jsonl", [{"prompt": "ok"}, {"messages": [{"role": "user", "content": "hi"}]}])
    p = _generate_cli(*model, f"input={chat}", timeout=120)
    assert p.returncode == 2 and f'{chat}:2: "messages" records are not supported for an encoder-decoder model' \
        in p.stderr, p.stderr[-2000:]
    assert "Traceback" not in p.stderr


def test_t5_requests_are_encoder_inputs(tiny_tokenizer_dir, tmp_path):
    """A T5 prompt is encode(prompt) + eos (no bos), cut from the left with its eos kept; the reference is
    scored as training's seq2seq sample; a reference longer than the evaluation max_length is refused by line."""
    from framework.runtime.errors import DataError
    from framework.data.seq2seq import split
    from framework.data.tokenizer import Tokenizer
    from framework.inference.requests import read_requests

    tok = Tokenizer.from_dir(tiny_tokenizer_dir)
    path = write_jsonl(tmp_path / "refs.jsonl", [{"prompt": "def add(a, b):", "completion": "return a + b"}])
    prompt, ref = tok.encode("def add(a, b):"), tok.encode("return a + b")
    (req,) = read_requests(path, tok, 100, references=True, max_length=100, seq2seq=True)
    assert req.prompt_ids == prompt + [tok.eos_id] and split(req.target) == (prompt + [tok.eos_id], ref + [tok.eos_id])
    (cut,) = read_requests(path, tok, 4, references=True, max_length=len(ref) + 1, seq2seq=True)
    assert cut.prompt_ids == prompt[-3:] + [tok.eos_id] and cut.truncated == len(prompt) + 1 - 4
    with pytest.raises(DataError, match=f"{path}:1: the reference is {len(ref)} tokens \\+ eos, more than the"):
        read_requests(path, tok, 100, references=True, max_length=len(ref), seq2seq=True)
