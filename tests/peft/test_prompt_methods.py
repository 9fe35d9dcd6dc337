"""Prompt tuning and P-tuning against Hugging Face PEFT, at every layout, with packing, and as a job.

One tiny random HF Llama (4 layers, GQA 4:2) is both Hugging Face's model and ours (through the HF
import). HF PEFT's ``PromptTuningConfig`` / ``PromptEncoderConfig`` (MLP and LSTM encoders) wrap it; its
prompt weights are set to seeded non-zero values and copied into our prompt module by name (our modules use
HF PEFT's parameter names). On one batch whose rows carry very different numbers of target tokens:

* TP=1: our logits of the real positions equal HF's (1e-4), and the loss (mean over target tokens, computed
  here from HF's logits with the virtual positions dropped, as HF PEFT's -100 labels do) and the gradients
  of every prompt parameter equal HF's (fp32: 1e-4 of the gradient's scale).
* TP=2 with SP (n + s = 21 is odd: the extension pads to 22) and PP=2: logits, loss and gradients equal our
  single-process run (tests/tolerances.py: FORWARD_REL for losses and logits, GRAD_REL of each gradient's
  largest entry, as tests/models/test_model_parallel.py).
* Packing: two samples packed into one row give the same loss and prompt gradients as the two alone.
* Export: P-tuning's saved table loads into a prompt-tuning model and gives the P-tuning model's logits.
* Job: a short fine-tune of each method reduces the validation loss, and the saved adapter reloads to the
  same validation loss.
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

N_VIRTUAL, SEQ, GLOBAL_BATCH, MICRO = 5, 16, 4, 1
VOCAB = 256
METHODS = {
    "prompt_tuning": dict(method="prompt_tuning"),
    "ptuning_mlp": dict(method="ptuning", encoder_reparameterization_type="MLP", encoder_hidden_size=48),
    "ptuning_lstm": dict(method="ptuning", encoder_reparameterization_type="LSTM", encoder_hidden_size=24,
                         encoder_num_layers=2),
}


def _batch():
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, VOCAB, (GLOBAL_BATCH, SEQ), generator=g)
    labels = torch.randint(0, VOCAB, (GLOBAL_BATCH, SEQ), generator=g)
    loss_mask = torch.zeros(GLOBAL_BATCH, SEQ)
    for i, n_targets in enumerate([1, 15, 4, 9]):
        loss_mask[i, SEQ - n_targets:] = 1
    position_ids = torch.arange(SEQ).expand(GLOBAL_BATCH, SEQ).clone()
    return dict(tokens=tokens, labels=labels, loss_mask=loss_mask, position_ids=position_ids)


def _hf_peft_config(spec):
    from peft import PromptEncoderConfig, PromptTuningConfig, TaskType

    if spec["method"] == "prompt_tuning":
        return PromptTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=N_VIRTUAL)
    return PromptEncoderConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=N_VIRTUAL,
                               encoder_reparameterization_type=spec["encoder_reparameterization_type"],
                               encoder_hidden_size=spec["encoder_hidden_size"],
                               encoder_num_layers=spec.get("encoder_num_layers", 2), encoder_dropout=0.0)


def _hf_reference(spec, seed):
    """HF PEFT's logits of the real positions, loss and prompt gradients; and the prompt weights used."""
    import torch.nn.functional as F
    from peft import get_peft_model

    model = get_peft_model(tiny_llama(0, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2),
                           _hf_peft_config(spec))
    model.eval()
    encoder = model.prompt_encoder["default"]
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in encoder.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    b = _batch()
    logits = model(input_ids=b["tokens"]).logits.float()
    assert logits.shape == (GLOBAL_BATCH, N_VIRTUAL + SEQ, VOCAB)
    real = logits[:, N_VIRTUAL:]
    ce = F.cross_entropy(real.reshape(-1, VOCAB), b["labels"].reshape(-1), reduction="none")
    loss = (ce * b["loss_mask"].reshape(-1)).sum() / b["loss_mask"].sum()
    loss.backward()
    grads = {k: p.grad.detach().clone() for k, p in encoder.named_parameters()}
    state = {k: v.detach().clone() for k, v in encoder.state_dict().items()}
    return real.detach(), loss.item(), grads, state


