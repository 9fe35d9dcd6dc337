"""The generation and evaluation jobs of launch/generate.py and launch/evaluate.py (conf/generate.yaml).

generate: every prompt of ``input`` -> ``output`` JSONL, one line per input record in input order: the
record with ``"completion"`` (the generated text, special tokens dropped) and ``"finish_reason"``
(``stop``: EOS or a ``generate.stop_tokens`` token; ``length``: ``generate.max_new_tokens``). A record that
already had a ``"completion"`` keeps it as ``"reference"``.

eval: the records carry references (framework/inference/requests.py). Two measurements per record:
the teacher-forced loss of the reference (framework/inference/scoring.py: completion tokens + EOS only,
as validation) and the completion generated from the prompt, scored against the references by exact match
and token F1 after SQuAD normalisation (framework/inference/metrics.py). ``output`` holds one line per
record (the record, ``"generated"``, ``"finish_reason"``, ``"exact_match"``, ``"f1"``, ``"loss"``,
``"target_tokens"``); ``report`` the corpus numbers as JSON::

    loss = sum of target-token losses / number of target tokens    perplexity = exp(loss)
    exact_match, f1 = 100 x mean over records of the best score over the record's references

Order and layout. Everything a user can get wrong (config, prompts file, tokenizer, adapter path) is
checked before process groups start. Prompts are sorted by length and cut into batches of ``batch_size``
(similar lengths waste fewer slots); data-parallel ranks take every DP-th batch; rank 0 gathers and
writes. Prompt i samples with seed ``seed + i``, so the output is the same at any batch size and layout
(greedy: up to float rounding between layouts).

Encoder-decoder models (T5) run the same job on ``"prompt"`` records: the encoder input is the prompt + EOS
and the completion is decoded from T5's decoder start (the pad token) by framework/inference/encoder_decoder.py
(encoder once per batch, decoder recomputed each step, no KV cache); the reference loss is the loss of the
seq2seq training sample (completion + EOS as targets); at TP (with DP), not PP.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from pathlib import Path

import torch
import torch.distributed as dist
from omegaconf import DictConfig, OmegaConf

from framework.checkpoint import hub
from framework.data.tokenizer import Tokenizer
from framework.inference.generate import generate
from framework.inference.loading import load_model, trained_peft_config
from framework.inference.metrics import best_over_references, corpus_scores, exact_match, token_f1
from framework.inference.options import generation_config, validate_generation
from framework.inference.requests import read_requests
from framework.inference.scoring import corpus_loss, sample_losses
from framework.models.kinds import ENCODER_DECODER
from framework.models.registry import kind_of
from framework.runtime import distributed as rtd
from framework.runtime.errors import ConfigError
from framework.runtime.progress import progress
from framework.runtime.text_table import table

log = logging.getLogger("framework.generate")


def default_paths(input: str, mode: str, output: str | None = None,
                  report: str | None = None) -> tuple[Path, Path | None]:
    """(output, report): the configured paths, or INPUT's name with .completions.jsonl / .eval.jsonl and
    OUTPUT's with .report.json."""
    inp = Path(input)
    stem = inp.name[:-len(".jsonl")] if inp.name.endswith(".jsonl") else inp.name
    suffix = ".eval.jsonl" if mode == "eval" else ".completions.jsonl"
    out = Path(output) if output else inp.with_name(stem + suffix)
    if mode != "eval":
        return out, None
    if report:
        return out, Path(report)
    ostem = out.name[:-len(".jsonl")] if out.name.endswith(".jsonl") else out.name
    return out, out.with_name(ostem + ".report.json")


def stop_ids(tokenizer, tokens) -> tuple[int, ...]:
    """EOS plus ``generate.stop_tokens`` (each must be one token of the vocabulary)."""
    ids = [tokenizer.eos_id]
    for s in tokens or []:
        enc = tokenizer.encode(s)
        if len(enc) != 1:
            raise ConfigError(f"generate.stop_tokens: {s!r} is {len(enc)} tokens ({enc}), not one token of the "
                              "vocabulary")
        ids.append(enc[0])
    return tuple(dict.fromkeys(ids))


