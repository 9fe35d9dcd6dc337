"""Preference tuning: the DPO loss family and one step over megatron-core's pipeline schedule.

Notation, per pair i (framework/data/preference.py): log-probabilities summed over the target tokens of a
response (its tokens and the final eos, or the assistant turn with its end-of-turn token), ``pc`` / ``pr``
under the policy for the chosen / rejected response, ``rc`` / ``rr`` under the reference model, ``nc`` /
``nr`` the numbers of target tokens, ``b`` = beta, ``e`` = label_smoothing, ``ls`` = log sigmoid::

    rewards     Rc = b (pc - rc),   Rr = b (pr - rr),   margin Rc - Rr,   accuracy [Rc > Rr]
    h           (pc - rc) - (pr - rr)
    sigmoid     -(1 - e) ls(b h) - e ls(-b h)             DPO (Rafailov et al. 2023); e > 0: conservative
                                                          DPO (cDPO), the preference label flipped with prob. e
    robust      (-(1 - e) ls(b h) + e ls(-b h)) / (1 - 2e) robust DPO (Chowdhury et al. 2024), e in [0, 0.5)
    ipo         ((pc - rc) / nc - (pr - rr) / nr - 1 / (2b))^2
                                                          IPO (Azar et al. 2023) on per-token averages, as TRL
                                                          computes it (its authors' normalisation)

The loss of a global batch is the mean of the pair loss over its pairs, plus, with ``sft_weight`` w > 0,
w times the negative log-likelihood of the chosen responses averaged over all their target tokens in the
global batch (RPO; TRL's ``sft`` loss). With e = 0 these are TRL 1.16's ``sigmoid``, ``robust`` and ``ipo``
losses exactly (tests/training/dpo/test_loss.py); cDPO equals TRL's ``(2 - 2e) sigmoid - (1 - 2e) robust``.

Parallelism. Chosen and rejected go through the model in one batch: a micro-batch of m pairs is 2m rows,
the m chosen first (``collate_pairs``). The model's forward with labels returns megatron's vocab-parallel
cross entropy, i.e. -log p of every label, computed from the TP-sharded logits without gathering them, and
the same on every TP rank (full sequence under SP too); the last pipeline stage sums it over each row's
targets. Megatron's schedule backpropagates each micro-batch's *sum* of pair losses and
``finalize_model_grads`` divides every gradient by the global number of pairs (the per-micro-batch
"number of tokens" is the number of pairs), all-reduced over data-parallel ranks; the SFT term is
pre-scaled by (global pairs / global chosen target tokens), both known from the batch indices, so the
division leaves it a per-token mean. The reference log-probabilities come in with each micro-batch as
``ref_logps`` [2m] (framework/training/dpo_reference.py computes them).

Packing (``data.packing``). A packed micro-batch holds whole pairs in rows of several sequences
(framework/data/preference.py, ``collate_packed_pairs``); the model gets its block-diagonal
``attention_mask`` and per-sequence ``position_ids``, and every per-sequence sum (log-probabilities, target
counts) is taken over the positions ``sequence_index`` assigns to that sequence instead of over a row, in
the same chosen-first order of ``2m`` sequences; the rest of the step is unchanged.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.distributed as dist
import torch.nn.functional as F

from framework.data.preference import FORMAT, check_preference_options
from framework.training.step import _autocast

LOSSES = ("sigmoid", "robust", "ipo")
REFERENCES = ("auto", "adapters_disabled", "frozen_copy", "precomputed")
#: PEFT methods whose adapters can be switched off to give the reference (they wrap layers, base untouched)
ADAPTER_METHODS = ("lora", "qlora", "dora", "ia3", "adapter")


@dataclasses.dataclass(frozen=True)
class DPOOptions:
    loss: str = "sigmoid"
    beta: float = 0.1
    label_smoothing: float = 0.0
    sft_weight: float = 0.0
    reference: str = "auto"

    @classmethod
    def from_config(cls, node) -> "DPOOptions":
        return cls(loss=str(node.get("loss", "sigmoid")), beta=float(node.get("beta", 0.1)),
                   label_smoothing=float(node.get("label_smoothing", 0.0)),
                   sft_weight=float(node.get("sft_weight", 0.0)), reference=str(node.get("reference", "auto")))


def options_problems(node, peft_method: str) -> list[str]:
    """Every problem with a ``dpo`` config node for a run with ``peft.method=peft_method``."""
    def number(key):
        v = node.get(key)
        return None if isinstance(v, bool) or not isinstance(v, (int, float)) else float(v)

    problems = []
    loss, ref = node.get("loss"), node.get("reference", "auto")
    if loss not in LOSSES:
        problems.append(f"dpo.loss={loss!r}: expected one of {', '.join(LOSSES)}")
    beta, eps, w = number("beta"), number("label_smoothing"), number("sft_weight")
    if beta is None or beta <= 0:
        problems.append(f"dpo.beta={node.get('beta')!r}: expected a number > 0")
    if eps is None or not 0 <= eps < (0.5 if loss == "robust" else 1):
        problems.append(f"dpo.label_smoothing={node.get('label_smoothing')!r}: expected a number in [0, "
                        f"{'0.5' if loss == 'robust' else '1'})")
    elif eps > 0 and loss == "ipo":
        problems.append(f"dpo.label_smoothing={eps}: IPO has no label smoothing; use dpo.loss=sigmoid (cDPO) or robust")
    if w is None or w < 0:
        problems.append(f"dpo.sft_weight={node.get('sft_weight')!r}: expected a number >= 0")
    if ref not in REFERENCES:
        problems.append(f"dpo.reference={ref!r}: expected one of {', '.join(REFERENCES)}")
    if peft_method not in ADAPTER_METHODS + ("none",):
        problems.append(f"peft.method={peft_method}: preference tuning supports full fine-tuning (none) and the "
                        f"layer-wrapping adapters {', '.join(ADAPTER_METHODS)}")
    elif ref == "adapters_disabled" and peft_method == "none":
        problems.append("dpo.reference=adapters_disabled needs an adapter method (peft=lora, ...); full fine-tuning "
                        "(peft.method=none) takes dpo.reference=frozen_copy or precomputed")
    return problems


def resolve_reference(reference: str, peft_method: str) -> str:
    """``auto``: the adapters switched off for adapter methods, a frozen copy for full fine-tuning."""
    if reference != "auto":
        return reference
    return "frozen_copy" if peft_method == "none" else "adapters_disabled"


def pair_losses(opts: DPOOptions, policy: torch.Tensor, reference: torch.Tensor, targets: torch.Tensor):
    """``(loss per pair [m], chosen rewards [m], rejected rewards [m])`` from per-row summed log-probs of the
    policy and the reference and the rows' target-token counts, each [2m] with the chosen rows first."""
    m = policy.shape[0] // 2
    ratios = policy - reference
    chosen, rejected = ratios[:m], ratios[m:]
    b, e = opts.beta, opts.label_smoothing
    if opts.loss == "ipo":
        n = targets.clamp(min=1)
        losses = (chosen / n[:m] - rejected / n[m:] - 1 / (2 * b)) ** 2
    else:
        z = b * (chosen - rejected)
        if opts.loss == "sigmoid":
            losses = -(1 - e) * F.logsigmoid(z) - e * F.logsigmoid(-z)
        else:  # robust
            losses = (-(1 - e) * F.logsigmoid(z) + e * F.logsigmoid(-z)) / (1 - 2 * e)
    return losses, b * chosen.detach(), b * rejected.detach()


