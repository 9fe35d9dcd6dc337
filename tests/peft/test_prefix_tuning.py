"""Prefix tuning against Hugging Face PEFT's PREFIX_TUNING, at every layout, with packing, generation and files.

Two tiny random HF Llamas (4 layers, 4 query heads; GQA with 2 KV heads, and MQA with 1, whose KV head is
replicated over TP=2) are both HF's model and ours (through the HF import). HF PEFT's ``PrefixTuningConfig``
wraps them, without and with ``prefix_projection``; its prefix weights are set to seeded non-zero values and
copied into ours by their HF names (:func:`framework.peft.prefix_tuning.set_full_state`). On one batch whose
rows carry very different numbers of target tokens, in one process group per layout (TP=1, TP=2 with SP,
PP=2), every case checks against HF PEFT directly (fp32; HF adds the same terms in another order):

* logits of every position within 1e-4, the loss (mean over target tokens) within 1e-5 relative, and the
  gradient of every prefix tensor, gathered to HF's shapes, within 1e-4 of its largest entry;
* greedy generation of three prompts of different lengths, batched (KV cache; without it under SP), equals
  HF PEFT's ``generate`` of each prompt alone.

TP=1 also packs two samples into one row (each must see the prefix) and gets the loss and gradients of the two
rows apart; PP=2 saves each case, and TP=2 loads those files and gets HF's logits. A short job (PP=2, packed,
with the projection) lowers the validation loss and its saved adapter reloads to the same loss.
"""

from __future__ import annotations

import json
import os

import pytest
import torch

from launch.spawn import run_distributed
from tests.hf_models import tiny_llama
from tests.portable import to_numpy, to_torch
from tests.tolerances import FORWARD_REL, GRAD_REL

N, SEQ, GLOBAL_BATCH, MICRO, VOCAB = 5, 16, 4, 1, 256
SHAPES = {"gqa": dict(num_key_value_heads=2), "mqa": dict(num_key_value_heads=1)}
CASES = {  # name: (model shape, projection width or None)
    "gqa": ("gqa", None), "gqa_proj": ("gqa", 24), "mqa": ("mqa", None), "mqa_proj": ("mqa", 24),
}
PROMPTS = [[11, 42, 7, 99, 3], [5, 6, 7, 8, 9, 10, 11, 12, 13], [200, 1, 77]]
NEW_TOKENS = 6


def _hf_model(shape):
    return tiny_llama(0, num_hidden_layers=4, num_attention_heads=4, **SHAPES[shape])


def _batch():
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, VOCAB, (GLOBAL_BATCH, SEQ), generator=g)
    labels = torch.randint(0, VOCAB, (GLOBAL_BATCH, SEQ), generator=g)
    loss_mask = torch.zeros(GLOBAL_BATCH, SEQ)
    for i, n_targets in enumerate([1, 15, 4, 9]):
        loss_mask[i, SEQ - n_targets:] = 1
    position_ids = torch.arange(SEQ).expand(GLOBAL_BATCH, SEQ).clone()
    return dict(tokens=tokens, labels=labels, loss_mask=loss_mask, position_ids=position_ids)


def _hf_reference(shape, width, seed, save_dir):
    """HF PEFT's logits, loss, prefix gradients and greedy completions; and the prefix tensors used (the
    adapter also saved to ``save_dir`` by HF PEFT)."""
    import torch.nn.functional as F
    from peft import PrefixTuningConfig, TaskType, get_peft_model

    config = PrefixTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=N,
                                prefix_projection=width is not None, encoder_hidden_size=width)
    model = get_peft_model(_hf_model(shape), config)
    model.eval()
    encoder = model.prompt_encoder["default"]
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in encoder.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    b = _batch()
    logits = model(input_ids=b["tokens"]).logits.float()
    ce = F.cross_entropy(logits.reshape(-1, VOCAB), b["labels"].reshape(-1), reduction="none")
    loss = (ce * b["loss_mask"].reshape(-1)).sum() / b["loss_mask"].sum()
    loss.backward()
    grads = {k: p.grad.detach().clone() for k, p in encoder.named_parameters()}
    state = {k: v.detach().clone() for k, v in encoder.state_dict().items()}
    model.save_pretrained(save_dir)
    eos = model.config.eos_token_id
    completions = []
    with torch.no_grad():
        for prompt in PROMPTS:
            ids = torch.tensor([prompt])
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS,
                                 do_sample=False, pad_token_id=0)[0, len(prompt):].tolist()
            completions.append(out[:out.index(eos)] if eos in out else out)
    return logits.detach(), loss.item(), grads, state, completions


