"""KV heads replicated over TP ranks (framework/models/kv_replication.py): models with fewer KV heads than TP
ranks -- Falcon-7B style (multi-query, parallel attention/MLP block), StarCoder (gpt_bigcode multi_query,
with a qkv bias) and a Llama with 8 query / 2 KV heads at TP=4 -- against transformers and the single process:

* logits within 1e-4 of the HF model at TP=2 (+SP), TP=2 x PP=2 and, for the Llama, TP=4; greedy generation
  with the KV cache at TP=2 gives transformers' tokens;
* one full fine-tuning step (Adam, gradient clipping) at TP=2/4 updates every weight as TP=1 does (the
  rounding of reordered fp32 sums, tests/tolerances.py),
  with the same gradient norm; the checkpoint saved there loads at TP=1 with identical weights, and TP=1's
  checkpoint loads at the replicated layout;
* LoRA, DoRA and IA3 trained two steps at TP=2/4 equal TP=1 on the losses and the saved adapter (as tight);
* the fine-tuning job from random weights at TP=2, paused and resumed, trains as at TP=1;
* a TP size that neither divides nor is a multiple of the KV heads is refused by key.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from launch.spawn import run_distributed
from tests.family_cases import check_parity, randomized, read_tensors, save_cases
from tests.hf_models import tiny_llama
from tests.tolerances import FORWARD_REL, TRAINED_ATOL

SEQ = 16


def _falcon_7b_style():
    from transformers import FalconConfig, FalconForCausalLM

    torch.manual_seed(0)  # multi_query, parallel_attn, one shared norm: Falcon-7B's layer with 4 heads, 1 KV head
    cfg = FalconConfig(vocab_size=256, hidden_size=64, max_position_embeddings=64, num_hidden_layers=2,
                       num_attention_heads=4)
    assert cfg.multi_query and cfg.parallel_attn and not cfg.new_decoder_architecture
    return randomized(FalconForCausalLM(cfg), 0)


def _starcoder():
    from transformers import GPTBigCodeConfig, GPTBigCodeForCausalLM

    torch.manual_seed(1)
    cfg = GPTBigCodeConfig(vocab_size=256, n_embd=64, n_positions=64, n_layer=2, n_head=4, multi_query=True)
    return randomized(GPTBigCodeForCausalLM(cfg), 1)


def _llama_8x2():
    return randomized(tiny_llama(2, num_attention_heads=8, num_key_value_heads=2, num_hidden_layers=2), 2)


#: case name -> the replicated TP size it is trained at
TRAIN_TP = {"falcon_mqa": 2, "starcoder_mqa": 2, "llama_8x2": 4}


@pytest.fixture(scope="module")
def cases(tmp_path_factory):
    models = {"falcon_mqa": _falcon_7b_style(), "starcoder_mqa": _starcoder(), "llama_8x2": _llama_8x2()}
    return save_cases(tmp_path_factory.mktemp("kv_replication"), models)


# -- logits -------------------------------------------------------------------------------------------------
@pytest.mark.timeout(300)
@pytest.mark.parametrize("tp,pp,sp,names", [(2, 1, True, ("falcon_mqa", "starcoder_mqa", "llama_8x2")),
                                            (2, 2, False, ("falcon_mqa", "starcoder_mqa")),
                                            (4, 1, False, ("llama_8x2",))], ids=["tp2-sp", "tp2-pp2", "tp4"])
def test_logits_match_transformers(cases, tp, pp, sp, names):
    check_parity([c for c in cases if c[0] in names], tp, pp, sp)


def _generate_worker(tp: int, hf_dir: str, prompts, n_new: int):
    from framework.checkpoint.hf_import import load_hf_into_gpt
    from framework.inference.generate import GenerationConfig, generate
    from framework.models.registry import build_model, config_from_hf
    from framework.runtime.distributed import initialize

    initialize(tp=tp)
    cfg = config_from_hf(json.loads(Path(hf_dir, "config.json").read_text()))
    model = build_model(cfg, tp=tp)
    load_hf_into_gpt(model, hf_dir, cfg)
    model.eval()
    return [c.tokens for c in generate(model, prompts, GenerationConfig(max_new_tokens=n_new))]


@pytest.mark.timeout(300)
def test_kv_cache_greedy_generation_at_tp2_equals_transformers(cases):
    """Generation with megatron's KV cache (one KV head per rank, the replicated copy) at TP=2: HF's tokens."""
    from transformers import AutoModelForCausalLM

    from tests.generate_cases import PROMPTS, hf_greedy

    for name in ("falcon_mqa", "starcoder_mqa"):
        _, hf_dir, _, _ = next(c for c in cases if c[0] == name)
        expected = hf_greedy(AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval(), PROMPTS, 8)
        got = run_distributed(_generate_worker, 2, 2, hf_dir, PROMPTS, 8, timeout=250)
        assert got[0] == got[1] == expected, name


# -- training -----------------------------------------------------------------------------------------------
def _micro_batches(vocab: int, seed: int, n: int = 2) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        tokens = torch.randint(0, vocab, (1, SEQ + 1), generator=g)
        out.append({"tokens": tokens[:, :-1].contiguous(), "labels": tokens[:, 1:].contiguous(),
                    "loss_mask": torch.ones(1, SEQ), "position_ids": torch.arange(SEQ)[None]})
    return out


def _trainer():
    from omegaconf import OmegaConf

    tr = OmegaConf.load(Path(__file__).parents[2] / "conf/trainer/default.yaml")
    tr.max_steps, tr.warmup_steps, tr.lr, tr.clip_grad = 4, 0, 1e-3, 1.0
    return tr


def _train_worker(tp: int, hf_dir: str, out: str, steps: int, peft: str | None = None, start: str | None = None,
                  distributed_optimizer: bool = False):
    """Load the HF model at TP=``tp`` (DP: the rest of the world), train ``steps`` steps (every weight, or the
    PEFT method ``peft`` starting from the adapter in directory ``start``), save the weights (our checkpoint +
    an HF export) or the adapter. Returns [loss, grad norm] of every step, in order."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps
    from omegaconf import OmegaConf

    from framework.checkpoint.adapter import load_adapter, save_adapter
    from framework.checkpoint.ckpt_format import save_checkpoint
    from framework.checkpoint.hf_export import export_hf
    from framework.checkpoint.hf_import import load_hf_into_gpt
    from framework.models.registry import build_model, config_from_hf
    from framework.peft.registry import apply_peft
    from framework.runtime.distributed import initialize
    from framework.training.optim import build_optimizer, wrap_ddp
    from framework.training.step import train_step

    initialize(tp=tp, seed=0)
    cfg = config_from_hf(json.loads(Path(hf_dir, "config.json").read_text()))
    model = build_model(cfg, tp=tp)
    load_hf_into_gpt(model, hf_dir, cfg)
    if peft:
        apply_peft(model, OmegaConf.create(PEFT[peft]), cfg)
        load_adapter(model, start, cfg)  # the same start at every layout, B non-zero (A's gradient counts)
    ddp = wrap_ddp(model, use_distributed_optimizer=distributed_optimizer)
    opt, sched = build_optimizer(ddp, _trainer())
    dp, dp_rank = dist.get_world_size() // tp, ps.get_data_parallel_rank()
    batches = _micro_batches(cfg.vocab_size, seed=0)[dp_rank::dp]  # this DP rank's share of the global batch
    history = []
    for _ in range(steps):
        r = train_step(ddp, opt, sched, batches)  # the same batch every step: its loss falls
        history += [r.loss, r.grad_norm]
    if peft:
        save_adapter(model, Path(out, "adapter"), {}, cfg)
    else:
        save_checkpoint(model, Path(out, "ckpt"), cfg)
        export_hf(model, Path(out, "hf"), cfg)
    return history


