"""Preference tuning (issue 8): DPO, IPO, robust and conservative DPO and the SFT term against TRL 1.16.

Parity. One tiny random HF Llama and a fixed batch of 4 pairs whose prompts and responses differ in length.
TRL's own loss code (``DPOTrainer._compute_loss``, called on a stand-in trainer holding the attributes it
reads, with the HF model given TRL's fused LM head) computes log-probs, loss, rewards and gradients from the
HF model; we import the same weights (framework/checkpoint/hf_import.py) and run our DPO step through
megatron's schedule. LoRA: our adapter (non-zero A and B) exported to HF PEFT, TRL's reference is PEFT with
its adapters disabled, ours the same network with its adapters switched off; gradients of every factor
compared. Full fine-tuning: the policy is a perturbed copy of the base weights, TRL's reference model is
the base, ours a frozen copy or precomputed log-probs; every weight's gradient compared (exported to HF
names). TRL 1.16 has no label-smoothed sigmoid loss; conservative DPO is checked against its
``(2 - 2e) sigmoid - (1 - 2e) robust`` combination, an identity (framework/training/dpo.py).

Layouts: the same loss, metrics and LoRA gradients at TP=2+SP, PP=2 and DP=2 as in one process, within the
rounding of reordered fp32 sums (tests/tolerances.py: DPO_ATOL for the metrics, GRAD_REL for gradients).
Packing: pairs packed two to a row give the unpacked loss, metrics and gradients (as tight) at TP=1, TP=2+SP,
PP=2, DP=2 and TP=2+SP x DP=2 (LoRA), and TRL's with full parameters (frozen copy at TP=2+SP, precomputed log-probs).
Learning: a short LoRA run on the bundled arithmetic pairs raises the training reward accuracy well above
chance. Data: the bad-record kinds are errors naming file:line or counted skips; truncation keeps one
prompt for both rows; chat records render with the chat template.
"""

from __future__ import annotations

import json
import os
from collections import defaultdict
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from launch.spawn import run_distributed
from tests.hf_models import fill_trainable, tiny_llama
from tests.tolerances import DPO_ATOL, GRAD_REL

