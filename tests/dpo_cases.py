"""What the preference-tuning tests share: a fixed batch of four pairs on a tiny random HF Llama, TRL's side
of the comparison, our side, and the DPO job's config.

The batch: prompts and responses of different lengths (IPO's per-token averages matter). TRL's side: its own
loss code (``DPOTrainer._compute_loss`` on a stand-in trainer holding the attributes it reads, the HF model
given TRL's fused LM head) computes log-probs, loss, rewards and gradients; ``trl_lora_reference`` runs it
on HF PEFT with our exported adapter (reference: adapters disabled), ``trl_full_reference`` on a perturbed
policy with the base as reference model. Our side: ``ours_worker`` imports the same weights
(framework/checkpoint/hf_import.py) and runs our DPO step through megatron's schedule at any layout,
writing the gradients where the assertions below read them. TRL 1.16 has no label-smoothed sigmoid loss;
conservative DPO ("cdpo") is checked against its ``(2 - 2e) sigmoid - (1 - 2e) robust`` combination, an
identity (framework/training/dpo.py).
"""

from __future__ import annotations

import json
import os
from collections import defaultdict
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from tests.hf_models import fill_trainable
from tests.tolerances import DPO_ATOL, GRAD_REL

ROOT = str(Path(__file__).resolve().parent.parent)
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


def fixed_examples():
    """TRL's tokenised preference examples (prompt_ids, chosen_ids, rejected_ids)."""
    g = torch.Generator().manual_seed(3)

    def ids(n):
        return torch.randint(3, 256, (n,), generator=g).tolist()

    return [{"prompt_ids": ids(p), "chosen_ids": ids(c), "rejected_ids": ids(r)} for p, c, r in LENGTHS]


def as_pairs(examples):
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


def build_from_hf(path, tp, pp, sp):
    from framework.checkpoint.hf_import import load_hf_into_gpt
    from framework.models.registry import build_model, config_from_hf

    cfg = config_from_hf(json.loads(open(os.path.join(path, "config.json")).read()))
    model = build_model(cfg, tp=tp, pp=pp, sp=sp)
    load_hf_into_gpt(model, path, cfg)
    return model, cfg


def ours_worker(tp, pp, sp, micro, policy_dir, variants, out_root, adapter_dir=None, reference_dir=None,
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
    model, cfg = build_from_hf(policy_dir, tp, pp, sp)
    if adapter_dir:
        apply_lora(model, targets=tuple(LORA["targets"]), rank=LORA["rank"], alpha=LORA["alpha"])
        load_adapter(model, adapter_dir, cfg)
    ddp = wrap_ddp(model)
    pairs = as_pairs(fixed_examples())
    if reference_kind == "adapters_disabled":
        reference = ref.AdaptersDisabled(ddp, "fp32")
    else:
        base, _ = build_from_hf(reference_dir, tp, pp, sp)
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


def adapter_grads(path):
    from safetensors.torch import load_file

    return {k.replace("base_model.model.", ""): v for k, v in load_file(os.path.join(path, "adapter.safetensors")).items()}


def hf_grads(path):
    from safetensors.torch import load_file

    grads = {}
    for f in sorted(os.listdir(path)):
        if f.endswith(".safetensors"):
            grads.update(load_file(os.path.join(path, f)))
    return grads


def assert_metrics(ours: dict, loss: float, metrics: dict, what: str):
    assert ours["pairs"] == len(LENGTHS)
    assert ours["loss"] == pytest.approx(loss, abs=1e-5, rel=1e-5), what
    for k, v in metrics.items():
        assert ours[k] == pytest.approx(v, abs=1e-5, rel=1e-5), f"{what}: {k} ours {ours[k]} TRL {v}"


def assert_grads(ours: dict, reference: dict, what: str, rel: float = 1e-5):
    assert ours.keys() == reference.keys(), f"{what}: {sorted(set(ours) ^ set(reference))}"
    for k, want in reference.items():
        scale = want.abs().max().item()
        assert scale > 0, f"{what}: {k} has no gradient"
        err = (ours[k] - want).abs().max().item() / scale
        assert err < rel, f"{what}: gradient of {k} differs by {err:.3g} (relative to its largest entry)"


def init_adapter_worker(base_dir, adapter_dir, peft_dir):
    """Our LoRA with seeded non-zero A and B, saved and exported to HF PEFT."""
    from framework.checkpoint.adapter import save_adapter
    from framework.checkpoint.peft_export import export_peft
    from framework.peft.lora import apply_lora
    from framework.runtime.distributed import initialize

    initialize(tp=1, pp=1, seed=0)
    model, cfg = build_from_hf(base_dir, 1, 1, False)
    apply_lora(model, targets=tuple(LORA["targets"]), rank=LORA["rank"], alpha=LORA["alpha"])
    fill_trainable(model, seed=2, scale=0.2)
    save_adapter(model, adapter_dir, LORA, cfg)
    export_peft(adapter_dir, peft_dir, base_model_name_or_path=base_dir)


def assert_same_as_single(results, lora_single, models, grad_root, variants, what):
    """Every rank's metrics and the LoRA gradients under ``grad_root`` equal the single process's (unpacked),
    within the rounding of reordered fp32 sums: DPO_ATOL absolute on the metrics (differences of log-prob
    sums of ~90 together), GRAD_REL of each gradient tensor's largest entry."""
    for rank, res in enumerate(results):
        for variant in variants:
            for k, v in lora_single[variant].items():
                assert res[variant][k] == pytest.approx(v, rel=0, abs=DPO_ATOL), f"{what} rank {rank} {variant} {k}"
    for variant in variants:
        assert_grads(adapter_grads(grad_root / variant), adapter_grads(models / "lora_single" / variant),
                      f"{variant} at {what}", rel=GRAD_REL)


# The four pairs take 14, 23, 13 and 21 positions: bins of 36 hold two pairs each ({23, 13} and {21, 14}).
PACKED_LENGTH = 36


# --- the job ---------------------------------------------------------------------------------------------------


def compose(overrides, config_name="dpo"):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=os.path.join(ROOT, "conf"), version_base="1.3"):
        return hydra_compose(config_name=config_name, overrides=overrides)


def run_dpo(cfg):
    os.chdir(ROOT)  # data paths in conf/ are relative to the repository root
    from framework.runtime.logs import setup_logging
    from framework.training.dpo_job import run

    setup_logging("WARNING")
    r = run(cfg)
    return r.history, r.val_before, r.val_after, r.trained_dir


def tiny_dpo(tiny_hf, tokenizer_dir, out, *extra):
    return compose(["model=tiny_llama", "model.source=hf", f"model.path={tiny_hf}", f"model.tokenizer={tokenizer_dir}",
                    "trainer.global_batch_size=8", "trainer.micro_batch_size=4", "trainer.warmup_steps=0",
                    "trainer.log_interval=100", f"output_dir={out}", *extra])
