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
weights) is written at the end.

Checkpoints and resume are the SFT job's (framework/training/checkpointing.py, train_state.py,
early_stopping.py): a checkpoint every ``trainer.save_interval`` steps, at a new best validation DPO loss
and when an invocation ends (the adapter or full weights, plus the train state: optimizer, LR schedule,
every rank's RNG, the data position, the early-stopping counters and, in ``LoopState.extra``, the per-step
metrics and the validations); ``trainer.keep_last``, ``trainer.resume``, ``trainer.steps_per_run`` and
``trainer.early_stopping`` as there. What DPO adds is the reference (framework/training/dpo_reference.py):
it is built from the starting weights *before* a resume restores the trained ones, and precomputed
reference log-probabilities are saved in each checkpoint and read back.

Packing (``data.packing=true``): whole pairs are packed into bins of ``2 x data.max_length`` positions (the
room of one unpacked pair; rounded up to a multiple of TP under sequence parallelism), once, by
best-fit decreasing (framework/data/packing.py); a global batch is then ``trainer.global_batch_size`` bins,
so its number of pairs varies, and the loss stays the mean over its pairs. Validation is not packed.
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
    val_after: dict | None        # the last validation (None: paused before any)
    trainable_params: int
    total_params: int
    output_dir: str
    trained_dir: str | None       # adapters/NAME, or weights/ for full fine-tuning (None: paused)
    reference: str                # adapters_disabled | frozen_copy | precomputed
    pairs_per_s: float
    status: str = "completed"     # completed | stopped_early | paused (trainer.steps_per_run reached)
    total_steps: int | None = None
    best_step: int | None = None  # the step of the best validation loss (its checkpoint is kept)
    best_val_loss: float | None = None
    best_checkpoint: str | None = None
    resumed_from: str | None = None


def prepare_inputs(cfg: DictConfig, world_size: int):
    """Validate the config, resolve the model files and tokenise the pairs; no process groups needed."""
    from framework.training.job_config import validate
    from framework.data.preference import prepare_preferences
    from framework.data.tokenizer import Tokenizer
    from framework.checkpoint import hub

    model_cfg = validate(cfg, world_size)
    if cfg.model.source != "random":
        hub.model_config_for(cfg.model)
    tokenizer = Tokenizer.from_dir(hub.tokenizer_dir(cfg.model))
    return model_cfg, tokenizer, prepare_preferences(cfg.data, tokenizer, seed=int(cfg.seed))


def _pad_multiple(rt) -> int:
    return rt.tp if rt.sp else 1  # sequence parallelism splits the sequence over TP ranks


def packed_length(cfg, rt) -> int:
    """Positions of a packed row of pairs: two rows of data.max_length (each a multiple of TP under SP)."""
    from framework.training.finetune import _packed_length

    return 2 * _packed_length(cfg, rt)


def pack_pairs(cfg, pairs, rt):
    """Bins of training-pair indices when data.packing is on (packed once, deterministically), else None."""
    if not cfg.data.get("packing", False):
        return None
    from framework.data.preference import pair_positions
    from framework.training.finetune import pack_for_training

    return pack_for_training(cfg, [pair_positions(p) for p in pairs], packed_length(cfg, rt), rt, unit="pairs")


def pair_batches(indices: list[int], pairs, micro_batch_size: int, pad_id: int, rt, bins=None,
                 seq_length: int | None = None) -> tuple[list[dict], list]:
    """This DP rank's micro-batches of a global batch, and each micro-batch's pair indices (in its sequence
    order). Unpacked: ``indices`` are pairs, 2 x micro_batch_size rows a micro-batch, all padded to the
    longest row of the global batch. Packed (``bins``): ``indices`` are bins, micro_batch_size rows of
    ``seq_length`` positions a micro-batch. Each carries the global batch's pair and chosen-target counts
    (for the SFT term's normalisation)."""
    from megatron.core import parallel_state as ps

    from framework.data.batching import micro_batches
    from framework.data.preference import collate_packed_pairs, collate_pairs

    mine = micro_batches(indices, ps.get_data_parallel_rank(), rt.dp, micro_batch_size)
    if bins is not None:
        groups = [[i for b in mb for i in bins[b]] for mb in mine]
        everyone = [i for b in indices for i in bins[b]]
        batches = [collate_packed_pairs([[pairs[i] for i in bins[b]] for b in mb], pad_id, seq_length) for mb in mine]
    else:
        groups, everyone = mine, indices
        multiple = _pad_multiple(rt)
        seq = math.ceil(max(pairs[i].longest - 1 for i in indices) / multiple) * multiple
        batches = [collate_pairs([pairs[i] for i in mb], pad_id, multiple, seq) for mb in mine]
    chosen_tokens = sum(pairs[i].chosen.num_targets for i in everyone)
    for mb in batches:
        mb.update(global_pairs=len(everyone), global_chosen_tokens=chosen_tokens)
    return batches, groups