ROOT = str(Path(__file__).resolve().parents[3])
SHAPE = dict(num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
LORA = dict(method="lora", rank=4, alpha=8.0, dropout=0.0, targets=["qkv", "proj", "fc1", "fc2"])
PAD = 0
# (prompt, chosen, rejected) lengths: responses of different lengths make IPO's per-token averages matter
LENGTHS = [(5, 4, 2), (9, 2, 5), (3, 6, 3), (7, 3, 6)]
# name -> (our dpo options, TRL loss types, TRL weights, TRL beta, TRL label_smoothing)
E = 0.2
VARIANTS = {
    "sigmoid": (dict(loss="sigmoid", beta=0.1), ["sigmoid"], None, 0.1, 0.0),
    "ipo": (dict(loss="ipo", beta=0.5), ["ipo"], None, 0.5, 0.0),
    "robust": (dict(loss="robust", beta=0.1, label_smoothing=E), ["robust"], None, 0.1, E),
    "cdpo": (dict(loss="sigmoid", beta=0.1, label_smoothing=E), ["sigmoid", "robust"], [2 - 2 * E, -(1 - 2 * E)],
             0.1, E),
    "sigmoid+sft": (dict(loss="sigmoid", beta=0.1, sft_weight=0.5), ["sigmoid", "sft"], [1.0, 0.5], 0.1, 0.0),
}
METRIC_NAMES = {"reward_chosen": "rewards/chosen", "reward_rejected": "rewards/rejected",
                "reward_margin": "rewards/margins", "reward_accuracy": "rewards/accuracies",
                "logp_chosen": "logps/chosen", "logp_rejected": "logps/rejected"}


# --- the fixed batch and TRL's side -----------------------------------------------------------------------


def _examples():
    """TRL's tokenised preference examples (prompt_ids, chosen_ids, rejected_ids)."""
    g = torch.Generator().manual_seed(3)

    def ids(n):
        return torch.randint(3, 256, (n,), generator=g).tolist()

    return [{"prompt_ids": ids(p), "chosen_ids": ids(c), "rejected_ids": ids(r)} for p, c, r in LENGTHS]


def _pairs(examples):
    """The same examples as our PreferencePairs: the loss mask on the response tokens."""
    from framework.data.preference import PreferencePair
    from framework.data.sample import Sample

    def row(e, key):
        return Sample(e["prompt_ids"] + e[key], [0] * len(e["prompt_ids"]) + [1] * len(e[key]))

    return [PreferencePair(row(e, "chosen_ids"), row(e, "rejected_ids")) for e in examples]


class _Accelerator:
    device = torch.device("cpu")

    @staticmethod
    def unwrap_model(m):
        return m

    @staticmethod
    def gather(t):
        return t

    gather_for_metrics = gather


def trl_dpo(model, ref_model, examples, loss_types, weights, beta, label_smoothing):
    """(loss, {metric: value}) from TRL's DPOTrainer._compute_loss on the examples; the loss is not yet
    backpropagated. ``ref_model`` None: ``model`` is a PEFT model and the reference is its adapters disabled."""
    from trl.trainer.dpo_trainer import DataCollatorForPreference, DPOTrainer

    trainer = SimpleNamespace(
        model=model, ref_model=ref_model, accelerator=_Accelerator(), aux_loss_enabled=False, ld_alpha=None,
        precompute_ref_logps=False, args=SimpleNamespace(gradient_checkpointing_kwargs=None, discopop_tau=0.05),
        f_divergence_type="reverse_kl", f_alpha_divergence_coef=1.0, loss_types=loss_types,
        loss_weights=weights or [1.0] * len(loss_types), beta=beta, label_smoothing=label_smoothing,
        use_weighting=False, _metrics={"train": defaultdict(list), "eval": defaultdict(list)},
        _total_train_tokens=0, _tp_size=1)
    inputs = DataCollatorForPreference(pad_token_id=PAD)(examples)
    model.train()
    loss = DPOTrainer._compute_loss(trainer, model, inputs, return_outputs=False)
    return loss, {k: trainer._metrics["train"][v][-1] for k, v in METRIC_NAMES.items()}


def _fused(model):
    from trl.trainer.utils import add_fused_lm_head

    add_fused_lm_head(model, outputs=("log_probs", "entropy", "mean_logits", "is_top1"))
    return model


def _hf_model(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)


# Our fused qkv and gate/up layers share one A across the parts (saved once under each HF name, so the
# exported PEFT adapter has equal As); its gradient is the sum of PEFT's per-part A gradients.
FUSED_PARTS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


def _shared_a_grads(grads: dict) -> dict:
    out = dict(grads)
    for k in grads:
        for parts in FUSED_PARTS:
            if ".lora_A." in k and f".{parts[0]}." in k:
                total = sum(grads[k.replace(parts[0], p)] for p in parts)
                out.update({k.replace(parts[0], p): total for p in parts})
    return out


def trl_lora_reference(base_dir, peft_dir, examples, variant):
    """TRL's loss, metrics and LoRA gradients {HF PEFT name: grad} on HF PEFT with our adapter (the A
    gradients of fused layers summed over their parts, as our shared A receives them)."""
    from peft import PeftModel

    _opts, types, weights, beta, eps = VARIANTS[variant]
    model = PeftModel.from_pretrained(_fused(_hf_model(base_dir)), peft_dir, is_trainable=True)
    loss, metrics = trl_dpo(model, None, examples, types, weights, beta, eps)
    loss.backward()
    grads = {n.replace("base_model.model.", "").replace(".default", ""): p.grad.clone()
             for n, p in model.named_parameters() if p.requires_grad}
    return loss.item(), metrics, _shared_a_grads(grads)


def trl_full_reference(base_dir, policy_dir, examples, variant):
    """TRL's loss, metrics and every weight's gradient {HF name: grad}: policy = policy_dir, reference = base."""
    _opts, types, weights, beta, eps = VARIANTS[variant]
    model, ref = _fused(_hf_model(policy_dir)), _fused(_hf_model(base_dir))
    loss, metrics = trl_dpo(model, ref, examples, types, weights, beta, eps)
    loss.backward()
    return loss.item(), metrics, {n: p.grad.clone() for n, p in model.named_parameters()}


# --- our side -----------------------------------------------------------------------------------------------


def _build(path, tp, pp, sp):
    from framework.checkpoint.hf_import import load_hf_into_gpt
    from framework.models.registry import build_model, config_from_hf

    cfg = config_from_hf(json.loads(open(os.path.join(path, "config.json")).read()))
    model = build_model(cfg, tp=tp, pp=pp, sp=sp)
    load_hf_into_gpt(model, path, cfg)
    return model, cfg


def _ours_worker(tp, pp, sp, micro, policy_dir, variants, out_root, adapter_dir=None, reference_dir=None,
                 reference_kind="adapters_disabled", packed_length=None):
    """Our DPO step on the fixed batch for each variant: {variant: metrics}; gradients written under
    out_root/variant as an adapter (LoRA) or an HF checkpoint (full fine-tuning). With ``packed_length`` the
    pairs are packed into bins of that many positions (``micro`` bins a micro-batch), as the job packs them."""
    from framework.checkpoint.adapter import load_adapter, save_adapter
    from framework.checkpoint.hf_export import export_hf
    from framework.data.preference import collate_pairs
    from framework.peft.lora import apply_lora
    from framework.runtime.distributed import initialize
    from framework.training import dpo_reference as ref
    from framework.training.dpo import DPOOptions, dpo_forward_backward
    from framework.training.dpo_task import pair_batches
    from framework.training.optim import wrap_ddp

    rt = initialize(tp=tp, pp=pp, sp=sp, seed=0)
    model, cfg = _build(policy_dir, tp, pp, sp)
    if adapter_dir:
        apply_lora(model, targets=tuple(LORA["targets"]), rank=LORA["rank"], alpha=LORA["alpha"])
        load_adapter(model, adapter_dir, cfg)
    ddp = wrap_ddp(model)
    pairs = _pairs(_examples())
    if reference_kind == "adapters_disabled":
        reference = ref.AdaptersDisabled(ddp, "fp32")
    else:
        base, _ = _build(reference_dir, tp, pp, sp)
        if reference_kind == "frozen_copy":
            reference = ref.FrozenCopy(base.eval(), "fp32")
        else:
            table = ref.precompute_table(base, pairs, micro, lambda ps_: collate_pairs(ps_, PAD, tp if sp else 1),
                                         "fp32")
            reference = ref.Precomputed({"train": table})
    bins = None
    if packed_length:
        from framework.data.packing import pack
        from framework.data.preference import pair_positions

        bins = pack([pair_positions(p) for p in pairs], packed_length)
        assert len(bins) < len(pairs)  # rows really hold several pairs
    out = {}
    for variant in variants:
        batches, idx = pair_batches(list(range(len(pairs) if bins is None else len(bins))), pairs, micro, PAD, rt,
                                    bins, packed_length)
        reference.attach(batches, idx, "train")
        metrics = dpo_forward_backward(ddp, batches, DPOOptions(**VARIANTS[variant][0]))
        out[variant] = metrics.__dict__
        grad_dir = os.path.join(out_root, variant)
        if adapter_dir:
            saved = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
            with torch.no_grad():
                for n, p in model.named_parameters():
                    if p.requires_grad:
                        p.copy_(p.main_grad)
            save_adapter(model, grad_dir, LORA, cfg)
            with torch.no_grad():
                for n, p in model.named_parameters():
                    if p.requires_grad:
                        p.copy_(saved[n])
        else:
            export_hf(model, grad_dir, cfg, params={n: p.main_grad for n, p in model.named_parameters()})
    return out


def _adapter_grads(path):
    from safetensors.torch import load_file

    return {k.replace("base_model.model.", ""): v for k, v in load_file(os.path.join(path, "adapter.safetensors")).items()}


def _hf_grads(path):
    from safetensors.torch import load_file

    grads = {}
    for f in sorted(os.listdir(path)):
        if f.endswith(".safetensors"):
            grads.update(load_file(os.path.join(path, f)))
    return grads


def _assert_metrics(ours: dict, loss: float, metrics: dict, what: str):
    assert ours["pairs"] == len(LENGTHS)
    assert ours["loss"] == pytest.approx(loss, abs=1e-5, rel=1e-5), what
    for k, v in metrics.items():
        assert ours[k] == pytest.approx(v, abs=1e-5, rel=1e-5), f"{what}: {k} ours {ours[k]} TRL {v}"


def _assert_grads(ours: dict, reference: dict, what: str, rel: float = 1e-5):
    assert ours.keys() == reference.keys(), f"{what}: {sorted(set(ours) ^ set(reference))}"
    for k, want in reference.items():
        scale = want.abs().max().item()
        assert scale > 0, f"{what}: {k} has no gradient"
        err = (ours[k] - want).abs().max().item() / scale
        assert err < rel, f"{what}: gradient of {k} differs by {err:.3g} (relative to its largest entry)"


# --- fixtures ------------------------------------------------------------------------------------------------


def _init_adapter_worker(base_dir, adapter_dir, peft_dir):
    """Our LoRA with seeded non-zero A and B, saved and exported to HF PEFT."""
    from framework.checkpoint.adapter import save_adapter
    from framework.checkpoint.peft_export import export_peft
    from framework.peft.lora import apply_lora
    from framework.runtime.distributed import initialize

    initialize(tp=1, pp=1, seed=0)
    model, cfg = _build(base_dir, 1, 1, False)
    apply_lora(model, targets=tuple(LORA["targets"]), rank=LORA["rank"], alpha=LORA["alpha"])
    fill_trainable(model, seed=2, scale=0.2)
    save_adapter(model, adapter_dir, LORA, cfg)
    export_peft(adapter_dir, peft_dir, base_model_name_or_path=base_dir)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """base (HF), policy (base perturbed, HF), our LoRA adapter and its HF PEFT export."""
    root = tmp_path_factory.mktemp("dpo")
    base = tiny_llama(0, **SHAPE)
    base.save_pretrained(root / "base")
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in base.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.02)
    base.save_pretrained(root / "policy")
    run_distributed(_init_adapter_worker, 1, str(root / "base"), str(root / "adapter"), str(root / "peft"),
                    timeout=120)
    return root


