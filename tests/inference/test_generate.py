"""Generation and evaluation against Hugging Face, at TP=1, TP=2 and PP=2, and as the CLI runs them.

References we did not write: transformers' ``generate(do_sample=False)`` on the same tiny random Llama
(batched, left-padded with an attention mask, as transformers batches prompts), HF PEFT's ``generate``
with the same LoRA adapter (exported by framework/checkpoint/peft_export.py) and with the same prompt-
tuning table, transformers' logits warpers for temperature / top-k / top-p, transformers' chat template
rendering, a teacher-forced loss computed here from HF's logits, and SQuAD's exact match / F1 worked out by
hand.

* Greedy tokens with megatron's KV cache equal HF's, for prompts of lengths 7, 2, 5 and 1 in one batch,
  with both padding schemes and an EOS that stops some rows early; the uncached path (full recomputation)
  gives the same tokens; every rank returns the same.
* Sampling with a fixed seed: the same tokens twice, on every rank, at every layout, and for a prompt alone
  or in a batch; another seed gives other tokens.
* Adapters: LoRA (TP=2, loaded through the registry as launch/generate.py loads it) and prompt tuning
  (virtual tokens in the prefill only) generate what HF PEFT generates.
* The CLI writes completions for prompt and chat records; data-parallel ranks share the prompts and write
  the same file; evaluation reports HF's loss and the hand-computed EM / F1.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from launch.spawn import run_distributed
from tests.generate_cases import PROMPTS, ROOT, cli_env, compose, hf_greedy, squad_by_hand
from tests.hf_models import save_tiny_job_llama, tiny_llama

ARCH = dict(num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2)
N_NEW = 12
N_VIRTUAL = 3
SAMPLING = dict(do_sample=True, temperature=0.8, top_k=40, top_p=0.9)


# --- the tiny model at every layout ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def hf_case(tmp_path_factory):
    """The tiny HF Llama, an EOS that row 0 emits mid-way, and HF's greedy tokens (with that EOS) with and
    without a prompt-tuning table."""
    from peft import PromptTuningConfig, TaskType, get_peft_model

    root = tmp_path_factory.mktemp("gen_hf")
    model = tiny_llama(3, **ARCH)
    model.save_pretrained(root / "hf")
    free = hf_greedy(model, PROMPTS, N_NEW)
    eos = free[0][5]
    expected = hf_greedy(model, PROMPTS, N_NEW, eos)
    assert len(expected[0]) == 5 and any(len(r) == N_NEW for r in expected)  # some rows stop, some run out
    peft_model = get_peft_model(tiny_llama(3, **ARCH), PromptTuningConfig(task_type=TaskType.CAUSAL_LM,
                                                                          num_virtual_tokens=N_VIRTUAL)).eval()
    table = peft_model.prompt_encoder["default"].embedding.weight
    with torch.no_grad():
        table.copy_(torch.randn(table.shape, generator=torch.Generator().manual_seed(4)))
    prompted = hf_greedy(peft_model, PROMPTS, N_NEW)
    assert prompted != free  # the table matters
    return {"dir": str(root / "hf"), "eos": eos, "greedy": expected, "prompted": prompted,
            "table": table.detach().clone()}


def _build(hf_dir, tp, pp):
    from framework.checkpoint.hf_import import load_hf_into_gpt
    from framework.models.gpt import build_gpt
    from framework.models.registry import config_from_hf

    model_cfg = config_from_hf(json.loads(open(os.path.join(hf_dir, "config.json")).read()))
    model = build_gpt(model_cfg, tp, pp)
    load_hf_into_gpt(model, hf_dir, model_cfg)
    return model


def _layout_worker(tp, pp, case):
    """Greedy (both paddings, cached and not), sampling (twice, another seed, prompts alone), prompt tuning."""
    from framework.inference.generate import GenerationConfig, generate
    from framework.inference.sampling import Sampling
    from framework.peft.prompt_tuning import apply_prompt_tuning
    from framework.peft.virtual_tokens import prompt_source
    from framework.runtime.distributed import initialize

    initialize(tp=tp, pp=pp)
    model = _build(case["dir"], tp, pp)
    out = {}

    def run(key, m=model, prompts=PROMPTS, seeds=None, **kw):
        cfg = GenerationConfig(max_new_tokens=N_NEW, **kw)
        done = generate(m, prompts, cfg, seeds=seeds)
        out[key] = [c.tokens for c in done]
        out[key + "/finish"] = [c.finish_reason for c in done]

    stop = (case["eos"],)
    for side in ("right", "left"):
        run(f"greedy/{side}", stop_ids=stop, padding_side=side)
    run("greedy/uncached", stop_ids=stop, use_cache=False)
    run("greedy/micro_batches", stop_ids=stop, micro_batch_size=2)  # padding_side auto
    sampling = Sampling(**SAMPLING)
    run("sample/a", sampling=sampling, seed=7)
    run("sample/b", sampling=sampling, seed=7)
    run("sample/other_seed", sampling=sampling, seed=8)
    run("sample/right", sampling=sampling, seed=7, padding_side="right")
    out["sample/alone"] = [generate(model, [p], GenerationConfig(max_new_tokens=N_NEW, sampling=sampling),
                                    seeds=[7 + i])[0].tokens for i, p in enumerate(PROMPTS)]

    prompted = _build(case["dir"], tp, pp)
    apply_prompt_tuning(prompted, N_VIRTUAL)
    if prompt_source(prompted) is not None:
        with torch.no_grad():
            prompt_source(prompted).embedding.weight.copy_(case["table"])
    for side in ("right", "left"):
        run(f"prompted/{side}", m=prompted, padding_side=side)
    run("prompted/uncached", m=prompted, use_cache=False)
    return out


LAYOUTS = {"tp1": (1, 1), "tp2": (2, 1), "pp2": (1, 2)}


class _Runs(dict):
    """Each layout's worker results (one per rank), run when a test first asks for the layout."""

    def __init__(self, case):
        super().__init__()
        self.case = case

    def __missing__(self, name):
        tp, pp = LAYOUTS[name]
        self[name] = run_distributed(_layout_worker, tp * pp, tp, pp, self.case, timeout=280)
        return self[name]