def _build(hf_dir, tp, pp, sp):
    from framework.checkpoint.hf_import import load_hf_into_gpt
    from framework.models.gpt import build_gpt
    from framework.models.registry import config_from_hf

    model_cfg = config_from_hf(json.loads(open(os.path.join(hf_dir, "config.json")).read()))
    model = build_gpt(model_cfg, tp, pp, sp)
    load_hf_into_gpt(model, hf_dir, model_cfg)
    return model, model_cfg


def _prefixed(hf_dirs, case, tp, pp, sp, state=None):
    from framework.peft.prefix_tuning import apply_prefix_tuning, set_full_state

    shape, width = CASES[case]
    model, model_cfg = _build(hf_dirs[shape], tp, pp, sp)
    apply_prefix_tuning(model, N, prefix_projection=width is not None, encoder_hidden_size=width)
    if state is not None:
        set_full_state(model, state)
    return model, model_cfg


def _peft_cfg(case):
    width = CASES[case][1]
    return {"method": "prefix_tuning", "num_virtual_tokens": N, "prefix_projection": width is not None,
            "encoder_hidden_size": width}


def _packing(hf_dirs, case, state):
    """Two samples packed into one row, then in rows of their own: (loss, n, gradients) of each."""
    from framework.data.batching import collate
    from framework.data.packing import collate_packed
    from framework.data.sample import Sample
    from framework.peft.prefix_tuning import full_state
    from framework.training.optim import wrap_ddp
    from framework.training.step import forward_backward

    a = Sample(list(range(30, 41)), [0] * 4 + [1] * 7)
    b = Sample(list(range(100, 107)), [0] * 2 + [1] * 5)
    out = []
    for batch in (collate([a, b], pad_id=0), collate_packed([[a, b]], pad_id=0, seq_length=20)):
        model, _ = _prefixed(hf_dirs, case, 1, 1, False, state)
        loss, n = forward_backward(wrap_ddp(model), [batch])
        out.append((loss, n, full_state(model, grads=True)))
    return out


def _layout_worker(tp, pp, sp, hf_dirs, states, save_root, load_root):
    """Per case: logits, loss and prefix gradients, greedy completions; TP=1 adds packing; files saved to
    ``save_root`` or loaded from ``load_root`` (our saves in CASE/, HF PEFT's imported in CASE-imported/,
    loaded into a model without the projection)."""
    from megatron.core import parallel_state as ps

    from framework.data.batching import micro_batches
    from framework.inference.generate import GenerationConfig, generate
    from framework.inference.logits import forward_logits
    from framework.peft import prefix_tuning
    from framework.runtime import initialize
    from framework.training.optim import wrap_ddp
    from framework.training.step import forward_backward

    rt = initialize(tp=tp, pp=pp, sp=sp, seed=0)
    out = {}
    for case, state in states.items():
        model, model_cfg = _prefixed(hf_dirs, case, tp, pp, sp, state)
        batch = _batch()
        res = {"logits": forward_logits(model, batch["tokens"])}
        cfg = GenerationConfig(max_new_tokens=NEW_TOKENS, stop_ids=(2,), use_cache=not sp)
        res["completions"] = [c.tokens for c in generate(model, PROMPTS, cfg)]
        if save_root:
            prefix_tuning.save(model, os.path.join(save_root, case), _peft_cfg(case), model_cfg)
        mine = micro_batches(list(range(GLOBAL_BATCH)), ps.get_data_parallel_rank(), rt.dp, MICRO)
        res["loss"], res["n"] = forward_backward(wrap_ddp(model), [{k: v[i] for k, v in batch.items()} for i in mine])
        res["grads"] = prefix_tuning.full_state(model, grads=True)
        if load_root:
            loaded, _ = _prefixed(hf_dirs, case, tp, pp, sp)
            prefix_tuning.load(loaded, os.path.join(load_root, case), model_cfg)
            res["loaded_logits"] = forward_logits(loaded, batch["tokens"])
            table_only, _ = _prefixed(hf_dirs, CASES[case][0], tp, pp, sp)
            prefix_tuning.load(table_only, os.path.join(load_root, f"{case}-imported"), model_cfg)
            res["imported_logits"] = forward_logits(table_only, batch["tokens"])
        if tp == 1 and pp == 1 and case in ("gqa", "gqa_proj"):
            res["packing"] = _packing(hf_dirs, case, state)
            try:
                generate(model, PROMPTS, GenerationConfig(max_new_tokens=1, padding_side="left"))
            except ValueError as e:
                res["left_padding"] = str(e)
        out[case] = res
    return to_numpy(out)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    hf_dirs = {}
    for shape in SHAPES:
        hf_dirs[shape] = str(tmp_path_factory.mktemp(f"prefix_hf_{shape}"))
        _hf_model(shape).save_pretrained(hf_dirs[shape])
    from framework.checkpoint.peft_import import import_peft
    from framework.models.registry import config_from_hf

    hf_saved, saved = tmp_path_factory.mktemp("prefix_hf_peft"), str(tmp_path_factory.mktemp("prefix_saved"))
    refs = {case: _hf_reference(shape, width, 20 + i, hf_saved / case)
            for i, (case, (shape, width)) in enumerate(CASES.items())}
    states = {case: ref[3] for case, ref in refs.items()}
    for case, (shape, _) in CASES.items():  # HF PEFT's directories as our adapters (the table)
        model_cfg = config_from_hf(json.loads(open(os.path.join(hf_dirs[shape], "config.json")).read()))
        import_peft(hf_saved / case, os.path.join(saved, f"{case}-imported"), model_cfg)
    runs = {}
    for name, (world, tp, pp, sp, save_root, load_root) in {
            "tp1": (1, 1, 1, False, None, None), "pp2": (2, 1, 2, False, saved, None),
            "tp2-sp": (2, 2, 1, True, None, saved)}.items():
        runs[name] = to_torch(run_distributed(_layout_worker, world, tp, pp, sp, hf_dirs, states, save_root,
                                              load_root, timeout=400))
    runs["saved"] = saved
    return hf_dirs, refs, runs


