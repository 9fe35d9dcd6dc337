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


def prepare_inputs(cfg: DictConfig, world_size: int):
    """Validate config, resolve model files and tokenise data; no process groups needed."""
    from framework.config.validate import validate
    from framework.data.prepare import prepare_config
    from framework.data.tokenizer import Tokenizer
    from framework.models import hub

    model_cfg = validate(cfg, world_size)
    if cfg.model.source != "random":
        hub.model_config_for(cfg.model)  # converts the bundled model once; checks model.arch against config.json
    tokenizer = Tokenizer.from_dir(hub.tokenizer_dir(cfg.model))
    samples, reports = prepare_config(cfg.data, tokenizer)
    return model_cfg, tokenizer, samples[0], samples[1], reports


def build_model(cfg: DictConfig, model_cfg, rt):
    """This rank's stage of the model with pretrained weights (or random for source=random), PEFT applied."""
    from framework.models import hub
    from framework.models.registry import get_family

    dtype = torch.bfloat16 if cfg.precision == "bf16" and rt.device.type == "cuda" else torch.float32
    model = get_family(model_cfg.family).build(model_cfg, rt.tp, rt.pp, rt.sp, params_dtype=dtype)
    if cfg.model.source != "random":
        from framework.checkpoint.hf_import import load_hf_into_gpt

        load_hf_into_gpt(model, hub.model_dir(cfg.model), model_cfg)
    from framework.peft.registry import apply_peft

    apply_peft(model, cfg.peft, model_cfg)
    return model