@pytest.fixture(scope="module")
def lora_single(models):
    """Our single-process LoRA results for every variant (metrics; gradients under lora_single/)."""
    out = models / "lora_single"
    return run_distributed(_ours_worker, 1, 1, 1, False, 2, str(models / "base"), list(VARIANTS), str(out),
                           adapter_dir=str(models / "adapter"), timeout=200)[0]


# --- parity with TRL -------------------------------------------------------------------------------------------


@pytest.mark.timeout(300)
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_lora_matches_trl(models, lora_single, variant):
    """Loss, rewards, log-probs and every LoRA factor's gradient equal TRL's on HF PEFT (reference: the
    adapters disabled, in both)."""
    loss, metrics, grads = trl_lora_reference(str(models / "base"), str(models / "peft"), _examples(), variant)
    assert metrics["reward_margin"] != 0 and metrics["reward_accuracy"] not in (0.0, 1.0)  # a real test
    _assert_metrics(lora_single[variant], loss, metrics, variant)
    _assert_grads(_adapter_grads(models / "lora_single" / variant), grads, variant)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("reference_kind,tp,pp,sp,world,micro", [
    ("frozen_copy", 1, 1, False, 1, 2),
    ("precomputed", 1, 1, False, 1, 2),
    ("frozen_copy", 2, 1, True, 2, 2),    # TP=2 + SP: the copy sharded like the policy
    ("precomputed", 1, 1, False, 2, 1),   # DP=2: each rank precomputes half the pairs
    ("precomputed", 1, 1, False, 1, 1),   # packed pairs, the table looked up per packed pair
    ("frozen_copy", 2, 1, True, 2, 1),    # packed pairs at TP=2 + SP
], ids=["frozen_copy", "precomputed", "frozen_copy-tp2-sp", "precomputed-dp2", "precomputed-packed",
        "frozen_copy-packed-tp2-sp"])
