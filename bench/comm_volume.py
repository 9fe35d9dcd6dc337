"""Communication volume of one training step by parallel layout, counted against the analytic minimum.

    python bench/comm_volume.py                         # every layout below, hidden 256, 4 layers, seq 128
    python bench/comm_volume.py --layouts tp2-lora dp2-full --calls   # a few, with every collective listed

Each layout runs in spawned gloo ranks (launch/spawn.py; the layouts of one world size share a
spawn), trains one step uncounted, then one step with every torch.distributed collective and
point-to-point send wrapped (``CollectiveCounter``: all_reduce, all_gather_into_tensor,
reduce_scatter_tensor, their list and ``_base`` forms, broadcast, all_to_all_single, send/isend --
batch_isend_irecv goes through isend -- and megatron's import-time aliases of them). A call records its
phase (megatron's gradient finalisation, the optimizer, our loss report, else the forward/backward
schedule: activations), op, group size p, and the bytes N of its full buffer (the all-reduced tensor, the
all-gather output, the reduce-scatter input, the sent tensor); a call on a group of one moves nothing and
is not counted. Per layout the table gives, per rank and step (mean over ranks): the counted buffer bytes
by phase, the analytic minimum, their ratio, whether the count equals the analytic prediction on every
rank and phase ("exact": the minimum plus megatron's SP re-gather below), the bytes a ring algorithm
sends for the counted calls (all-reduce 2(p-1)/p N, all-gather / reduce-scatter / broadcast (p-1)/p N,
point-to-point N), and, for LoRA under TP, the analytic bytes of the NeMo-style wiring.

Analytic buffer bytes per rank (fp32, e = 4 bytes; T = s*b tokens of a micro-batch, m micro-batches per
rank, L layers of the rank's stage, h hidden, r LoRA rank, t = TP; ``analytic()`` below):

TP without SP, per micro-batch (megatron's column-parallel GEMM all-reduces its input gradient, its
row-parallel GEMM its output):
    embedding        forward all-reduce of the [s, b, h] output                          T h
    each layer       forward: all-reduce after proj and after fc2                        2 T h
                     backward: all-reduce of the input gradient of qkv and of fc1        2 T h
    output layer     backward: all-reduce of its input gradient                          T h
    cross entropy    forward: all-reduce of max logit, target logit, sum of exp [s, b]   3 T
A backward all-reduce happens only where the input needs a gradient: with LoRA the embedding is frozen,
so layer 1's qkv input gradient is never formed (nor layer 1's fc1 input gradient unless layer 1's
attention has a LoRA target). Each tensor above is consumed by the next operation; none can be left out.

LoRA under TP (DESIGN.md section 5, framework/peft/lora.py), per micro-batch and target, r-wide only:
    column base (qkv, fc1)   backward all-reduce of du [s, b, r]                          T r
    row base (proj, fc2)     forward all-reduce of u [s, b, r]                            T r

SP (t > 1), per micro-batch: each all-reduce of an [s, b, h] activation becomes an all-gather (before a
column-parallel GEMM) or a reduce-scatter (after a row-parallel GEMM) of the same full buffer:
    embedding        forward reduce-scatter T h; backward all-gather T h if the embedding trains
    each layer       forward: all-gather before qkv and fc1, reduce-scatter after proj and fc2   4 T h
                     backward: reduce-scatter of the qkv/fc1 input gradients (when needed, as above),
                     all-gather of the proj/fc2 output gradients (when needed)                   <= 4 T h
    output layer     forward all-gather T h, backward reduce-scatter T h
    cross entropy    3 T (as without SP)
    LoRA             column: all-gather u forward + reduce-scatter du backward               2 T r
                     row: reduce-scatter u forward + all-gather du backward                  2 T r
  megatron adds one all-gather T h in backward for every column-parallel GEMM whose weight trains (qkv,
  fc1 and the output layer in full SFT): it keeps only the local s/t slice of the input and re-gathers it
  for the weight gradient, trading that traffic for t times less activation memory. The minimum leaves
  it out, so full SFT under SP counts more than the minimum (by 2 L T h + T h per micro-batch).
  Gradient sync over TP, once a step: replicated parameters whose gradient is partial per rank, i.e. the
  norm weights in full SFT ((2L + 1) h on the last stage, 2 L h elsewhere), the LoRA factors A of column
  bases (r x h each) and B of row bases (h x r each).

PP (p stages), per micro-batch each way: the stage output [s, b, h] ([s/t, b, h] under SP) goes forward
and its gradient comes back; a rank sends m T h (first and last stage) or 2 m T h (middle stages).
megatron exchanges no shapes (fixed sequence length).

DP (d replicas): the trainable gradients, all-reduced once a step from megatron's contiguous fp32 buffer:
trainable numel x 4 bytes (from the shapes, framework/planner/params.py; no padding without the
distributed optimizer).

Scalars (counted, listed apart): the step's loss and token count (framework/training/step.py, 16 bytes,
world group); megatron's token count, broadcast over PP and all-reduced over DP (finalize_model_grads,
4 bytes each, counted with the gradient sync); the gradient norm over TP x PP (megatron's optimizer, 4).

NeMo-style LoRA (NeMo 2 / Megatron-Bridge ``ParallelLinearAdapter``; analytic only): each adapter is two
megatron parallel linears built with SP switched off. Row base: ``linear_in`` RowParallelLinear(h/t -> r)
all-reduces u (T r forward); ``linear_out`` ColumnParallelLinear(r -> h, gather_output=True) all-gathers
the h-wide LoRA output (T h forward) and all-reduces du (T r backward); under SP that output is then
split along the sequence, whose backward all-gathers the h-wide gradient (T h). Column base:
``linear_in`` ColumnParallelLinear(h -> r/t, gather_output=True) all-gathers u (T r forward) and, without
SP, all-reduces its own h-wide input gradient (T h backward, where the input needs one); ``linear_out``
all-reduces du (T r backward); under SP we let the adapter read the norm output that TE's
LayerNormColumnParallelLinear has already gathered (no h-wide traffic counted for it; the local layer
spec would add an h-wide all-gather and reduce-scatter). Its factors need no TP gradient sync. It also
needs t to divide r; ours does not. NeMo-style minus ours, per micro-batch and layer with all four
targets: 4 T h + 4 T r without SP (3 T h + 4 T r in layer 1), 4 T h with SP less our 4 r h of factor
gradients per layer and step.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from collections import defaultdict

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

E = 4  # fp32 bytes


# -- counting -------------------------------------------------------------------------------------------------
class CollectiveCounter:
    """Wraps torch.distributed collectives and sends (and megatron's import-time aliases of them) inside a
    ``with`` block and records one ``(phase, op, group size, buffer bytes)`` per call on a group of more than
    one rank. ``phase`` says who called: gradient finalisation, the optimizer, the loss report, or the
    forward/backward schedule (activations)."""

    #: op -> index of the argument that holds the full buffer
    BUFFER_ARG = {"all_reduce": 0, "all_gather_into_tensor": 0, "_all_gather_base": 0, "all_gather": 0,
                  "reduce_scatter_tensor": 1, "_reduce_scatter_base": 1, "reduce_scatter": 1,
                  "broadcast": 0, "all_to_all_single": 0, "send": 0, "isend": 0}
    #: megatron modules that bind a collective to a module global at import time
    ALIAS_MODULES = ("megatron.core.tensor_parallel.mappings", "megatron.core.tensor_parallel.layers",
                     "megatron.core.distributed.param_and_grad_buffer")
    PHASES = (("finalize_model_grads", "grad sync"), ("get_grad_norm_fp32", "optimizer"),
              ("global_ratio", "loss"))

    def __init__(self):
        self.calls: list[tuple[str, str, int, int]] = []
        self._saved: list[tuple[object, str, object]] = []
        self._depth = 0  # a wrapped op calling another (e.g. _all_gather_base) counts once

    def _phase(self) -> str:
        f = sys._getframe(2)
        while f is not None:
            for fn, phase in self.PHASES:
                if f.f_code.co_name == fn:
                    return phase
            f = f.f_back
        return "activations"

    def _wrapper(self, name, orig):
        import inspect

        import torch
        import torch.distributed as dist

        sig = inspect.signature(orig)
        buffer_param = list(sig.parameters)[self.BUFFER_ARG[name]]
        counter = self

        def wrapped(*args, **kwargs):
            if counter._depth == 0:
                bound = sig.bind_partial(*args, **kwargs).arguments
                size = dist.get_world_size(bound.get("group"))
                if size > 1:
                    buf = bound[buffer_param]
                    tensors = buf if isinstance(buf, (list, tuple)) else [buf]
                    nbytes = sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))
                    counter.calls.append((counter._phase(), name, size, nbytes))
            counter._depth += 1
            try:
                return orig(*args, **kwargs)
            finally:
                counter._depth -= 1

        wrapped.__wrapped__ = orig
        return wrapped

    def _patch(self, owner, name, new):
        self._saved.append((owner, name, getattr(owner, name)))
        setattr(owner, name, new)

    def __enter__(self):
        import importlib

        import torch.distributed as dist
        import torch.distributed.distributed_c10d as c10d

        wrappers = {}
        for name in self.BUFFER_ARG:
            orig = getattr(c10d, name, None)
            if orig is None:
                continue
            wrappers[id(orig)] = w = self._wrapper(name, orig)
            # Both namespaces: P2POp checks its op against c10d's module globals, and batch_isend_irecv
            # calls the op it holds, so isend stays one function everywhere.
            self._patch(c10d, name, w)
            if getattr(dist, name, None) is orig:
                self._patch(dist, name, w)
        for mod_name in self.ALIAS_MODULES:
            mod = importlib.import_module(mod_name)
            for attr in ("dist_all_gather_func", "dist_reduce_scatter_func"):
                f = getattr(mod, attr, None)
                if f is not None and id(f) in wrappers:
                    self._patch(mod, attr, wrappers[id(f)])
        return self

    def __exit__(self, *exc):
        for owner, name, orig in reversed(self._saved):
            setattr(owner, name, orig)
        self._saved.clear()


def ring_bytes(op: str, p: int, nbytes: int) -> float:
    """Bytes one rank sends for the call under the ring algorithm (p2p: the tensor)."""
    if op == "all_reduce":
        return 2 * (p - 1) / p * nbytes
    if op in ("send", "isend"):
        return nbytes
    return (p - 1) / p * nbytes


# -- layouts ----------------------------------------------------------------------------------------------------
ALL_TARGETS = ("qkv", "proj", "fc1", "fc2")


@dataclasses.dataclass(frozen=True)
class Layout:
    name: str
    tp: int = 1
    pp: int = 1
    dp: int = 1
    sp: bool = False
    method: str = "lora"                 # lora | none (full SFT)
    targets: tuple[str, ...] = ALL_TARGETS

    @property
    def world(self) -> int:
        return self.tp * self.pp * self.dp


def _layouts() -> dict[str, Layout]:
    out = {}
    for base, kw in (("tp2", dict(tp=2)), ("tp2-sp", dict(tp=2, sp=True)), ("tp4", dict(tp=4)),
                     ("tp4-sp", dict(tp=4, sp=True)), ("pp2", dict(pp=2)), ("dp2", dict(dp=2))):
        out[f"{base}-full"] = Layout(f"{base}-full", method="none", **kw)
        out[f"{base}-lora"] = Layout(f"{base}-lora", **kw)
    out["tp2-lora-qkv"] = Layout("tp2-lora-qkv", tp=2, targets=("qkv",))
    out["tp2-lora-mlp"] = Layout("tp2-lora-mlp", tp=2, targets=("fc1", "fc2"))
    return out


LAYOUTS = _layouts()


@dataclasses.dataclass(frozen=True)
class Shape:
    hidden: int = 256
    layers: int = 4
    heads: int = 8
    kv_heads: int = 4
    ffn: int = 512
    vocab: int = 1024
    seq: int = 128
    micro_batch: int = 2
    micro_batches: int = 2   # per DP rank and step
    rank: int = 8

    def model_config(self):
        from framework.models.config import ModelConfig

        return ModelConfig(vocab_size=self.vocab, hidden_size=self.hidden, num_layers=self.layers,
                           num_attention_heads=self.heads, num_query_groups=self.kv_heads,
                           ffn_hidden_size=self.ffn, max_position_embeddings=max(256, self.seq))


# -- one layout in the spawned ranks -----------------------------------------------------------------------------
def _measure(layout: Layout, shape: Shape) -> dict:
    import torch
    from megatron.core import parallel_state as ps
    from omegaconf import OmegaConf

    from framework.models.gpt import build_gpt
    from framework.peft.registry import apply_peft
    from framework.runtime import initialize
    from framework.training.optim import build_optimizer, wrap_ddp
    from framework.training.step import train_step

    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    rt = initialize(tp=layout.tp, pp=layout.pp, sp=layout.sp, seed=0)
    model_cfg = shape.model_config()
    model = build_gpt(model_cfg, layout.tp, layout.pp, layout.sp)
    peft = dict(method="none") if layout.method == "none" else dict(
        method="lora", targets=list(layout.targets), rank=shape.rank, alpha=2.0 * shape.rank, dropout=0.0)
    apply_peft(model, OmegaConf.create(peft), model_cfg)
    ddp = wrap_ddp(model)
    trainer = OmegaConf.create(dict(lr=1e-4, min_lr=1e-4, weight_decay=0.0, adam_beta1=0.9, adam_beta2=0.999,
                                    clip_grad=0.0, max_steps=10, warmup_steps=0))
    opt, sched = build_optimizer(ddp, trainer)
    g = torch.Generator().manual_seed(1 + ps.get_data_parallel_rank())
    mbs = []
    for _ in range(shape.micro_batches):
        tokens = torch.randint(0, shape.vocab, (shape.micro_batch, shape.seq + 1), generator=g)
        mbs.append(dict(tokens=tokens[:, :-1].contiguous(), labels=tokens[:, 1:].contiguous(),
                        loss_mask=torch.ones(shape.micro_batch, shape.seq),
                        position_ids=torch.arange(shape.seq).expand(shape.micro_batch, -1).contiguous()))
    train_step(ddp, opt, sched, mbs)  # untimed, uncounted: first-call set-up
    with CollectiveCounter() as counter:
        train_step(ddp, opt, sched, mbs)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return dict(calls=counter.calls, stage=ps.get_pipeline_model_parallel_rank(), trainable=trainable,
                grad_buffer=sum(b.grad_data.numel() for b in ddp.buffers), rank=rt.rank)


def _worker(layouts: list[Layout], shape: Shape) -> list[dict]:
    return [_measure(layout, shape) for layout in layouts]


def measure(layouts: list[Layout], shape: Shape, timeout: float = 900) -> dict[str, list[dict]]:
    """layout name -> one record per rank (calls, pipeline stage, trainable numel), from spawned ranks; the
    layouts of one world size share one spawn."""
    from launch.spawn import run_distributed

    by_world = defaultdict(list)
    for layout in layouts:
        by_world[layout.world].append(layout)
    out = {}
    for world, group in by_world.items():
        ranks = run_distributed(_worker, world, group, shape, timeout=timeout)
        for i, layout in enumerate(group):
            out[layout.name] = [r[i] for r in ranks]
    return out


# -- analytic bytes -------------------------------------------------------------------------------------------
COLUMN, ROW = ("qkv", "fc1"), ("proj", "fc2")


def analytic(layout: Layout, shape: Shape, stage: int, wiring: str = "ours", regather: bool = False) -> dict[str, int]:
    """Buffer bytes one rank of pipeline stage ``stage`` moves in one step, by phase (see the module
    docstring). ``wiring="nemo"``: the LoRA branch communicates as NeMo's ParallelLinearAdapter does.
    ``regather``: add megatron's backward re-gather of the SP input of column-parallel GEMMs whose weight
    trains (not part of the minimum)."""
    from framework.models.layout import pipeline_split
    from framework.planner.params import count, lora_per_layer

    cfg = shape.model_config()
    t, pp, sp = layout.tp, layout.pp, layout.sp and layout.tp > 1
    full, targets = layout.method == "none", set() if layout.method == "none" else set(layout.targets)
    T, h, r, m = shape.seq * shape.micro_batch, shape.hidden, shape.rank, shape.micro_batches
    first, last = stage == 0, stage == pp - 1
    n_first, n_last = pipeline_split(shape.layers, pp)
    n_layers = shape.layers // pp
    if first and n_first is not None:
        n_layers = n_first
    elif last and n_first is not None:
        n_layers = n_last if n_last is not None else shape.layers - n_first
    act = 0  # elements per micro-batch
    nemo = wiring == "nemo"

    def gather_or_reduce(width):  # one all-reduce (no SP) or one all-gather / reduce-scatter (SP): same buffer
        return T * width if t > 1 else 0

    if t > 1:
        if first:  # embedding: forward all-reduce / reduce-scatter; backward all-gather only under SP
            act += T * h + (T * h if sp and full else 0)
        needs_grad = not first or full  # received activations carry requires_grad
        for _ in range(n_layers):
            for col, row in (("qkv", "proj"), ("fc1", "fc2")):
                # column base: SP forward all-gather; input gradient when needed; SP re-gather for wgrad
                act += (T * h if sp else 0) + (T * h if needs_grad else 0) + (T * h if sp and full and regather else 0)
                if col in targets:
                    act += gather_or_reduce(r) * (2 if sp else 1)
                    if nemo and not sp:  # linear_in gathers u (r-wide) and all-reduces its h-wide dgrad
                        act += T * r + (T * h if needs_grad else 0)
                out_needs_grad = needs_grad or full or col in targets
                # row base: forward all-reduce / reduce-scatter; SP backward all-gather when it needs a gradient
                act += T * h + (T * h if sp and out_needs_grad else 0)
                if row in targets:
                    act += gather_or_reduce(r) * (2 if sp else 1)
                    if nemo:  # linear_out gathers the h-wide output (+ its gradient under SP)
                        act += T * h * (2 if sp else 1) + (0 if sp else T * r)
                needs_grad = out_needs_grad or row in targets
        if last:  # output layer (column) + vocab-parallel cross entropy (3 fp32 per token)
            act += (T * h if sp else 0) + T * h + (T * h if sp and full and regather else 0) + 3 * T
    p2p = 0
    if pp > 1:
        slice_ = T * h // (t if sp else 1)
        p2p = m * slice_ * ((0 if last else 1) + (0 if first else 1))
    out = {"activations": (m * act + p2p) * E}
    grad = 0
    if sp:
        if full:
            grad += (2 * n_layers + (1 if last else 0)) * h
        elif not nemo:
            grad += n_layers * r * h * sum(1 for x in targets if x in COLUMN + ROW)
    if layout.dp > 1:
        c = count(cfg)
        grad += c.total(shape.layers) if full else shape.layers * lora_per_layer(cfg, r, tuple(targets))
    out["grad sync"] = grad * E + (4 if pp > 1 else 0) + (4 if layout.dp > 1 else 0)
    out["scalars"] = 16 + (4 if t * pp > 1 else 0)  # loss + token count (fp64); grad norm over TP x PP
    return out


def _counted(calls) -> tuple[dict[str, int], float]:
    """(buffer bytes by phase, ring bytes sent) of one rank's calls; loss and optimizer calls are 'scalars'."""
    by_phase = defaultdict(int)
    wire = 0.0
    for phase, op, size, nbytes in calls:
        by_phase["scalars" if phase in ("loss", "optimizer") else phase] += nbytes
        wire += ring_bytes(op, size, nbytes)
    return by_phase, wire


def rows(results: dict[str, list[dict]], shape: Shape) -> list[dict]:
    out = []
    for name, ranks in results.items():
        layout = LAYOUTS[name]
        counted = [_counted(r["calls"]) for r in ranks]
        want = [analytic(layout, shape, r["stage"]) for r in ranks]
        expected = [analytic(layout, shape, r["stage"], regather=True) for r in ranks]
        nemo = [analytic(layout, shape, r["stage"], "nemo") for r in ranks]
        n = len(ranks)

        def mean(values):
            return sum(values) / n

        row = dict(name=name, layout=layout,
                   **{f"counted {k}": mean([c[0].get(k, 0) for c in counted]) for k in ("activations", "grad sync", "scalars")},
                   counted=mean([sum(c[0].values()) for c in counted]), wire=mean([c[1] for c in counted]),
                   analytic=mean([sum(w.values()) for w in want]), nemo=mean([sum(w.values()) for w in nemo]),
                   exact=all(dict(c[0]) == {k: v for k, v in w.items() if v} for c, w in zip(counted, expected)))
        out.append(row)
    return out


def _kib(x: float) -> str:
    return f"{x / 1024:,.1f}"


def table(rows_: list[dict], shape: Shape) -> str:
    lines = [f"communication per training step and rank (KiB, mean over ranks; buffer bytes unless 'ring'), "
             f"hidden {shape.hidden}, {shape.layers} layers, seq {shape.seq} x micro-batch {shape.micro_batch} x "
             f"{shape.micro_batches} micro-batches, LoRA rank {shape.rank}, fp32",
             f"{'layout':<14}{'TP':>3}{'PP':>3}{'DP':>3}{'SP':>4} {'trained':<17}{'activations':>12}{'grad sync':>11}"
             f"{'scalars':>9}{'counted':>10}{'minimum':>10}{'cnt/min':>8}{'exact':>6}{'ring':>10}{'NeMo-style':>11}"
             f"{'NeMo/ours':>10}"]
    for r in rows_:
        lay = r["layout"]
        trained = "full" if lay.method == "none" else "lora " + ",".join(lay.targets)
        lora_tp = lay.method != "none" and lay.tp > 1
        nemo = f"{_kib(r['nemo'])}" if lora_tp else "-"
        ratio = f"{r['nemo'] / r['analytic']:.2f}x" if lora_tp else "-"
        lines.append(
            f"{r['name']:<14}{lay.tp:>3}{lay.pp:>3}{lay.dp:>3}{'on' if lay.sp else 'off':>4} {trained:<17}"
            f"{_kib(r['counted activations']):>12}{_kib(r['counted grad sync']):>11}{r['counted scalars']:>8.0f}B"
            f"{_kib(r['counted']):>10}{_kib(r['analytic']):>10}{r['counted'] / r['analytic']:>8.3f}"
            f"{'yes' if r['exact'] else 'no':>6}{_kib(r['wire']):>10}"
            f"{nemo:>11}{ratio:>10}")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layouts", nargs="*", default=list(LAYOUTS), choices=list(LAYOUTS), help="layouts to count")
    for f in dataclasses.fields(Shape):
        p.add_argument(f"--{f.name.replace('_', '-')}", type=int, default=f.default, help=f"(default {f.default})")
    p.add_argument("--calls", action="store_true", help="list every counted call of each layout's rank 0")
    a = p.parse_args(argv)
    shape = Shape(**{f.name: getattr(a, f.name) for f in dataclasses.fields(Shape)})
    results = measure([LAYOUTS[n] for n in a.layouts], shape)
    if a.calls:
        for name, ranks in results.items():
            print(f"{name}, rank 0 (phase, op, group size, buffer bytes):")
            for c in ranks[0]["calls"]:
                print("   ", c)
    print()
    print(table(rows(results, shape), shape))


if __name__ == "__main__":
    main()
