"""Per-GPU memory of a fine-tuning job at a TP x PP x DP layout: an estimate from shapes alone.

For the pipeline stage that needs most (the first holds the embedding and, under 1F1B, ``pp`` micro-batches
of activations in flight; the last holds the output layer and the logits)::

    weights      this rank's stage params x bytes per weight (bf16 2, fp32 4, fp8 2 + 1 for TE's fp8 copies,
                 QLoRA linears 0.5 + 1/64 x 4 bytes of block constants ~ 0.56, double quantisation ignored)
    gradients    this rank's trainable x 4  (megatron accumulates main grads in fp32)
    optimizer    this rank's trainable x 12 (bf16: fp32 master copy + Adam m, v) or 8 (fp32: m, v);
                 / DP with the distributed optimizer
    activations  per layer, saved for backward (bytes a = 2 for bf16/fp8, 4 for fp32; s sequence, b micro
                 batch, t TP; the first group is divided by t only under sequence parallelism)
                   none/selective   a s b [4h / (t if SP) + ((n + 2g') d + n d + F + f) / t]
                   full             a s b h / (t if SP)  (+ one layer's full set, recomputed at a time)
                 (fused attention keeps no s x s scores, so selective recompute saves nothing more here)
                 x layers on the stage x micro-batches in flight (first stage: min(pp, micro-batches))
                 Encoder-decoder (T5, PP=1): the layers above are the encoder's, at s = data.max_length; the
                 decoder's L_dec layers run at s_dec = data.decoder_max_length (null: data.max_length), each a
                 layer above at s_dec plus its cross-attention (norm input and output; q and the attention
                 output at s_dec, keys/values from the encoder output at s)
                   none/selective   a s_dec b [4h / (t if SP) + ((n + 2g') d + n d + F + f) / t]
                                    + a b [s_dec (2h / (t if SP) + 2 n d / t) + s 2g' d / t]
                   full             a s_dec b h / (t if SP)  (+ the larger of one encoder / decoder layer's set)
                 plus the encoder output, kept once for every layer's cross-attention: a s b h / (t if SP)
    logits       last stage: s_dec b V / t x 4 bytes x 2 (fp32 logits and their gradient; s_dec = s for a GPT)
    overhead     3 GiB: CUDA context, NCCL buffers, allocator fragmentation

"This rank's" parameters are framework/planner/params.py's per-rank counts at TP = t: sharded tensors / t,
replicated ones (norms, row-parallel biases, the router) whole, and with fewer KV heads than TP ranks
(g' = t, framework/models/kv_replication.py) the K/V copies every rank holds: in the base weights, their
gradients and optimizer state under full fine-tuning, and in LoRA's B (and DoRA's magnitude) of qkv.
A T5's trainable state covers both stacks: under full fine-tuning params.py's ``decoder`` count, under
LoRA/DoRA L_dec decoder layers of :func:`~framework.planner.params.lora_per_layer` with ``decoder=True``
(the layer targets plus cross_q / cross_kv / cross_proj when targeted).

A statement about fitting is an estimate: the tests check the parameter counts against built models and
the arithmetic against the formulas above; the overhead and activation constants are the usual
Megatron-paper approximations, not measurements.
"""

from __future__ import annotations

import dataclasses

from omegaconf import OmegaConf

from framework.checkpoint.model_checks import model_config
from framework.config.trainer import RECOMPUTE
from framework.data.seq2seq import decoder_max_length
from framework.models.config import ModelConfig
from framework.models.kv_replication import built_groups
from framework.models.layout import LayoutError, check_layout, stage_layers
from framework.peft.registry import moe_problems
from framework.planner.params import CROSS_TARGETS, LORA_TARGETS, count, lora_per_layer
from framework.runtime.errors import ConfigError

GiB = 2 ** 30
OVERHEAD = 3 * GiB
WEIGHT_BYTES = {"fp32": 4.0, "bf16": 2.0, "fp8": 3.0}
QLORA_WEIGHT_BYTES = 0.5 + 4 / 64
ACT_BYTES = {"fp32": 4, "bf16": 2, "fp8": 2}

# Planned options: with fused attention, selective recompute keeps the same activations as none (above).
PLANNED_RECOMPUTE = ("none", "full")
ADAPTER_METHODS = ("lora", "dora", "qlora")


@dataclasses.dataclass(frozen=True)
class Job:
    """What the estimate depends on besides the layout."""

    model: ModelConfig
    method: str = "lora"             # none (full fine-tuning) | lora | dora | qlora | ia3 | adapter | ...
    lora_rank: int = 16
    lora_targets: tuple = ("qkv", "proj", "fc1", "fc2")
    precision: str = "bf16"
    seq_length: int = 4096
    decoder_seq_length: int | None = None  # T5: decoder tokens (data.decoder_max_length); None: seq_length
    micro_batch_size: int = 1
    global_batch_size: int = 128
    recompute: str = "none"
    distributed_optimizer: bool = True
    first_stage_layers: int | None = None  # an explicit uneven pipeline split (parallel.*); None: megatron's
    last_stage_layers: int | None = None