def prepare(cfg: DictConfig, world_size: int):
    """Validate the config, load the tokenizer and read every request; no process group needed."""
    model_cfg = validate_generation(cfg, world_size)
    if cfg.model.source != "random":
        hub.model_config_for(cfg.model)  # converts a bundled model once; checks model.arch against config.json
    tokenizer = Tokenizer.from_dir(hub.tokenizer_dir(cfg.model))
    peft = trained_peft_config(cfg.adapter) if cfg.get("adapter") else {}
    kind = kind_of(model_cfg)
    seq2seq = kind is ENCODER_DECODER  # T5: the prompt is the encoder's, apart from the decoder's
    if kind.peft_methods is not None and peft.get("method", "none") not in kind.peft_methods:
        raise ConfigError(f"adapter={cfg.adapter}: a {peft['method']} adapter; an encoder-decoder model (T5) "
                          f"takes {' or '.join(kind.peft_methods)} (LoRA adapters, or full fine-tuned weights)")
    n_virtual = int(peft.get("num_virtual_tokens") or 0)
    gen = generation_config(cfg.generate, stop_ids(tokenizer, cfg.generate.get("stop_tokens")), int(cfg.seed))
    room = model_cfg.max_position_embeddings - n_virtual
    max_length = (cfg.get("eval") or {}).get("max_length") or room
    max_prompt = room if seq2seq else room - gen.max_new_tokens
    requests = read_requests(cfg.input, tokenizer, max_prompt, references=cfg.mode == "eval",
                             max_length=min(int(max_length), room), seq2seq=seq2seq)
    cut = [r.line for r in requests if r.truncated]
    if cut:
        why = ("max_position_embeddings, eos included" if seq2seq else "max_position_embeddings - "
               "generate.max_new_tokens" + (" - virtual tokens" if n_virtual else ""))
        log.warning("%d prompt(s) longer than %d tokens (%s) keep only their last tokens; lines %s", len(cut),
                    max_prompt, why, ", ".join(map(str, cut[:10])) + (" ..." if len(cut) > 10 else ""))
    return model_cfg, tokenizer, requests, gen


def _batches(requests, batch_size: int, dp_rank: int, dp: int) -> list[list[int]]:
    """This DP rank's batches of request indices, longest prompts first."""
    order = sorted(range(len(requests)), key=lambda i: (-len(requests[i].prompt_ids), i))
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    return batches[dp_rank::dp]


def _precision_context(precision: str, device):
    if precision == "bf16" and device.type == "cpu":  # as training: autocast the matmuls on CPU
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _gather(mine: dict, rt) -> dict | None:
    """Every rank's {request index: result} on global rank 0 (None elsewhere)."""
    if rt.world_size == 1:
        return mine
    parts = [None] * rt.world_size if rt.is_main else None
    dist.gather_object(mine, parts, dst=0)
    if not rt.is_main:
        return None
    merged = {}
    for part in parts:
        merged.update(part)
    return merged


def _write_jsonl(path: Path, records) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def run(cfg: DictConfig) -> dict:
    """Run ``cfg.mode`` (generate | eval); returns the summary (on rank 0; other ranks get {})."""
    from megatron.core import parallel_state as ps

    model_cfg, tokenizer, requests, gen = prepare(cfg, rtd.world_size_from_env())
    output, report_path = default_paths(cfg.input, cfg.mode, cfg.get("output"), cfg.get("report"))
    par = cfg.parallel
    rt = rtd.initialize(tp=par.tensor, pp=par.pipeline, sp=False, seed=cfg.seed)
    model = load_model(cfg, model_cfg, rt, cfg.get("adapter"))
    evaluating = cfg.mode == "eval"
    batches = _batches(requests, cfg.batch_size, ps.get_data_parallel_rank(), rt.dp)
    mine: dict[int, dict] = {}
    t0 = time.perf_counter()
    bar = progress(sum(len(b) for b in batches), f"{cfg.mode} (DP rank 0 of {rt.dp})" if rt.dp > 1 else cfg.mode,
                   enabled=rt.is_main and bool(cfg.get("progress", True)))
    with _precision_context(cfg.precision, rt.device):
        for batch in batches:
            done = generate(model, [requests[i].prompt_ids for i in batch], gen, pad_id=tokenizer.pad_id,
                            seeds=[gen.seed + i for i in batch])
            for i, c in zip(batch, done):
                mine[i] = {"text": tokenizer.decode(c.tokens), "finish_reason": c.finish_reason,
                           "new_tokens": len(c.tokens)}
            if evaluating:
                losses = sample_losses(model, [requests[i].target for i in batch], tokenizer.pad_id,
                                       micro_batch_size=len(batch))
                for i, (s, n) in zip(batch, losses):
                    mine[i].update(loss_sum=s, target_tokens=n)
            bar.update(len(batch))
    bar.close()
    seconds = time.perf_counter() - t0
    results = _gather(mine, rt)
    if not rt.is_main:
        return {}
    common = _common(cfg, results, seconds, rt)
    if evaluating:
        return _write_eval(common, requests, results, output, report_path)
    return _write_generate(common, requests, results, output)


