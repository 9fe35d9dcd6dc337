"""KV heads replicated over tensor-parallel ranks, for models with fewer KV heads than TP ranks (MQA, GQA).

megatron-core splits the g query groups (KV heads) over the t TP ranks, so it needs g % t == 0. When t > g,
t % g == 0 and the n query heads split (n % t == 0), the model is built with t query groups instead: every
KV head is held c = t / g times, once on each of the c consecutive ranks whose query heads attend to it,
as NeMo and Megatron-LM do for multi-query attention. ``model.arch.num_query_groups`` stays g (Hugging
Face's count); t is derived (:func:`built_groups`).

Rows of the fused ``linear_qkv`` weight (and bias) are per group [q heads of the group, k, v], d =
kv_channels rows per head (framework/models/fused_layout.py). Rank r holds group j = r // c as copy
m = r % c::

    true fused W       rows (n + 2g) d    [Q_0 K_0 V_0 | Q_1 K_1 V_1 | ...]        Q_j: the n/g heads of group j
    rank r's shard     rows (n/t + 2) d   [m-th of the c row chunks of Q_j; K_j; V_j]
    all t shards       rows (n + 2t) d    = fuse_qkv(q, k (x) 1_c, v (x) 1_c, n, t)  (each KV head repeated c times)

HF query head i attends to KV head i // (n/g). On rank r it is local head i - r n/t, and the rank's only
local group is j = r // c = i // (n/g): the same KV head, so the replicated model computes exactly the
unreplicated one.

Loading (HF import, our checkpoints, adapters) replicates: :func:`replicate_rows` cuts rank r's rows out
of the true tensor. Saving and exporting de-replicate: :func:`dereplicate_rows` turns the t shards into the
g shards of the true layout at TP = g (copy 0 of K_j, V_j, after checking every copy equals it), so
checkpoints, HF exports and adapters always hold the g true KV heads and load at any layout.

Our checkpoints (megatron dist_checkpointing): :func:`install` gives ``linear_qkv``'s weight and bias the
sharded state dict of the *true* global tensor, cut into its n + 2g head blocks of d rows (the regular grid
megatron's torch_dist format needs): rank r's n/t query heads are main replicas, its K_j and V_j blocks
replica m (copy 0 is written; every copy reads them back).

Training: copy m of K_j is the one W_k,j seen by another subset of query heads, so the unreplicated model's
gradient is dL/dW_k,j = sum over the c copies of dL/dW_k,j^(m). :func:`tie_grads` (run right after megatron's
gradient finalisation, :func:`with_tied_copies`) sets the gradient of every copy's K/V rows to that sum:
the base weight and bias under full fine-tuning, LoRA's B and DoRA's magnitude (their K/V rows), IA3's l_k
and l_v (all rows). Every copy then takes the step the single copy takes at TP = 1, and the copies stay
equal. The sum is one all-reduce over the TP group of a [g, K] buffer in which each rank fills row j with
its K tied gradient values (zeros elsewhere): afterwards row j is the sum over group j's copies; no extra
process groups (for MQA, g = 1, it is exactly an all-reduce among the copies). The gradient norm counts
each KV head once (:func:`count_copies_once` masks copies m > 0 out of it, as megatron counts a
TP-duplicated parameter on one rank only), so clipping is the same as at TP = 1.
"""

from __future__ import annotations

import dataclasses
import functools

import torch
import torch.distributed as dist

from framework.models.fused_layout import shard
from framework.models.unwrap import unwrap_model
from framework.runtime.errors import ConfigError


# -- which layouts, and what each rank holds -------------------------------------------------------------
def layout_problem(num_heads: int, num_groups: int, tp: int) -> str | None:
    """Why TP = ``tp`` cannot split ``num_heads`` query heads over ``num_groups`` KV heads (None: it can)."""
    if num_heads % tp:
        return (f"parallel.tensor={tp} does not divide the model's {num_heads} query heads and {num_groups} KV "
                f"heads (model.arch.num_attention_heads, model.arch.num_query_groups): it must divide the query "
                f"heads, and divide the KV heads or be a multiple of them")
    if num_groups % tp and tp % num_groups:
        return (f"parallel.tensor={tp} is neither a divisor nor a multiple of the model's {num_groups} KV heads "
                f"(model.arch.num_query_groups={num_groups}): each TP rank holds whole KV heads, or one of "
                f"parallel.tensor / num_query_groups copies of a single KV head")
    return None


