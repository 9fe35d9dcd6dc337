"""The job engine: one training loop for every task (SFT, DPO, and tasks to come such as a reward model).

A task (:class:`Task`) says only what differs between jobs: how its config and data are checked before
any process group starts, what a batch is, the loss of a micro-batch, what validation reports, what it
adds to a checkpoint, what it does before and after training, and what its summary shows. The engine does
the rest, the same way for every task: the model (pretrained weights, PEFT) in megatron DDP, the batch
order, the optimizer and LR schedule; an exact resume (weights, optimizer, LR schedule, every rank's RNG,
the data position, early stopping, the task's own progress in ``LoopState.extra``) or a validation before
training; then per step the task's micro-batches through megatron's forward-backward schedule (gradient
accumulation over micro-batches and pipeline stages, reduction over data parallelism), the optimizer step,
a log line, the progress bar, TensorBoard / W&B scalars and throughput (the task's units per second, model
TFLOP/s per GPU, MFU, memory); validation every ``trainer.eval_interval`` steps and after the last, early
stopping on its loss; a checkpoint every ``trainer.save_interval`` steps, at a new best validation loss and
when the invocation ends (finished, stopped early, or paused after ``trainer.steps_per_run`` steps), background
saves finalized before exit; at the end the trained weights, ``summary.json`` and the summary table. An
invocation that finds its run already finished returns the summary that run wrote.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from pathlib import Path
from typing import Protocol

from megatron.core.pipeline_parallel import get_forward_backward_func
from omegaconf import DictConfig, OmegaConf

from framework.checkpoint.model_loading import build_pretrained
from framework.data.batching import BatchOrder
from framework.models.config import ModelConfig
from framework.peft.param_count import count_parameters
from framework.peft.relora import Restarts
from framework.peft.virtual_tokens import with_virtual_tokens
from framework.runtime import distributed as rtd
from framework.runtime.progress import progress
from framework.training import run_setup
from framework.training.checkpointing import BEST
from framework.training.early_stopping import EarlyStopping
from framework.training.flops import Throughput, peak_tflops
from framework.training.optim import build_optimizer, wrap_ddp
from framework.training.tracking import Tracker, format_memory, memory_gib
from framework.training.train_state import LoopState, resume_settings

SUMMARY_FILE = "summary.json"


@dataclasses.dataclass
class Report:
    """What a task measured over a training step's global batch or a validation pass (all ranks agree)."""
    loss: float                   # training: the optimised loss; validation: the early-stopping number
    text: str                     # for the log line, e.g. "loss 1.2345"
    scalars: dict                 # for TensorBoard / W&B, e.g. {"train/loss": 1.2345}
    count: int = 0                # training: units processed (Task.unit), for throughput
    record: dict | None = None    # JSON kept in checkpoints: a step's in LoopState.extra["history"] (with lr
    #                               and grad_norm), a validation's as extra["val_before"] / extra["val_after"]


@dataclasses.dataclass
class Job:
    """What the engine has set up when it calls a task's hooks."""
    cfg: DictConfig
    model_cfg: ModelConfig
    rt: object                    # framework.runtime.distributed Runtime: layout, device, is_main
    model: object                 # this rank's stage in megatron DDP, PEFT applied
    output_dir: Path
    resume_from: Path | None      # the checkpoint this invocation continues from (None: a fresh start)
    log: logging.Logger


@dataclasses.dataclass
class Outcome:
    """The engine's account of an invocation, from which a task builds its result."""
    loop: LoopState
    status: str                   # completed | stopped_early | paused (trainer.steps_per_run reached)
    trainable_params: int
    total_params: int
    output_dir: str
    trained_dir: str | None       # adapters/NAME or weights/ (None: paused)
    units_per_s: float            # Task.unit per second of training, over every invocation of the run
    best_step: int | None
    best_val_loss: float | None
    best_checkpoint: str | None
    resumed_from: str | None