def test_full_parameters_match_trl(models, tmp_path, request, reference_kind, tp, pp, sp, world, micro):
    """Full fine-tuning: TRL with a reference model; ours with a frozen copy or precomputed log-probs.
    Every weight's gradient (embedding, norms, output layer included) equals TRL's."""
    variants = ["sigmoid", "ipo"]
    packed = PACKED_LENGTH if "packed" in request.node.callspec.id else None
    results = run_distributed(_ours_worker, world, tp, pp, sp, micro, str(models / "policy"), variants,
                              str(tmp_path), reference_dir=str(models / "base"), reference_kind=reference_kind,
                              packed_length=packed, timeout=250)
    for variant in variants:
        loss, metrics, grads = trl_full_reference(str(models / "base"), str(models / "policy"), _examples(), variant)
        for ours in results:
            _assert_metrics(ours[variant], loss, metrics, variant)
        _assert_grads(_hf_grads(tmp_path / variant), grads, variant)


# --- layouts ---------------------------------------------------------------------------------------------------


@pytest.mark.timeout(300)
@pytest.mark.parametrize("tp,pp,sp,world,micro", [
    (2, 1, True, 2, 2),    # TP=2 + SP
    (1, 2, False, 2, 1),   # PP=2, four micro-batches through the pipeline
    (1, 1, False, 2, 1),   # DP=2
], ids=["tp2-sp", "pp2", "dp2"])
def test_layouts_match_single_process(models, lora_single, tmp_path, tp, pp, sp, world, micro):
    variants = ["sigmoid", "ipo"]
    results = run_distributed(_ours_worker, world, tp, pp, sp, micro, str(models / "base"), variants, str(tmp_path),
                              adapter_dir=str(models / "adapter"), timeout=250)
    _assert_same_as_single(results, lora_single, models, tmp_path, variants,
                           f"TP={tp} PP={pp} SP={sp} DP={world // (tp * pp)}")


def _assert_same_as_single(results, lora_single, models, grad_root, variants, what):
    """Every rank's metrics and the LoRA gradients under ``grad_root`` equal the single process's (unpacked),
    within the rounding of reordered fp32 sums: DPO_ATOL absolute on the metrics (differences of log-prob
    sums of ~90 together), GRAD_REL of each gradient tensor's largest entry."""
    for rank, res in enumerate(results):
        for variant in variants:
            for k, v in lora_single[variant].items():
                assert res[variant][k] == pytest.approx(v, rel=0, abs=DPO_ATOL), f"{what} rank {rank} {variant} {k}"
    for variant in variants:
        _assert_grads(_adapter_grads(grad_root / variant), _adapter_grads(models / "lora_single" / variant),
                      f"{variant} at {what}", rel=GRAD_REL)


# --- packing ---------------------------------------------------------------------------------------------------

# The four pairs take 14, 23, 13 and 21 positions: bins of 36 hold two pairs each ({23, 13} and {21, 14}).
PACKED_LENGTH = 36


@pytest.mark.timeout(300)
@pytest.mark.parametrize("tp,pp,sp,world", [(1, 1, False, 1), (2, 1, True, 2), (1, 2, False, 2), (1, 1, False, 2),
                                            (2, 1, True, 4)],
                         ids=["tp1", "tp2-sp", "pp2", "dp2", "tp2-sp-dp2"])