def _apply(model, spec):
    from framework.peft.p_tuning import apply_p_tuning
    from framework.peft.prompt_tuning import apply_prompt_tuning

    if spec["method"] == "prompt_tuning":
        return apply_prompt_tuning(model, N_VIRTUAL)
    return apply_p_tuning(model, N_VIRTUAL, spec["encoder_reparameterization_type"], spec["encoder_hidden_size"],
                          spec.get("encoder_num_layers", 2))


def _build(hf_dir, tp, pp, sp):
    from framework.checkpoint.hf_import import load_hf_into_gpt
    from framework.models.gpt import build_gpt
    from framework.models.registry import config_from_hf

    model_cfg = config_from_hf(json.loads(open(os.path.join(hf_dir, "config.json")).read()))
    model = build_gpt(model_cfg, tp, pp, sp)
    load_hf_into_gpt(model, hf_dir, model_cfg)
    return model, model_cfg


def _layout_worker(tp, pp, sp, hf_dir, cases):
    """Per method: logits (forward_logits), then loss and prompt gradients through megatron's schedule."""
    from megatron.core import parallel_state as ps

    from framework.data.batching import micro_batches
    from framework.inference.logits import forward_logits
    from framework.peft.virtual_tokens import prompt_source
    from framework.runtime import initialize
    from framework.training.optim import wrap_ddp
    from framework.training.step import forward_backward

    rt = initialize(tp=tp, pp=pp, sp=sp, seed=0)
    out = {}
    for name, spec, state in cases:
        model, _ = _build(hf_dir, tp, pp, sp)
        _apply(model, spec)
        src = prompt_source(model)
        if src is not None:
            src.load_state_dict(state)
        batch = _batch()
        logits = forward_logits(model, batch["tokens"])
        ddp = wrap_ddp(model)
        mine = micro_batches(list(range(GLOBAL_BATCH)), ps.get_data_parallel_rank(), rt.dp, MICRO)
        loss, n = forward_backward(ddp, [{k: v[idx] for k, v in batch.items()} for idx in mine])
        grads = None if src is None else {k: p.main_grad.detach().clone() for k, p in src.named_parameters()}
        out[name] = (logits if rt.rank == 0 else None, loss, n, grads)
    return to_numpy(out)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    hf_dir = tmp_path_factory.mktemp("prompt_hf")
    tiny_llama(0, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2).save_pretrained(hf_dir)
    refs = {name: _hf_reference(spec, seed=10 + i) for i, (name, spec) in enumerate(METHODS.items())}
    cases = [(name, spec, refs[name][3]) for name, spec in METHODS.items()]
    single = to_torch(run_distributed(_layout_worker, 1, 1, 1, False, str(hf_dir), cases, timeout=250)[0])
    return str(hf_dir), refs, cases, single


@pytest.mark.timeout(300)
def test_matches_hf_peft(setup):
    """TP=1: logits, loss and every prompt-parameter gradient equal HF PEFT's (fp32)."""
    _, refs, _, single = setup
    for name, (hf_logits, hf_loss, hf_grads, _) in refs.items():
        logits, loss, n, grads = single[name]
        assert n == 1 + 15 + 4 + 9
        torch.testing.assert_close(logits, hf_logits, atol=1e-4, rtol=0, msg=lambda m: f"{name} logits: {m}")
        assert loss == pytest.approx(hf_loss, rel=1e-5), name
        assert grads.keys() == hf_grads.keys(), (name, sorted(grads), sorted(hf_grads))
        for k, ref in hf_grads.items():
            assert ref.abs().max() > 0, f"{name} {k}: HF's gradient is zero, the test would prove nothing"
            torch.testing.assert_close(grads[k], ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item(),
                                       msg=lambda m: f"{name} grad {k}: {m}")