_LORA = {"rank": 4, "alpha": 8, "dropout": 0.0, "rslora": False, "targets": ["qkv", "proj", "fc1", "fc2"]}
PEFT = {"lora": {"method": "lora", **_LORA}, "dora": {"method": "dora", **_LORA},
        "ia3": {"method": "ia3", "targets": ["k", "v", "fc2"]}}


def _random_adapter_worker(hf_dir: str, out: str, peft: str):
    """An adapter of method ``peft`` written at TP=1, every tensor away from its initial value (B non-zero,
    IA3 vectors and DoRA magnitudes off their starting values)."""
    from omegaconf import OmegaConf

    from framework.checkpoint.adapter import save_adapter
    from framework.models.registry import build_model, config_from_hf
    from framework.peft.registry import apply_peft
    from framework.runtime.distributed import initialize

    initialize(seed=0)
    cfg = config_from_hf(json.loads(Path(hf_dir, "config.json").read_text()))
    model = build_model(cfg)
    apply_peft(model, OmegaConf.create(PEFT[peft]), cfg)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in (p for p in model.parameters() if p.requires_grad):
            noise = torch.randn(p.shape, generator=g)
            p.copy_(noise * 0.05 if torch.all(p == 0) else p * (1 + 0.1 * noise))
    save_adapter(model, out, {}, cfg)
    return True