def test_packed_pairs_match_unpacked(models, lora_single, tmp_path, tp, pp, sp, world):
    """Pairs packed two to a row (one bin a micro-batch, so two micro-batches; at DP=2 one on each DP rank):
    loss, rewards, log-probs and every LoRA gradient equal the unpacked single process (DPO_ATOL, GRAD_REL; so
    the packed single process, ``tp1``), for sigmoid, IPO (per-token means: the target counts are per
    segment) and the SFT term (the chosen segments' NLL, normalised by the global batch's chosen tokens,
    which each DP rank knows); the reference (adapters disabled) is computed on the packed rows too."""
    variants = ["sigmoid", "ipo", "sigmoid+sft"]
    results = run_distributed(_ours_worker, world, tp, pp, sp, 1, str(models / "base"), variants, str(tmp_path),
                              adapter_dir=str(models / "adapter"), packed_length=PACKED_LENGTH, timeout=250)
    _assert_same_as_single(results, lora_single, models, tmp_path, variants, f"packed, TP={tp} PP={pp} SP={sp}")


def test_packed_pairs_by_hand():
    """Two pairs in one row: sequences side by side (chosen, rejected, chosen, rejected), positions restarting,
    ``sequence_index`` naming the unpacked order (chosen 0, chosen 1, rejected 0, rejected 1), padding the
    discarded slot 4; the mask keeps each sequence to itself."""
    from framework.data.preference import PreferencePair, collate_packed_pairs
    from framework.data.sample import Sample

    a = PreferencePair(Sample([1, 10, 11], [0, 1, 1]), Sample([1, 20], [0, 1]))
    b = PreferencePair(Sample([1, 30], [0, 1]), Sample([1, 40, 41, 42], [0, 1, 1, 1]))
    batch = collate_packed_pairs([[a, b]], pad_id=0, seq_length=9)
    assert batch["tokens"].tolist() == [[1, 10, 1, 1, 1, 40, 41, 0, 0]]
    assert batch["labels"].tolist() == [[10, 11, 20, 30, 40, 41, 42, 0, 0]]
    assert batch["position_ids"].tolist() == [[0, 1, 0, 0, 0, 1, 2, 0, 0]]
    assert batch["sequence_index"].tolist() == [[0, 0, 2, 1, 3, 3, 3, 4, 4]]
    assert int(batch["pairs"]) == 2
    allowed = ~batch["attention_mask"][0, 0]
    assert allowed[6].tolist() == [False] * 4 + [True] * 3 + [False] * 2  # rejected of b sees only itself


def _disabled_worker(base_dir):
    """{method: (max |with adapter - base|, max |adapters disabled - base|, max |after - with adapter|)}."""
    from omegaconf import OmegaConf

    from framework.inference.logits import forward_logits
    from framework.peft.registry import apply_peft
    from framework.peft.wrapping import adapters_disabled, remove_peft
    from framework.runtime.distributed import initialize

    initialize(tp=1, pp=1, seed=0)
    model, cfg = _build(base_dir, 1, 1, False)
    model.eval()
    tokens = torch.randint(3, 256, (2, 12), generator=torch.Generator().manual_seed(0))
    base = forward_logits(model, tokens)
    out = {}
    for peft in (LORA, dict(method="dora", rank=4, alpha=8.0, dropout=0.0, targets=["qkv", "fc2"]),
                 dict(method="ia3", targets=["k", "v", "fc2"]),
                 dict(method="adapter", bottleneck=8, activation="gelu", targets=["attention", "mlp"])):
        apply_peft(model, OmegaConf.create(peft), cfg)
        fill_trainable(model, seed=4, scale=0.2)
        with_adapter = forward_logits(model, tokens)
        with adapters_disabled(model):
            disabled = forward_logits(model, tokens)
        after = forward_logits(model, tokens)
        out[peft["method"]] = tuple((a - b).abs().max().item() for a, b in
                                    ((with_adapter, base), (disabled, base), (after, with_adapter)))
        remove_peft(model)
    return out


@pytest.mark.timeout(200)
def test_adapters_disabled_is_the_base_model(models):
    """For every layer-wrapping method (the DPO reference of adapter runs): inside ``adapters_disabled`` the
    logits are exactly the base model's, and the adapter is back afterwards."""
    results = run_distributed(_disabled_worker, 1, str(models / "base"), timeout=150)[0]
    assert set(results) == {"lora", "dora", "ia3", "adapter"}
    for method, (changed, disabled, restored) in results.items():
        assert changed > 1e-3, f"{method}: the adapter does not change the output, the test would prove nothing"
        assert disabled == 0 and restored == 0, (method, disabled, restored)


# --- the job ---------------------------------------------------------------------------------------------------


def compose(overrides, config_name="dpo"):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=os.path.join(ROOT, "conf"), version_base="1.3"):
        return hydra_compose(config_name=config_name, overrides=overrides)


def _run_job(cfg):
    os.chdir(ROOT)  # data paths in conf/ are relative to the repository root
    from framework.runtime.logs import setup_logging
    from framework.training.dpo_job import run

    setup_logging("WARNING")
    r = run(cfg)
    return r.history, r.val_before, r.val_after, r.trained_dir