def build_reference(kind: str, cfg, model, model_cfg, rt, data, pad_id: int, checkpoint: Path | None = None):
    """The reference of ``dpo.reference`` (resolved): see framework/training/dpo_reference.py. Call it while
    ``model`` holds the starting weights; precomputed tables come from ``checkpoint`` when it has them."""
    from framework.data.preference import collate_pairs
    from framework.training import dpo_reference as ref
    from framework.training.finetune import build_model

    if kind == "adapters_disabled":
        return ref.AdaptersDisabled(model, cfg.precision)
    if kind == "frozen_copy":
        base_cfg = OmegaConf.merge(cfg, {"peft": {"method": "none"}})
        return ref.FrozenCopy(ref.frozen_copy(model, lambda: build_model(base_cfg, model_cfg, rt)), cfg.precision)
    if checkpoint is not None and (checkpoint / ref.TABLES_FILE).is_file():
        tables = ref.load_tables(checkpoint, {"train": len(data.train), "validation": len(data.validation)})
        log.info("reference log-probabilities read from %s", checkpoint / ref.TABLES_FILE)
        return ref.Precomputed(tables)
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
    """A function giving the DPO metrics over the first trainer.eval_samples validation pairs (all of them
    for null), exactly those pairs at every layout, so validations before and after a resume at another
    data-parallel size compare (early stopping, the best checkpoint). DP rank ``r`` takes the ``r``-th
    contiguous slice of ``ceil(n / DP)`` pairs (the last ranks fewer, possibly none), in micro-batches of up
    to trainer.micro_batch_size pairs, each padded to its own longest row: evaluation has no collective
    over DP before the final sum of the metrics, so ranks may run different numbers of micro-batches."""
    from megatron.core import parallel_state as ps

    from framework.runtime.errors import ConfigError
    from framework.data.preference import collate_pairs
    from framework.training.dpo import dpo_evaluate

    tr = cfg.trainer
    mbs = int(tr.micro_batch_size)
    n = len(val_pairs) if tr.get("eval_samples") is None else min(int(tr.eval_samples), len(val_pairs))
    if n < 1:
        raise ConfigError(f"trainer.eval_samples={tr.eval_samples}: expected at least 1 validation pair")
    per_rank = math.ceil(n / rt.dp)
    rank = ps.get_data_parallel_rank()
    mine = list(range(rank * per_rank, min(n, (rank + 1) * per_rank)))
    chunks = [mine[i:i + mbs] for i in range(0, len(mine), mbs)]
    batches = [collate_pairs([val_pairs[i] for i in c], pad_id, _pad_multiple(rt)) for c in chunks]

    def validate_now():
        reference.attach(batches, chunks, "validation")
        return dpo_evaluate(model, batches, opts, cfg.precision)

    return validate_now