def _common(cfg, results, seconds, rt) -> dict:
    """What the summary of either mode reports: the job, the layout and the generation's throughput."""
    new_tokens = sum(r["new_tokens"] for r in results.values())
    return {"input": str(cfg.input), "model": cfg.model.name, "adapter": cfg.get("adapter"), "samples": len(results),
            "generated_tokens": new_tokens, "seconds": round(seconds, 3),
            "tokens_per_s": round(new_tokens / seconds, 2) if seconds > 0 else None,
            "layout": f"TP={rt.tp} PP={rt.pp} DP={rt.dp}",
            "generate": OmegaConf.to_container(cfg.generate, resolve=True)}


def _write_generate(common: dict, requests, results, output: Path) -> dict:
    records = []
    for i, req in enumerate(requests):
        rec = dict(req.record)
        if "completion" in rec:
            rec["reference"] = rec["completion"]
        rec.update(completion=results[i]["text"], finish_reason=results[i]["finish_reason"])
        records.append(rec)
    _write_jsonl(output, records)
    summary = {**common, "output": str(output)}
    print(_table(summary, [("completions", str(output))]), flush=True)
    return summary


def _write_eval(common: dict, requests, results, output: Path, report_path: Path) -> dict:
    records = []
    for i, req in enumerate(requests):
        r = results[i]
        records.append({**req.record, "generated": r["text"], "finish_reason": r["finish_reason"],
                        "exact_match": best_over_references(exact_match, r["text"], req.references),
                        "f1": best_over_references(token_f1, r["text"], req.references),
                        "loss": r["loss_sum"] / r["target_tokens"], "target_tokens": r["target_tokens"]})
    _write_jsonl(output, records)
    scores = corpus_scores([results[i]["text"] for i in range(len(requests))], [r.references for r in requests])
    summary = {**common,
               **corpus_loss([(results[i]["loss_sum"], results[i]["target_tokens"]) for i in range(len(requests))]),
               **scores, "normalization": "SQuAD: lowercase, drop punctuation and a/an/the, collapse whitespace",
               "output": str(output), "report": str(report_path)}
    report_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = report_path.with_name(report_path.name + ".tmp")
    tmp.write_text(json.dumps(summary, indent=1))
    os.replace(tmp, report_path)
    print(_table(summary, [
        ("loss (reference tokens)", f"{summary['loss']:.4f} over {summary['target_tokens']:,} tokens"),
        ("perplexity", f"{summary['perplexity']:.3f}"),
        ("exact match", f"{summary['exact_match']:.2f}%"),
        ("token F1", f"{summary['f1']:.2f}%"),
        ("per-sample results", str(output)), ("report", str(report_path))]), flush=True)
    return summary


def _table(summary: dict, rows: list[tuple[str, str]]) -> str:
    head = [("samples", str(summary["samples"])), ("model", summary["model"] + (
        f" + {summary['adapter']}" if summary["adapter"] else "")), ("layout", summary["layout"]),
        ("generated tokens", f"{summary['generated_tokens']:,} in {summary['seconds']:.1f} s")]
    return table(head + rows, "Evaluation" if "loss" in summary else "Generation")