@pytest.fixture(scope="module")
def tiny_hf(tmp_path_factory):
    from tests.hf_models import save_tiny_job_llama

    return save_tiny_job_llama(tmp_path_factory.mktemp("tiny_hf"))


def tiny_dpo(tiny_hf, tokenizer_dir, out, *extra):
    return compose(["model=tiny_llama", "model.source=hf", f"model.path={tiny_hf}", f"model.tokenizer={tokenizer_dir}",
                    "trainer.global_batch_size=8", "trainer.micro_batch_size=4", "trainer.warmup_steps=0",
                    "trainer.log_interval=100", f"output_dir={out}", *extra])


@pytest.mark.timeout(600)
def test_short_run_raises_reward_accuracy(tiny_hf, tiny_tokenizer_dir, tmp_path):
    """LoRA DPO of the tiny random model on 32 of the bundled arithmetic pairs (the tiny model knows no
    arithmetic, so the signal is these pairs themselves): after 20 steps (5 epochs) the reward accuracy over
    the pairs is well above chance (it starts at 0: policy = reference, all rewards 0), the margin is positive
    and the adapter is written."""
    pairs = tmp_path / "pairs.jsonl"
    with open(os.path.join(ROOT, "data", "preference", "arithmetic.jsonl")) as f:
        pairs.write_text("".join(f.readlines()[:32]))
    cfg = tiny_dpo(tiny_hf, tiny_tokenizer_dir, tmp_path / "run", f"data.train={pairs}", f"data.validation={pairs}",
                   "data.validation_split=null", "trainer.eval_samples=32", "trainer.max_steps=20",
                   "trainer.eval_interval=100", "trainer.lr=5e-3")
    history, before, after, trained = run_distributed(_run_job, 1, cfg, timeout=550)[0]
    assert before["reward_accuracy"] == 0 and before["loss"] == pytest.approx(0.693147, abs=1e-5)
    assert after["reward_accuracy"] >= 0.8, after
    assert after["reward_margin"] > 0 and after["loss"] < before["loss"]
    assert os.path.isfile(os.path.join(trained, "adapter.safetensors"))
    assert (tmp_path / "run" / "summary.json").is_file()
    assert any(f.startswith("events") for f in os.listdir(tmp_path / "run" / "tensorboard"))


@pytest.mark.timeout(600)
def test_full_parameter_references_agree(tiny_hf, tiny_tokenizer_dir, tmp_path):
    """peft=none: the frozen copy (built and filled from the policy) and the precomputed table give the same
    run; the first step, before any update, has loss log 2 and zero rewards."""
    runs = {}
    for ref in ("frozen_copy", "precomputed"):
        cfg = tiny_dpo(tiny_hf, tiny_tokenizer_dir, tmp_path / ref, "peft=none", f"dpo.reference={ref}",
                       "trainer.max_steps=2", "trainer.eval_samples=8", "trainer.eval_interval=100", "trainer.lr=1e-3",
                       "dpo.sft_weight=0.3")
        runs[ref] = run_distributed(_run_job, 1, cfg, timeout=280)[0]
    (h1, b1, a1, trained), (h2, b2, a2, _) = runs["frozen_copy"], runs["precomputed"]
    assert b1["loss"] == pytest.approx(b2["loss"], rel=1e-6) and b1["reward_margin"] == b2["reward_margin"] == 0
    assert h1[0]["pair_loss"] == pytest.approx(0.693147, abs=1e-5) and h1[0]["reward_margin"] == 0
    assert h1[1]["reward_margin"] != 0
    for x, y in zip(h1 + [a1], h2 + [a2]):
        for k in ("loss", "reward_chosen", "reward_rejected", "reward_accuracy", "logp_chosen", "nll_chosen"):
            assert x[k] == pytest.approx(y[k], rel=1e-5, abs=1e-6), k
    assert os.path.basename(trained) == "weights"


@pytest.mark.real_model
@pytest.mark.slow
@pytest.mark.timeout(600)
def test_smollm2_generalises_to_held_out_pairs(tmp_path):
    """The default job (LoRA on SmolLM2-135M-Instruct, bundled arithmetic pairs), a few steps: the reward
    accuracy on held-out validation pairs rises well above chance."""
    from tests.real_model import require_smollm2

    require_smollm2()
    cfg = compose([f"output_dir={tmp_path}", "trainer.max_steps=4", "trainer.global_batch_size=8",
                   "trainer.micro_batch_size=4", "trainer.eval_samples=16", "trainer.eval_interval=100",
                   "data.max_length=32"])
    _history, before, after, _ = run_distributed(_run_job, 1, cfg, timeout=550)[0]
    assert before["reward_accuracy"] == 0
    assert after["reward_accuracy"] >= 0.75 and after["reward_margin"] > 0, after