@pytest.mark.timeout(300)
@pytest.mark.parametrize("tp,pp,sp", [(2, 1, True), (1, 2, False)], ids=["tp2-sp", "pp2"])
def test_layout_matches_single_process(setup, tp, pp, sp):
    hf_dir, _, cases, single = setup
    results = to_torch(run_distributed(_layout_worker, tp * pp, tp, pp, sp, hf_dir, cases, timeout=280))
    for name in METHODS:
        ref_logits, ref_loss, ref_n, ref_grads = single[name]
        for rank, res in enumerate(results):
            logits, loss, n, grads = res[name]
            assert n == ref_n and loss == pytest.approx(ref_loss, rel=FORWARD_REL), (name, rank)
            if logits is not None:
                # a logit sums 64 normed activations (~1) times output weights (~0.02 each): terms of scale ~1
                torch.testing.assert_close(logits, ref_logits, atol=FORWARD_REL * 1.0, rtol=0)
            if grads is not None:  # ranks of the first stage hold the prompt
                for k, ref in ref_grads.items():
                    torch.testing.assert_close(grads[k], ref, atol=GRAD_REL * ref.abs().max().item(), rtol=0,
                                               msg=lambda m: f"{name} rank {rank} grad {k}: {m}")
        first_stage = [r[name][3] is not None for r in results]
        assert first_stage == ([True, True] if tp == 2 else [True, False])


# -- packing -----------------------------------------------------------------------------------------------
def _packing_worker(hf_dir, state):
    from framework.data.batching import collate
    from framework.data.packing import collate_packed
    from framework.data.sample import Sample
    from framework.peft.virtual_tokens import prompt_source
    from framework.runtime import initialize
    from framework.training.optim import wrap_ddp
    from framework.training.step import forward_backward

    initialize(seed=0)
    a = Sample(list(range(30, 41)), [0] * 4 + [1] * 7)
    b = Sample(list(range(100, 107)), [0] * 2 + [1] * 5)
    results = []
    for batch in (collate([a, b], pad_id=0), collate_packed([[a, b]], pad_id=0, seq_length=20)):
        model, _ = _build(hf_dir, 1, 1, False)
        _apply(model, METHODS["ptuning_mlp"])
        src = prompt_source(model)
        src.load_state_dict(state)
        loss, n = forward_backward(wrap_ddp(model), [batch])
        results.append((loss, n, {k: p.main_grad.clone() for k, p in src.named_parameters()}))
    return to_numpy(results)


@pytest.mark.timeout(200)
def test_packed_rows_see_the_virtual_tokens_as_separate_samples(setup):
    """A row packing two samples (block-diagonal mask, positions restarting per sample; the extension lets
    every sample see the virtual tokens at positions 0..n-1 and shifts its own by n) gives the loss and
    prompt gradients of the two samples in rows of their own."""
    hf_dir, refs, _, _ = setup
    (ul, un, ug), (pl, pn, pg) = to_torch(run_distributed(_packing_worker, 1, hf_dir, refs["ptuning_mlp"][3],
                                                          timeout=180)[0])
    assert un == pn == 7 + 5
    assert pl == pytest.approx(ul, rel=FORWARD_REL)  # packing reorders the sums: tests/tolerances.py
    for k, ref in ug.items():
        torch.testing.assert_close(pg[k], ref, atol=GRAD_REL * ref.abs().max().item(), rtol=0,
                                   msg=lambda m: f"grad {k}: {m}")


def test_extend_batch_by_hand():
    from framework.peft.virtual_tokens import extend_batch

    batch = dict(tokens=torch.tensor([[7, 8, 9]]), labels=torch.tensor([[8, 9, 4]]),
                 loss_mask=torch.tensor([[0.0, 1.0, 1.0]]), position_ids=torch.tensor([[0, 1, 0]]),
                 attention_mask=torch.tensor([[[[False, True, True], [False, False, True], [True, True, False]]]]))
    out = extend_batch(batch, 2, multiple=3)  # 2 + 3 = 5 -> padded to 6
    assert out["tokens"].tolist() == [[0, 0, 7, 8, 9, 0]]
    assert out["labels"].tolist() == [[0, 0, 8, 9, 4, 0]]
    assert out["loss_mask"].tolist() == [[0, 0, 0, 1, 1, 0]]
    assert out["position_ids"].tolist() == [[0, 1, 2, 3, 2, 3]]
    allowed = (~out["attention_mask"][0, 0]).int().tolist()
    assert allowed == [[1, 0, 0, 0, 0, 0],
                       [1, 1, 0, 0, 0, 0],
                       [1, 1, 1, 0, 0, 0],
                       [1, 1, 1, 1, 0, 0],
                       [1, 1, 0, 0, 1, 0],   # the second packed sample: the prefix and itself
                       [1, 1, 0, 0, 0, 1]]   # padding: the prefix and itself
    assert "attention_mask" not in extend_batch({k: v for k, v in batch.items() if k != "attention_mask"}, 2)


