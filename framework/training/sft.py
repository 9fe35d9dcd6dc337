"""Supervised fine-tuning as a task of the job engine (framework/training/engine.py): the loss is the mean
over all target tokens of a global batch (framework/training/step.py), on prompt/completion, chat or
(for an encoder-decoder model) seq2seq samples, packed into rows of data.max_length with data.packing.

Everything that can be wrong in the configuration or the data is checked before any process group starts,
so a bad key or a bad JSONL line costs seconds, not a cluster job. Validation is the mean loss per target
token over exactly the first trainer.eval_samples validation samples, the same at every layout. Before
training (the model then *is* the base model: LoRA B starts at zero) and after it, the task greedily
completes one held-out prompt, so the summary shows what the adapter changed; after training it also
evaluates data.test when given.
"""

from __future__ import annotations

import dataclasses
import logging
import math

import torch
from megatron.core import parallel_state as ps
from omegaconf import DictConfig

from framework.checkpoint import hub
from framework.checkpoint.model_loading import build_pretrained
from framework.checkpoint.trained import load_trained
from framework.data.batching import collate_global_batch, micro_batches
from framework.data.packing import collate_packed, sample_positions
from framework.data.prepare import prepare_config, prepare_file
from framework.data.seq2seq import use_seq2seq_format
from framework.data.tokenizer import Tokenizer
from framework.data.views import Padded, Subset
from framework.inference.generate import complete_sample
from framework.models.registry import get_family
from framework.planner.memory import job_from_config, warn_if_unfit
from framework.runtime import distributed as rtd
from framework.runtime.distributed import data_parallel_size
from framework.runtime.errors import ConfigError
from framework.runtime.text_table import table
from framework.training import summary
from framework.training.engine import Job, Outcome, Report
from framework.training.job_config import validate
from framework.training.run_setup import pack_for_training, packed_length
from framework.training.step import evaluate, forward_step_fn, global_ratio
from framework.training.train_state import LoopState

log = logging.getLogger("framework.finetune")


@dataclasses.dataclass
class RunResult:
    steps: int
    val_loss_before: float
    val_loss_after: float
    train_losses: list
    tokens_per_s: float
    trainable_params: int
    total_params: int
    output_dir: str
    adapter_dir: str | None
    completion_before: str | None = None
    completion_after: str | None = None
    test_loss: float | None = None  # mean loss per target token over all of data.test, after training
    status: str = "completed"        # completed | stopped_early | paused (trainer.steps_per_run reached)
    total_steps: int | None = None   # the run's length (trainer.max_steps / max_epochs)
    best_step: int | None = None     # the step of the best validation loss (its checkpoint is kept)
    best_val_loss: float | None = None
    best_checkpoint: str | None = None
    resumed_from: str | None = None  # the checkpoint this invocation continued from


