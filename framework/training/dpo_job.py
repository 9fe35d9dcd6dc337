"""The preference-tuning job (launch/dpo.py): config -> preference pairs -> policy (+ reference) -> DPO steps
-> adapter (or full weights) -> summary.

It reuses the SFT job's pieces (model building with PEFT, DDP, optimizer and LR schedule, batch order,
tracker, summary table) and differs only in the data (pairs, framework/data/preference.py), the step
(framework/training/dpo.py) and the reference model (framework/training/dpo_reference.py). As in the SFT
job, every config and data problem is found before any process group starts.

Per step, every rank logs and (on rank 0) sends to TensorBoard: loss, rewards of chosen and rejected, their
margin, reward accuracy (chosen > rejected), the chosen and rejected log-probabilities, lr and grad norm;
validation (every ``trainer.eval_interval`` steps and at the end, over the first ``trainer.eval_samples``
validation pairs) logs the same under ``val/``. The trained adapter (or, for ``peft.method=none``, the full
weights) is written at the end; periodic checkpoints and resume (``trainer.save_interval``, ``resume``,
``steps_per_run``, early stopping) are the SFT job's and not used here.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

log = logging.getLogger("framework.dpo")


@dataclasses.dataclass
class DPOResult:
    steps: int
    history: list                 # per step: DPOMetrics as a dict, plus lr and grad_norm
    val_before: dict
    val_after: dict
    trainable_params: int
    total_params: int
    output_dir: str
    trained_dir: str              # adapters/NAME, or weights/ for full fine-tuning
    reference: str                # adapters_disabled | frozen_copy | precomputed
    pairs_per_s: float


def prepare_inputs(cfg: DictConfig, world_size: int):
    """Validate the config, resolve the model files and tokenise the pairs; no process groups needed."""
    from framework.config.validate import validate
    from framework.data.preference import prepare_preferences
    from framework.data.tokenizer import Tokenizer
    from framework.models import hub

    model_cfg = validate(cfg, world_size)
    if cfg.model.source != "random":
        hub.model_config_for(cfg.model)
    tokenizer = Tokenizer.from_dir(hub.tokenizer_dir(cfg.model))
    return model_cfg, tokenizer, prepare_preferences(cfg.data, tokenizer, seed=int(cfg.seed))


def _pad_multiple(rt) -> int:
    return rt.tp if rt.sp else 1  # sequence parallelism splits the sequence over TP ranks


def pair_batches(indices: list[int], pairs, micro_batch_size: int, pad_id: int, rt) -> tuple[list[dict], list]:
    """This DP rank's micro-batches of a global batch of pair ``indices`` (2 x micro_batch_size rows each),
    all padded to the longest row of the global batch; and each micro-batch's pair indices. Each carries the
    global batch's pair and chosen-target counts (for the SFT term's normalisation)."""
    from megatron.core import parallel_state as ps

    from framework.data.batching import micro_batches
    from framework.data.preference import collate_pairs

    mine = micro_batches(indices, ps.get_data_parallel_rank(), rt.dp, micro_batch_size)
    multiple = _pad_multiple(rt)
    seq = math.ceil(max(pairs[i].longest - 1 for i in indices) / multiple) * multiple
    chosen_tokens = sum(pairs[i].chosen.num_targets for i in indices)
    batches = [collate_pairs([pairs[i] for i in mb], pad_id, multiple, seq) | {
        "global_pairs": len(indices), "global_chosen_tokens": chosen_tokens} for mb in mine]
    return batches, mine


def build_reference(kind: str, cfg, model, model_cfg, rt, data, pad_id: int):
    """The reference of ``dpo.reference`` (resolved): see framework/training/dpo_reference.py."""
    from framework.data.preference import collate_pairs
    from framework.training import dpo_reference as ref
    from framework.training.finetune import build_model

    if kind == "adapters_disabled":
        return ref.AdaptersDisabled(model, cfg.precision)
    if kind == "frozen_copy":
        base_cfg = OmegaConf.merge(cfg, {"peft": {"method": "none"}})
        return ref.FrozenCopy(ref.frozen_copy(model, lambda: build_model(base_cfg, model_cfg, rt)), cfg.precision)
    t0 = time.perf_counter()
    mbs = int(cfg.trainer.micro_batch_size)

    def collate(pairs):
        return collate_pairs(pairs, pad_id, _pad_multiple(rt))

    tables = {split: ref.precompute_table(model, pairs, mbs, collate, cfg.precision)
              for split, pairs in (("train", data.train), ("validation", data.validation))}
    log.info("reference log-probabilities of %d training and %d validation pairs precomputed in %.1fs",
             len(data.train), len(data.validation), time.perf_counter() - t0)
    return ref.Precomputed(tables)


def _validator(cfg, model, reference, val_pairs, opts, pad_id: int, rt):
    """A function giving the DPO metrics over the first trainer.eval_samples validation pairs (rounded down
    to whole micro-batch x DP groups), the same at every layout."""
    from framework.config.errors import ConfigError
    from framework.training.dpo import dpo_evaluate

    tr = cfg.trainer
    mbs = int(tr.micro_batch_size)
    group = mbs * rt.dp
    n = len(val_pairs) if tr.get("eval_samples") is None else min(int(tr.eval_samples), len(val_pairs))
    if n < group:
        raise ConfigError(f"trainer.eval_samples={n} (validation pairs available: {len(val_pairs)}) is fewer than "
                          f"micro_batch_size x data-parallel size = {group}")
    groups = [list(range(i, i + group)) for i in range(0, n - n % group, group)]

    def validate_now():
        batches = []
        for g in groups:
            mb, idx = pair_batches(g, val_pairs, mbs, pad_id, rt)
            reference.attach(mb, idx, "validation")
            batches += mb
        return dpo_evaluate(model, batches, opts, cfg.precision)

    return validate_now


def run(cfg: DictConfig) -> DPOResult:
    from framework.data.batching import BatchOrder
    from framework.peft.registry import save_trained
    from framework.runtime import distributed as rtd
    from framework.runtime.progress import progress
    from framework.training.dpo import DPOOptions, dpo_train_step, resolve_reference
    from framework.training.finetune import _total_steps, _trained_dir, build_model, count_parameters
    from framework.training.optim import build_optimizer, wrap_ddp
    from framework.training.tracking import Tracker

    world = rtd.world_size_from_env()
    model_cfg, tokenizer, data = prepare_inputs(cfg, world)
    par, tr = cfg.parallel, cfg.trainer
    rt = rtd.initialize(tp=int(par.tensor), pp=int(par.pipeline), sp=bool(par.sequence), seed=int(cfg.seed))
    out = Path(cfg.output_dir)
    if rt.is_main:
        from framework.data.report import format_reports

        out.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(cfg, out / "config.yaml", resolve=True)
        log.info("data report (tokens count both rows of a pair)\n%s", format_reports(data.reports))

    opts = DPOOptions.from_config(cfg.dpo)
    kind = resolve_reference(opts.reference, cfg.peft.method)
    model = build_model(cfg, model_cfg, rt)
    pad_id = tokenizer.pad_id
    model = wrap_ddp(model, bool(tr.get("distributed_optimizer", False)))
    gbs, mbs = int(tr.global_batch_size), int(tr.micro_batch_size)
    order = BatchOrder(len(data.train), gbs, seed=int(cfg.seed))
    total_steps = _total_steps(tr, order)
    optimizer, scheduler = build_optimizer(model, tr, cfg.precision, total_steps=total_steps)
    trainable, total = count_parameters(model)
    log.info("parameters: %s trainable of %s (%.3f%%); reference: %s; loss: %s beta=%g label_smoothing=%g "
             "sft_weight=%g", f"{trainable:,}", f"{total:,}", 100 * trainable / total, kind, opts.loss, opts.beta,
             opts.label_smoothing, opts.sft_weight)
    reference = build_reference(kind, cfg, model, model_cfg, rt, data, pad_id)  # from the policy before any step
    validate_now = _validator(cfg, model, reference, data.validation, opts, pad_id, rt)
    val_before = validate_now()
    log.info("validation before training: %s", val_before.format())
    tracker = Tracker(cfg, out, rt.is_main, first_step=1, wandb_run_id=None)
    tracker.scalars(0, val_before.scalars("val"))

    history, val_after, seconds = [], val_before, 0.0
    bar = progress(total=total_steps, desc="preference tuning", enabled=rt.is_main)
    for step in range(1, total_steps + 1):
        t0 = time.perf_counter()
        indices = next(order)
        batches, idx = pair_batches(indices, data.train, mbs, pad_id, rt)
        reference.attach(batches, idx, "train")
        res = dpo_train_step(model, optimizer, scheduler, batches, opts, cfg.precision)
        seconds += time.perf_counter() - t0
        m = res.metrics
        history.append(dataclasses.asdict(m) | {"lr": res.lr, "grad_norm": res.grad_norm})
        bar.update(1, loss=f"{m.loss:.4f}", acc=f"{m.reward_accuracy:.2f}")
        if step % int(tr.log_interval) == 0:
            log.info("step %d/%d %s lr %.3e grad_norm %s", step, total_steps, m.format(), res.lr,
                     "n/a" if res.grad_norm is None else f"{res.grad_norm:.3f}")
        tracker.scalars(step, m.scalars("train") | {"train/lr": res.lr, "train/grad_norm": res.grad_norm})
        if step % int(tr.eval_interval) == 0 or step == total_steps:
            val_after = validate_now()
            log.info("step %d validation: %s", step, val_after.format())
            tracker.scalars(step, val_after.scalars("val"))
    bar.close()
    tracker.close()

    trained = _trained_dir(cfg, out)
    save_trained(model.module, trained, cfg.peft, model_cfg, base={"name": cfg.model.name, "source": cfg.model.source})
    result = DPOResult(steps=total_steps, history=history, val_before=dataclasses.asdict(val_before),
                       val_after=dataclasses.asdict(val_after), trainable_params=trainable, total_params=total,
                       output_dir=str(out), trained_dir=str(trained), reference=kind,
                       pairs_per_s=total_steps * gbs / max(seconds, 1e-9))
    if rt.is_main:
        (out / "summary.json").write_text(json.dumps(dataclasses.asdict(result) | {
            "layout": {"tp": rt.tp, "pp": rt.pp, "dp": rt.dp, "sp": rt.sp}}, indent=1))
        print(summary_table(result, rt), flush=True)
    return result


def summary_table(r: DPOResult, rt) -> str:
    from framework.training.summary import table

    first, last = r.history[0], r.history[-1]
    b, a = r.val_before, r.val_after
    rows = [
        ("steps", str(r.steps)),
        ("layout", f"TP={rt.tp} PP={rt.pp} DP={rt.dp} SP={'on' if rt.sp else 'off'} ({rt.backend}, {rt.device.type})"),
        ("reference", r.reference),
        ("pairs/s", f"{r.pairs_per_s:,.1f}"),
        ("train loss first -> last", f"{first['loss']:.4f} -> {last['loss']:.4f}"),
        ("train reward accuracy first -> last", f"{first['reward_accuracy']:.3f} -> {last['reward_accuracy']:.3f}"),
        ("validation loss before -> after", f"{b['loss']:.4f} -> {a['loss']:.4f}"),
        ("validation reward accuracy before -> after", f"{b['reward_accuracy']:.3f} -> {a['reward_accuracy']:.3f}"),
        ("validation reward margin before -> after", f"{b['reward_margin']:.4f} -> {a['reward_margin']:.4f}"),
        ("trainable / total parameters",
         f"{r.trainable_params:,} / {r.total_params:,} ({100 * r.trainable_params / r.total_params:.2f}%)"),
        ("run directory", r.output_dir),
        ("trained", r.trained_dir),
    ]
    return table(rows, "Preference tuning summary")
