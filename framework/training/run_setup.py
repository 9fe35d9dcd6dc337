"""What every training job sets up around its loop: the run's processes and directory, the checkpoint to
resume from and its restore, a job checkpoint's save, the run's length, the parameter counts, where the
trained weights go, and packing of the training set.

The job engine (framework/training/engine.py) calls these in order; a task never needs to. They take the
sections they need; only ``open_run``, which records the whole config in the run directory, takes it all.
Each function that reports takes the job's logger, so a job's messages stay under one name
(``framework.finetune``, ``framework.dpo``).
"""

from __future__ import annotations

import dataclasses
import logging
import math
from pathlib import Path

import torch.distributed as dist
from omegaconf import DictConfig, OmegaConf

from framework.checkpoint.trained import load_trained, save_trained
from framework.data.packing import pack, packing_efficiency
from framework.models.config import ModelConfig
from framework.models.gpt import te_available
from framework.peft.registry import get_method
from framework.runtime import distributed as rtd
from framework.runtime.errors import ConfigError
from framework.training.checkpointing import TRAIN_STATE_DIR, Checkpoints
from framework.training.train_state import (load_train_state, read_state, save_train_state,
                                            settings_differences)


def open_run(cfg: DictConfig, log: logging.Logger):
    """Start a job's processes and its run directory (all ranks call): the process groups, the checkpoint
    store, the checkpoint to resume from (None: a fresh start), and, on rank 0, OUTPUT_DIR with the resolved
    config. Returns (runtime, output dir, Checkpoints, resume_from)."""
    par = cfg.parallel
    rt = rtd.initialize(tp=par.tensor, pp=par.pipeline, sp=par.sequence, seed=cfg.seed)
    out = Path(cfg.output_dir)
    ckpts = Checkpoints(out / "checkpoints", async_save=cfg.trainer.async_save)
    resume_from = resume_point(cfg.trainer, ckpts, rt, log)
    if rt.is_main:
        out.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(cfg, out / "config.yaml", resolve=True)
    return rt, out, ckpts, resume_from


def resume_point(trainer, ckpts: Checkpoints, rt, log: logging.Logger) -> Path | None:
    """The checkpoint this run continues from (None: a fresh start), per trainer.resume. All ranks decide
    from the same files; then global rank 0 removes what an interrupted save left behind, and, for
    trainer.resume=never, the checkpoints of an earlier run in the same output_dir."""
    resume = trainer.resume
    point = ckpts.resume_point(resume)
    existing = ckpts.complete()
    if point is not None and resume != "auto" and point.parent == ckpts.root.absolute():
        step = read_state(point / TRAIN_STATE_DIR)["step"]
        later = [s for s in existing if s > step]
        if later:
            raise ConfigError(f"trainer.resume={resume}: {ckpts.root} also holds later checkpoints (steps {later}), "
                              "which a later auto-resume would pick instead of this branch; use another output_dir "
                              "or delete them")
    dist.barrier()  # everyone has read the directory before rank 0 changes it
    if rt.is_main:
        removed = ckpts.remove_leftovers()
        if removed:
            log.warning("removed what an interrupted checkpoint save left in %s: %s", ckpts.root, ", ".join(removed))
        if resume == "never" and existing:
            log.warning("trainer.resume=never: removing the %d checkpoint(s) of an earlier run in %s", len(existing),
                        ckpts.root)
            ckpts.remove_all()
    dist.barrier()
    if point is None and resume == "auto":
        log.info("no checkpoint in %s: starting from step 0", ckpts.root)
    return point


def total_steps(tr, order) -> int:
    """The run's length: trainer.max_steps, or the steps that show every item of ``order`` (samples, pairs
    or packed bins) trainer.max_epochs times (rounded up), whichever is smaller."""
    bounds = [] if tr.max_steps is None else [tr.max_steps]
    if tr.max_epochs is not None:
        bounds.append(math.ceil(tr.max_epochs * order.steps_per_epoch))
    return max(1, min(bounds))


@dataclasses.dataclass(frozen=True)
class TrainedWeights:
    """What a run trains (``peft``: an adapter, the full weights for ``peft.method=none``, ReLoRA's merged base
    and adapter) and where it lives in a run or checkpoint directory: adapters/``adapter_name``, or weights/
    when it includes base weights."""
    peft: DictConfig
    adapter_name: str
    model_cfg: ModelConfig
    base: dict                    # the base model's model.name and model.source, recorded beside the weights

    @classmethod
    def of(cls, cfg: DictConfig, model_cfg: ModelConfig) -> "TrainedWeights":
        return cls(cfg.peft, cfg.adapter_name, model_cfg, {"name": cfg.model.name, "source": cfg.model.source})

    def dir(self, root: Path) -> Path:
        return root / "weights" if get_method(self.peft.method).saves_base else root / "adapters" / self.adapter_name

    def save(self, model, root: Path) -> Path:
        """Write them from the DDP-wrapped ``model`` under ``root`` (all ranks); returns their directory."""
        directory = self.dir(root)
        save_trained(model.module, directory, self.peft, self.model_cfg, base=self.base)
        return directory

    def load(self, model, root: Path) -> None:
        load_trained(model.module, self.dir(root), self.peft, self.model_cfg)