def run(cfg: DictConfig) -> DPOResult:
    from framework.data.batching import BatchOrder
    from framework.runtime import distributed as rtd
    from framework.runtime.progress import progress
    from framework.training.checkpointing import BEST
    from framework.training.dpo import DPOMetrics, DPOOptions, dpo_train_step, resolve_reference
    from framework.training.early_stopping import EarlyStopping
    from framework.training.finetune import (_restore, open_run, _save_trained, _total_steps, _trained_dir,
                                             build_model, count_parameters, save_job_checkpoint)
    from framework.training.optim import build_optimizer, wrap_ddp
    from framework.training.tracking import Tracker
    from framework.training.train_state import LoopState

    world = rtd.world_size_from_env()
    model_cfg, tokenizer, data = prepare_inputs(cfg, world)
    tr = cfg.trainer
    rt, out, ckpts, resume_from = open_run(cfg)
    if rt.is_main:
        from framework.data.report import format_reports

        log.info("data report (tokens count both rows of a pair)\n%s", format_reports(data.reports))

    opts = DPOOptions.from_config(cfg.dpo)
    kind = resolve_reference(opts.reference, cfg.peft.method)
    model = build_model(cfg, model_cfg, rt)
    pad_id = tokenizer.pad_id
    model = wrap_ddp(model, bool(tr.get("distributed_optimizer", False)))
    gbs, mbs = int(tr.global_batch_size), int(tr.micro_batch_size)
    bins = pack_pairs(cfg, data.train, rt)  # a global batch is then gbs bins
    order = BatchOrder(len(data.train) if bins is None else len(bins), gbs, seed=int(cfg.seed))
    total_steps = _total_steps(tr, order)
    optimizer, scheduler = build_optimizer(model, tr, cfg.precision, total_steps=total_steps)
    trainable, total = count_parameters(model)
    log.info("parameters: %s trainable of %s (%.3f%%); reference: %s; loss: %s beta=%g label_smoothing=%g "
             "sft_weight=%g", f"{trainable:,}", f"{total:,}", 100 * trainable / total, kind, opts.loss, opts.beta,
             opts.label_smoothing, opts.sft_weight)
    # from the starting weights, so before a resume restores the trained ones
    reference = build_reference(kind, cfg, model, model_cfg, rt, data, pad_id, resume_from)
    validate_now = _validator(cfg, model, reference, data.validation, opts, pad_id, rt)
    stopper = EarlyStopping.from_config(tr)
    if resume_from is not None:
        loop = _restore(cfg, resume_from, model, optimizer, scheduler, order, stopper, model_cfg, total_steps, rt)
        if loop.finished and (out / "summary.json").is_file():
            log.warning("the run in %s already finished at step %d; nothing to do. To train again, use another "
                        "output_dir or trainer.resume=never", out, loop.step)
            return _result_from_summary(out / "summary.json")
    else:
        val_before = validate_now()
        log.info("validation before training: %s", val_before.format())
        loop = LoopState(total_steps=total_steps, val_before=val_before.loss,
                         extra={"val_before": dataclasses.asdict(val_before), "val_after": None, "history": [],
                                "pairs": 0})
    job = loop.extra  # DPO's progress: per-step metrics, validations, pairs trained
    tracker = Tracker(cfg, out, rt.is_main, first_step=loop.step + 1, wandb_run_id=loop.wandb_run_id)
    loop.wandb_run_id = tracker.wandb_run_id
    if loop.step == 0:
        tracker.scalars(0, DPOMetrics(**job["val_before"]).scalars("val"))

    # Each step: train, log, validate every eval_interval steps and after the last, then checkpoint every
    # save_interval steps, at a new best validation loss, and when this invocation ends.
    save_interval, steps_per_run = tr.get("save_interval"), tr.get("steps_per_run")
    first_step, paused = loop.step, False
    seq_length = None if bins is None else packed_length(cfg, rt)
    bar = progress(total=total_steps - loop.step, desc="preference tuning", enabled=rt.is_main)
    while not loop.finished and not paused:
        step = loop.step + 1
        t0 = time.perf_counter()
        batches, idx = pair_batches(next(order), data.train, mbs, pad_id, rt, bins, seq_length)
        reference.attach(batches, idx, "train")
        res = dpo_train_step(model, optimizer, scheduler, batches, opts, cfg.precision)
        loop.train_seconds += time.perf_counter() - t0
        m = res.metrics
        loop.step = step
        loop.losses.append(m.loss)
        job["history"].append(dataclasses.asdict(m) | {"lr": res.lr, "grad_norm": res.grad_norm})
        job["pairs"] += m.pairs
        bar.update(1, loss=f"{m.loss:.4f}", acc=f"{m.reward_accuracy:.2f}")
        if step % int(tr.log_interval) == 0:
            log.info("step %d/%d %s lr %.3e grad_norm %s", step, total_steps, m.format(), res.lr,
                     "n/a" if res.grad_norm is None else f"{res.grad_norm:.3f}")
        tracker.scalars(step, m.scalars("train") | {"train/lr": res.lr, "train/grad_norm": res.grad_norm})
        ckpts.finalize(blocking=False)  # publish a background checkpoint save that every rank has finished
        improved = False
        if step % int(tr.eval_interval) == 0 or step == total_steps:
            val = validate_now()
            improved = stopper.update(step, val.loss)
            loop.validations.append([step, val.loss])
            job["val_after"] = dataclasses.asdict(val)
            log.info("step %d validation: %s%s", step, val.format(), " (best)" if improved else "")
            tracker.scalars(step, val.scalars("val"))
        loop.finished = step == total_steps or stopper.should_stop
        paused = not loop.finished and steps_per_run is not None and step - first_step >= int(steps_per_run)
        if improved or loop.finished or paused or (save_interval is not None and step % int(save_interval) == 0):
            save_job_checkpoint(ckpts, cfg, model_cfg, rt, model=model, optimizer=optimizer, scheduler=scheduler,
                                order=order, stopper=stopper, loop=loop, best=improved, also=reference.save)
    ckpts.finalize()  # wait for a background save and publish it before anything reads the checkpoints
    bar.close()
    tracker.close()

    trained = None
    if paused:
        log.info("paused at step %d of %d (trainer.steps_per_run=%s); run the same command again to continue",
                 loop.step, total_steps, steps_per_run)
    else:
        if stopper.should_stop:
            log.info("early stopping at step %d: validation loss has not improved by %g for %d validations; best "
                     "%.4f at step %d", loop.step, stopper.min_delta, stopper.patience, stopper.best_loss,
                     stopper.best_step)
        trained = _trained_dir(cfg, out)
        _save_trained(cfg, model, trained, model_cfg)
    best = ckpts.pointer(BEST)
    result = DPOResult(steps=loop.step, history=job["history"], val_before=job["val_before"],
                       val_after=job["val_after"], trainable_params=trainable, total_params=total,
                       output_dir=str(out), trained_dir=None if trained is None else str(trained), reference=kind,
                       pairs_per_s=job["pairs"] / max(loop.train_seconds, 1e-9),
                       status="paused" if paused else "stopped_early" if stopper.should_stop else "completed",
                       total_steps=total_steps, best_step=stopper.best_step,
                       best_val_loss=None if stopper.best_step is None else stopper.best_loss,
                       best_checkpoint=str(best) if best else None,
                       resumed_from=str(resume_from) if resume_from else None)
    if rt.is_main:
        if not paused:
            (out / "summary.json").write_text(json.dumps(dataclasses.asdict(result) | {
                "layout": {"tp": rt.tp, "pp": rt.pp, "dp": rt.dp, "sp": rt.sp}}, indent=1))
        print(summary_table(result, rt), flush=True)
    return result