@pytest.fixture(scope="module")
def layout_runs(hf_case):
    return _Runs(hf_case)


@pytest.mark.timeout(900)
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_greedy_with_kv_cache_matches_transformers(hf_case, layout_runs, layout):
    for rank, out in enumerate(layout_runs[layout]):
        for key in ("greedy/right", "greedy/left", "greedy/micro_batches"):
            assert out[key] == hf_case["greedy"], (layout, rank, key)
            assert out[key + "/finish"] == ["stop" if len(r) < N_NEW else "length" for r in hf_case["greedy"]]


@pytest.mark.timeout(900)
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_cached_equals_uncached(hf_case, layout_runs, layout):
    for out in layout_runs[layout]:
        assert out["greedy/uncached"] == out["greedy/right"] == out["greedy/left"]
        assert out["prompted/uncached"] == out["prompted/right"] == out["prompted/left"]


@pytest.mark.timeout(900)
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_prompt_tuning_matches_hf_peft(hf_case, layout_runs, layout):
    """Virtual tokens enter the prefill only; decode steps must not splice the table over the new token."""
    for out in layout_runs[layout]:
        assert out["prompted/right"] == hf_case["prompted"]
        assert out["prompted/left"] == hf_case["prompted"]


@pytest.mark.timeout(900)
def test_sampling_is_seeded_and_the_same_on_every_rank_and_layout(layout_runs):
    reference = layout_runs["tp1"][0]
    assert reference["sample/a"] == reference["sample/b"]
    assert reference["sample/a"] != reference["sample/other_seed"]
    assert reference["sample/a"] != reference["greedy/uncached"]  # it does sample
    assert reference["sample/alone"] == reference["sample/a"]      # batch-invariant: per-prompt generators
    assert reference["sample/right"] == reference["sample/a"]  # default (auto) is left on the local spec
    for name in LAYOUTS:
        for rank, out in enumerate(layout_runs[name]):
            for key in ("sample/a", "sample/b", "sample/other_seed", "sample/alone"):
                assert out[key] == reference[key], (name, rank, key)


def test_sampling_filters_match_transformers_warpers():
    from transformers.generation.logits_process import (LogitsProcessorList, TemperatureLogitsWarper,
                                                        TopKLogitsWarper, TopPLogitsWarper)

    from framework.inference.sampling import Sampling, filtered_logits

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(5, 300, generator=g) * 3
    logits[1, :4] = 10.0  # ties at the top-k boundary
    for temperature, top_k, top_p in [(0.7, 0, 1.0), (1.0, 20, 1.0), (1.3, 0, 0.8), (0.5, 5, 0.5), (1.0, 0, 0.01)]:
        hf = LogitsProcessorList([TemperatureLogitsWarper(temperature)]
                                 + ([TopKLogitsWarper(top_k)] if top_k else [])
                                 + ([TopPLogitsWarper(top_p)] if top_p < 1 else []))(None, logits.clone())
        ours = filtered_logits(logits, Sampling(True, temperature, top_k, top_p))
        assert torch.equal(torch.isinf(ours), torch.isinf(hf)), (temperature, top_k, top_p)
        assert torch.allclose(ours[~torch.isinf(ours)], hf[~torch.isinf(hf)]), (temperature, top_k, top_p)