class Task(Protocol):
    """What one kind of training job does differently; everything else is the engine's."""
    name: str                     # the progress bar's description, e.g. "fine-tuning"
    unit: str                     # what Report.count counts, e.g. "tokens": throughput is logged as tokens/s
    log: logging.Logger           # the job's logger
    result_type: type             # the dataclass run() returns, also read back from summary.json

    def prepare(self, cfg: DictConfig, world_size: int) -> ModelConfig:
        """Check the config and the data and tokenise it, before any process group (errors cost seconds)."""

    def setup(self, job: Job) -> int:
        """Before the optimizer and any restore (the model holds its starting weights): build what batches
        and validation need; returns the number of items the batch order draws global batches from."""

    def batch(self, indices: list[int]) -> list[dict]:
        """This data-parallel rank's micro-batches of the global batch ``indices`` (from BatchOrder)."""

    def forward_step(self, data_iterator, model):
        """megatron's forward step for a micro-batch of the last ``batch``: (output tensor, loss function);
        the loss function returns (loss sum, its normaliser, {name: tensor reduced in train_report})."""

    def train_report(self, reduced: list[dict]) -> Report:
        """The step's measurements from the loss functions' per-micro-batch dicts on this rank."""

    def validate(self) -> Report:
        """A validation pass (every rank calls it)."""

    def save(self, directory: Path) -> None:
        """Write the task's own files into a checkpoint directory (e.g. DPO's precomputed reference)."""

    def before_training(self, loop: LoopState) -> None:
        """A fresh start only, before the first validation (e.g. SFT's completion without the adapter)."""

    def after_training(self, job: Job) -> None:
        """After the last step and the trained weights are written (not when paused)."""

    def result(self, outcome: Outcome):
        """The job's result (a ``result_type``), written to summary.json when the run is not paused."""

    def summary(self, result, rt) -> str:
        """The table printed at the end."""