def _result_from_summary(path: Path) -> DPOResult:
    fields = {f.name for f in dataclasses.fields(DPOResult)}
    return DPOResult(**{k: v for k, v in json.loads(path.read_text()).items() if k in fields})


def summary_table(r: DPOResult, rt) -> str:
    from framework.training.summary import _steps, checkpoint_rows, table

    first, last = r.history[0], r.history[-1]
    b, a = r.val_before, r.val_after or {}

    def change(key, fmt):
        return f"{b[key]:{fmt}} -> " + (f"{a[key]:{fmt}}" if key in a else "n/a")

    rows = [
        ("steps", _steps(r)),
        ("layout", f"TP={rt.tp} PP={rt.pp} DP={rt.dp} SP={'on' if rt.sp else 'off'} ({rt.backend}, {rt.device.type})"),
        ("reference", r.reference),
        ("pairs/s", f"{r.pairs_per_s:,.1f}"),
        ("train loss first -> last", f"{first['loss']:.4f} -> {last['loss']:.4f}"),
        ("train reward accuracy first -> last", f"{first['reward_accuracy']:.3f} -> {last['reward_accuracy']:.3f}"),
        ("validation loss before -> after", change("loss", ".4f")),
        ("validation reward accuracy before -> after", change("reward_accuracy", ".3f")),
        ("validation reward margin before -> after", change("reward_margin", ".4f")),
        ("trainable / total parameters",
         f"{r.trainable_params:,} / {r.total_params:,} ({100 * r.trainable_params / r.total_params:.2f}%)"),
        ("run directory", r.output_dir),
    ]
    if r.trained_dir:
        rows.append(("trained", r.trained_dir))
    return table(rows + checkpoint_rows(r), "Preference tuning summary")
