"""The fine-tuning job: config -> data -> model -> LoRA -> train -> adapter -> before/after completion.

Order matters for users: everything that can be wrong in the configuration or the data is checked
before any process group starts, so a bad key or a bad JSONL line costs seconds, not a cluster job.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

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


def prepare_inputs(cfg: DictConfig, world_size: int):
    """Validate config, resolve model files and tokenise data; no process groups needed."""
    from framework.training.job_config import validate
    from framework.data.prepare import prepare_config
    from framework.data.tokenizer import Tokenizer
    from framework.checkpoint import hub

    model_cfg = validate(cfg, world_size)
    from framework.data.seq2seq import use_seq2seq_format

    use_seq2seq_format(cfg)  # an encoder-decoder model (T5) tokenises prompt/completion records as seq2seq
    if cfg.model.source != "random":
        hub.model_config_for(cfg.model)  # converts the bundled model once; checks model.arch against config.json
    _check_memory_plan(cfg, world_size)
    tokenizer = Tokenizer.from_dir(hub.tokenizer_dir(cfg.model))
    data = prepare_config(cfg.data, tokenizer, seed=int(cfg.seed))  # train, validation (file or split), test
    return model_cfg, tokenizer, data.train, data.validation, data.reports


def _check_memory_plan(cfg: DictConfig, world_size: int) -> None:
    """On a GPU, warn before any process group starts when the memory planner predicts the layout will
    not fit (framework/planner/memory.py); on the CPU there is no device limit to check."""
    if not torch.cuda.is_available():
        return
    from framework.planner.memory import job_from_config, warn_if_unfit

    par = cfg.parallel
    tp, pp = int(par.tensor), int(par.pipeline)
    warn_if_unfit(job_from_config(cfg), tp, pp, max(1, world_size // (tp * pp)), bool(par.sequence),
                  torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory, log)


def build_model(cfg: DictConfig, model_cfg, rt):
    """This rank's stage of the model with pretrained weights (or random for source=random), PEFT applied."""
    from framework.checkpoint import hub
    from framework.models.registry import get_family

    from framework.models.precision import transformer_settings

    on_gpu = rt.device.type == "cuda"
    dtype = torch.bfloat16 if cfg.precision in ("bf16", "fp8") and on_gpu else torch.float32
    model = get_family(model_cfg.family).build(model_cfg, rt.tp, rt.pp, rt.sp, params_dtype=dtype,
                                               **transformer_settings(cfg))
    if cfg.model.source == "ckpt":  # our format: dist_checkpointing reshards to this layout
        from framework.checkpoint.ckpt_format import load_checkpoint_into

        load_checkpoint_into(model, hub.model_dir(cfg.model), model_cfg)
    elif cfg.model.source != "random":
        from framework.checkpoint.hf_import import load_hf_into_gpt

        load_hf_into_gpt(model, hub.model_dir(cfg.model), model_cfg)
    from framework.peft.registry import apply_peft

    apply_peft(model, cfg.peft, model_cfg, encode_text=hub.text_encoder(cfg.peft))
    return model