# --- LoRA against HF PEFT ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def job_llama(tmp_path_factory):
    """The tiny Llama of conf/model/tiny_llama.yaml's shape (vocabulary 512), in HF format."""
    return str(save_tiny_job_llama(tmp_path_factory.mktemp("gen_job_llama")))


def _make_lora(hf_dir, adapter_dir):
    from framework.checkpoint.adapter import save_adapter
    from framework.peft.lora import apply_lora
    from framework.runtime.distributed import initialize
    from tests.hf_models import fill_trainable

    initialize()
    model = _build(hf_dir, 1, 1)
    from framework.models.registry import config_from_hf

    model_cfg = config_from_hf(json.loads(open(os.path.join(hf_dir, "config.json")).read()))
    apply_lora(model, targets=("qkv", "proj", "fc1", "fc2"), rank=4, alpha=8.0)
    fill_trainable(model, seed=5, scale=0.3)
    save_adapter(model, adapter_dir, {"method": "lora", "rank": 4, "alpha": 8.0, "dropout": 0.0,
                                      "targets": ["qkv", "proj", "fc1", "fc2"]}, model_cfg,
                 base={"name": "tiny-llama"})


def _generate_with_adapter(cfg, prompts):
    """What launch/generate.py does with adapter=...: the registry applies and loads the adapter."""
    from framework.checkpoint.model_checks import model_config
    from framework.inference.generate import GenerationConfig, generate
    from framework.inference.loading import load_model
    from framework.runtime import distributed as rtd

    rt = rtd.initialize(tp=int(cfg.parallel.tensor), pp=int(cfg.parallel.pipeline))
    model = load_model(cfg, model_config(cfg), rt, cfg.adapter)
    return [c.tokens for c in generate(model, prompts, GenerationConfig(max_new_tokens=N_NEW))]


@pytest.mark.timeout(400)
def test_lora_adapter_matches_hf_peft_generate(job_llama, tiny_tokenizer_dir, tmp_path):
    from peft import PeftModel
    from transformers import LlamaForCausalLM

    from framework.checkpoint.peft_export import export_peft

    adapter = tmp_path / "adapters" / "default"
    run_distributed(_make_lora, 1, job_llama, str(adapter), timeout=200)
    export_peft(adapter, tmp_path / "peft")
    base = LlamaForCausalLM.from_pretrained(job_llama).eval()
    without = hf_greedy(base, PROMPTS, N_NEW)
    expected = hf_greedy(PeftModel.from_pretrained(base, str(tmp_path / "peft")).eval(), PROMPTS, N_NEW)
    assert expected != without  # the adapter changes what is generated
    cfg = compose(["model=tiny_llama", "model.source=hf", f"model.path={job_llama}",
                   f"model.tokenizer={tiny_tokenizer_dir}", f"adapter={adapter}", "parallel.tensor=2", "input=x"])
    for rank, got in enumerate(run_distributed(_generate_with_adapter, 2, cfg, PROMPTS, timeout=250)):
        assert got == expected, rank


# --- the CLI and the evaluation job ------------------------------------------------------------------------