def _reload_worker(tp: int, hf_dir: str, ckpt: str, out: str):
    """Our checkpoint loaded at TP=``tp`` and exported to HF."""
    from framework.checkpoint.ckpt_format import load_checkpoint_into
    from framework.checkpoint.hf_export import export_hf
    from framework.models.registry import build_model, config_from_hf
    from framework.runtime.distributed import initialize

    initialize(tp=tp, seed=1)  # another seed: nothing may survive from the random initialisation
    cfg = config_from_hf(json.loads(Path(hf_dir, "config.json").read_text()))
    model = build_model(cfg, tp=tp)
    load_checkpoint_into(model, ckpt, cfg)
    export_hf(model, out, cfg)
    return True


def _assert_close(got: dict, ref: dict, what: str, atol: float = TRAINED_ATOL):
    assert sorted(got) == sorted(ref), what
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], atol=atol, rtol=0, msg=lambda m: f"{what}, {k}: {m}")


@pytest.mark.timeout(600)
@pytest.mark.parametrize("name,dp", [(name, 1) for name in TRAIN_TP] + [("falcon_mqa", 2)],
                         ids=[*TRAIN_TP, "falcon_mqa-dp2-distributed-optimizer"])
def test_full_finetuning_step_equals_tp1_and_checkpoint_reloads_at_tp1(cases, name, dp, tmp_path):
    """With dp=2: TP=2 x DP=2 and megatron's distributed optimizer (Adam state sharded over DP)."""
    _, hf_dir, _, _ = next(c for c in cases if c[0] == name)
    tp = TRAIN_TP[name]
    ref = run_distributed(_train_worker, 1, 1, hf_dir, str(tmp_path / "tp1"), 1, timeout=200)[0]
    got = run_distributed(_train_worker, tp * dp, tp, hf_dir, str(tmp_path / "tpn"), 1, None, None, dp > 1,
                          timeout=250)
    for rank_history in got:
        assert rank_history == pytest.approx(ref, rel=FORWARD_REL)  # loss and gradient norm (clipped at 1.0)
    start, trained_ref, trained = (read_tensors(d) for d in (hf_dir, tmp_path / "tp1/hf", tmp_path / "tpn/hf"))
    _assert_close(trained, trained_ref, f"{name}: TP={tp} step vs TP=1 step")
    for k in start:
        assert not torch.equal(trained[k], start[k]), f"{name}: {k} was not trained"

    # the checkpoint written at TP=tp, loaded at TP=1: the very weights TP=tp held
    run_distributed(_reload_worker, 1, 1, hf_dir, str(tmp_path / "tpn/ckpt"), str(tmp_path / "back1"), timeout=200)
    _assert_close(read_tensors(tmp_path / "back1"), trained, f"{name}: TP={tp} checkpoint at TP=1", atol=0)
    # TP=1's checkpoint loaded at the replicated layout
    run_distributed(_reload_worker, tp, tp, hf_dir, str(tmp_path / "tp1/ckpt"), str(tmp_path / "backn"), timeout=200)
    _assert_close(read_tensors(tmp_path / "backn"), trained_ref, f"{name}: TP=1 checkpoint at TP={tp}", atol=0)


@pytest.mark.timeout(600)
@pytest.mark.parametrize("peft,name", [("lora", "falcon_mqa"), ("lora", "llama_8x2"), ("dora", "starcoder_mqa"),
                                       ("ia3", "falcon_mqa"), ("ia3", "llama_8x2")])
def test_peft_two_steps_equal_tp1(cases, peft, name, tmp_path):
    """LoRA (B's K/V rows), DoRA (also the magnitude's) and IA3 (l_k, l_v; fused in Falcon's query_key_value,
    separate k_proj / v_proj in Llama) tie their copies: two steps at the replicated layout equal TP=1."""
    from safetensors.torch import load_file

    _, hf_dir, _, _ = next(c for c in cases if c[0] == name)
    tp = TRAIN_TP[name]
    start = str(tmp_path / "start")
    run_distributed(_random_adapter_worker, 1, hf_dir, start, peft, timeout=200)
    ref = run_distributed(_train_worker, 1, 1, hf_dir, str(tmp_path / "tp1"), 2, peft, start, timeout=200)[0]
    got = run_distributed(_train_worker, tp, tp, hf_dir, str(tmp_path / "tpn"), 2, peft, start, timeout=250)
    for rank_history in got:
        assert rank_history == pytest.approx(ref, rel=FORWARD_REL)  # losses and gradient norms
    assert ref[2] < ref[0]  # the second step's loss fell
    a, b, s = (load_file(str(tmp_path / d / "adapter.safetensors")) for d in ("tp1/adapter", "tpn/adapter", "start"))
    _assert_close(b, a, f"{name}: {peft} adapter at TP={tp} vs TP=1")
    for k in s:
        assert not torch.equal(a[k], s[k]), f"{name}: {k} was not trained"