def run(cfg: DictConfig, task: Task):
    log, tr = task.log, cfg.trainer
    world = rtd.world_size_from_env()
    model_cfg = task.prepare(cfg, world)
    rt, out, ckpts, resume_from = run_setup.open_run(cfg, log)
    model = wrap_ddp(build_pretrained(cfg, model_cfg, rt), tr.distributed_optimizer)
    job = Job(cfg, model_cfg, rt, model, out, resume_from, log)
    weights, settings = run_setup.TrainedWeights.of(cfg, model_cfg), resume_settings(cfg)
    order = BatchOrder(task.setup(job), tr.global_batch_size, seed=cfg.seed)
    total_steps = run_setup.total_steps(tr, order)
    optimizer, scheduler = build_optimizer(model, tr, cfg.precision, total_steps=total_steps)
    trainable, total = count_parameters(model)
    log.info("parameters: %s trainable of %s (%.3f%%)", f"{trainable:,}", f"{total:,}", 100 * trainable / total)
    stopper = EarlyStopping.from_config(tr)
    # ReLoRA: after some steps the adapter is merged into the base and restarted (framework/peft/relora.py)
    restarts = None if cfg.peft.method != "relora" else Restarts.from_config(cfg.peft, model, optimizer, scheduler,
                                                                              cfg.seed)

    before = None
    if resume_from is not None:
        loop = run_setup.restore(resume_from, weights, settings, log, model=model, optimizer=optimizer,
                                 scheduler=scheduler, order=order, stopper=stopper, steps=total_steps, rt=rt)
        if loop.finished and (out / SUMMARY_FILE).is_file():
            log.warning("the run in %s already finished at step %d (%s); nothing to do. To train again, use "
                        "another output_dir or trainer.resume=never", out, loop.step,
                        "stopped early" if stopper.should_stop else "all steps done")
            return _result_from_summary(task.result_type, out / SUMMARY_FILE)
    else:
        loop = LoopState(total_steps=total_steps)
        task.before_training(loop)
        before = task.validate()
        loop.val_before = before.loss
        if before.record is not None:
            loop.extra["val_before"] = before.record
        log.info("validation before training: %s", before.text)
    if restarts is not None:
        restarts.set_lr(loop.step + 1)  # a warm-up after a restart, over the scheduler's (restored) rate
    tracker = Tracker(tr, out, rt.is_main, first_step=loop.step + 1, wandb_run_id=loop.wandb_run_id,
                      run_config=OmegaConf.to_container(cfg, resolve=True))
    loop.wandb_run_id = tracker.wandb_run_id
    if before is not None:
        tracker.scalars(0, before.scalars)

    # Each step: train, log, validate every eval_interval steps and after the last, then checkpoint every
    # save_interval steps, at a new best validation loss, and when this invocation ends.
    save_interval, steps_per_run = tr.get("save_interval"), tr.get("steps_per_run")
    first_step, paused = loop.step, False
    units_before, seconds_before = loop.units, loop.train_seconds
    t0, not_training = time.perf_counter(), 0.0  # not_training: validation and checkpoint seconds
    throughput = Throughput(model_cfg, cfg.peft, world, peak_tflops(tr.get("peak_tflops"), rt.device))
    bar = progress(total=total_steps - loop.step, desc=task.name, enabled=rt.is_main)
    while not loop.finished and not paused:
        step = loop.step + 1
        micro_batches = task.batch(next(order))
        throughput.add_step(rt.dp * sum(mb["tokens"].shape[0] for mb in micro_batches), micro_batches)
        micro_batches = with_virtual_tokens(model, micro_batches)  # prompt methods: n more positions, no loss
        optimizer.zero_grad()
        model.zero_grad_buffer()
        reduced = get_forward_backward_func()(  # accumulates the micro-batches' gradients, finalised over DP
            forward_step_func=task.forward_step, data_iterator=iter(micro_batches), model=[model],
            num_microbatches=len(micro_batches), seq_length=micro_batches[0]["tokens"].shape[1],
            micro_batch_size=micro_batches[0]["tokens"].shape[0], forward_only=False)
        lr = optimizer.param_groups[0]["lr"]  # this step's (the scheduler sets the next one's below)
        _ok, grad_norm, _ = optimizer.step()
        scheduler.step(increment=1)
        grad_norm = None if grad_norm is None else float(grad_norm)
        if restarts is not None and restarts.after_step(step):
            log.info("step %d: ReLoRA restart %d: adapter merged into the base, new factors, optimizer state %s",
                     step, step // restarts.merge_every, "zeroed" if restarts.reset == "zero" else
                     f"pruned to its largest {1 - restarts.prune_ratio:.0%}")
        report = task.train_report(reduced)

        loop.step, loop.units = step, loop.units + report.count
        loop.losses.append(report.loss)
        if report.record is not None:
            loop.extra.setdefault("history", []).append(report.record | {"lr": lr, "grad_norm": grad_norm})
        seconds = time.perf_counter() - t0 - not_training
        loop.train_seconds = seconds_before + seconds
        per_s = (loop.units - units_before) / seconds  # this invocation's throughput
        flops, memory = throughput.scalars(seconds), memory_gib(rt.device)  # TFLOP/s per GPU, MFU; GiB
        bar.update(1, loss=f"{report.loss:.4f}", lr=f"{lr:.2e}")
        if step % tr.log_interval == 0:
            log.info("step %d/%d %s lr %.3e grad_norm %s %s/s %.0f%s memory %s", step, total_steps, report.text, lr,
                     "n/a" if grad_norm is None else f"{grad_norm:.3f}", task.unit, per_s,
                     Throughput.describe(flops), format_memory(memory))
        tracker.scalars(step, report.scalars | {"train/lr": lr, "train/grad_norm": grad_norm,
                                                f"train/{task.unit}_per_s": per_s,
                                                "train/memory_gib": max(memory.values()), **flops})
        ckpts.finalize(blocking=False)  # publish a background checkpoint save that every rank has finished

        improved = False
        if step % tr.eval_interval == 0 or step == total_steps:
            t_eval = time.perf_counter()
            val = task.validate()
            not_training += time.perf_counter() - t_eval
            improved = stopper.update(step, val.loss)
            loop.validations.append([step, val.loss])
            if val.record is not None:
                loop.extra["val_after"] = val.record
            log.info("step %d validation: %s%s", step, val.text, " (best)" if improved else "")
            tracker.scalars(step, val.scalars)
        loop.finished = step == total_steps or stopper.should_stop
        paused = not loop.finished and steps_per_run is not None and step - first_step >= int(steps_per_run)
        if improved or loop.finished or paused or (save_interval is not None and step % int(save_interval) == 0):
            t_save = time.perf_counter()
            run_setup.save_job_checkpoint(ckpts, weights, settings, tr.keep_last, rt, log, model=model,
                                          optimizer=optimizer, scheduler=scheduler, order=order, stopper=stopper,
                                          loop=loop, best=improved, also=task.save)
            not_training += time.perf_counter() - t_save
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
        if loop.validations:
            log.info("validation loss after training: %.4f", loop.validations[-1][1])
        trained = weights.save(model, out)
        task.after_training(job)
    best = ckpts.pointer(BEST)
    result = task.result(Outcome(
        loop=loop, status="paused" if paused else "stopped_early" if stopper.should_stop else "completed",
        trainable_params=trainable, total_params=total, output_dir=str(out),
        trained_dir=None if trained is None else str(trained),
        units_per_s=loop.units / max(loop.train_seconds, 1e-9), best_step=stopper.best_step,
        best_val_loss=None if stopper.best_step is None else stopper.best_loss,
        best_checkpoint=str(best) if best else None, resumed_from=str(resume_from) if resume_from else None))
    if rt.is_main:
        if not paused:
            summary = dataclasses.asdict(result) | {"layout": {"tp": rt.tp, "pp": rt.pp, "dp": rt.dp, "sp": rt.sp}}
            (out / SUMMARY_FILE).write_text(json.dumps(summary, indent=1))
        print(task.summary(result, rt), flush=True)
    return result


def _result_from_summary(result_type: type, path: Path):
    fields = {f.name for f in dataclasses.fields(result_type)}
    return result_type(**{k: v for k, v in json.loads(path.read_text()).items() if k in fields})