class SFTTask:
    """Next-token loss on the target tokens of each sample (the completion, the assistant turns)."""
    name, unit, log, result_type = "fine-tuning", "tokens", log, RunResult

    def __init__(self):
        self.test_loss = self.completion_after = None

    def prepare(self, cfg: DictConfig, world_size: int):
        self.cfg = cfg
        model_cfg, self.tokenizer, self.train_set, self.val_set, self.reports = prepare_inputs(cfg, world_size)
        return model_cfg

    def setup(self, job: Job) -> int:
        self.model, self.rt = job.model, job.rt
        if job.rt.is_main:
            for r in self.reports:
                log.info("data report\n%s", r.format())
        # With data.packing the order runs over bins (rows of several samples), not samples: a global batch is
        # global_batch_size bins; see framework/data/packing.py for the semantics.
        cfg = self.cfg
        self.bins = None
        if cfg.data.packing:
            self.bins = pack_for_training(cfg.trainer, [sample_positions(s) for s in self.train_set],
                                          packed_length(cfg.data, job.rt), job.rt, log)
        self.batches = Batches(_kind(cfg.model), cfg.trainer.micro_batch_size, self.tokenizer.pad_id, job.rt,
                               packed_length(cfg.data, job.rt))
        self.device = next(job.model.parameters()).device
        self._forward_step = forward_step_fn(cfg.precision, self.device)
        self._validate = _validator(cfg.trainer, cfg.precision, job.model, self.batches, self.val_set)
        return len(self.train_set) if self.bins is None else len(self.bins)

    def batch(self, indices: list[int]) -> list[dict]:
        samples = indices if self.bins is None else [i for b in indices for i in self.bins[b]]
        self._tokens = sum(len(self.train_set[i].input_ids) - 1 for i in samples)
        return self.batches(indices, self.train_set, self.bins)

    def forward_step(self, data_iterator, model):
        return self._forward_step(data_iterator, model)

    def train_report(self, reduced: list[dict]) -> Report:
        loss, _ = global_ratio(reduced, self.device)
        return Report(loss, f"loss {loss:.4f}", {"train/loss": loss}, count=self._tokens)

    def validate(self) -> Report:
        loss = self._validate()
        return Report(loss, f"loss {loss:.4f}", {"val/loss": loss})

    def save(self, directory) -> None:
        """Nothing of its own: the trained weights and the train state are the whole checkpoint."""

    def before_training(self, loop: LoopState) -> None:
        loop.completion_before = _complete(self.cfg.generate, self.batches, self.model, self.tokenizer, self.val_set)

    def after_training(self, job: Job) -> None:
        cfg = self.cfg
        self.test_loss = _evaluate_test(cfg.data, cfg.precision, self.model, self.tokenizer, self.batches)
        self.completion_after = _complete(cfg.generate, self.batches, self.model, self.tokenizer, self.val_set)

    def result(self, o: Outcome) -> RunResult:
        loop = o.loop
        return RunResult(steps=loop.step, val_loss_before=loop.val_before,
                         val_loss_after=loop.validations[-1][1] if loop.validations else None,
                         train_losses=loop.losses, tokens_per_s=o.units_per_s, trainable_params=o.trainable_params,
                         total_params=o.total_params, output_dir=o.output_dir, adapter_dir=o.trained_dir,
                         completion_before=loop.completion_before, completion_after=self.completion_after,
                         test_loss=self.test_loss, status=o.status, total_steps=loop.total_steps,
                         best_step=o.best_step, best_val_loss=o.best_val_loss, best_checkpoint=o.best_checkpoint,
                         resumed_from=o.resumed_from)

    def summary(self, result: RunResult, rt) -> str:
        return summary_table(result, rt)


def prepare_inputs(cfg: DictConfig, world_size: int):
    """Validate config, resolve model files and tokenise data; no process groups needed. Returns
    (model config, tokenizer, training samples, validation samples, data reports)."""
    model_cfg = validate(cfg, world_size)
    use_seq2seq_format(cfg)  # an encoder-decoder model (T5) tokenises prompt/completion records as seq2seq
    if cfg.model.source != "random":
        hub.model_config_for(cfg.model)  # converts the bundled model once; checks model.arch against config.json
    _check_memory_plan(cfg, world_size)
    tokenizer = Tokenizer.from_dir(hub.tokenizer_dir(cfg.model))
    data = prepare_config(cfg.data, tokenizer, seed=cfg.seed)  # train, validation (file or split), test
    return model_cfg, tokenizer, data.train, data.validation, data.reports


def _check_memory_plan(cfg: DictConfig, world_size: int) -> None:
    """On a GPU, warn before any process group starts when the memory planner predicts the layout will
    not fit (framework/planner/memory.py); on the CPU there is no device limit to check."""
    if not torch.cuda.is_available():
        return
    par = cfg.parallel
    tp, pp = par.tensor, par.pipeline
    warn_if_unfit(job_from_config(cfg), tp, pp, data_parallel_size(world_size, tp, pp), par.sequence,
                  torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory, log)


@dataclasses.dataclass(frozen=True)
class Batches:
    """How a global batch becomes this DP rank's micro-batches: under PP all padded to the global batch's
    longest (one activation shape per step), else each to its own longest (fewer padded positions, the same
    loss); SP needs a multiple of TP. With ``bins`` (packing), the indices are bin ids and every row is one
    packed bin of ``packed_length`` positions. An encoder-decoder model's decoder starts from the pad id
    (T5's ``decoder_start_token_id``)."""
    kind: str                     # the model's kind (framework/models/kinds.py)
    micro_batch_size: int
    pad_id: int
    rt: object                    # framework.runtime.distributed Runtime: tp, dp, sp, pp
    packed_length: int            # row length of packed bins (packed_length of data.max_length)

    def __call__(self, indices, dataset, bins=None) -> list[dict]:
        rt = self.rt
        mine = micro_batches(indices, ps.get_data_parallel_rank(), rt.dp, self.micro_batch_size)
        if bins is not None:
            return [collate_packed([[dataset[i] for i in bins[b]] for b in mb], self.pad_id, self.packed_length)
                    for mb in mine]
        return collate_global_batch(self.kind, mine, indices, dataset, self.pad_id, rt.tp if rt.sp else 1,
                                    same_length=rt.pp > 1)