# -- initialisation ----------------------------------------------------------------------------------------
def _init_worker(hf_dir, tp):
    from framework.peft.prompt_tuning import apply_prompt_tuning
    from framework.runtime import initialize

    initialize(tp=tp, seed=0)
    tables = {}
    for init, ids in (("text", [5, 9, 200]), ("vocab", None), ("random", None)):
        model, _ = _build(hf_dir, tp, 1, False)
        tables[init] = apply_prompt_tuning(model, N_VIRTUAL, init=init, init_text_ids=ids, seed=7).prompt().detach()
    return to_numpy(tables)


@pytest.mark.timeout(200)
def test_initialisation_from_the_vocabulary(setup):
    """init=text: the word embeddings of the text's tokens, repeated to n (HF PEFT's TEXT), read across the
    vocabulary-parallel shards at TP=2; init=vocab: rows of the embedding table (HF's SAMPLE_VOCAB); every
    init gives the same table at TP=1 and TP=2."""
    hf_dir = setup[0]
    emb = tiny_llama(0, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2).model.embed_tokens.weight
    tp1 = to_torch(run_distributed(_init_worker, 1, hf_dir, 1, timeout=150)[0])
    tp2 = to_torch(run_distributed(_init_worker, 2, hf_dir, 2, timeout=150))
    torch.testing.assert_close(tp1["text"], emb[[5, 9, 200, 5, 9]].detach(), atol=0, rtol=0)
    for row in tp1["vocab"]:
        assert (emb.detach() == row).all(dim=1).any(), "a vocab-initialised row is not a row of the embedding table"
    for rank in tp2:
        for init in ("text", "vocab", "random"):
            torch.testing.assert_close(rank[init], tp1[init], atol=0, rtol=0)
    assert not torch.equal(tp1["random"], tp1["vocab"])


# -- export ------------------------------------------------------------------------------------------------
def _export_worker(hf_dir, state, out_dir):
    from framework.inference.logits import forward_logits
    from framework.peft import p_tuning, prompt_tuning
    from framework.peft.virtual_tokens import VirtualTokenError, prompt_source
    from framework.runtime import initialize

    initialize(seed=0)
    tokens = _batch()["tokens"]
    model, model_cfg = _build(hf_dir, 1, 1, False)
    _apply(model, METHODS["ptuning_lstm"])
    prompt_source(model).load_state_dict(state)
    expected = forward_logits(model, tokens)
    p_tuning.save(model, out_dir, {"method": "ptuning", "num_virtual_tokens": N_VIRTUAL}, model_cfg)

    table_model, _ = _build(hf_dir, 1, 1, False)
    prompt_tuning.apply_prompt_tuning(table_model, N_VIRTUAL)
    prompt_tuning.load(table_model, out_dir, model_cfg)
    from_table = forward_logits(table_model, tokens)

    again, _ = _build(hf_dir, 1, 1, False)
    _apply(again, dict(METHODS["ptuning_lstm"]))
    p_tuning.load(again, out_dir, model_cfg)
    reloaded = forward_logits(again, tokens)

    errors = []
    os.remove(os.path.join(out_dir, p_tuning.ENCODER_FILE))
    try:
        p_tuning.load(again, out_dir, model_cfg)
    except VirtualTokenError as e:
        errors.append(str(e))
    wrong_n, _ = _build(hf_dir, 1, 1, False)
    prompt_tuning.apply_prompt_tuning(wrong_n, N_VIRTUAL + 1)
    try:
        prompt_tuning.load(wrong_n, out_dir, model_cfg)
    except VirtualTokenError as e:
        errors.append(str(e))
    return to_numpy((expected, from_table, reloaded, errors))