def count_parameters(model) -> tuple[int, int]:
    """(trainable, total) over the whole model: summed over PP stages, TP shards counted once."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    def numel(p):  # replicated parameters would be counted once per TP rank
        return p.numel() if getattr(p, "tensor_model_parallel", False) else p.numel() / ps.get_tensor_model_parallel_world_size()

    t = torch.tensor([sum(numel(p) for p in model.parameters() if p.requires_grad),
                      sum(numel(p) for p in model.parameters())], dtype=torch.float64)
    if ps.get_data_parallel_rank() != 0:
        t.zero_()
    dist.all_reduce(t)
    return int(round(t[0].item())), int(round(t[1].item()))


def run(cfg: DictConfig) -> RunResult:
    from framework.data.batching import BatchOrder
    from framework.runtime import distributed as rtd
    from framework.runtime.progress import progress
    from framework.training.optim import build_optimizer, wrap_ddp
    from framework.training.step import train_step
    from framework.training.summary import summary_table

    world = rtd.world_size_from_env()
    model_cfg, tokenizer, train_set, val_set, reports = prepare_inputs(cfg, world)
    par = cfg.parallel
    rt = rtd.initialize(tp=int(par.tensor), pp=int(par.pipeline), sp=bool(par.sequence), seed=int(cfg.seed))
    out = Path(cfg.output_dir)
    if rt.is_main:
        out.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(cfg, out / "config.yaml", resolve=True)
        for r in reports:
            log.info("data report\n%s", r.format())

    model = build_model(cfg, model_cfg, rt)
    model = wrap_ddp(model)
    optimizer, scheduler = build_optimizer(model, cfg.trainer, cfg.precision)
    trainable, total = count_parameters(model)
    log.info("parameters: %s trainable of %s (%.3f%%)", f"{trainable:,}", f"{total:,}", 100 * trainable / total)

    tr = cfg.trainer
    gbs = int(tr.global_batch_size)
    validate_now = _validator(cfg, model, tokenizer, val_set, rt)

    # LoRA B starts at zero, so before training the model *is* the base model: this is "without adapter".
    completion_before = _complete(cfg, model, tokenizer, val_set, rt)
    val_before = validate_now()
    log.info("validation loss before training: %.4f", val_before)

    # With data.packing the order runs over bins (rows of several samples), not samples: a global batch is
    # global_batch_size bins; see framework/data/packing.py for the semantics.
    bins = _pack_training_set(cfg, train_set, rt)
    order = BatchOrder(len(train_set) if bins is None else len(bins), gbs, seed=int(cfg.seed))
    losses, tokens, t0, eval_time = [], 0, time.perf_counter(), 0.0
    bar = progress(total=int(tr.max_steps), desc="fine-tuning", enabled=rt.is_main)
    for step in range(1, int(tr.max_steps) + 1):
        indices = next(order)
        res = train_step(model, optimizer, scheduler, _batches(indices, train_set, cfg, tokenizer, rt, bins),
                         cfg.precision)
        samples = indices if bins is None else [i for b in indices for i in bins[b]]
        tokens += sum(len(train_set[i].input_ids) - 1 for i in samples)
        losses.append(res.loss)
        bar.update(1, loss=f"{res.loss:.4f}", lr=f"{res.lr:.2e}")
        if step % int(tr.log_interval) == 0:
            log.info("step %d/%d loss %.4f lr %.3e grad_norm %s tokens/s %.0f", step, tr.max_steps, res.loss,
                     res.lr, "n/a" if res.grad_norm is None else f"{res.grad_norm:.3f}",
                     tokens / (time.perf_counter() - t0 - eval_time))
        if step % int(tr.eval_interval) == 0 and step != int(tr.max_steps):
            t_eval = time.perf_counter()
            log.info("step %d validation loss %.4f", step, validate_now())
            eval_time += time.perf_counter() - t_eval
    bar.close()
    elapsed = time.perf_counter() - t0 - eval_time  # training throughput: validation time excluded
    val_after = validate_now()
    log.info("validation loss after training: %.4f", val_after)

    from framework.peft.registry import get_method, save_trained

    # PEFT methods write a small adapter directory; full fine-tuning (peft.method=none) writes weights/.
    adapter_dir = out / "weights" if get_method(cfg.peft.method).trains_base else out / "adapters" / cfg.adapter_name
    save_trained(model.module, adapter_dir, cfg.peft, model_cfg,
                 base={"name": cfg.model.name, "source": cfg.model.source})
    completion_after = _complete(cfg, model, tokenizer, val_set, rt)

    result = RunResult(steps=int(tr.max_steps), val_loss_before=val_before, val_loss_after=val_after,
                       train_losses=losses, tokens_per_s=tokens / elapsed, trainable_params=trainable,
                       total_params=total, output_dir=str(out), adapter_dir=str(adapter_dir) if adapter_dir else None,
                       completion_before=completion_before, completion_after=completion_after)
    if rt.is_main:
        summary = dataclasses.asdict(result) | {"layout": {"tp": rt.tp, "pp": rt.pp, "dp": rt.dp, "sp": rt.sp}}
        (out / "summary.json").write_text(json.dumps(summary, indent=1))
        print(summary_table(result, rt), flush=True)
    return result


def _packed_length(cfg, rt) -> int:
    """Row length of packed batches: data.max_length rounded up to a multiple of TP under SP."""
    multiple = rt.tp if rt.sp else 1
    return math.ceil(int(cfg.data.max_length) / multiple) * multiple


def _pack_training_set(cfg, train_set, rt):
    """Bins of training-sample indices when data.packing is on (packed once, deterministically), else None."""
    if not cfg.data.get("packing", False):
        return None
    from framework.config.validate import ConfigError
    from framework.data.packing import pack, packing_efficiency, sample_positions
    from framework.models.gpt import te_available

    if te_available():
        # TE's fused attention takes the causal mask type and would not apply our block-diagonal mask.
        raise ConfigError("data.packing=true is supported on the local (non-Transformer-Engine) layer spec "
                          "only; THD packed_seq_params for TE are not implemented")
    lengths = [sample_positions(s) for s in train_set]
    size = _packed_length(cfg, rt)
    bins = pack(lengths, size)
    if len(bins) < int(cfg.trainer.global_batch_size):
        log.warning("packing: %d bins is fewer than trainer.global_batch_size=%d (a global batch is that many "
                    "bins); batches will repeat bins", len(bins), int(cfg.trainer.global_batch_size))
    if rt.is_main:
        log.info("packing: %d samples into %d bins of %d positions, efficiency %.1f%% (%.2f samples per bin)",
                 len(lengths), len(bins), size, 100 * packing_efficiency(bins, lengths, size),
                 len(lengths) / len(bins))
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
    longest = max(len(dataset[i].input_ids) - 1 for i in indices)
    seq = math.ceil(longest / multiple) * multiple
    return [collate([dataset[i] for i in mb], tokenizer.pad_id, seq_length=seq) for mb in mine]


def _validator(cfg, model, tokenizer, val_set, rt):
    """A function giving the mean validation loss per target token over the first trainer.eval_samples
    validation samples (rounded down to whole micro-batch x DP groups), the same at every layout."""
    from framework.training.step import evaluate

    tr = cfg.trainer
    group = int(tr.micro_batch_size) * rt.dp
    n = len(val_set) if tr.get("eval_samples") is None else min(int(tr.eval_samples), len(val_set))
    if n < group:
        from framework.config.validate import ConfigError

        raise ConfigError(f"trainer.eval_samples={n} (validation samples available: {len(val_set)}) is fewer "
                         f"than micro_batch_size x data-parallel size = {group}")
    groups = [list(range(i, i + group)) for i in range(0, n - n % group, group)]

    def validate_now():
        return evaluate(model, [mb for g in groups for mb in _batches(g, val_set, cfg, tokenizer, rt)],
                        cfg.precision)

    return validate_now


def evaluate_adapter(cfg: DictConfig, adapter_dir: str) -> float:
    """Validation loss of the configured model with a saved adapter, as the job computes it."""
    from framework.peft.registry import load_trained
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
    prompt = [t for t, m in zip(sample.input_ids, sample.loss_mask) if not m]
    ids = greedy_generate(model, prompt, n, eos_id=tokenizer.eos_id, pad_multiple=rt.tp if rt.sp else 1)
    return tokenizer.decode(ids)