# Per micro-batch, summed over pairs or tokens; all-reduced into DPOMetrics.
_STATS = ("loss", "pairs", "correct", "reward_chosen", "reward_rejected", "logp_chosen", "logp_rejected",
          "nll_chosen", "chosen_tokens")


@dataclasses.dataclass
class DPOMetrics:
    """Means over the pairs of a global batch (``nll_chosen``: per chosen target token)."""
    loss: float               # the optimised loss: pair loss + sft_weight x nll_chosen
    pair_loss: float
    reward_chosen: float
    reward_rejected: float
    reward_margin: float
    reward_accuracy: float    # fraction of pairs with reward_chosen > reward_rejected
    logp_chosen: float
    logp_rejected: float
    nll_chosen: float
    pairs: int

    def scalars(self, prefix: str) -> dict[str, float]:
        """TensorBoard names, TRL's: ``train/rewards/margins`` ..."""
        return {f"{prefix}/loss": self.loss, f"{prefix}/rewards/chosen": self.reward_chosen,
                f"{prefix}/rewards/rejected": self.reward_rejected, f"{prefix}/rewards/margins": self.reward_margin,
                f"{prefix}/rewards/accuracies": self.reward_accuracy, f"{prefix}/logps/chosen": self.logp_chosen,
                f"{prefix}/logps/rejected": self.logp_rejected, f"{prefix}/nll_chosen": self.nll_chosen}

    def format(self) -> str:
        return (f"loss {self.loss:.4f} reward acc {self.reward_accuracy:.3f} margin {self.reward_margin:.4f} "
                f"chosen {self.reward_chosen:.4f} rejected {self.reward_rejected:.4f} "
                f"logps chosen {self.logp_chosen:.3f} rejected {self.logp_rejected:.3f}")