def _kind(model) -> str:
    """The model's kind (framework/models/kinds.py) from the model section: what its batches and
    completions look like."""
    return get_family(model.arch.family).kind.name


def _validator(trainer, precision: str, model, batches: Batches, val_set):
    """A function giving the mean validation loss per target token over exactly the first
    trainer.eval_samples validation samples (all of them when unset), the same at every layout."""
    n = len(val_set) if trainer.eval_samples is None else min(trainer.eval_samples, len(val_set))
    if n < 1:
        raise ConfigError(f"trainer.eval_samples={trainer.eval_samples}: validation needs at least one sample "
                          f"(validation samples available: {len(val_set)})")
    first = Subset(val_set, range(n))
    return lambda: _mean_loss(first, model, batches, precision)


def _mean_loss(samples, model, batches: Batches, precision: str) -> float:
    """Mean loss per target token over ``samples``. The last micro-batch x DP group is filled with
    zero-target samples (``framework.data.views.Padded``): no sample is left out or counted twice, so the
    loss is the same at every layout."""
    group = batches.micro_batch_size * batches.rt.dp
    padded = Padded(samples, group)
    groups = [list(range(i, i + group)) for i in range(0, len(padded), group)]
    return evaluate(model, [mb for g in groups for mb in batches(g, padded)], precision)


def _evaluate_test(data, precision: str, model, tokenizer, batches: Batches) -> float | None:
    """Mean loss per target token over every sample of data.test (None without one), evaluated as
    validation is. The file was validated with the rest before training; with the data cache this maps
    it again."""
    if not data.test:
        return None
    test_set, _ = prepare_file(data, tokenizer, data.test)
    loss = _mean_loss(test_set, model, batches, precision)
    log.info("test loss %.4f (perplexity %.2f) over %d samples of %s", loss, math.exp(loss), len(test_set),
             data.test)
    return loss


def evaluate_adapter(cfg: DictConfig, adapter_dir: str) -> float:
    """Validation loss of the configured model with a saved adapter, as the job computes it."""
    model_cfg, tokenizer, _train, val_set, _reports = prepare_inputs(cfg, rtd.world_size_from_env())
    par = cfg.parallel
    rt = rtd.initialize(tp=par.tensor, pp=par.pipeline, sp=par.sequence, seed=cfg.seed)
    model = build_pretrained(cfg, model_cfg, rt)
    load_trained(model, adapter_dir, cfg.peft, model_cfg)
    batches = Batches(_kind(cfg.model), cfg.trainer.micro_batch_size, tokenizer.pad_id, rt,
                      packed_length(cfg.data, rt))
    return _validator(cfg.trainer, cfg.precision, model, batches, val_set)()


def _complete(generate, batches: Batches, model, tokenizer, val_set) -> str | None:
    """Greedy completion of one held-out prompt (the prompt part of a validation sample; for an
    encoder-decoder model its encoder input, the prompt + eos); ``generate``: the generate section."""
    n = generate.max_new_tokens
    if n <= 0:
        return None
    sample = val_set[generate.sample % len(val_set)]
    rt = batches.rt
    return complete_sample(batches.kind, model, sample, tokenizer, n, rt.tp if rt.sp else 1)


def summary_table(r: RunResult, rt) -> str:
    rows = [
        ("steps", summary.steps(r)),
        ("layout", summary.layout(rt)),
        ("tokens/s", f"{r.tokens_per_s:,.0f}"),
        ("train loss first -> last", f"{r.train_losses[0]:.4f} -> {r.train_losses[-1]:.4f}"),
        ("validation loss before -> after",
         f"{r.val_loss_before:.4f} -> {'n/a' if r.val_loss_after is None else f'{r.val_loss_after:.4f}'}"),
    ]
    if r.test_loss is not None:  # data.test, evaluated after training: next to validation
        rows.append(("test loss (perplexity)", f"{r.test_loss:.4f} ({math.exp(r.test_loss):.2f})"))
    rows += [("trainable / total parameters", summary.parameters(r)), ("run directory", r.output_dir)]
    if r.adapter_dir:
        rows.append(("adapter", r.adapter_dir))
    text = table(rows + summary.checkpoint_rows(r), "Run summary")
    if r.completion_before is not None and r.completion_after is not None:
        text += ("\n\nHeld-out prompt, greedy completion WITHOUT the adapter (base model):\n"
                 f"{r.completion_before!r}\n\nWITH the adapter:\n{r.completion_after!r}")
    return text
