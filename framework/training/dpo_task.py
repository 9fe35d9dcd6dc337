"""Preference tuning (DPO and its variants) as a task of the job engine (framework/training/engine.py): the
data are preference pairs (framework/data/preference.py), the loss of a micro-batch is the DPO family's
(framework/training/dpo.py) against a reference model (framework/training/dpo_reference.py).

Per step, every rank logs and (on rank 0) sends to TensorBoard: loss, rewards of chosen and rejected, their
margin, reward accuracy (chosen > rejected), the chosen and rejected log-probabilities, lr and grad norm;
validation (every ``trainer.eval_interval`` steps and at the end, over the first ``trainer.eval_samples``
validation pairs) logs the same under ``val/``, and its DPO loss drives early stopping and the best
checkpoint. The per-step metrics and the first and last validation are kept in ``LoopState.extra``, so
they survive a resume. The reference is built from the starting weights *before* a resume restores the
trained ones; a precomputed reference's tables are saved in each checkpoint and read back.

Packing (``data.packing=true``): whole pairs are packed into bins of ``2 x data.max_length`` positions (the
room of one unpacked pair; rounded up to a multiple of TP under sequence parallelism), once, by
best-fit decreasing (framework/data/packing.py); a global batch is then ``trainer.global_batch_size`` bins,
so its number of pairs varies, and the loss stays the mean over its pairs. Validation is not packed.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from pathlib import Path

from megatron.core import parallel_state as ps
from omegaconf import DictConfig, OmegaConf

from framework.checkpoint import hub
from framework.checkpoint.model_loading import build_pretrained
from framework.data.batching import micro_batches
from framework.data.preference import collate_packed_pairs, collate_pairs, pair_positions, prepare_preferences
from framework.data.report import format_reports
from framework.data.tokenizer import Tokenizer
from framework.runtime.errors import ConfigError
from framework.runtime.text_table import table
from framework.training import dpo_reference as ref
from framework.training import summary
from framework.training.dpo import (DPOMetrics, DPOOptions, dpo_evaluate, dpo_forward_step, model_inputs,
                                   reduce_metrics, resolve_reference, sft_term_scale)
from framework.training.engine import Job, Outcome, Report
from framework.training.job_config import validate
from framework.training.run_setup import pack_for_training
from framework.training.run_setup import packed_length as row_length
from framework.training.train_state import LoopState

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


class DPOTask:
    """The DPO loss family on preference pairs, against a reference model."""
    name, unit, log, result_type = "preference tuning", "pairs", log, DPOResult

    def prepare(self, cfg: DictConfig, world_size: int):
        self.cfg = cfg
        model_cfg, self.tokenizer, self.data = prepare_inputs(cfg, world_size)
        self.opts = DPOOptions.from_config(cfg.dpo)
        self.kind = resolve_reference(self.opts.reference, cfg.peft.method)
        return model_cfg

    def setup(self, job: Job) -> int:
        cfg, rt, self.rt = self.cfg, job.rt, job.rt
        if rt.is_main:
            log.info("data report (tokens count both rows of a pair)\n%s", format_reports(self.data.reports))
        log.info("reference: %s; loss: %s beta=%g label_smoothing=%g sft_weight=%g", self.kind, self.opts.loss,
                 self.opts.beta, self.opts.label_smoothing, self.opts.sft_weight)
        self.bins = pack_pairs(cfg.data, cfg.trainer, self.data.train, rt)  # a global batch is then global_batch_size bins
        self.seq_length = None if self.bins is None else packed_length(cfg.data, rt)
        # from the starting weights, so before a resume restores the trained ones
        self.reference = build_reference(self.kind, cfg, job.model, job.model_cfg, rt, self.data,
                                         self.tokenizer.pad_id, job.resume_from)
        self._validate = _validator(cfg.trainer, cfg.precision, job.model, self.reference, self.data.validation,
                                    self.opts, self.tokenizer.pad_id, rt)
        self.device = next(job.model.parameters()).device
        return len(self.data.train) if self.bins is None else len(self.bins)

    def batch(self, indices: list[int]) -> list[dict]:
        batches, idx = pair_batches(indices, self.data.train, self.cfg.trainer.micro_batch_size,
                                    self.tokenizer.pad_id, self.rt, self.bins, self.seq_length)
        self.reference.attach(batches, idx, "train")
        # the SFT term's scale needs the whole global batch's counts, which only these batches carry
        self._forward_step = dpo_forward_step(self.opts, self.cfg.precision, self.device,
                                              sft_term_scale(self.opts, batches))
        return model_inputs(batches)

    def forward_step(self, data_iterator, model):
        return self._forward_step(data_iterator, model)

    def train_report(self, reduced: list[dict]) -> Report:
        m = reduce_metrics(reduced, self.device, self.opts.sft_weight)
        return Report(m.loss, m.format(), m.scalars("train"), count=m.pairs, record=dataclasses.asdict(m))

    def validate(self) -> Report:
        m = self._validate()
        return Report(m.loss, m.format(), m.scalars("val"), record=dataclasses.asdict(m))

    def save(self, directory: Path) -> None:
        self.reference.save(directory)  # a precomputed reference's tables; nothing for the others

    def before_training(self, loop: LoopState) -> None:
        """Nothing before the first validation."""

    def after_training(self, job: Job) -> None:
        """Nothing after the trained weights are written."""

    def result(self, o: Outcome) -> DPOResult:
        loop = o.loop
        return DPOResult(steps=loop.step, history=loop.extra.get("history", []), val_before=loop.extra["val_before"],
                         val_after=loop.extra.get("val_after"), trainable_params=o.trainable_params,
                         total_params=o.total_params, output_dir=o.output_dir, trained_dir=o.trained_dir,
                         reference=self.kind, pairs_per_s=o.units_per_s, status=o.status,
                         total_steps=loop.total_steps, best_step=o.best_step, best_val_loss=o.best_val_loss,
                         best_checkpoint=o.best_checkpoint, resumed_from=o.resumed_from)

    def summary(self, result: DPOResult, rt) -> str:
        return summary_table(result, rt)


def prepare_inputs(cfg: DictConfig, world_size: int):
    """Validate the config, resolve the model files and tokenise the pairs; no process groups needed."""
    model_cfg = validate(cfg, world_size)
    if cfg.model.source != "random":
        hub.model_config_for(cfg.model)
    tokenizer = Tokenizer.from_dir(hub.tokenizer_dir(cfg.model))
    return model_cfg, tokenizer, prepare_preferences(cfg.data, tokenizer, seed=cfg.seed)


def _pad_multiple(rt) -> int:
    return rt.tp if rt.sp else 1  # sequence parallelism splits the sequence over TP ranks


def packed_length(data, rt) -> int:
    """Positions of a packed row of pairs: two rows of data.max_length (each a multiple of TP under SP)."""
    return 2 * row_length(data, rt)


def pack_pairs(data, trainer, pairs, rt):
    """Bins of training-pair indices when data.packing is on (packed once, deterministically), else None."""
    if not data.packing:
        return None
    return pack_for_training(trainer, [pair_positions(p) for p in pairs], packed_length(data, rt), rt, log,
                             unit="pairs")


def pair_batches(indices: list[int], pairs, micro_batch_size: int, pad_id: int, rt, bins=None,
                 seq_length: int | None = None) -> tuple[list[dict], list]:
    """This DP rank's micro-batches of a global batch, and each micro-batch's pair indices (in its sequence
    order). Unpacked: ``indices`` are pairs, 2 x micro_batch_size rows a micro-batch, all padded to the
    longest row of the global batch. Packed (``bins``): ``indices`` are bins, micro_batch_size rows of
    ``seq_length`` positions a micro-batch. Each carries the global batch's pair and chosen-target counts
    (for the SFT term's normalisation)."""
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
    ``model`` holds the starting weights; precomputed tables come from ``checkpoint`` when it has them. It
    takes the job's ``cfg``: a frozen copy is the job's model built again without PEFT."""
    if kind == "adapters_disabled":
        return ref.AdaptersDisabled(model, cfg.precision)
    if kind == "frozen_copy":
        base_cfg = OmegaConf.merge(cfg, {"peft": {"method": "none"}})
        return ref.FrozenCopy(ref.frozen_copy(model, lambda: build_pretrained(base_cfg, model_cfg, rt)), cfg.precision)
    if checkpoint is not None and (checkpoint / ref.TABLES_FILE).is_file():
        tables = ref.load_tables(checkpoint, {"train": len(data.train), "validation": len(data.validation)})
        log.info("reference log-probabilities read from %s", checkpoint / ref.TABLES_FILE)
        return ref.Precomputed(tables)
    t0 = time.perf_counter()
    mbs = cfg.trainer.micro_batch_size

    def collate(pairs):
        return collate_pairs(pairs, pad_id, _pad_multiple(rt))

    tables = {split: ref.precompute_table(model, pairs, mbs, collate, cfg.precision)
              for split, pairs in (("train", data.train), ("validation", data.validation))}
    log.info("reference log-probabilities of %d training and %d validation pairs precomputed in %.1fs",
             len(data.train), len(data.validation), time.perf_counter() - t0)
    return ref.Precomputed(tables)


def _validator(trainer, precision: str, model, reference, val_pairs, opts, pad_id: int, rt):
    """A function giving the DPO metrics over the first trainer.eval_samples validation pairs (all of them
    for null), exactly those pairs at every layout, so validations before and after a resume at another
    data-parallel size compare (early stopping, the best checkpoint). DP rank ``r`` takes the ``r``-th
    contiguous slice of ``ceil(n / DP)`` pairs (the last ranks fewer, possibly none), in micro-batches of up
    to trainer.micro_batch_size pairs, each padded to its own longest row: evaluation has no collective
    over DP before the final sum of the metrics, so ranks may run different numbers of micro-batches."""
    mbs = trainer.micro_batch_size
    n = len(val_pairs) if trainer.eval_samples is None else min(trainer.eval_samples, len(val_pairs))
    if n < 1:
        raise ConfigError(f"trainer.eval_samples={trainer.eval_samples}: expected at least 1 validation pair")
    per_rank = math.ceil(n / rt.dp)
    rank = ps.get_data_parallel_rank()
    mine = list(range(rank * per_rank, min(n, (rank + 1) * per_rank)))
    chunks = [mine[i:i + mbs] for i in range(0, len(mine), mbs)]
    batches = [collate_pairs([val_pairs[i] for i in c], pad_id, _pad_multiple(rt)) for c in chunks]

    def validate_now() -> DPOMetrics:
        reference.attach(batches, chunks, "validation")
        return dpo_evaluate(model, batches, opts, precision)

    return validate_now


def summary_table(r: DPOResult, rt) -> str:
    first, last = r.history[0], r.history[-1]
    b, a = r.val_before, r.val_after or {}

    def change(key, fmt):
        return f"{b[key]:{fmt}} -> " + (f"{a[key]:{fmt}}" if key in a else "n/a")

    rows = [
        ("steps", summary.steps(r)),
        ("layout", summary.layout(rt)),
        ("reference", r.reference),
        ("pairs/s", f"{r.pairs_per_s:,.1f}"),
        ("train loss first -> last", f"{first['loss']:.4f} -> {last['loss']:.4f}"),
        ("train reward accuracy first -> last", f"{first['reward_accuracy']:.3f} -> {last['reward_accuracy']:.3f}"),
        ("validation loss before -> after", change("loss", ".4f")),
        ("validation reward accuracy before -> after", change("reward_accuracy", ".3f")),
        ("validation reward margin before -> after", change("reward_margin", ".4f")),
        ("trainable / total parameters", summary.parameters(r)),
        ("run directory", r.output_dir),
    ]
    if r.trained_dir:
        rows.append(("trained", r.trained_dir))
    return table(rows + summary.checkpoint_rows(r), "Preference tuning summary")