def _close_to_hf(res, ref, where):
    hf_logits, hf_loss, hf_grads, _, hf_completions = ref
    torch.testing.assert_close(res["logits"], hf_logits, atol=1e-4, rtol=0, msg=lambda m: f"{where} logits: {m}")
    assert res["n"] == 1 + 15 + 4 + 9
    assert res["loss"] == pytest.approx(hf_loss, rel=1e-5), where
    assert res["grads"].keys() == hf_grads.keys(), (where, sorted(res["grads"]), sorted(hf_grads))
    for k, g in hf_grads.items():
        assert g.abs().max() > 0, f"{where} {k}: HF's gradient is zero, the test would prove nothing"
        torch.testing.assert_close(res["grads"][k], g, rtol=0, atol=1e-4 * g.abs().max().item(),
                                   msg=lambda m: f"{where} grad {k}: {m}")
    assert res["completions"] == hf_completions, where


@pytest.mark.timeout(1500)
@pytest.mark.parametrize("layout", ["tp1", "pp2", "tp2-sp"])
def test_matches_hf_peft(setup, layout):
    """Every rank's logits, loss, prefix gradients (whole, as HF shapes them) and greedy completions equal HF
    PEFT's, for a GQA and a replicated-MQA model, with and without the projection."""
    _, refs, runs = setup
    for rank, result in enumerate(runs[layout]):
        for case, ref in refs.items():
            _close_to_hf(result[case], ref, f"{layout} rank {rank} {case}")


def test_the_prefix_changes_the_model(setup):
    """Without its prefix the model's logits differ from HF PEFT's by far more than the tolerance."""
    hf_dirs, refs, _ = setup
    with torch.no_grad():
        base = _hf_model("gqa")(input_ids=_batch()["tokens"]).logits
    assert (base - refs["gqa"][0]).abs().max() > 0.1


def test_packed_samples_each_see_the_prefix(setup):
    """Two samples packed in one row (block-diagonal mask, positions restarting per sample) give the loss and
    prefix gradients of the two in rows of their own: the prefix columns are visible to every sample."""
    _, _, runs = setup
    for case in ("gqa", "gqa_proj"):
        (ul, un, ug), (pl, pn, pg) = runs["tp1"][0][case]["packing"]
        assert un == pn == 7 + 5
        assert pl == pytest.approx(ul, rel=FORWARD_REL)  # packing reorders the sums: tests/tolerances.py
        for k, ref in ug.items():
            torch.testing.assert_close(pg[k], ref, atol=GRAD_REL * ref.abs().max().item(), rtol=0,
                                       msg=lambda m: f"{case} grad {k}: {m}")


def test_left_padding_is_refused(setup):
    """Left padding would move a row's RoPE angles relative to the (unrotated) prefix keys: refused by name."""
    _, _, runs = setup
    assert "padding_side='left' shifts a row's RoPE angles" in runs["tp1"][0]["gqa"]["left_padding"]