def reduce_metrics(reduced: list[dict], device, sft_weight: float) -> DPOMetrics:
    """Sum the micro-batches' statistics here and over all ranks (TP copies cancel in every ratio)."""
    from megatron.core import parallel_state as ps

    t = torch.zeros(len(_STATS), dtype=torch.float64, device=device)
    for r in reduced:
        t += r["dpo"].to(t)
    dist.all_reduce(t)
    s = dict(zip(_STATS, t.tolist()))
    n = s["pairs"]
    nll = s["nll_chosen"] / s["chosen_tokens"] if s["chosen_tokens"] else float("nan")
    pair_loss = s["loss"] / n if n else float("nan")
    mean = (lambda k: s[k] / n) if n else (lambda k: float("nan"))
    return DPOMetrics(loss=pair_loss + sft_weight * nll, pair_loss=pair_loss, reward_chosen=mean("reward_chosen"),
                      reward_rejected=mean("reward_rejected"),
                      reward_margin=mean("reward_chosen") - mean("reward_rejected"),
                      reward_accuracy=mean("correct"), logp_chosen=mean("logp_chosen"),
                      logp_rejected=mean("logp_rejected"), nll_chosen=nll,
                      pairs=round(n / ps.get_tensor_model_parallel_world_size()))


def num_pairs(micro_batch: dict) -> int:
    """Pairs in a micro-batch: half its rows, or ``pairs`` of a packed one."""
    if "pairs" in micro_batch:
        return int(micro_batch["pairs"])
    return micro_batch["tokens"].shape[0] // 2


def sequence_sums(values: torch.Tensor, batch: dict, m: int) -> torch.Tensor:
    """[2m] sums of ``values`` [rows, s] over each sequence, chosen first: a row of an unpacked micro-batch,
    the positions ``sequence_index`` assigns to it in a packed one (padding goes to a discarded slot 2m)."""
    index = batch.get("sequence_index")
    if index is None:
        return values.sum(-1)
    return values.new_zeros(2 * m + 1).index_add(0, index.reshape(-1), values.reshape(-1))[:2 * m]


def _model_forward(batch: dict, model, precision: str, device):
    """Per-token -log p of the labels [rows, s] (megatron's vocab-parallel cross entropy), the batch on
    ``device`` and its number of pairs."""
    m = num_pairs(batch)
    batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
    with _autocast(precision, device):
        # attention_mask: packed micro-batches only (block-diagonal causal); otherwise plain causal
        nll = model(batch["tokens"], batch["position_ids"], batch.get("attention_mask"), labels=batch["labels"])
    return nll, batch, m


def dpo_forward_step(opts: DPOOptions, precision: str, device, sft_scale: float):
    """The schedule's forward step: the DPO loss of a micro-batch of pairs (see the module docstring)."""
    def forward_step(data_iterator, model):
        nll, batch, m = _model_forward(next(data_iterator), model, precision, device)
        mask = batch["loss_mask"]

        def loss_func(output_tensor):
            per_token = output_tensor.float() * mask
            logps, targets = -sequence_sums(per_token, batch, m), sequence_sums(mask, batch, m)
            losses, r_chosen, r_rejected = pair_losses(opts, logps, batch["ref_logps"].float(), targets)
            nll_chosen = -logps[:m].sum()
            total = losses.sum() + (sft_scale * nll_chosen if opts.sft_weight else 0.0)
            stats = torch.stack([t.detach().double() for t in (
                losses.sum(), torch.tensor(float(m), device=device), (r_chosen > r_rejected).sum(), r_chosen.sum(),
                r_rejected.sum(), logps[:m].sum(), logps[m:].sum(), nll_chosen, targets[:m].sum())])
            return total, torch.tensor(m, dtype=torch.int, device=device), {"dpo": stats}

        return nll, loss_func

    return forward_step


def sft_term_scale(opts: DPOOptions, micro_batches: list[dict]) -> float:
    """sft_weight x global pairs / global chosen target tokens (every rank knows the whole global batch
    through ``global_pairs`` / ``global_chosen_tokens`` set by the caller)."""
    if not opts.sft_weight:
        return 0.0
    mb = micro_batches[0]
    return opts.sft_weight * float(mb["global_pairs"]) / max(float(mb["global_chosen_tokens"]), 1.0)