def copies(num_heads: int, num_groups: int, tp: int) -> int:
    """c: how many TP ranks hold each KV head (1: megatron's own split). ConfigError for a layout that fits
    neither."""
    problem = layout_problem(num_heads, num_groups, tp)
    if problem:
        raise ConfigError(problem)
    return tp // num_groups if tp > num_groups else 1


def built_groups(model_cfg, tp: int) -> int:
    """The query groups megatron's model is built with at TP = ``tp``: g, or t when KV heads are replicated."""
    g = model_cfg.num_query_groups
    return g * copies(model_cfg.num_attention_heads, g, tp)


@dataclasses.dataclass(frozen=True)
class Replication:
    """Rank ``rank`` of ``tp`` holds copy ``copy`` of KV head ``group`` (replicated layouts only)."""

    num_heads: int
    num_groups: int
    head_dim: int
    tp: int
    rank: int

    @property
    def copies(self) -> int:
        return self.tp // self.num_groups

    @property
    def group(self) -> int:
        return self.rank // self.copies

    @property
    def copy(self) -> int:
        return self.rank % self.copies

    @property
    def kv_rows(self) -> slice:
        """The K and V rows of this rank's fused qkv shard (one local group: after its n/t query heads)."""
        start = self.num_heads // self.tp * self.head_dim
        return slice(start, start + 2 * self.head_dim)


def replication_of(model_cfg, tp: int, rank: int) -> Replication | None:
    """The replication at this layout, or None where megatron splits whole KV heads."""
    if copies(model_cfg.num_attention_heads, model_cfg.num_query_groups, tp) == 1:
        return None
    return Replication(model_cfg.num_attention_heads, model_cfg.num_query_groups, model_cfg.kv_channels, tp, rank)


def is_fused_qkv(param_name: str) -> bool:
    """Whether a parameter of ours holds fused qkv rows (the weight or bias of self-attention's linear_qkv)."""
    return param_name.endswith(("self_attention.linear_qkv.weight", "self_attention.linear_qkv.bias"))