def count_parameters(model) -> tuple[int, int]:
    """(trainable, total) over the whole model: summed over PP stages, TP shards counted once."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from framework.models.kv_replication import extra_copies

    copies = extra_copies(model)  # KV heads replicated over TP ranks count once

    def numel(p):  # replicated parameters would be counted once per TP rank
        if getattr(p, "tensor_model_parallel", False):
            return p.numel() - copies.get(id(p), 0)
        return p.numel() / ps.get_tensor_model_parallel_world_size()

    from framework.peft.qlora import quantized_numel

    quantized = quantized_numel(model)  # QLoRA: TP shards (KV copies once), not params
    t = torch.tensor([sum(numel(p) for p in model.parameters() if p.requires_grad),
                      sum(numel(p) for p in model.parameters()) + quantized], dtype=torch.float64)
    if ps.get_data_parallel_rank() != 0:
        t.zero_()
    dist.all_reduce(t)
    return int(round(t[0].item())), int(round(t[1].item()))


def run(cfg: DictConfig) -> RunResult:
    from framework.data.batching import BatchOrder
    from framework.runtime import distributed as rtd
    from framework.runtime.progress import progress
    from framework.training.checkpointing import BEST
    from framework.training.early_stopping import EarlyStopping
    from framework.training.optim import build_optimizer, wrap_ddp
    from framework.training.step import train_step
    from framework.training.summary import summary_table
    from framework.training.flops import Throughput, peak_tflops
    from framework.training.tracking import Tracker, format_memory, memory_gib
    from framework.training.train_state import LoopState

    world = rtd.world_size_from_env()
    model_cfg, tokenizer, train_set, val_set, reports = prepare_inputs(cfg, world)
    rt, out, ckpts, resume_from = open_run(cfg)
    if rt.is_main:
        for r in reports:
            log.info("data report\n%s", r.format())

    model = build_model(cfg, model_cfg, rt)
    model = wrap_ddp(model, bool(cfg.trainer.get("distributed_optimizer", False)))  # shard Adam over DP
    tr = cfg.trainer
    gbs = int(tr.global_batch_size)
    # With data.packing the order runs over bins (rows of several samples), not samples: a global batch is
    # global_batch_size bins; see framework/data/packing.py for the semantics.
    bins = _pack_training_set(cfg, train_set, rt)
    order = BatchOrder(len(train_set) if bins is None else len(bins), gbs, seed=int(cfg.seed))
    total_steps = _total_steps(tr, order)
    optimizer, scheduler = build_optimizer(model, tr, cfg.precision, total_steps=total_steps)
    trainable, total = count_parameters(model)
    log.info("parameters: %s trainable of %s (%.3f%%)", f"{trainable:,}", f"{total:,}", 100 * trainable / total)
    validate_now = _validator(cfg, model, tokenizer, val_set, rt)
    stopper = EarlyStopping.from_config(tr)

    if resume_from is not None:
        loop = _restore(cfg, resume_from, model, optimizer, scheduler, order, stopper, model_cfg, total_steps, rt)
        if loop.finished and (out / "summary.json").is_file():
            log.warning("the run in %s already finished at step %d (%s); nothing to do. To train again, use "
                        "another output_dir or trainer.resume=never", out, loop.step,
                        "stopped early" if stopper.should_stop else "all steps done")
            return _result_from_summary(out / "summary.json")
    else:
        # LoRA B starts at zero, so before training the model *is* the base model: this is "without adapter".
        loop = LoopState(total_steps=total_steps, completion_before=_complete(cfg, model, tokenizer, val_set, rt),
                         val_before=validate_now())
        log.info("validation loss before training: %.4f", loop.val_before)
    tracker = Tracker(cfg, out, rt.is_main, first_step=loop.step + 1, wandb_run_id=loop.wandb_run_id)
    loop.wandb_run_id = tracker.wandb_run_id
    if loop.step == 0:
        tracker.scalars(0, {"val/loss": loop.val_before})

    def save_checkpoint(best: bool) -> None:
        save_job_checkpoint(ckpts, cfg, model_cfg, rt, model=model, optimizer=optimizer, scheduler=scheduler,
                            order=order, stopper=stopper, loop=loop, best=best)

    # Each step: train, log, validate every eval_interval steps and after the last, then checkpoint every
    # save_interval steps, at a new best validation loss, and when this invocation ends.
    save_interval, steps_per_run = tr.get("save_interval"), tr.get("steps_per_run")
    first_step, paused = loop.step, False
    tokens_before, seconds_before = loop.tokens, loop.train_seconds
    tokens, t0, not_training = 0, time.perf_counter(), 0.0  # not_training: validation and checkpoint seconds
    throughput = Throughput(model_cfg, cfg.peft, world, peak_tflops(tr.get("peak_tflops"), rt.device))  # model FLOPs
    bar = progress(total=total_steps - loop.step, desc="fine-tuning", enabled=rt.is_main)
    while not loop.finished and not paused:
        step = loop.step + 1
        indices = next(order)
        batches = _batches(indices, train_set, cfg, tokenizer, rt, bins)
        res = train_step(model, optimizer, scheduler, batches, cfg.precision)
        throughput.add_step(len(indices), batches)
        samples = indices if bins is None else [i for b in indices for i in bins[b]]
        tokens += sum(len(train_set[i].input_ids) - 1 for i in samples)
        loop.step, loop.tokens = step, tokens_before + tokens
        loop.losses.append(res.loss)
        loop.train_seconds = seconds_before + time.perf_counter() - t0 - not_training
        tokens_per_s = tokens / (time.perf_counter() - t0 - not_training)  # this invocation's throughput
        flops = throughput.scalars(time.perf_counter() - t0 - not_training)  # TFLOP/s per GPU, MFU
        memory = memory_gib(rt.device)
        bar.update(1, loss=f"{res.loss:.4f}", lr=f"{res.lr:.2e}")
        if step % int(tr.log_interval) == 0:
            log.info("step %d/%d loss %.4f lr %.3e grad_norm %s tokens/s %.0f%s memory %s", step, total_steps,
                     res.loss, res.lr, "n/a" if res.grad_norm is None else f"{res.grad_norm:.3f}", tokens_per_s,
                     Throughput.describe(flops), format_memory(memory))
        tracker.scalars(step, {"train/loss": res.loss, "train/lr": res.lr, "train/grad_norm": res.grad_norm,
                               "train/tokens_per_s": tokens_per_s, "train/memory_gib": max(memory.values()), **flops})
        ckpts.finalize(blocking=False)  # publish a background checkpoint save that every rank has finished
        improved = False
        if step % int(tr.eval_interval) == 0 or step == total_steps:
            t_eval = time.perf_counter()
            val = validate_now()
            not_training += time.perf_counter() - t_eval
            improved = stopper.update(step, val)
            loop.validations.append([step, val])
            log.info("step %d validation loss %.4f%s", step, val, " (best)" if improved else "")
            tracker.scalars(step, {"val/loss": val})
        loop.finished = step == total_steps or stopper.should_stop
        paused = not loop.finished and steps_per_run is not None and step - first_step >= int(steps_per_run)
        if improved or loop.finished or paused or (save_interval is not None and step % int(save_interval) == 0):
            t_save = time.perf_counter()
            save_checkpoint(best=improved)
            not_training += time.perf_counter() - t_save
    ckpts.finalize()  # wait for a background save and publish it before anything reads the checkpoints
    bar.close()
    tracker.close()
    if stopper.should_stop:
        log.info("early stopping at step %d: validation loss has not improved by %g for %d validations; best %.4f "
                 "at step %d", loop.step, stopper.min_delta, stopper.patience, stopper.best_loss, stopper.best_step)
    val_after = loop.validations[-1][1] if loop.validations else None
    test_loss = adapter_dir = completion_after = None
    if paused:
        log.info("paused at step %d of %d (trainer.steps_per_run=%s); run the same command again to continue",
                 loop.step, total_steps, steps_per_run)
    else:
        log.info("validation loss after training: %.4f", val_after)
        test_loss = _evaluate_test(cfg, model, tokenizer, rt)
        # PEFT methods write a small adapter directory; full fine-tuning (peft.method=none) writes weights/.
        adapter_dir = _trained_dir(cfg, out)
        _save_trained(cfg, model, adapter_dir, model_cfg)
        completion_after = _complete(cfg, model, tokenizer, val_set, rt)

    best = ckpts.pointer(BEST)
    result = RunResult(steps=loop.step, val_loss_before=loop.val_before, val_loss_after=val_after,
                       train_losses=loop.losses, tokens_per_s=loop.tokens / max(loop.train_seconds, 1e-9),
                       trainable_params=trainable, total_params=total, output_dir=str(out),
                       adapter_dir=str(adapter_dir) if adapter_dir else None,
                       completion_before=loop.completion_before, completion_after=completion_after,
                       test_loss=test_loss,
                       status="paused" if paused else "stopped_early" if stopper.should_stop else "completed",
                       total_steps=total_steps, best_step=stopper.best_step,
                       best_val_loss=None if stopper.best_step is None else stopper.best_loss,
                       best_checkpoint=str(best) if best else None,
                       resumed_from=str(resume_from) if resume_from else None)
    if rt.is_main:
        summary = dataclasses.asdict(result) | {"layout": {"tp": rt.tp, "pp": rt.pp, "dp": rt.dp, "sp": rt.sp}}
        if not paused:
            (out / "summary.json").write_text(json.dumps(summary, indent=1))
        print(summary_table(result, rt), flush=True)
    return result

def _total_steps(tr, order) -> int:
    """The run's length: trainer.max_steps, or the steps that show every sample trainer.max_epochs times
    (rounded up), whichever is smaller; with data.packing an epoch is a pass over the bins."""
    bounds = [] if tr.get("max_steps") is None else [int(tr.max_steps)]
    if tr.get("max_epochs") is not None:
        bounds.append(math.ceil(float(tr.max_epochs) * order.steps_per_epoch))
    return max(1, min(bounds))


def _trained_dir(cfg, root: Path) -> Path:
    """Where what the PEFT method trains lives under ``root``: adapters/NAME, or weights/ for full fine-tuning."""
    from framework.peft.registry import get_method

    return root / "weights" if get_method(cfg.peft.method).trains_base else root / "adapters" / cfg.adapter_name


def _save_trained(cfg, model, directory: Path, model_cfg) -> None:
    from framework.checkpoint.trained import save_trained

    save_trained(model.module, directory, cfg.peft, model_cfg, base={"name": cfg.model.name, "source": cfg.model.source})


def save_job_checkpoint(ckpts, cfg, model_cfg, rt, *, model, optimizer, scheduler, order, stopper, loop, best: bool,
                        also=None) -> Path:
    """Checkpoint ``loop.step`` (all ranks call): the trained weights (adapter, or full weights), then
    ``also(directory)`` (a job's own files, e.g. DPO's precomputed reference), then the train state, whose
    state.json, written last, marks the checkpoint complete (framework/training/checkpointing.py)."""
    from framework.training.checkpointing import TRAIN_STATE_DIR
    from framework.training.train_state import save_train_state

    def write(directory: Path) -> list:  # megatron AsyncRequests of a background save (trainer.async_save)
        _save_trained(cfg, model, _trained_dir(cfg, directory), model_cfg)
        if also is not None:
            also(directory)
        return save_train_state(directory / TRAIN_STATE_DIR, model=model, optimizer=optimizer, scheduler=scheduler,
                                order=order, stopper=stopper, loop=loop, cfg=cfg, rt=rt, background=ckpts.async_save)

    path = ckpts.save(loop.step, write, best=best, keep_last=cfg.trainer.get("keep_last"))
    log.info("step %d checkpoint %s%s%s", loop.step, path, " (best validation loss so far)" if best else "",
             ": optimizer state being written in the background" if ckpts.pending else "")
    return path


def open_run(cfg: DictConfig):
    """Start a job's processes and its run directory (all ranks call): the process groups, the checkpoint
    store, the checkpoint to resume from (None: a fresh start), and, on rank 0, OUTPUT_DIR with the resolved
    config. Returns (runtime, output dir, Checkpoints, resume_from)."""
    from framework.runtime import distributed as rtd
    from framework.training.checkpointing import Checkpoints

    par = cfg.parallel
    rt = rtd.initialize(tp=int(par.tensor), pp=int(par.pipeline), sp=bool(par.sequence), seed=int(cfg.seed))
    out = Path(cfg.output_dir)
    ckpts = Checkpoints(out / "checkpoints", async_save=bool(cfg.trainer.get("async_save", False)))
    resume_from = _resume_point(cfg, ckpts, rt)
    if rt.is_main:
        out.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(cfg, out / "config.yaml", resolve=True)
    return rt, out, ckpts, resume_from


def _resume_point(cfg, ckpts, rt):
    """The checkpoint this run continues from (None: a fresh start), per trainer.resume. All ranks decide
    from the same files; then global rank 0 removes what an interrupted save left behind, and, for
    trainer.resume=never, the checkpoints of an earlier run in the same output_dir."""
    import torch.distributed as dist

    from framework.runtime.errors import ConfigError
    from framework.training.checkpointing import TRAIN_STATE_DIR
    from framework.training.train_state import read_state

    resume = cfg.trainer.get("resume", "auto")
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


def _restore(cfg, point: Path, model, optimizer, scheduler, order, stopper, model_cfg, total_steps: int, rt):
    """Load the trained weights and the train state of checkpoint ``point``; returns the loop's progress.
    Refuses (naming the keys) a checkpoint trained with settings that would make the continuation another
    training run than the one it interrupted."""
    from framework.runtime.errors import ConfigError
    from framework.checkpoint.trained import load_trained
    from framework.training.checkpointing import TRAIN_STATE_DIR
    from framework.training.train_state import load_train_state, read_state, resume_settings, settings_differences

    state = read_state(point / TRAIN_STATE_DIR)
    problems = settings_differences(state["settings"], resume_settings(cfg))
    if state["total_steps"] != total_steps:
        problems.append(f"run length (trainer.max_steps / trainer.max_epochs): checkpoint {state['total_steps']} "
                        f"steps, now {total_steps} (the LR schedule depends on it)")
    trained = _trained_dir(cfg, point)
    if not trained.is_dir():
        problems.append(f"{trained} does not exist (adapter_name or peft.method changed?)")
    if problems:
        raise ConfigError(f"cannot resume from {point}: it belongs to a run with other settings:\n  - "
                          + "\n  - ".join(problems) + "\nresume with the same settings, or start a new run "
                          "(another output_dir, or trainer.resume=never)")
    load_trained(model.module, trained, cfg.peft, model_cfg)
    loop = load_train_state(point / TRAIN_STATE_DIR, model=model, optimizer=optimizer, scheduler=scheduler,
                            order=order, stopper=stopper, rt=rt)
    log.info("resumed from %s: step %d of %d, epoch %d, %d of %d samples into it", point, loop.step, total_steps,
             order.epoch, order.position, order.num_samples)
    return loop


def _result_from_summary(path: Path) -> RunResult:
    fields = {f.name for f in dataclasses.fields(RunResult)}
    return RunResult(**{k: v for k, v in json.loads(path.read_text()).items() if k in fields})


def _packed_length(cfg, rt) -> int:
    """Row length of packed batches: data.max_length rounded up to a multiple of TP under SP."""
    multiple = rt.tp if rt.sp else 1
    return math.ceil(int(cfg.data.max_length) / multiple) * multiple


def _pack_training_set(cfg, train_set, rt):
    """Bins of training-sample indices when data.packing is on (packed once, deterministically), else None."""
    if not cfg.data.get("packing", False):
        return None
    from framework.data.packing import sample_positions

    return pack_for_training(cfg, [sample_positions(s) for s in train_set], _packed_length(cfg, rt), rt)


def pack_for_training(cfg, lengths: list[int], size: int, rt, unit: str = "samples") -> list[list[int]]:
    """Bins of ``size`` positions over items of ``lengths`` positions (``framework.data.packing.pack``),
    refused on the Transformer Engine layer spec, with the efficiency logged; ``unit`` names the items."""
    from framework.runtime.errors import ConfigError
    from framework.data.packing import pack, packing_efficiency
    from framework.models.gpt import te_available

    if te_available():
        # TE's fused attention takes the causal mask type and would not apply our block-diagonal mask.
        raise ConfigError("data.packing=true is supported on the local (non-Transformer-Engine) layer spec "
                          "only; THD packed_seq_params for TE are not implemented")
    bins = pack(lengths, size)
    if len(bins) < int(cfg.trainer.global_batch_size):
        log.warning("packing: %d bins is fewer than trainer.global_batch_size=%d (a global batch is that many "
                    "bins); batches will repeat bins", len(bins), int(cfg.trainer.global_batch_size))
    if rt.is_main:
        log.info("packing: %d %s into %d bins of %d positions, efficiency %.1f%% (%.2f %s per bin)",
                 len(lengths), unit, len(bins), size, 100 * packing_efficiency(bins, lengths, size),
                 len(lengths) / len(bins), unit)
    return bins


def _batches(indices, dataset, cfg, tokenizer, rt, bins=None):
    """This DP rank's micro-batches of a global batch, all padded to one length (PP needs it; SP needs a
    multiple of TP). With ``bins`` (packing), ``indices`` are bin ids and every row is one packed bin of
    ``_packed_length`` positions."""
    from megatron.core import parallel_state as ps

    from framework.data.batching import collate, micro_batches

    mine = micro_batches(indices, ps.get_data_parallel_rank(), rt.dp, int(cfg.trainer.micro_batch_size))
    if bins is not None:
        from framework.data.packing import collate_packed

        return [collate_packed([[dataset[i] for i in bins[b]] for b in mb], tokenizer.pad_id,
                               _packed_length(cfg, rt)) for mb in mine]
    multiple = rt.tp if rt.sp else 1
    if cfg.data.get("format") == "seq2seq":  # encoder-decoder (T5): framework/data/seq2seq.py
        from framework.training.t5_step import seq2seq_batches

        return seq2seq_batches(mine, indices, dataset, tokenizer, multiple)
    longest = max(len(dataset[i].input_ids) - 1 for i in indices)
    seq = math.ceil(longest / multiple) * multiple
    return [collate([dataset[i] for i in mb], tokenizer.pad_id, seq_length=seq) for mb in mine]


def _validator(cfg, model, tokenizer, val_set, rt):
    """A function giving the mean validation loss per target token over exactly the first
    trainer.eval_samples validation samples (all of them when unset), the same at every layout."""
    from framework.data.views import Subset

    n = len(val_set) if cfg.trainer.get("eval_samples") is None else min(int(cfg.trainer.eval_samples), len(val_set))
    if n < 1:
        from framework.runtime.errors import ConfigError

        raise ConfigError(f"trainer.eval_samples={cfg.trainer.eval_samples}: validation needs at least one sample "
                          f"(validation samples available: {len(val_set)})")
    first = Subset(val_set, range(n))
    return lambda: _mean_loss(first, cfg, model, tokenizer, rt)


def _mean_loss(samples, cfg, model, tokenizer, rt) -> float:
    """Mean loss per target token over ``samples``. The last micro-batch x DP group is filled with
    zero-target samples (``framework.data.views.Padded``): no sample is left out or counted twice, so the
    loss is the same at every layout."""
    from framework.data.views import Padded
    from framework.training.step import evaluate

    group = int(cfg.trainer.micro_batch_size) * rt.dp
    padded = Padded(samples, group)
    groups = [list(range(i, i + group)) for i in range(0, len(padded), group)]
    return evaluate(model, [mb for g in groups for mb in _batches(g, padded, cfg, tokenizer, rt)], cfg.precision)


def _evaluate_test(cfg, model, tokenizer, rt) -> float | None:
    """Mean loss per target token over every sample of data.test (None without one), evaluated as
    validation is. The file was validated with the rest before training; with the data cache this maps
    it again."""
    if not cfg.data.get("test"):
        return None
    from framework.data.prepare import prepare_file

    test_set, _ = prepare_file(cfg.data, tokenizer, cfg.data.test)
    loss = _mean_loss(test_set, cfg, model, tokenizer, rt)
    log.info("test loss %.4f (perplexity %.2f) over %d samples of %s", loss, math.exp(loss), len(test_set),
             cfg.data.test)
    return loss


def evaluate_adapter(cfg: DictConfig, adapter_dir: str) -> float:
    """Validation loss of the configured model with a saved adapter, as the job computes it."""
    from framework.checkpoint.trained import load_trained
    from framework.runtime import distributed as rtd

    model_cfg, tokenizer, _train, val_set, _reports = prepare_inputs(cfg, rtd.world_size_from_env())
    par = cfg.parallel
    rt = rtd.initialize(tp=int(par.tensor), pp=int(par.pipeline), sp=bool(par.sequence), seed=int(cfg.seed))
    model = build_model(cfg, model_cfg, rt)
    load_trained(model, adapter_dir, cfg.peft, model_cfg)
    return _validator(cfg, model, tokenizer, val_set, rt)()


def _complete(cfg, model, tokenizer, val_set, rt):
    """Greedy completion of one held-out prompt (the prompt part of a validation sample)."""
    n = int(cfg.generate.max_new_tokens)
    if n <= 0:
        return None
    from framework.inference.generate import greedy_generate

    sample = val_set[int(cfg.generate.sample) % len(val_set)]
    if cfg.data.get("format") == "seq2seq":  # encoder-decoder (T5)
        from framework.training.t5_step import complete

        return complete(model, sample, tokenizer, n, rt.tp if rt.sp else 1)
    prompt = [t for t, m in zip(sample.input_ids, sample.loss_mask) if not m]
    ids = greedy_generate(model, prompt, n, eos_id=tokenizer.eos_id, pad_multiple=rt.tp if rt.sp else 1)
    return tokenizer.decode(ids)