def _job(cfg, runs: int):
    """The fine-tuning job run ``runs`` times in a row (each continues from the last checkpoint): the train
    losses (all steps), each run's status, the parameter count."""
    import os

    from framework.runtime.logs import setup_logging
    from framework.training.finetune import run

    os.chdir(Path(__file__).parents[2])
    setup_logging("WARNING")
    results = [run(cfg) for _ in range(runs)]
    return results[-1].train_losses, [r.status for r in results], results[-1].total_params


@pytest.mark.timeout(600)
def test_job_multi_query_random_start_tp2_paused_and_resumed_equals_tp1(tiny_tokenizer_dir, tmp_path):
    """The fine-tuning job on a multi-query model (model.source=random: the random weights are the same at
    every layout) at TP=2, paused after two steps (weights and Adam state checkpointed through the true KV
    head's blocks) and resumed, trains as the uninterrupted TP=1 job."""
    from tests.sft_jobs import compose

    def cfg(out, *extra):
        return compose(["model=tiny_llama", f"model.tokenizer={tiny_tokenizer_dir}", "model.arch.num_query_groups=1",
                        "peft=none", "data.max_length=64", "trainer.max_steps=3", "trainer.global_batch_size=4",
                        "trainer.micro_batch_size=1", "trainer.eval_samples=4", "trainer.eval_interval=100",
                        "generate.max_new_tokens=0", f"output_dir={out}", *extra])

    ref, _, ref_params = run_distributed(_job, 1, cfg(tmp_path / "tp1"), 1, timeout=280)[0]
    got, status, params = run_distributed(_job, 2, cfg(tmp_path / "tp2", "parallel.tensor=2",
                                                       "trainer.steps_per_run=2"), 2, timeout=280)[0]
    assert status == ["paused", "completed"]
    assert got == pytest.approx(ref, rel=FORWARD_REL) and len(ref) == 3
    assert params == ref_params  # the KV head's copies are not counted as parameters


# -- refused layouts ----------------------------------------------------------------------------------------
def test_tp_neither_dividing_nor_multiple_of_kv_heads_is_refused_by_key(tiny_tokenizer_dir):
    from framework.runtime.errors import ConfigError
    from framework.training.job_config import validate
    from framework.models import kv_replication
    from framework.models.config import ModelConfig
    from tests.sft_jobs import compose

    arch = "model.arch."
    cfg = compose(["model=tiny_llama", f"model.tokenizer={tiny_tokenizer_dir}", f"{arch}num_attention_heads=12",
                   f"{arch}num_query_groups=4", f"{arch}hidden_size=96", f"{arch}kv_channels=8", "parallel.tensor=6"])
    with pytest.raises(ConfigError, match=r"parallel\.tensor=6 is neither a divisor nor a multiple of the model's 4 "
                                          r"KV heads \(model\.arch\.num_query_groups=4\).*sizes that work: "
                                          r"\[1, 2, 4\]"):
        validate(cfg, world_size=6)
    model = ModelConfig(hidden_size=96, num_attention_heads=12, num_query_groups=4, kv_channels=8)
    with pytest.raises(ConfigError, match=r"parallel\.tensor=6 .*model\.arch\.num_query_groups=4"):
        kv_replication.built_groups(model, 6)  # what build_gpt asks for megatron's TransformerConfig
    assert kv_replication.built_groups(model, 12) == 12 and kv_replication.built_groups(model, 2) == 4


def test_rows_replicate_and_dereplicate_against_repeat_interleave():
    """The rank shards of replicated rows are megatron's ordinary shards of the model whose KV heads are
    repeated in place (HF's repeat_kv), and de-replication gives back the true tensor."""
    from framework.models.fused_layout import fuse_qkv
    from framework.models.kv_replication import dereplicate_rows, replicate_rows

    n, g, d, h, tp = 8, 2, 3, 5, 4
    q, k, v = torch.randn(n * d, h), torch.randn(g * d, h), torch.randn(g * d, h)
    full = fuse_qkv(q, k, v, n, g)
    c = tp // g
    rep = lambda t: t.reshape(g, d, h).repeat_interleave(c, dim=0).reshape(-1, h)  # noqa: E731
    expected = fuse_qkv(q, rep(k), rep(v), n, tp).chunk(tp)
    shards = [replicate_rows(full, n, g, tp, r) for r in range(tp)]
    for r in range(tp):
        assert torch.equal(shards[r], expected[r])
    assert torch.equal(torch.cat(dereplicate_rows(shards, n, g)), full)
    kv_shards = [replicate_rows(k, n, g, tp, r, kv_only=True) for r in range(tp)]
    assert torch.equal(torch.cat(dereplicate_rows(kv_shards, n, g, kv_only=True)), k)
    shards[1] = shards[1].clone()
    shards[1][-1, 0] += 1  # a copy out of step is an error, never a silent pick
    with pytest.raises(ValueError, match="KV head 0 differ"):
        dereplicate_rows(shards, n, g)
