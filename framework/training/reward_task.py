"""Reward-model training as a task of the job engine (framework/training/engine.py): the data are preference
pairs (framework/data/preference.py, with an optional ``"margin"`` per record), the model's LM head is a score
head (``head: score``: framework/models/score_head.py, built by framework/checkpoint/model_loading.py and always
trained, with LoRA or any other method, or full parameters), the loss the Bradley-Terry loss of
framework/training/reward.py.

Per step, every rank logs and (on rank 0) sends to TensorBoard: loss, accuracy (chosen scored above rejected),
margin, the mean scores of chosen and rejected, the mean and standard deviation of all scores, lr and grad
norm; validation (every ``trainer.eval_interval`` steps and at the end, over the first ``trainer.eval_samples``
validation pairs, split over DP ranks) logs the same under ``val/``; its loss drives early stopping and the
best checkpoint. Every checkpoint and the trained weights carry the head as ``score_head.safetensors`` beside
the adapter (or the full weights, which hold it too); a resume reads it back before the engine restores the
rest. Not yet: packing (``data.packing``), prompt methods (their virtual tokens), LoRA on the output layer
(the head replaces it), encoder-decoder models.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from pathlib import Path

from megatron.core import parallel_state as ps
from omegaconf import DictConfig

from framework.checkpoint import hub
from framework.checkpoint.model_checks import model_config, model_problems
from framework.checkpoint.score_head import load_score_head, save_score_head
from framework.config.job import Layout, typed
from framework.data.batching import micro_batches
from framework.data.preference import FORMAT, check_preference_options, prepare_preferences
from framework.data.report import format_reports
from framework.data.tokenizer import Tokenizer
from framework.models.kinds import DECODER_ONLY
from framework.models.registry import kind_of
from framework.peft.registry import METHODS, config_problems, get_method
from framework.runtime.errors import ConfigError
from framework.runtime.text_table import table
from framework.training import engine, summary
from framework.training.engine import Job, Outcome, Report
from framework.training.reward import (RewardOptions, collate_scored_pairs, options_problems, reduce_metrics,
                                       reward_evaluate, reward_forward_step)
from framework.training.run_setup import TrainedWeights
from framework.training.train_state import LoopState

log = logging.getLogger("framework.reward")


@dataclasses.dataclass
class RewardResult:
    steps: int
    history: list                 # per step: RewardMetrics as a dict, plus lr and grad_norm
    val_before: dict
    val_after: dict | None        # the last validation (None: paused before any)
    trainable_params: int
    total_params: int
    output_dir: str
    trained_dir: str | None       # adapters/NAME or weights/, each with score_head.safetensors (None: paused)
    pairs_per_s: float
    status: str = "completed"     # completed | stopped_early | paused (trainer.steps_per_run reached)
    total_steps: int | None = None
    best_step: int | None = None
    best_val_loss: float | None = None
    best_checkpoint: str | None = None
    resumed_from: str | None = None


def job_problems(cfg) -> list[str]:
    """What a reward-model job needs of ``head``, ``data``, ``peft`` and ``reward``."""
    problems = []
    if cfg.get("head") != "score":
        problems.append(f"head={cfg.get('head')!r}: a reward model needs head=score (conf/reward.yaml sets it)")
    fmt = cfg.data.get("format")
    if fmt != FORMAT:
        problems.append(f"data.format={fmt!r}: a reward model trains on preference pairs (data.format={FORMAT}, "
                        f"e.g. data=preference_arithmetic)")
    problems += check_preference_options(cfg.data)
    if cfg.data.get("packing"):
        problems.append("data.packing=true is not supported for reward models yet; use data.packing=false")
    method = cfg.peft.method
    if method in METHODS and get_method(method).artefact == "prompt_table":
        problems.append(f"peft.method={method!r}: prompt methods are not supported for reward models yet; use "
                        "peft=lora (or another adapter method) or peft=none")
    if "output" in list(cfg.peft.get("targets") or []):
        problems.append("peft.targets: 'output' (the LM head) does not exist in a reward model (a score head, "
                        "always trained, replaces it); remove it")
    return problems + options_problems(cfg.get("reward"))


def validate(cfg: DictConfig, world_size: int):
    """Raise ConfigError (every problem in one message) or return the model architecture: the checks of
    framework/training/job_config.py's ``validate`` with the reward model's own in place of SFT's and DPO's."""
    problems, all_typed = typed(cfg, require_validation=True)
    if all_typed:
        model = model_config(cfg)
        problems += model_problems(cfg, model, world_size)
        problems += Layout.of(cfg.parallel, cfg.trainer, world_size).batch_problems(cfg.trainer)
        if cfg.peft.method not in METHODS:
            problems.append(f"peft.method={cfg.peft.method!r} is not one of {sorted(METHODS)}")
        problems += config_problems(cfg, model)
        if kind_of(model) is not DECODER_ONLY:
            problems.append(f"model family {model.family!r}: reward models are decoder-only (a score head on the "
                            "last token)")
        problems += job_problems(cfg)
        if cfg.data.max_length > model.max_position_embeddings:
            problems.append(f"data.max_length={cfg.data.max_length} exceeds the model's "
                            f"max_position_embeddings={model.max_position_embeddings}")
    if problems:
        raise ConfigError("invalid configuration:\n  - " + "\n  - ".join(dict.fromkeys(problems)))
    return model


def _pad_multiple(rt) -> int:
    return rt.tp if rt.sp else 1  # sequence parallelism splits the sequence over TP ranks


def pair_batches(indices: list[int], pairs, micro_batch_size: int, pad_id: int, rt) -> list[dict]:
    """This DP rank's micro-batches of a global batch of pair ``indices``: micro_batch_size pairs (2x rows)
    each, all padded to the longest row of the global batch (pipeline stages exchange one shape)."""
    mine = micro_batches(indices, ps.get_data_parallel_rank(), rt.dp, micro_batch_size)
    multiple = _pad_multiple(rt)
    seq = math.ceil(max(pairs[i].longest for i in indices) / multiple) * multiple
    return [collate_scored_pairs([pairs[i] for i in mb], pad_id, multiple, seq) for mb in mine]


def validation_batches(trainer, val_pairs, pad_id: int, rt) -> list[dict]:
    """This DP rank's share of the first trainer.eval_samples validation pairs (all for null): the ``r``-th
    contiguous slice of ``ceil(n / DP)``, micro-batches of up to trainer.micro_batch_size pairs, each padded
    to its own longest row; the same pairs at every layout."""
    mbs = trainer.micro_batch_size
    n = len(val_pairs) if trainer.eval_samples is None else min(trainer.eval_samples, len(val_pairs))
    if n < 1:
        raise ConfigError(f"trainer.eval_samples={trainer.eval_samples}: expected at least 1 validation pair")
    per_rank = math.ceil(n / rt.dp)
    rank = ps.get_data_parallel_rank()
    mine = list(range(rank * per_rank, min(n, (rank + 1) * per_rank)))
    return [collate_scored_pairs([val_pairs[i] for i in mine[k:k + mbs]], pad_id, _pad_multiple(rt))
            for k in range(0, len(mine), mbs)]


class RewardTask:
    """The Bradley-Terry loss of a score head on preference pairs."""
    name, unit, log, result_type = "reward model", "pairs", log, RewardResult

    def prepare(self, cfg: DictConfig, world_size: int):
        self.cfg = cfg
        model_cfg = validate(cfg, world_size)
        if cfg.model.source != "random":
            hub.model_config_for(cfg.model)
        self.tokenizer = Tokenizer.from_dir(hub.tokenizer_dir(cfg.model))
        self.data = prepare_preferences(cfg.data, self.tokenizer, seed=cfg.seed)
        self.opts = RewardOptions.from_config(cfg.get("reward"))
        return model_cfg

    def setup(self, job: Job) -> int:
        cfg, self.rt, self.model = self.cfg, job.rt, job.model
        if job.rt.is_main:
            log.info("data report (tokens count both rows of a pair)\n%s", format_reports(self.data.reports))
        log.info("loss: Bradley-Terry%s; head: score (trained)", "" if self.opts.center_rewards_coefficient is None
                 else f" + {self.opts.center_rewards_coefficient:g} x centring")
        if job.resume_from is not None:  # the engine restores the adapter or weights and optimizer state after this
            load_score_head(job.model, job.resume_from)
        self.device = next(job.model.parameters()).device
        self._forward_step = reward_forward_step(self.opts, cfg.precision, self.device)
        self.val_batches = validation_batches(cfg.trainer, self.data.validation, self.tokenizer.pad_id, job.rt)
        return len(self.data.train)

    def batch(self, indices: list[int]) -> list[dict]:
        return pair_batches(indices, self.data.train, self.cfg.trainer.micro_batch_size, self.tokenizer.pad_id,
                            self.rt)

    def forward_step(self, data_iterator, model):
        return self._forward_step(data_iterator, model)

    def train_report(self, reduced: list[dict]) -> Report:
        m = reduce_metrics(reduced, self.device)
        return Report(m.loss, m.format(), m.scalars("train"), count=m.pairs, record=dataclasses.asdict(m))

    def validate(self) -> Report:
        m = reward_evaluate(self.model, self.val_batches, self.opts, self.cfg.precision)
        return Report(m.loss, m.format(), m.scalars("val"), record=dataclasses.asdict(m))

    def save(self, directory: Path) -> None:
        save_score_head(self.model, directory)

    def before_training(self, loop: LoopState) -> None:
        """Nothing before the first validation."""

    def after_training(self, job: Job) -> None:
        save_score_head(job.model, TrainedWeights.of(job.cfg, job.model_cfg).dir(job.output_dir))

    def result(self, o: Outcome) -> RewardResult:
        loop = o.loop
        return RewardResult(steps=loop.step, history=loop.extra.get("history", []),
                            val_before=loop.extra["val_before"], val_after=loop.extra.get("val_after"),
                            trainable_params=o.trainable_params, total_params=o.total_params,
                            output_dir=o.output_dir, trained_dir=o.trained_dir, pairs_per_s=o.units_per_s,
                            status=o.status, total_steps=loop.total_steps, best_step=o.best_step,
                            best_val_loss=o.best_val_loss, best_checkpoint=o.best_checkpoint,
                            resumed_from=o.resumed_from)

    def summary(self, result: RewardResult, rt) -> str:
        return summary_table(result, rt)


def run(cfg: DictConfig) -> RewardResult:
    """Train a reward model (all ranks call)."""
    return engine.run(cfg, RewardTask())


def summary_table(r: RewardResult, rt) -> str:
    first, last = r.history[0], r.history[-1]
    b, a = r.val_before, r.val_after or {}

    def change(key, fmt):
        return f"{b[key]:{fmt}} -> " + (f"{a[key]:{fmt}}" if key in a else "n/a")

    rows = [
        ("steps", summary.steps(r)),
        ("layout", summary.layout(rt)),
        ("pairs/s", f"{r.pairs_per_s:,.1f}"),
        ("train loss first -> last", f"{first['loss']:.4f} -> {last['loss']:.4f}"),
        ("train accuracy first -> last", f"{first['accuracy']:.3f} -> {last['accuracy']:.3f}"),
        ("validation loss before -> after", change("loss", ".4f")),
        ("validation accuracy before -> after", change("accuracy", ".3f")),
        ("validation margin before -> after", change("margin", ".4f")),
        ("trainable / total parameters", summary.parameters(r)),
        ("run directory", r.output_dir),
    ]
    if r.trained_dir:
        rows.append(("trained", r.trained_dir))
    return table(rows + summary.checkpoint_rows(r), "Reward model summary")