@dataclasses.dataclass(frozen=True)
class Estimate:
    tp: int
    pp: int
    dp: int
    sp: bool
    recompute: str
    weights: float
    gradients: float
    optimizer: float
    activations: float
    logits: float
    overhead: float = OVERHEAD

    @property
    def total(self) -> float:
        return self.weights + self.gradients + self.optimizer + self.activations + self.logits + self.overhead


def trainable_per_layer(job: Job, tp: int = 1, decoder: bool = False) -> int:
    """Trainable elements of one layer on one rank at TP = ``tp`` (``decoder``: of a T5 decoder layer; full
    fine-tuning of the decoder is counted whole, by params.py's ``decoder``)."""
    if job.method == "none":
        return count(job.model, tp).per_layer
    if job.method in ADAPTER_METHODS:  # DoRA: plus a magnitude per output row of each wrapped linear
        return lora_per_layer(job.model, job.lora_rank, job.lora_targets, tp, magnitude=job.method == "dora",
                              decoder=decoder)
    return 4 * job.model.hidden_size  # ia3, adapters, virtual tokens: a few vectors per layer (negligible)


def estimate(job: Job, tp: int, pp: int, dp: int, sp: bool | None = None) -> Estimate:
    """Bytes per GPU on the stage that needs most, for one layout."""
    m = job.model
    sp = (tp > 1) if sp is None else sp
    c = count(m, tp)  # this rank's share, KV copies included
    layers = stage_layers(m.num_layers, pp, job.first_stage_layers, job.last_stage_layers)
    tr_layer = trainable_per_layer(job, tp)
    full = job.method == "none"
    L_dec = m.num_decoder_layers or 0
    # adapters of a T5's decoder stack (full fine-tuning: in c.decoder)
    tr_decoder = 0 if full or not L_dec else L_dec * trainable_per_layer(job, tp, decoder=True)

    def stage(layers: int, is_first: bool, is_last: bool) -> Estimate:
        params_linear = layers * c.linear_per_layer
        params_other = layers * (c.per_layer - c.linear_per_layer) + (c.embedding if is_first else 0) \
            + (c.final + c.decoder if is_last else 0)  # decoder: a T5's decoder stack (PP=1: one stage)
        wb = WEIGHT_BYTES[job.precision]
        lin_b = QLORA_WEIGHT_BYTES if job.method == "qlora" else wb
        weights = params_linear * lin_b + params_other * wb
        trainable = layers * tr_layer + (((c.embedding if is_first else 0) + (c.final + c.decoder if is_last else 0))
                                         if full else (tr_decoder if is_last else 0))
        grads = trainable * 4
        opt_bytes = 12 if job.precision != "fp32" else 8
        optimizer = trainable * opt_bytes / (dp if job.distributed_optimizer else 1)
        a = ACT_BYTES[job.precision]
        s, b, h = job.seq_length, job.micro_batch_size, m.hidden_size
        s_dec = job.decoder_seq_length or s
        rep = tp if sp else 1  # what sequence parallelism splits
        f = m.ffn_hidden_size
        F = 2 * f if m.gated_linear_unit else f
        nd, gd = m.num_attention_heads * m.kv_channels, built_groups(m, tp) * m.kv_channels
        tp_region = nd + 2 * gd + nd + F + f
        if m.num_experts:
            tp_region += (F + f) * (m.moe_router_topk - 1)  # each token's activations in k experts
        one_layer = a * s * b * (4 * h / rep + tp_region / tp)
        one_dec_layer = a * s_dec * b * (4 * h / rep + tp_region / tp) \
            + a * b * (s_dec * (2 * h / rep + 2 * nd / tp) + s * 2 * gd / tp)  # + cross-attention
        full_rc = job.recompute == "full"
        per_layer = a * s * b * h / rep if full_rc else one_layer
        micro_batches = max(1, job.global_batch_size // (job.micro_batch_size * dp))
        in_flight = min(pp, micro_batches) if is_first else 1
        activations = layers * per_layer * in_flight
        if L_dec and is_last:  # T5 (PP=1): the decoder stack and the encoder output its cross-attention reads
            activations += L_dec * (a * s_dec * b * h / rep if full_rc else one_dec_layer) + a * s * b * h / rep
        if full_rc:
            activations += max(one_layer, one_dec_layer) if L_dec else one_layer
        logits = s_dec * b * m.vocab_size / tp * 4 * 2 if is_last else 0
        return Estimate(tp, pp, dp, sp, job.recompute, weights, grads, optimizer, activations, logits)

    stages = [stage(n, i == 0, i == pp - 1) for i, n in enumerate(layers)]
    return max(stages, key=lambda e: e.total)


def layouts(model: ModelConfig, gpus: int, gpus_per_node: int = 8) -> list[tuple[int, int, int]]:
    """(tp, pp, dp) with tp dividing heads/KV heads/vocab/ffn, tp <= a node, pp <= layers, tp*pp*dp = gpus."""
    out = []
    for tp in range(1, min(gpus, gpus_per_node) + 1):
        for pp in range(1, min(gpus // tp, model.num_layers) + 1):
            if gpus % (tp * pp):
                continue
            try:
                check_layout(model, tp, pp, sp=False, world_size=gpus)
            except LayoutError:
                continue
            out.append((tp, pp, gpus // (tp * pp)))
    return out


def plan(job: Job, gpus: int, gpu_memory_gib: float = 80.0, gpus_per_node: int = 8) -> list[tuple[Estimate, bool]]:
    """Every layout x recompute option with its estimate and whether it fits, best first: fitting layouts
    by least model parallelism (more DP is faster), then fewer pipeline stages (no bubble; TP stays inside
    a node), then less recompute."""
    rows = []
    for tp, pp, dp in layouts(job.model, gpus, gpus_per_node):
        for rc in PLANNED_RECOMPUTE:
            e = estimate(dataclasses.replace(job, recompute=rc), tp, pp, dp)
            rows.append((e, e.total <= gpu_memory_gib * GiB))
    rows.sort(key=lambda r: (not r[1], r[0].tp * r[0].pp, r[0].pp, RECOMPUTE.index(r[0].recompute)))
    return rows


def recommend(job: Job, gpus: int, gpu_memory_gib: float = 80.0, gpus_per_node: int = 8) -> Estimate | None:
    rows = plan(job, gpus, gpu_memory_gib, gpus_per_node)
    return rows[0][0] if rows and rows[0][1] else None


def job_from_config(cfg, seq: int | None = None) -> Job:
    """The Job a composed fine-tuning config (conf/finetune.yaml) describes."""

    peft, model = cfg.peft, model_config(cfg)
    problems = moe_problems(peft, model)  # the job refuses MLP targets on a mixture of experts: plan no such job
    if problems:
        raise ConfigError(problems[0])
    targets = tuple(peft.get("targets") or LORA_TARGETS)
    seq_length = int(seq or cfg.data.max_length)
    # T5: the decoder's own length; null follows the encoder's (seq overrides data.max_length)
    decoder_seq = decoder_max_length(cfg.data) if cfg.data.get("decoder_max_length") is not None else None
    return Job(model=model, method=str(peft.method), lora_rank=peft.get("rank", 0),  # the method's own rank (LoRA-style methods all have one)
               lora_targets=tuple(t for t in targets if t in LORA_TARGETS + CROSS_TARGETS),
               precision=str(OmegaConf.select(cfg, "precision", default="bf16")),
               seq_length=seq_length, decoder_seq_length=decoder_seq if model.num_decoder_layers else None,
               micro_batch_size=int(cfg.trainer.micro_batch_size),
               global_batch_size=int(cfg.trainer.global_batch_size),
               distributed_optimizer=bool(OmegaConf.select(cfg, "trainer.distributed_optimizer", default=True)),
               first_stage_layers=OmegaConf.select(cfg, "parallel.first_stage_layers", default=None),
               last_stage_layers=OmegaConf.select(cfg, "parallel.last_stage_layers", default=None))


def warn_if_unfit(job: Job, tp: int, pp: int, dp: int, sp: bool, gpu_memory_bytes: int, log) -> Estimate:
    """The job's check before launching: log a warning with the numbers when the layout is predicted not to fit."""
    e = estimate(job, tp, pp, dp, sp)
    if e.total > gpu_memory_bytes:
        log.warning("memory planner: TP=%d PP=%d DP=%d SP=%s needs about %s GiB per GPU (weights %s, gradients %s, "
                    "optimizer %s, activations %s, logits %s, overhead %s) but the GPU has %s GiB; see "
                    "python launch/plan.py for layouts that fit", tp, pp, dp, sp, gib(e.total), gib(e.weights),
                    gib(e.gradients), gib(e.optimizer), gib(e.activations), gib(e.logits), gib(e.overhead),
                    gib(gpu_memory_bytes))
    return e


def gib(x: float) -> str:
    return f"{x / GiB:.1f}"


def table(rows: list[tuple[Estimate, bool]], limit: int | None = None) -> str:
    head = f"{'TP':>3}{'PP':>4}{'DP':>4}{'SP':>4} {'recompute':<10}{'weights':>9}{'grads':>8}{'optim':>8}" \
           f"{'activ':>8}{'logits':>8}{'total GiB':>11}  fits"
    lines = [head, "-" * len(head)]
    for e, fits in rows[:limit] if limit else rows:
        lines.append(f"{e.tp:>3}{e.pp:>4}{e.dp:>4}{'y' if e.sp else 'n':>4} {e.recompute:<10}{gib(e.weights):>9}"
                     f"{gib(e.gradients):>8}{gib(e.optimizer):>8}{gib(e.activations):>8}{gib(e.logits):>8}"
                     f"{gib(e.total):>11}  {'yes' if fits else 'NO'}")
    return "\n".join(lines)