def _chat_tokenizer(tiny_tokenizer_dir, out):
    """The tiny tokenizer with the Mistral instruct chat template (no added tokens: the vocabulary stays 512)."""
    import shutil

    out.mkdir(parents=True, exist_ok=True)
    shutil.copy(os.path.join(tiny_tokenizer_dir, "tokenizer.json"), out / "tokenizer.json")
    template = (ROOT + "/tests/fixtures/chat_templates/mistral_instruct.jinja")
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>",
              "pad_token": "<pad>", "chat_template": open(template, encoding="utf-8").read()}
    (out / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    return out


CHAT = [{"role": "user", "content": "Write a function that adds two numbers."}]


def test_chat_prompts_render_as_transformers_does(tiny_tokenizer_dir, tmp_path):
    from transformers import AutoTokenizer

    from framework.data.tokenizer import Tokenizer
    from framework.inference.requests import read_requests

    tok_dir = _chat_tokenizer(tiny_tokenizer_dir, tmp_path / "tok")
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps({"messages": CHAT}) + "\n" + json.dumps({"prompt": "def f(x):"}) + "\n")
    chat, plain = read_requests(path, Tokenizer.from_dir(tok_dir), max_prompt_tokens=100)
    hf = AutoTokenizer.from_pretrained(str(tok_dir))
    rendered = hf.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=True)
    assert chat.prompt_ids == list(rendered if isinstance(rendered, list) else rendered["input_ids"])
    assert plain.prompt_ids == [hf.bos_token_id] + hf.encode("def f(x):", add_special_tokens=False)
    long = read_requests(path, Tokenizer.from_dir(tok_dir), max_prompt_tokens=3)
    assert long[1].prompt_ids == plain.prompt_ids[-3:] and long[1].truncated == len(plain.prompt_ids) - 3


@pytest.mark.timeout(400)
def test_cli_writes_completions(tiny_tokenizer_dir, tmp_path):
    tok_dir = _chat_tokenizer(tiny_tokenizer_dir, tmp_path / "tok")
    inp, out = tmp_path / "prompts.jsonl", tmp_path / "out" / "completions.jsonl"
    records = [{"prompt": "def add(a, b):", "id": 1}, {"messages": CHAT, "id": 2},
               {"prompt": "x", "completion": "the reference"}]
    inp.write_text("".join(json.dumps(r) + "\n" for r in records))
    args = [sys.executable, "launch/generate.py", "model=tiny_llama", "model.source=random",
            f"model.tokenizer={tok_dir}", f"input={inp}", f"output={out}", "generate.max_new_tokens=5",
            "batch_size=2", "progress=false"]
    p = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, env=cli_env(), timeout=350)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "Generation" in p.stdout and str(out) in p.stdout
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r.get("id") for r in lines] == [1, 2, None]  # input order
    for rec, line in zip(records, lines):
        assert {k: v for k, v in line.items() if k not in ("completion", "finish_reason", "reference")} == \
            {k: v for k, v in rec.items() if k != "completion"}
        assert isinstance(line["completion"], str) and line["finish_reason"] in ("stop", "length")
    assert lines[2]["reference"] == "the reference"

    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "ok"}) + "\n" + json.dumps({"prompt": 3}) + "\n")
    p = subprocess.run(args[:5] + [f"input={bad}"], cwd=ROOT, capture_output=True, text=True, env=cli_env(),
                       timeout=120)
    assert p.returncode == 2 and f"{bad}:2: expected a string under \"prompt\", got int" in p.stderr, p.stderr[-2000:]
    assert "Traceback" not in p.stderr
    p = subprocess.run([sys.executable, "launch/generate.py", "--help"], cwd=ROOT, capture_output=True, text=True,
                       env=cli_env(), timeout=120)
    assert p.returncode == 0 and "generate.top_p" in p.stdout and "adapter=PATH" in p.stdout


def _run_job(cfg):
    os.chdir(ROOT)
    from framework.inference.job import run
    from framework.runtime.logs import setup_logging

    setup_logging("WARNING")
    return run(cfg)


@pytest.mark.timeout(500)
def test_data_parallel_ranks_write_the_same_completions(job_llama, tiny_tokenizer_dir, tmp_path):
    """DP=2 (each rank generates every other batch; rank 0 gathers) and PP=2 write the single process's
    file; sampled, so the per-prompt seeds are checked too."""
    inp = tmp_path / "prompts.jsonl"
    inp.write_text("".join(json.dumps({"prompt": t}) + "\n" for t in
                           ["def add(a, b):", "Hello", "import os", "class A:", "x = 1"]))
    files = {}
    for name, world, extra in [("single", 1, []), ("dp2", 2, []), ("pp2", 2, ["parallel.pipeline=2"])]:
        out = tmp_path / f"{name}.jsonl"
        cfg = compose(["model=tiny_llama", "model.source=hf", f"model.path={job_llama}",
                       f"model.tokenizer={tiny_tokenizer_dir}", f"input={inp}", f"output={out}",
                       "generate.max_new_tokens=6", "batch_size=2",
                       "generate.do_sample=true", "generate.top_k=20", "progress=false", *extra])
        run_distributed(_run_job, world, cfg, timeout=250)
        files[name] = [json.loads(line) for line in out.read_text().splitlines()]
    assert files["dp2"] == files["single"]
    assert files["pp2"] == files["single"]