def test_saved_at_pp2_loads_at_tp2(setup):
    """Files saved at PP=2 (the table, and the projection's tensors) load at TP=2 and give HF's logits."""
    _, refs, runs = setup
    for rank, result in enumerate(runs["tp2-sp"]):
        for case, ref in refs.items():
            torch.testing.assert_close(result[case]["loaded_logits"], ref[0], atol=1e-4, rtol=0,
                                       msg=lambda m: f"rank {rank} {case}: {m}")


def test_hf_peft_directories_import(setup):
    """HF PEFT's saved PREFIX_TUNING directories (its prompt_embeddings: the projection's output where it was
    on) import as our adapters, which load at TP=2 into models without the projection and give HF's logits."""
    _, refs, runs = setup
    for rank, result in enumerate(runs["tp2-sp"]):
        for case, ref in refs.items():
            torch.testing.assert_close(result[case]["imported_logits"], ref[0], atol=1e-4, rtol=0,
                                       msg=lambda m: f"rank {rank} {case}: {m}")


def test_exports_load_in_hf_peft(setup, tmp_path):
    """Our adapters saved at PP=2 export to HF PEFT directories that ``PeftModel.from_pretrained`` loads and
    that give HF PEFT's logits (the table exported with prefix_projection off, HF's inference mode)."""
    from peft import PeftModel

    from framework.checkpoint.peft_export import export_peft

    _, refs, runs = setup
    saved = runs["saved"]
    for case, (shape, _) in CASES.items():
        out = tmp_path / case
        export_peft(os.path.join(saved, case), out)
        model = PeftModel.from_pretrained(_hf_model(shape), out).eval()
        with torch.no_grad():
            logits = model(input_ids=_batch()["tokens"]).logits.float()
        torch.testing.assert_close(logits, refs[case][0], atol=1e-4, rtol=0, msg=lambda m: f"{case}: {m}")


# -- the job -----------------------------------------------------------------------------------------------
def _job(cfg):
    from tests.sft_jobs import run_sft

    return run_sft(cfg)


def _evaluate(cfg, adapter_dir):
    from tests.sft_jobs import evaluate_adapter

    return evaluate_adapter(cfg, adapter_dir)


def _compose(overrides):
    from tests.sft_jobs import compose

    return compose(overrides)


@pytest.mark.timeout(500)
def test_short_finetune_pp2_packed(tiny_tokenizer_dir, tmp_path):
    cfg = _compose(["model=tiny_llama", "model.source=random", f"model.tokenizer={tiny_tokenizer_dir}",
                    "data.max_length=64", "trainer.max_steps=4", "trainer.global_batch_size=4",
                    "trainer.micro_batch_size=1", "trainer.eval_samples=4", "trainer.eval_interval=100",
                    "trainer.lr=3e-2", "trainer.warmup_steps=0", "generate.max_new_tokens=2",
                    "peft=prefix_tuning", "peft.num_virtual_tokens=4", "peft.prefix_projection=true",
                    "peft.encoder_hidden_size=32", "parallel.pipeline=2", "data.packing=true",
                    f"output_dir={tmp_path}"])
    losses, before, after, adapter_dir = run_distributed(_job, 2, cfg, timeout=450)[0]
    assert after < before, (before, after)
    for name in ("adapter.safetensors", "prefix_encoder.safetensors", "adapter.yaml"):
        assert os.path.isfile(os.path.join(adapter_dir, name)), name
    reloaded = run_distributed(_evaluate, 2, cfg, adapter_dir, timeout=300)[0]
    assert reloaded == pytest.approx(after, abs=1e-5)


def test_bad_prefix_config_is_refused(tiny_tokenizer_dir):
    from framework.runtime.errors import ConfigError
    from framework.training.job_config import validate

    cfg = _compose(["model=tiny_llama", "model.source=random", f"model.tokenizer={tiny_tokenizer_dir}",
                    "peft=prefix_tuning", "peft.num_virtual_tokens=1000", "data.max_length=64",
                    "peft.init_weights=ones", "peft.encoder_hidden_size=0"])
    with pytest.raises(ConfigError) as e:
        validate(cfg, 1)
    msg = str(e.value)
    assert "peft.num_virtual_tokens=1000 + data.max_length=64 = 1064 positions" in msg
    assert "peft.init_weights='ones'" in msg
    assert "peft.encoder_hidden_size=0" in msg
    windowed = _compose(["model=tiny_llama", "model.source=random", f"model.tokenizer={tiny_tokenizer_dir}",
                         "peft=prefix_tuning", "data.packing=true", "+model.arch.sliding_window=16"])
    with pytest.raises(ConfigError, match="sliding_window=16"):
        validate(windowed, 1)