@pytest.mark.timeout(200)
def test_ptuning_exports_a_plain_prompt_table(setup, tmp_path):
    """The saved P-tuning adapter: its table alone (a prompt-tuning model, no encoder) gives the P-tuning
    model's logits; with the encoder file, a P-tuning model reloads it; without it, or with another n, the
    load is refused naming the problem."""
    hf_dir, refs, _, _ = setup
    expected, from_table, reloaded, errors = to_torch(run_distributed(
        _export_worker, 1, hf_dir, refs["ptuning_lstm"][3], str(tmp_path / "ptuning"), timeout=180)[0])
    torch.testing.assert_close(from_table, expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(reloaded, expected, atol=0, rtol=0)
    assert "holds only the exported prompt table" in errors[0]
    assert "prompt_embeddings has shape (5, 64), the model expects (6, 64)" in errors[1]


# -- the job -----------------------------------------------------------------------------------------------
def _compose(overrides):
    from tests.sft_jobs import compose

    return compose(overrides)


def _job(cfg):
    from tests.sft_jobs import run_sft

    return run_sft(cfg)


def _evaluate(cfg, adapter_dir):
    from tests.sft_jobs import evaluate_adapter

    return evaluate_adapter(cfg, adapter_dir)


@pytest.mark.timeout(500)
@pytest.mark.parametrize("peft,world,extra", [
    (["peft=prompt_tuning", "peft.init=text", "peft.init_text='def solve(x): return'"], 1, []),
    (["peft=ptuning", "peft.encoder_hidden_size=32"], 2, ["parallel.pipeline=2", "data.packing=true"]),
], ids=["prompt_tuning", "ptuning-pp2-packed"])
def test_short_finetune_reduces_validation_loss(tiny_tokenizer_dir, tmp_path, peft, world, extra):
    cfg = _compose(["model=tiny_llama", "model.source=random", f"model.tokenizer={tiny_tokenizer_dir}",
                    "data.max_length=64", "trainer.max_steps=4", "trainer.global_batch_size=4",
                    "trainer.micro_batch_size=1", "trainer.eval_samples=4", "trainer.eval_interval=100",
                    "trainer.lr=3e-2", "trainer.warmup_steps=0", "generate.max_new_tokens=2", "peft.num_virtual_tokens=4",
                    f"output_dir={tmp_path}", *peft, *extra])
    losses, before, after, adapter_dir = run_distributed(_job, world, cfg, timeout=450)[0]
    assert after < before, (before, after)
    assert os.path.isfile(os.path.join(adapter_dir, "adapter.safetensors"))
    reloaded = run_distributed(_evaluate, world, cfg, adapter_dir, timeout=300)[0]
    assert reloaded == pytest.approx(after, abs=1e-5)


def test_bad_prompt_config_is_refused(tiny_tokenizer_dir):
    from framework.runtime.errors import ConfigError
    from framework.training.job_config import validate

    cfg = _compose(["model=tiny_llama", "model.source=random", f"model.tokenizer={tiny_tokenizer_dir}",
                    "peft=ptuning", "peft.num_virtual_tokens=1000", "data.max_length=64",
                    "peft.encoder_reparameterization_type=GRU"])
    with pytest.raises(ConfigError) as e:
        validate(cfg, 1)
    msg = str(e.value)
    assert "peft.num_virtual_tokens=1000 + data.max_length=64 need up to 1064 positions" in msg
    assert "peft.encoder_reparameterization_type='GRU' is not one of ['MLP', 'LSTM']" in msg
    cfg = _compose(["model=tiny_llama", "model.source=random", f"model.tokenizer={tiny_tokenizer_dir}",
                    "peft=prompt_tuning", "peft.init=text"])
    with pytest.raises(ConfigError, match="peft.init=text needs peft.init_text"):
        validate(cfg, 1)