def test_exact_match_and_f1_by_hand():
    from framework.inference.metrics import corpus_scores, exact_match, normalize_answer, token_f1

    assert normalize_answer("  The Cat, sat on  a MAT!! ") == "cat sat on mat"
    assert exact_match("The cat sat on the mat.", "cat sat on mat") == 1.0
    assert exact_match("cat sat", "cat sat down") == 0.0
    # pred {red, apple, tree}, ref {green, apple}: 1 common, P = 1/3, R = 1/2, F1 = 2PR/(P+R) = 0.4
    assert token_f1("a red apple tree", "the green apple") == pytest.approx(0.4)
    # multiset overlap: "cat cat" vs "cat": 1 common, P = 1/2, R = 1, F1 = 2/3
    assert token_f1("cat cat", "cat") == pytest.approx(2 / 3)
    assert token_f1("The", "an") == 1.0 and token_f1("", "x") == 0.0 and token_f1("dog", "cat") == 0.0
    # corpus: the best over each sample's references, then the mean, in %
    scores = corpus_scores(["Paris", "blue sky"], [["paris", "Lyon"], ["the sky is blue"]])
    # sample 2: pred {blue, sky}, ref {sky, is, blue}: 2 common, P = 1, R = 2/3, F1 = 0.8
    assert scores == {"exact_match": pytest.approx(50.0), "f1": pytest.approx(90.0)}


@pytest.mark.timeout(500)
def test_eval_reports_hf_loss_and_squad_scores(job_llama, tiny_tokenizer_dir, tmp_path):
    """The reference of record 1 is HF's own greedy completion of its prompt (exact match 1); record 2's is
    some text. The loss is the mean over completion + EOS tokens of HF's teacher-forced cross entropy."""
    import torch.nn.functional as F
    from transformers import LlamaForCausalLM

    from framework.data.tokenizer import Tokenizer

    tok = Tokenizer.from_dir(tiny_tokenizer_dir)
    hf = LlamaForCausalLM.from_pretrained(job_llama).eval()
    prompts = ["def add(a, b):", "Hello there"]
    ids = [[tok.bos_id] + tok.encode(p) for p in prompts]
    n_new = 6
    greedy_text = tok.decode(hf_greedy(hf, [ids[0]], n_new, eos=tok.eos_id)[0])
    refs = [greedy_text, "    return a + b"]
    inp = tmp_path / "refs.jsonl"
    inp.write_text("".join(json.dumps({"prompt": p, "completion": r}) + "\n" for p, r in zip(prompts, refs)))
    total, count = 0.0, 0
    for prompt, ref in zip(prompts, refs):
        p_ids, c_ids = [tok.bos_id] + tok.encode(prompt), tok.encode(ref) + [tok.eos_id]
        seq = torch.tensor([p_ids + c_ids])
        with torch.no_grad():
            logits = hf(input_ids=seq).logits[0, :-1]
        ce = F.cross_entropy(logits, seq[0, 1:], reduction="none")[len(p_ids) - 1:]
        total, count = total + ce.sum().item(), count + len(c_ids)
    out = tmp_path / "eval.jsonl"
    cfg = compose(["model=tiny_llama", "model.source=hf", f"model.path={job_llama}", "mode=eval",
                   f"model.tokenizer={tiny_tokenizer_dir}", f"input={inp}", f"output={out}", "progress=false",
                   f"generate.max_new_tokens={n_new}", "parallel.tensor=2"])
    summary = run_distributed(_run_job, 2, cfg, timeout=300)[0]
    report = json.loads((tmp_path / "eval.report.json").read_text())
    assert report == json.loads(json.dumps(summary))
    assert report["loss"] == pytest.approx(total / count, rel=1e-5)
    assert report["perplexity"] == pytest.approx(float(torch.tensor(total / count).exp()), rel=1e-5)
    assert report["target_tokens"] == count
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert lines[0]["generated"] == greedy_text and lines[0]["exact_match"] == 1.0
    by_hand = [squad_by_hand(line["generated"], ref) for line, ref in zip(lines, refs)]
    assert [(line["exact_match"], line["f1"]) for line in lines] == [pytest.approx(x) for x in by_hand]
    assert report["exact_match"] == pytest.approx(100 * sum(e for e, _ in by_hand) / 2)
    assert report["f1"] == pytest.approx(100 * sum(f for _, f in by_hand) / 2)