@pytest.mark.parametrize("overrides,needle", [
    (["dpo.loss=kto"], "dpo.loss='kto': expected one of sigmoid, robust, ipo"),
    (["dpo.beta=0"], "dpo.beta=0: expected a number > 0"),
    (["dpo.loss=robust", "dpo.label_smoothing=0.5"], "dpo.label_smoothing=0.5: expected a number in [0, 0.5)"),
    (["dpo.loss=ipo", "dpo.label_smoothing=0.1"], "IPO has no label smoothing"),
    (["dpo.sft_weight=-1"], "dpo.sft_weight=-1: expected a number >= 0"),
    (["peft=none", "dpo.reference=adapters_disabled"], "dpo.reference=adapters_disabled needs an adapter method"),
    (["peft=prompt_tuning"], "preference tuning supports full fine-tuning (none) and the layer-wrapping adapters"),
    (["data.bad_records=ignore"], "data.bad_records='ignore': expected one of error, skip"),
    (["data=humaneval"], "launch/dpo.py trains on preference pairs (data.format=preference"),
])
def test_bad_dpo_config_is_refused(tiny_tokenizer_dir, overrides, needle):
    from framework.runtime.errors import ConfigError
    from framework.training.job_config import validate

    cfg = compose(["model=tiny_llama", f"model.tokenizer={tiny_tokenizer_dir}", *overrides])
    with pytest.raises(ConfigError) as e:
        validate(cfg, 1)
    assert needle in str(e.value)


def test_sft_job_refuses_preference_data(tiny_tokenizer_dir):
    from framework.runtime.errors import ConfigError
    from framework.training.job_config import validate

    cfg = compose(["model=tiny_llama", f"model.tokenizer={tiny_tokenizer_dir}", "data=preference_arithmetic"],
                  config_name="finetune")
    with pytest.raises(ConfigError, match="preference pairs train with launch/dpo.py"):
        validate(cfg, 1)


# --- data ------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tok(tiny_tokenizer_dir):
    from framework.data.tokenizer import Tokenizer

    return Tokenizer.from_dir(tiny_tokenizer_dir)


def _write(path, records):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


GOOD = {"prompt": "What is 2 + 2?", "chosen": "4", "rejected": "5"}
BAD = [  # (record, reason, message)
    ({"prompt": "What is 2 + 2?", "rejected": "5"}, "missing_chosen", 'missing "chosen" response'),
    ({"prompt": "What is 2 + 2?", "chosen": "4", "rejected": None}, "missing_rejected", 'missing "rejected" response'),
    ({"prompt": "What is 2 + 2?", "chosen": "4", "rejected": "4"}, "identical_responses",
     "chosen and rejected are identical"),
    ({"prompt": "  ", "chosen": "4", "rejected": "5"}, "empty_prompt", "empty prompt"),
    ({"messages": [], "chosen": "4", "rejected": "5"}, "empty_prompt", "empty prompt"),
    ({"prompt": "What is 2 + 2?", "chosen": "", "rejected": "5"}, "empty_response", 'empty "chosen" response'),
]


@pytest.mark.parametrize("record,reason,message", BAD, ids=[f"{b[1]}-{i}" for i, b in enumerate(BAD)])
def test_bad_record_is_an_error_naming_file_and_line(tok, tmp_path, record, reason, message):
    from framework.runtime.errors import DataError
    from framework.data.preference import tokenize_preferences

    path = _write(tmp_path / "p.jsonl", [GOOD, "", GOOD, record, GOOD])
    with pytest.raises(DataError) as e:
        tokenize_preferences(path, tok, 64)
    assert str(e.value).startswith(f"{path}:4: {message}")
    assert f"counted as {reason}" in str(e.value)


def test_bad_records_skipped_and_counted(tok, tmp_path):
    from framework.data.preference import tokenize_preferences

    path = _write(tmp_path / "p.jsonl", [GOOD] + [b[0] for b in BAD] + [GOOD])
    pairs, report = tokenize_preferences(path, tok, 64, bad_records="skip")
    assert len(pairs) == 2 and report.read == 2 + len(BAD) and report.kept == 2
    want = {}
    for _rec, reason, _msg in BAD:
        want[reason] = want.get(reason, 0) + 1
    assert dict(report.dropped) == want
    assert report.dropped_lines["empty_prompt"] == [5, 6]
    assert "identical_responses" in report.format()


@pytest.mark.parametrize("record,message", [
    ({"chosen": "4", "rejected": "5"}, 'missing "prompt" (text) or "messages" (chat)'),
    ({"prompt": "x", "chosen": 4, "rejected": "5"}, '"chosen": expected a string (the response to "prompt"), got int'),
    ({"prompt": 3, "chosen": "4", "rejected": "5"}, '"prompt": expected a string or a list of messages, got int'),
    ({"messages": [{"role": "user", "content": "x"}], "chosen": {"role": "user", "content": "4"}, "rejected": "5"},
     '"chosen": expected a string or an assistant message'),
    ({"messages": [{"role": "bot", "content": "x"}], "chosen": "4", "rejected": "5"}, "messages[0].role"),
    ("[1, 2]", "expected a JSON object"),
])
def test_malformed_records_are_errors_even_when_skipping(tok, tmp_path, record, message):
    from framework.runtime.errors import DataError
    from framework.data.preference import tokenize_preferences

    path = _write(tmp_path / "p.jsonl", [GOOD, record])
    with pytest.raises(DataError, match=f"^{path}:2: ") as e:
        tokenize_preferences(path, tok, 64, bad_records="skip")
    assert message in str(e.value)