# -- the row arithmetic ------------------------------------------------------------------------------------
def replicate_rows(full: torch.Tensor, num_heads: int, num_groups: int, tp: int, rank: int,
                   kv_only: bool = False) -> torch.Tensor:
    """Rank ``rank``'s rows (dim 0) of a true tensor in fused-qkv row order ((n + 2g) d rows: a qkv weight or
    bias, LoRA B, DoRA's magnitude), or with ``kv_only`` of K or V rows only (g d rows: IA3's l_k / l_v).
    Without replication: the rank's plain chunk."""
    c = copies(num_heads, num_groups, tp)
    if c == 1:
        return shard(full, 0, rank, tp)
    if full.shape[0] % num_groups:
        raise ValueError(f"{full.shape[0]} rows do not split into {num_groups} KV groups")
    j, m = divmod(rank, c)
    block = full.reshape(num_groups, full.shape[0] // num_groups, *full.shape[1:])[j]
    if kv_only:
        return block.contiguous()
    q_rows = block.shape[0] - 2 * (block.shape[0] // (num_heads // num_groups + 2))
    return torch.cat([block[:q_rows].chunk(c, dim=0)[m], block[q_rows:]]).contiguous()


def dereplicate_rows(shards: list[torch.Tensor], num_heads: int, num_groups: int,
                     kv_only: bool = False) -> list[torch.Tensor]:
    """The TP shards (rank order) of a fused-qkv-row tensor (or, ``kv_only``, of K or V rows) -> the shards of
    the true tensor at TP = g (their concatenation is the true tensor). Unreplicated shards are returned as
    they are. ValueError when the copies of a KV head differ."""
    tp = len(shards)
    c = copies(num_heads, num_groups, tp)
    if c == 1:
        return list(shards)
    out = []
    for j in range(num_groups):
        group = shards[j * c:(j + 1) * c]
        q_rows = 0 if kv_only else group[0].shape[0] - 2 * (group[0].shape[0] // (num_heads // tp + 2))
        kv = group[0][q_rows:]
        for m, s in enumerate(group[1:], 1):
            if not torch.equal(s[q_rows:], kv):
                raise ValueError(f"the K/V rows of KV head {j} differ between its copies on TP ranks {j * c} and "
                                 f"{j * c + m} (were their gradients tied?)")
        out.append(kv if kv_only else torch.cat([s[:q_rows] for s in group] + [kv]))
    return out


# -- checkpoints: the true tensor's sharded state dict ------------------------------------------------------
def _with_copy(replica_id, copy: int):
    """A replica id marking K/V blocks of copy ``copy`` (0: the main replica, when the rest of it is 0)."""
    if isinstance(replica_id, tuple):
        return (replica_id[0], copy, *replica_id[2:]) if len(replica_id) > 1 else (replica_id[0], copy)
    return (replica_id, copy)


def _head_blocks(sh_ten, spec: Replication):
    """megatron's ShardedTensor of this rank's (replicated-layout) qkv weight or bias -> a factory that
    saves and loads it as this rank's head blocks of the true tensor (see the module docstring)."""
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory

    prepend = sh_ten.prepend_axis_num
    layer_axes = tuple((a, sh_ten.global_offset[a], sh_ten.axis_fragmentations[a]) for a in range(prepend))
    n, g, d, t = spec.num_heads, spec.num_groups, spec.head_dim, spec.tp
    blocks, first = n + 2 * g, spec.group * (n // g + 2)  # head blocks in all; group j's first one

    def build(key, data, replica_id, flattened_range):
        if flattened_range is not None:
            raise ValueError(f"{key}: flattened (distributed-optimizer) shards of replicated KV heads are not "
                             f"supported")
        pieces = []
        local = [(h, first + spec.copy * (n // t) + h, replica_id) for h in range(n // t)]  # query heads
        local += [(n // t + i, first + n // g + i, _with_copy(replica_id, spec.copy)) for i in (0, 1)]  # K, V
        for row_block, block, replica in local:
            pieces.append(ShardedTensor.from_rank_offsets(
                key, data[row_block * d:(row_block + 1) * d], *layer_axes, (prepend, block, blocks),
                replica_id=replica, prepend_axis_num=prepend))
        return pieces

    def merge(loaded):
        return torch.cat(loaded)

    return ShardedTensorFactory(sh_ten.key, sh_ten.data, build, merge, sh_ten.replica_id)


def _true_sharded_state_dict(original, spec: Replication, prefix: str = "", sharded_offsets: tuple = (),
                             metadata: dict | None = None):
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    sd = original(prefix, sharded_offsets, metadata)
    for name in ("weight", "bias"):
        key = f"{prefix}{name}"
        if isinstance(sd.get(key), ShardedTensor):
            sd[key] = _head_blocks(sd[key], spec)
    return sd


# -- random initialisation as the unreplicated model's --------------------------------------------------------
@functools.lru_cache(maxsize=None)
def _replicating_linear():
    from megatron.core.tensor_parallel.layers import ColumnParallelLinear

    class ReplicatedKVColumnParallelLinear(ColumnParallelLinear):
        """megatron's linear_qkv whose CPU initialisation draws the true ((n + 2g) d, h) weight, consuming the
        random numbers the TP = 1 model consumes, and lays it out replicated (the ``(n + 2t) d`` master weight
        megatron then splits over the ranks); any other initialisation (on the GPU, per rank) as megatron's."""

        def __init__(self, input_size, output_size, *, config, init_method, num_groups: int, **kwargs):
            n, t = config.num_attention_heads, config.tensor_model_parallel_size

            def init(master):
                if master.shape[0] != output_size:
                    return init_method(master)
                true = master.new_empty(output_size - 2 * (t - num_groups) * config.kv_channels, master.shape[1])
                init_method(true)
                with torch.no_grad():
                    master.copy_(torch.cat([replicate_rows(true, n, num_groups, t, r) for r in range(t)]))
                return master

            super().__init__(input_size, output_size, config=config, init_method=init, **kwargs)

    return ReplicatedKVColumnParallelLinear


def init_as_unreplicated(block_spec, model_cfg, tp: int) -> None:
    """With KV heads replicated at TP = ``tp``, make the local layer spec's linear_qkv (megatron's
    ColumnParallelLinear) initialise as the unreplicated model does, so a randomly initialised model is the
    same at every layout (megatron's CPU initialisation draws each master weight whole, from one seed)."""
    from megatron.core.tensor_parallel.layers import ColumnParallelLinear
    from megatron.core.transformer.spec_utils import ModuleSpec

    if copies(model_cfg.num_attention_heads, model_cfg.num_query_groups, tp) == 1:
        return
    for spec in {id(s): s for s in getattr(block_spec, "layer_specs", [block_spec])}.values():
        attn = spec.submodules.self_attention.submodules
        if attn.linear_qkv is ColumnParallelLinear:
            attn.linear_qkv = ModuleSpec(module=_replicating_linear(),
                                         params={"num_groups": model_cfg.num_query_groups})


def _qkv_layers(gpt):
    """linear_qkv of every attention layer of this stage (a PEFT wrapper or the base layer)."""
    return [layer.self_attention.linear_qkv for layer in gpt.decoder.layers
            if hasattr(getattr(layer, "self_attention", None), "linear_qkv")]


def _base(module):
    return getattr(module, "base_layer", module)


def install(gpt, model_cfg, tp: int, rank: int) -> None:
    """After building ``gpt`` at TP = ``tp``: record the replication (``gpt.kv_replication``, None without),
    give linear_qkv the true tensor's sharded state dict, and make freshly initialised copies equal (copy 0's
    K/V rows on every copy; process groups must exist)."""
    spec = replication_of(model_cfg, tp, rank)
    gpt.kv_replication = spec
    if spec is None:
        return
    rows = []
    for qkv in _qkv_layers(gpt):
        base = _base(qkv)
        base.sharded_state_dict = functools.partial(_true_sharded_state_dict, base.sharded_state_dict, spec)
        rows += [p.data[spec.kv_rows] for p in (base.weight, getattr(base, "bias", None))
                 if p is not None and not p.is_meta]
    if rows:
        _sum_over_copies(rows, spec, first_copy_only=True)


# -- training: tied gradients -------------------------------------------------------------------------------

def _tied(gpt, spec: Replication, trainable: bool = True) -> list[tuple[torch.nn.Parameter, int, slice]]:
    """(parameter, dim, its replicated K/V rows along dim) on this stage: the trainable ones, or all (QLoRA's
    NF4 storage of a base weight included)."""
    out = []
    for qkv in _qkv_layers(gpt):
        base = _base(qkv)
        out += [(p, 0, spec.kv_rows) for p in (base.weight, getattr(base, "bias", None))
                if p is not None and (p.requires_grad or not trainable)]  # NF4 storage: requires_grad False
        if qkv is base:
            continue
        for piece in qkv.pieces():
            p, rows = qkv.get_parameter(piece.name), piece_rows(qkv, piece)
            if (p.requires_grad or not trainable) and rows is not None:
                out.append((p, 0, slice(None) if rows == "kv" else spec.kv_rows))
    return out


def extra_copies(model) -> dict[int, int]:
    """{id(parameter): how many of its elements on this rank are a copy m > 0 of a KV head} (empty without
    replication; QLoRA's NF4 base weights are keyed by their NF4Weight module): what a parameter count over TP
    ranks leaves out to count each KV head once."""
    gpt = unwrap_model(model)
    spec = getattr(gpt, "kv_replication", None)
    if spec is None or spec.copy == 0:
        return {}
    return {id(p): _span(rows, p.shape[dim])[1] * p.numel() // p.shape[dim] for p, dim, rows in _tied(gpt, spec, False)}


def piece_rows(wrapper, piece) -> str | None:
    """How a PEFT tensor of the linear_qkv wrapper ``wrapper`` meets the KV heads: 'fused' when its dim 0 runs
    along the fused qkv output rows (LoRA's B, DoRA's magnitude), 'kv' when it holds K or V rows only (IA3's
    l_k / l_v), None otherwise (A runs along the input and is whole on every TP rank)."""
    if wrapper.shard_dim(piece) != 0 or piece.side != "out" or piece.part == "q":
        return None
    return "kv" if piece.part in ("k", "v") else "fused"


def _sum_over_copies(tensors: list[torch.Tensor], spec: Replication, first_copy_only: bool = False) -> None:
    """Each tensor (a view, written in place) replaced by its sum over the copies of this rank's KV head (or,
    ``first_copy_only``, by copy 0's value): one all-reduce of a [g, K] buffer over the TP group."""
    from megatron.core import parallel_state

    flat = torch.cat([t.reshape(-1).float() for t in tensors])
    buf = flat.new_zeros(spec.num_groups, flat.numel())
    if not first_copy_only or spec.copy == 0:
        buf[spec.group] = flat
    dist.all_reduce(buf, group=parallel_state.get_tensor_model_parallel_group())
    total, offset = buf[spec.group], 0
    for t in tensors:
        t.copy_(total[offset:offset + t.numel()].view_as(t))
        offset += t.numel()


def _grad_of(p: torch.nn.Parameter):
    g = getattr(p, "main_grad", None)  # megatron DDP's buffer; .grad without DDP
    return p.grad if g is None else g


@torch.no_grad()
def tie_grads(model) -> None:
    """Sum the gradients of every copy of each KV head's rows over its copies (no-op without replication)."""
    gpt = unwrap_model(model)
    spec = getattr(gpt, "kv_replication", None)
    if spec is None:
        return
    views = [_grad_of(p).narrow(dim, *_span(rows, p.shape[dim])) for p, dim, rows in _tied(gpt, spec)
             if _grad_of(p) is not None]
    if views:
        _sum_over_copies(views, spec)


def _span(rows: slice, size: int) -> tuple[int, int]:
    start, stop, _ = rows.indices(size)
    return start, stop - start


def with_tied_copies(finalize):
    """megatron's ``finalize_model_grads`` followed by :func:`tie_grads` on every model chunk (the schedule
    calls it once per step, after the last backward)."""

    @functools.wraps(finalize)
    def run(model, *args, **kwargs):
        out = finalize(model, *args, **kwargs)
        for chunk in model:
            tie_grads(chunk)
        return out

    return run


# -- training: the gradient norm ----------------------------------------------------------------------------
def _optimizer_params(opt):
    """(the optimizer's parameter, its model parameter, the flat range of the model parameter it covers or
    None for all of it) for megatron's optimizers (distributed, mixed precision, fp32)."""
    if hasattr(opt, "shard_fp32_groups"):  # DistributedOptimizer
        pairs = [(opt.model_fp32_groups, opt.shard_fp32_groups),
                 (opt.model_float16_groups, opt.shard_fp32_from_float16_groups)]
        for model_groups, shard_groups in pairs:
            for model_group, shard_group in zip(model_groups, shard_groups):
                for mp, sp in zip(model_group, shard_group):
                    r = opt._get_model_param_range_map(mp)["param"]
                    yield sp, mp, (r.start, r.end)
    elif hasattr(opt, "fp32_from_float16_groups"):  # Float16OptimizerWithFloat16Params
        for g16, g32 in zip(opt.float16_groups, opt.fp32_from_float16_groups):
            yield from ((main, mp, None) for mp, main in zip(g16, g32))
        yield from ((p, p, None) for g in opt.fp32_from_fp32_groups for p in g)
    else:  # FP32Optimizer: the model's own parameters
        yield from ((p, p, None) for group in opt.optimizer.param_groups for p in group["params"])


def count_copies_once(optimizer, model) -> None:
    """Make ``optimizer``'s gradient norm (and so clipping) count every KV head once: on copies m > 0 the
    K/V rows are left out of the gradients it takes the norm of. No-op without replication."""
    gpt = unwrap_model(model)
    spec = getattr(gpt, "kv_replication", None)
    if spec is None or spec.copy == 0:
        return
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        original = opt.get_main_grads_for_grad_norm

        def grads_for_norm(opt=opt, original=original):
            tied = {id(p): (dim, rows) for p, dim, rows in _tied(gpt, spec)}
            masks = {}
            for param, mp, flat_range in _optimizer_params(opt):
                if id(mp) in tied and param.grad is not None:
                    dim, rows = tied[id(mp)]
                    keep = torch.ones(mp.shape, dtype=param.grad.dtype, device=param.grad.device)
                    keep.narrow(dim, *_span(rows, mp.shape[dim])).zero_()
                    masks[id(param.grad)] = keep.view(-1)[slice(*flat_range)] if flat_range else keep
            return [g * masks[id(g)] if id(g) in masks else g for g in original()]

        opt.get_main_grads_for_grad_norm = grads_for_norm