def save_job_checkpoint(ckpts: Checkpoints, weights: TrainedWeights, settings: dict, keep_last: int | None, rt,
                        log: logging.Logger, *, model, optimizer, scheduler, order, stopper, loop, best: bool,
                        also=None) -> Path:
    """Checkpoint ``loop.step`` (all ranks call): the trained weights, then ``also(directory)`` (a task's own
    files, e.g. DPO's precomputed reference), then the train state with the run's ``settings``
    (train_state.resume_settings), whose state.json, written last, marks the checkpoint complete
    (framework/training/checkpointing.py). ``keep_last``: trainer.keep_last."""
    def write(directory: Path) -> list:  # megatron AsyncRequests of a background save (trainer.async_save)
        weights.save(model, directory)
        if also is not None:
            also(directory)
        return save_train_state(directory / TRAIN_STATE_DIR, model=model, optimizer=optimizer, scheduler=scheduler,
                                order=order, stopper=stopper, loop=loop, settings=settings, rt=rt,
                                background=ckpts.async_save)

    path = ckpts.save(loop.step, write, best=best, keep_last=keep_last)
    log.info("step %d checkpoint %s%s%s", loop.step, path, " (best validation loss so far)" if best else "",
             ": optimizer state being written in the background" if ckpts.pending else "")
    return path


def restore(point: Path, weights: TrainedWeights, settings: dict, log: logging.Logger, *, model, optimizer,
            scheduler, order, stopper, steps: int, rt):
    """Load the trained weights and the train state of checkpoint ``point``; returns the loop's progress
    (LoopState). Refuses (naming the keys) a checkpoint trained with ``settings`` (resume_settings) that
    differ, which would make the continuation another training run than the one it interrupted; ``steps``
    is this run's length."""
    state = read_state(point / TRAIN_STATE_DIR)
    problems = settings_differences(state["settings"], settings)
    if state["total_steps"] != steps:
        problems.append(f"run length (trainer.max_steps / trainer.max_epochs): checkpoint {state['total_steps']} "
                        f"steps, now {steps} (the LR schedule depends on it)")
    trained = weights.dir(point)
    if not trained.is_dir():
        problems.append(f"{trained} does not exist (adapter_name or peft.method changed?)")
    if problems:
        raise ConfigError(f"cannot resume from {point}: it belongs to a run with other settings:\n  - "
                          + "\n  - ".join(problems) + "\nresume with the same settings, or start a new run "
                          "(another output_dir, or trainer.resume=never)")
    weights.load(model, point)
    loop = load_train_state(point / TRAIN_STATE_DIR, model=model, optimizer=optimizer, scheduler=scheduler,
                            order=order, stopper=stopper, rt=rt)
    log.info("resumed from %s: step %d of %d, epoch %d, %d of %d samples into it", point, loop.step, steps,
             order.epoch, order.position, order.num_samples)
    return loop


def packed_length(data, rt) -> int:
    """Row length of packed batches: data.max_length rounded up to a multiple of TP under SP."""
    multiple = rt.tp if rt.sp else 1
    return math.ceil(data.max_length / multiple) * multiple


def pack_for_training(trainer, lengths: list[int], size: int, rt, log: logging.Logger,
                      unit: str = "samples") -> list[list[int]]:
    """Bins of ``size`` positions over items of ``lengths`` positions (``framework.data.packing.pack``),
    refused on the Transformer Engine layer spec, with the efficiency logged; ``unit`` names the items."""
    if te_available():
        # TE's fused attention takes the causal mask type and would not apply our block-diagonal mask.
        raise ConfigError("data.packing=true is supported on the local (non-Transformer-Engine) layer spec "
                          "only; THD packed_seq_params for TE are not implemented")
    bins = pack(lengths, size)
    if len(bins) < trainer.global_batch_size:
        log.warning("packing: %d bins is fewer than trainer.global_batch_size=%d (a global batch is that many "
                    "bins); batches will repeat bins", len(bins), trainer.global_batch_size)
    if rt.is_main:
        log.info("packing: %d %s into %d bins of %d positions, efficiency %.1f%% (%.2f %s per bin)",
                 len(lengths), unit, len(bins), size, 100 * packing_efficiency(bins, lengths, size),
                 len(lengths) / len(bins), unit)
    return bins