def test_text_pairs_share_one_truncated_prompt(tok, tmp_path):
    """Both rows keep the same prompt tokens, cut (from the left by default) so the longer response fits;
    each row is exactly the SFT prompt/completion sample of that prompt; a response that cannot fit drops."""
    from framework.data.preference import tokenize_preferences
    from framework.data.prompt_completion import build_sample

    prompt, short, long = "def add(a, b):\n    " * 6, "return a + b", "return a + b  # the sum of a and b"
    n_long = len(tok.encode(long))
    max_length = n_long + 2 + 10  # bos + eos + 10 prompt tokens
    path = _write(tmp_path / "p.jsonl", [{"prompt": prompt, "chosen": short, "rejected": long},
                                         {"prompt": "x", "chosen": short, "rejected": long * 20}])
    for side in ("left", "right"):
        pairs, report = tokenize_preferences(path, tok, max_length, truncation_side=side)
        assert len(pairs) == 1 and dict(report.dropped) == {"completion_too_long": 1} and report.truncated == 1
        p = pairs[0]
        ids = tok.encode(prompt)
        kept = ids[-10:] if side == "left" else ids[:10]
        assert p.chosen == build_sample(kept, tok.encode(short), tok.bos_id, tok.eos_id, 10 ** 6)[0]
        assert p.rejected == build_sample(kept, tok.encode(long), tok.bos_id, tok.eos_id, 10 ** 6)[0]
        assert len(p.rejected) == max_length and report.prompt_tokens_cut == len(ids) - 10


def test_chat_pairs_render_with_the_template(tiny_tokenizer_dir, tmp_path):
    """Chat form: each row is the context plus that response rendered by the chat template, the mask on the
    last assistant turn (SFT's loss_on=last); TRL's list form is the same; long contexts lose their earliest
    exchanges, the same for both rows."""
    from framework.data.chat import ChatEncoder
    from framework.data.preference import tokenize_preferences
    from framework.data.tokenizer import Tokenizer
    from tests.tokenizer_fixture import make_family_tokenizer

    tok = Tokenizer.from_dir(make_family_tokenizer(tiny_tokenizer_dir, tmp_path / "tok", "llama3_instruct"))
    enc = ChatEncoder(tok, loss_on="last")
    sys_, u1, a1, u2 = ({"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"},
                        {"role": "assistant", "content": "Hello, how can I help?"},
                        {"role": "user", "content": "What is 2 + 2?"})
    chosen, rejected = {"role": "assistant", "content": "4"}, {"role": "assistant", "content": "5, I think"}
    context = [sys_, u1, a1, u2]
    path = _write(tmp_path / "c.jsonl", [{"messages": context, "chosen": "4", "rejected": "5, I think"},
                                         {"prompt": context, "chosen": [chosen], "rejected": [rejected]}])
    pairs, _ = tokenize_preferences(path, tok, 512)
    assert pairs[0] == pairs[1]
    assert pairs[0].chosen == enc.encode(context + [chosen])
    assert pairs[0].rejected == enc.encode(context + [rejected])
    assert 0 < pairs[0].chosen.num_targets < pairs[0].rejected.num_targets
    short = [sys_, u2]
    limit = max(len(enc.encode(short + [r])) for r in (chosen, rejected))
    pairs, report = tokenize_preferences(path, tok, limit)
    assert pairs[0].chosen == enc.encode(short + [chosen]) and pairs[0].rejected == enc.encode(short + [rejected])
    assert report.truncated == 2


def test_bundled_arithmetic_set(tok):
    """data/preference/arithmetic.jsonl is what make_arithmetic.py writes; every pair is kept, the chosen
    answer is the sum and the rejected one is not."""
    import importlib.util

    from framework.data.preference import tokenize_preferences

    path = os.path.join(ROOT, "data", "preference", "arithmetic.jsonl")
    spec = importlib.util.spec_from_file_location("make_arithmetic", os.path.join(ROOT, "data", "preference",
                                                                                   "make_arithmetic.py"))
    make = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(make)
    records = make.records()
    assert open(path).read() == "".join(json.dumps(r) + "\n" for r in records)
    for r in records:
        a, b = (int(x) for x in r["prompt"].removeprefix("What is ").split("?")[0].split(" + "))
        assert int(r["chosen"]) == a + b != int(r["rejected"])
    pairs, report = tokenize_preferences(path, tok, 64)
    assert len(pairs) == len(records) == 400 and not report.dropped_total