def _schedule(model, micro_batches: list[dict], step_fn, forward_only: bool):
    from megatron.core.pipeline_parallel import get_forward_backward_func

    tokens = micro_batches[0]["tokens"]
    return get_forward_backward_func()(forward_step_func=step_fn, data_iterator=iter(micro_batches), model=[model],
                                       num_microbatches=len(micro_batches), seq_length=tokens.shape[1],
                                       micro_batch_size=tokens.shape[0], forward_only=forward_only)


def model_inputs(micro_batches: list[dict]) -> list[dict]:
    # only tensors the forward step moves to the device; the globals stay plain numbers
    return [{k: v for k, v in mb.items() if isinstance(v, torch.Tensor)} for mb in micro_batches]


def dpo_forward_backward(model, micro_batches: list[dict], opts: DPOOptions, precision: str = "fp32") -> DPOMetrics:
    """Accumulate the DPO gradients of this rank's micro-batches (each with ``ref_logps``) into
    ``main_grad``, finalised (reduced over DP / SP / tied embeddings, divided by the global pair count)."""
    device = next(model.parameters()).device
    model.zero_grad_buffer()
    reduced = _schedule(model, model_inputs(micro_batches),
                        dpo_forward_step(opts, precision, device, sft_term_scale(opts, micro_batches)), forward_only=False)
    return reduce_metrics(reduced, device, opts.sft_weight)


@dataclasses.dataclass
class DPOStepResult:
    metrics: DPOMetrics
    grad_norm: float | None
    lr: float


def dpo_train_step(model, optimizer, scheduler, micro_batches: list[dict], opts: DPOOptions,
                   precision: str = "fp32") -> DPOStepResult:
    optimizer.zero_grad()
    metrics = dpo_forward_backward(model, micro_batches, opts, precision)
    _ok, grad_norm, _ = optimizer.step()
    scheduler.step(increment=1)
    return DPOStepResult(metrics, None if grad_norm is None else float(grad_norm), optimizer.param_groups[0]["lr"])


@torch.no_grad()
def dpo_evaluate(model, micro_batches: list[dict], opts: DPOOptions, precision: str = "fp32") -> DPOMetrics:
    """The DPO metrics of the given micro-batches (this rank's share; each with ``ref_logps``), all ranks
    agreeing; the SFT term is the per-token mean over these batches' chosen tokens."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    reduced = []
    for mb in micro_batches:  # one at a time: evaluation batches may differ in length
        reduced += _schedule(model, model_inputs([mb]), dpo_forward_step(opts, precision, device, 0.0), forward_only=True)
    model.train(was_training)
    return reduce_metrics(reduced, device, opts.sft_weight)


def _keep_logps(batch: dict, m: int):
    mask = batch["loss_mask"]

    def loss_func(output_tensor):
        logps = -sequence_sums(output_tensor.float() * mask, batch, m)
        zero = torch.zeros((), dtype=torch.float32, device=logps.device)
        return zero, torch.ones((), dtype=torch.int, device=logps.device), {"logps": logps.detach()}

    return loss_func


@torch.no_grad()
def sequence_logps(model, micro_batches: list[dict], precision: str = "fp32") -> list[torch.Tensor] | None:
    """Each sequence's log-probability summed over its targets, per micro-batch ([2m] float32), on the last
    pipeline stage (None on other stages). Runs in eval mode, without autograd; micro-batches of one shape
    share one schedule call (pipelined), others run one at a time."""
    from megatron.core import parallel_state as ps

    device = next(model.parameters()).device
    micro_batches = model_inputs(micro_batches)

    def step(data_iterator, stage):
        nll, batch, m = _model_forward(next(data_iterator), stage, precision, device)
        return nll, _keep_logps(batch, m)

    was_training = model.training
    model.eval()
    shapes = {tuple(mb["tokens"].shape) for mb in micro_batches}
    groups = [micro_batches] if len(shapes) == 1 else [[mb] for mb in micro_batches]
    out = [r["logps"] for g in groups for r in _schedule(model, g, step, forward_only=True)]
    model.train(was_training)
    return out if ps.is_pipeline_last_stage() else None


def job_problems(cfg) -> list[str]:
    """What a preference-tuning job needs of ``data`` and ``dpo`` (framework/training/job_config.py calls this for
    any job with a ``dpo`` node or preference data)."""
    fmt = cfg.data.get("format")
    if "dpo" not in cfg:
        return [f"data.format={fmt}: preference pairs train with launch/dpo.py (DPO), not the SFT job"]
    if fmt != FORMAT:
        return [f"data.format={fmt!r}: launch/dpo.py trains on preference pairs (data.format={FORMAT}, e.g. "
                f"data=preference_arithmetic)"]
    return check_preference_options(cfg.data) + options_problems(cfg.dpo, cfg.peft.method)
