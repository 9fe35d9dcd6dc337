"""Prefix tuning (Li and Liang 2021): trained keys and values in front of every attention layer's own.

For layer l, with the base model frozen and n = ``num_virtual_tokens``::

    K_l' = [P_l^K ; K_l]    V_l' = [P_l^V ; V_l]        P_l^K, P_l^V: [n, g, d] (g KV heads of d channels)
    context = softmax(q K_l'^T * scale + mask') V_l'    every query sees all n prefix positions

The prefix is never rotated (RoPE acts on q and K_l only) and the real tokens sit at positions n .. n + s - 1,
as in Hugging Face PEFT, which hands the table to transformers as a KV cache of n already-seen positions.
The table is HF PEFT's ``prompt_embeddings`` [n, L * 2 * g * d], read as [n, L, 2 (key, value), g, d]. With
``prefix_projection`` it is produced during training by HF's reparameterisation (its ``PrefixEncoder``)::

    table = W_2 tanh(W_1 E + b_1) + b_2         E [n, g d], W_1 [e, g d], W_2 [L 2 g d, e]

and exported as the resulting table; without it the table is the trained parameter itself.

Where the parameters live. Each layer's core attention is wrapped (:class:`PrefixAttention`); the wrapper
holds that layer's rows of the table (or of W_2, b_2) for this TP rank's KV heads, so pipeline stages hold
their layers and TP ranks their query groups. With KV heads replicated over TP (framework/models/
kv_replication.py) each copy holds its head's rows and the backward sums the gradient over the copies
(:class:`_SumOverCopies`, one all-reduce of a [g, K] buffer). The shared part of the projection (E, W_1,
b_1: ``gpt.prefix_encoder``) is whole on every rank: its output u enters each layer through
:class:`_SharedInput` (backward: all-reduce of du over TP, each KV head counted once), and under pipeline
parallelism megatron's gradient finalisation sums its gradients over the stages (the ``pipeline_parallel``
parameters of ``config.has_cond_embedder``); later stages mark it ``shared`` so the gradient norm counts it
once. Under sequence parallelism attention already sees the whole sequence: nothing changes.

Masks and positions. A causal row needs no mask (queries are the last s of the n + s keys); an explicit
mask [b, 1, s, s] (packing's block-diagonal one, generation's left padding) gets n visible columns in
front, so every packed sample sees the prefix. A forward pre-hook adds n to ``position_ids`` (learned
position embeddings, packed rows' RoPE angles) and RoPE's offset becomes n (megatron's KV-cache path).
Generation needs no cache slot for the prefix: the wrapper puts it in front of the cached keys at every
call.

Files (:func:`save`, :func:`load`): ``adapter.safetensors`` with ``prompt_embeddings`` (the whole table,
HF PEFT's key), ``adapter.yaml``; with the projection also ``prefix_encoder.safetensors`` (HF's
``embedding``, ``transform.0``, ``transform.2`` tensors, whole) so training can continue. They load at any
layout.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
import yaml
from safetensors.torch import load_file, save_file
from torch import nn

from framework.models.unwrap import unwrap_model
from framework.peft.virtual_tokens import plain_config, seeded
from framework.runtime.atomic import atomic_directory

FORMAT_VERSION = 1
TABLE_FILE = "adapter.safetensors"
CONFIG_FILE = "adapter.yaml"
ENCODER_FILE = "prefix_encoder.safetensors"
TABLE_KEY = "prompt_embeddings"
POSITION_TYPES = ("rope", "learned_absolute")
INITS = (None, "zero")


class PrefixError(ValueError):
    """A prefix that does not fit the model, or a model that cannot take one."""


# -- which KV heads this rank holds -----------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Heads:
    groups: int   # g, the model's KV heads
    first: int    # this rank's first KV head
    local: int    # how many it holds
    copies: int   # TP ranks holding each of them (1 unless replicated)
    copy: int     # which copy this rank is
    head_dim: int

    @property
    def token_dim(self) -> int:
        return self.groups * self.head_dim


def heads_of(gpt) -> Heads:
    from megatron.core import parallel_state as ps

    cfg = gpt.config
    spec = getattr(gpt, "kv_replication", None)
    if spec is not None:
        return Heads(spec.num_groups, spec.group, 1, spec.copies, spec.copy, spec.head_dim)
    tp, rank = ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank()
    local = cfg.num_query_groups // tp
    return Heads(cfg.num_query_groups, rank * local, local, 1, 0, cfg.kv_channels)


# -- communication ----------------------------------------------------------------------------------------
class _SumOverCopies(torch.autograd.Function):
    """forward: identity; backward: the gradient summed over the TP copies of this rank's (single) KV head."""

    @staticmethod
    def forward(ctx, x, heads: Heads):
        ctx.heads = heads
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        from megatron.core import parallel_state as ps

        h = ctx.heads
        buf = grad.new_zeros(h.groups, grad.numel())
        buf[h.first] = grad.reshape(-1)
        dist.all_reduce(buf, group=ps.get_tensor_model_parallel_group())
        return buf[h.first].view_as(grad), None


class _SharedInput(torch.autograd.Function):
    """forward: identity (u, whole on every TP rank); backward: du summed over TP, copies m > 0 of a
    replicated KV head contributing nothing (their du equals copy 0's)."""

    @staticmethod
    def forward(ctx, x, heads: Heads):
        ctx.heads = heads
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        from megatron.core import parallel_state as ps

        grad = grad.clone() if ctx.heads.copy == 0 else torch.zeros_like(grad)
        dist.all_reduce(grad, group=ps.get_tensor_model_parallel_group())
        return grad, None


# -- modules ---------------------------------------------------------------------------------------------
class PrefixEncoder(nn.Module):
    """The shared part of HF PEFT's reparameterisation: u = tanh(W_1 E + b_1) [n, e] (its parameter names)."""

    def __init__(self, n: int, token_dim: int, hidden: int, device=None):
        super().__init__()
        self.embedding = nn.Embedding(n, token_dim, device=device)
        self.transform = nn.Sequential(nn.Linear(token_dim, hidden, device=device), nn.Tanh())

    def forward(self) -> torch.Tensor:
        return self.transform(self.embedding.weight)

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata: dict | None = None):
        """Whole on every rank of every stage: only the first stage's copy is a main replica."""
        from megatron.core import parallel_state as ps
        from megatron.core.transformer.utils import make_sharded_tensors_for_checkpoint

        sd = make_sharded_tensors_for_checkpoint(dict(self.named_parameters()), prefix, {}, sharded_offsets)
        stage = ps.get_pipeline_model_parallel_rank()
        for t in sd.values():
            t.replica_id = (stage, *t.replica_id[1:]) if isinstance(t.replica_id, tuple) else (stage, t.replica_id)
        return sd


class PrefixAttention(nn.Module):
    """A layer's core attention with its prefix in front of the keys and values (module docstring)."""

    def __init__(self, base: nn.Module, layer: int, n: int, heads: Heads, encoder: PrefixEncoder | None,
                 tp: int, device=None, dtype=None):
        super().__init__()
        self.base, self.layer, self.n, self.heads, self.tp = base, layer, n, heads, tp
        rows = 2 * heads.local * heads.head_dim
        if encoder is None:
            self.prefix_kv = nn.Parameter(torch.empty(2, n, heads.local, heads.head_dim, device=device, dtype=dtype))
        else:
            e = encoder.transform[0].out_features
            self.prefix_out_weight = nn.Parameter(torch.empty(rows, e, device=device, dtype=dtype))
            self.prefix_out_bias = nn.Parameter(torch.empty(rows, device=device, dtype=dtype))
        self._encoder = [encoder]  # a list: the encoder belongs to the GPT model, not to each layer
        for p in self.own_parameters():
            # TP-sharded by KV heads; a replicated head's copies m > 0 count as TP duplicates (grad norm once)
            p.tensor_model_parallel = heads.copy == 0
            p.partition_dim = 2 if encoder is None else 0
            p.partition_stride = 1

    @property
    def encoder(self) -> PrefixEncoder | None:
        return self._encoder[0]

    def own_parameters(self) -> list[nn.Parameter]:
        return [p for name, p in self.named_parameters(recurse=False)]

    def kv(self) -> torch.Tensor:
        """This layer's prefix [2, n, local heads, d] (keys, values)."""
        h = self.heads
        if self.encoder is None:
            kv = self.prefix_kv
        else:
            u = self.encoder()
            if self.tp > 1:
                u = _SharedInput.apply(u, h)
            kv = F.linear(u, self.prefix_out_weight, self.prefix_out_bias)
            kv = kv.view(self.n, 2, h.local, h.head_dim).transpose(0, 1)
        return _SumOverCopies.apply(kv, h) if h.copies > 1 else kv

    def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None):
        if packed_seq_params is not None:
            raise PrefixError("prefix tuning takes no packed_seq_params (THD packing); use the local layer spec")
        kv = self.kv().to(key.dtype)
        n, b = self.n, key.shape[1]
        key = torch.cat([kv[0].unsqueeze(1).expand(n, b, *kv.shape[2:]), key])
        value = torch.cat([kv[1].unsqueeze(1).expand(n, b, *kv.shape[2:]), value])
        if attention_mask is not None:  # True = masked: the prefix columns are visible to every query
            visible = attention_mask.new_zeros(*attention_mask.shape[:-1], n)
            attention_mask = torch.cat([visible, attention_mask], dim=-1)
        return self.base(query, key, value, attention_mask, attn_mask_type=attn_mask_type,
                         attention_bias=attention_bias, packed_seq_params=packed_seq_params)

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata: dict | None = None):
        """Optimizer state of a train_state: the prefix tensors sharded over TP along their heads."""
        from megatron.core.transformer.utils import make_sharded_tensors_for_checkpoint

        sd = self.base.sharded_state_dict(f"{prefix}base.", sharded_offsets, metadata) \
            if hasattr(self.base, "sharded_state_dict") else {}
        tensors = {name: p for name, p in self.named_parameters(recurse=False)}
        axes = {name: p.partition_dim for name, p in tensors.items()}
        sd.update(make_sharded_tensors_for_checkpoint(tensors, prefix, axes, sharded_offsets))
        return sd


def _layers(gpt) -> list:
    return [layer for layer in gpt.decoder.layers if hasattr(getattr(layer, "self_attention", None), "core_attention")]


def wrappers(model) -> list[PrefixAttention]:
    """This stage's prefix-wrapped attentions, in layer order."""
    return [layer.self_attention.core_attention for layer in _layers(unwrap_model(model))
            if isinstance(layer.self_attention.core_attention, PrefixAttention)]


def prefix_tokens(model) -> int:
    """n of a prefix-tuned model (0 without a prefix)."""
    return int(getattr(unwrap_model(model), "prefix_tokens", 0))


# -- applying -------------------------------------------------------------------------------------------
def apply_prefix_tuning(model, num_virtual_tokens: int, prefix_projection: bool = False,
                        encoder_hidden_size: int | None = None, init_weights: str | None = None,
                        seed: int | None = None) -> None:
    """Freeze the model and give every attention layer of this stage its prefix (call on every stage). The
    initial values are HF PEFT's ``PrefixEncoder`` initialisation drawn whole from ``seed`` (default: the
    run's seed) on the CPU, then cut to this rank's layers and heads: the same model at every layout."""
    from megatron.core import parallel_state as ps

    from framework.models.attention import SDPAttention  # imports megatron-core: kept out of validation

    gpt = unwrap_model(model)
    cfg = gpt.config
    if getattr(gpt, "prefix_tokens", 0):
        raise PrefixError("the model already has a prefix")
    if getattr(gpt, "position_embedding_type", "rope") not in POSITION_TYPES:
        raise PrefixError(f"prefix tuning needs position embeddings {POSITION_TYPES}, the model has "
                          f"{gpt.position_embedding_type!r}")
    if init_weights not in INITS:
        raise PrefixError(f"init_weights={init_weights!r} is not one of {list(INITS)}")
    layers = _layers(gpt)
    for layer in layers:
        core = layer.self_attention.core_attention
        if type(core) is not SDPAttention or cfg.softmax_type != "vanilla":
            raise PrefixError(f"prefix tuning puts keys in front of the cached ones, which our SDPA core attention "
                              f"does; layer {layer.layer_number} has {type(core).__name__} (use model.spec=local)")
    n = int(num_virtual_tokens)
    heads, tp = heads_of(gpt), ps.get_tensor_model_parallel_world_size()
    e = int(encoder_hidden_size or heads.token_dim)
    like = gpt.embedding.word_embeddings.weight if gpt.pre_process else next(gpt.parameters())
    device = "meta" if like.is_meta else "cpu"
    full = _initial_state(n, cfg.num_layers, heads.token_dim, e, prefix_projection, init_weights, seed, device)
    for p in gpt.parameters():
        p.requires_grad_(False)

    encoder = None
    if prefix_projection:
        encoder = PrefixEncoder(n, heads.token_dim, e, device=device)
        if device != "meta":
            encoder.load_state_dict({k: v for k, v in full.items() if not k.startswith("transform.2")})
        encoder.to(device=like.device, dtype=like.dtype)
        pp = ps.get_pipeline_model_parallel_world_size()
        for p in encoder.parameters():
            if pp > 1:  # one encoder, replicated on every stage: megatron sums its gradients over them
                p.pipeline_parallel = True
                p.shared = not ps.is_pipeline_first_stage()  # counted in the gradient norm on one stage
        if pp > 1:
            cfg.has_cond_embedder = True
        gpt.prefix_encoder = encoder
    for layer in layers:
        attn = layer.self_attention
        wrapper = PrefixAttention(attn.core_attention, layer.layer_number - 1, n, heads, encoder, tp,
                                  device=like.device, dtype=like.dtype)
        attn.core_attention = wrapper
    if device != "meta":
        set_full_state(gpt, full)
    for p in trainable_parameters(gpt):
        p.requires_grad_(True)
    gpt.prefix_tokens = n
    gpt.register_forward_pre_hook(_shift_positions, with_kwargs=True)
    if gpt.position_embedding_type == "rope":
        gpt.rotary_pos_emb.register_forward_pre_hook(_rope_offset(n), with_kwargs=True)


def trainable_parameters(model) -> list[nn.Parameter]:
    gpt = unwrap_model(model)
    out = [p for w in wrappers(gpt) for p in w.own_parameters()]
    encoder = getattr(gpt, "prefix_encoder", None)
    return out + ([] if encoder is None else list(encoder.parameters()))


def _shift_positions(gpt, args, kwargs):
    """The real tokens sit after the n prefix positions (HF's cache positions n .. n + s - 1)."""
    n = gpt.prefix_tokens
    if "position_ids" in kwargs:
        if kwargs["position_ids"] is not None:
            kwargs = {**kwargs, "position_ids": kwargs["position_ids"] + n}
    elif len(args) > 1 and args[1] is not None:
        args = (args[0], args[1] + n, *args[2:])
    return args, kwargs


def _rope_offset(n: int):
    """megatron's RoPE angles from position n on (its KV-cache path takes the angles of slot indices)."""
    def hook(module, args, kwargs):
        if len(args) < 2 and "offset" not in kwargs:
            kwargs = {**kwargs, "offset": n}
        return args, kwargs

    return hook


# -- the whole (HF-shaped) state and this rank's share of it ----------------------------------------------
def _initial_state(n, num_layers, token_dim, e, projection, init_weights, seed, device) -> dict:
    """HF PEFT's ``PrefixEncoder`` parameters, drawn in its order (torch's default initialisations)."""
    width = num_layers * 2 * token_dim
    with seeded(seed):
        if projection:
            emb = nn.Embedding(n, token_dim, device=device)
            t0, t2 = nn.Linear(token_dim, e, device=device), nn.Linear(e, width, device=device)
            if init_weights == "zero":
                nn.init.zeros_(t2.weight)
                nn.init.zeros_(t2.bias)
            state = {"embedding.weight": emb.weight, "transform.0.weight": t0.weight, "transform.0.bias": t0.bias,
                     "transform.2.weight": t2.weight, "transform.2.bias": t2.bias}
        else:
            emb = nn.Embedding(n, width, device=device)
            if init_weights == "zero":
                nn.init.zeros_(emb.weight)
            state = {"embedding.weight": emb.weight}
    return {k: v.detach() for k, v in state.items()}


def _rows(wrapper: PrefixAttention, token_dim: int) -> torch.Tensor:
    """Indices of this wrapper's rows in the table's last dimension (layer, key/value, head, channel)."""
    h = wrapper.heads
    kv = torch.arange(2)[:, None, None]
    head = torch.arange(h.first, h.first + h.local)[None, :, None]
    ch = torch.arange(h.head_dim)[None, None, :]
    return ((wrapper.layer * 2 + kv) * token_dim + head * h.head_dim + ch).reshape(-1)


@torch.no_grad()
def set_full_state(model, state: dict) -> None:
    """Load HF-named whole tensors (``embedding.weight`` = the table, or the projection's ``embedding``,
    ``transform.0``, ``transform.2`` tensors) into this rank's share."""
    gpt = unwrap_model(model)
    ws = wrappers(gpt)
    encoder = getattr(gpt, "prefix_encoder", None)
    if not ws:
        return
    n, h = ws[0].n, ws[0].heads
    width = gpt.config.num_layers * 2 * h.token_dim
    if encoder is None:
        want = {"embedding.weight": (n, width)}
    else:
        e = encoder.transform[0].out_features
        want = {"embedding.weight": (n, h.token_dim), "transform.0.weight": (e, h.token_dim),
                "transform.0.bias": (e,), "transform.2.weight": (width, e), "transform.2.bias": (width,)}
    got = {k: tuple(v.shape) for k, v in state.items()}
    if got != want:
        raise PrefixError(f"prefix tensors {got} do not fit this model's prefix {want}")
    if encoder is not None:
        encoder.embedding.weight.copy_(state["embedding.weight"])
        encoder.transform[0].weight.copy_(state["transform.0.weight"])
        encoder.transform[0].bias.copy_(state["transform.0.bias"])
    for w in ws:
        rows = _rows(w, h.token_dim)
        if encoder is None:
            table = state["embedding.weight"][:, rows]  # [n, 2 * local * d] in (kv, head, channel) order
            w.prefix_kv.copy_(table.view(n, 2, h.local, h.head_dim).transpose(0, 1))
        else:
            w.prefix_out_weight.copy_(state["transform.2.weight"][rows])
            w.prefix_out_bias.copy_(state["transform.2.bias"][rows])


@torch.no_grad()
def full_state(model, grads: bool = False) -> dict:
    """The whole HF-named tensors (or, ``grads``, their gradients: ``main_grad`` under DDP), the same on
    every rank: each rank fills its layers' and heads' rows (copy 0 of a replicated head, DP rank 0) into
    zeros and one all-reduce over the model-parallel group sums them."""
    from megatron.core import parallel_state as ps

    gpt = unwrap_model(model)
    cfg = gpt.config
    heads, n = heads_of(gpt), gpt.prefix_tokens
    encoder = getattr(gpt, "prefix_encoder", None)
    token_dim, width = heads.token_dim, cfg.num_layers * 2 * heads.token_dim
    fill = heads.copy == 0 and ps.get_data_parallel_rank() == 0

    def value(p):
        if not grads:
            return p.detach().float()
        g = getattr(p, "main_grad", None)
        g = p.grad if g is None else g
        return torch.zeros(p.shape) if g is None else g.detach().float()

    device = next(gpt.parameters()).device
    out = {}
    if encoder is None:
        table = torch.zeros(n, width, device=device)
        for w in wrappers(gpt) if fill else []:
            table[:, _rows(w, token_dim)] = value(w.prefix_kv).transpose(0, 1).reshape(n, -1)
        out["embedding.weight"] = table
    else:
        e = encoder.transform[0].out_features
        weight, bias = torch.zeros(width, e, device=device), torch.zeros(width, device=device)
        for w in wrappers(gpt) if fill else []:
            rows = _rows(w, token_dim)
            weight[rows], bias[rows] = value(w.prefix_out_weight), value(w.prefix_out_bias)
        out["transform.2.weight"], out["transform.2.bias"] = weight, bias
    group = ps.get_model_parallel_group()
    if dist.is_initialized() and dist.get_world_size(group) > 1:
        for t in out.values():
            dist.all_reduce(t, group=group)
    if encoder is not None:  # whole on every rank (its gradient already summed over TP and stages)
        out = {"embedding.weight": value(encoder.embedding.weight),
               "transform.0.weight": value(encoder.transform[0].weight),
               "transform.0.bias": value(encoder.transform[0].bias), **out}
    return {k: v.cpu() for k, v in out.items()}


def table_of(state: dict) -> torch.Tensor:
    """HF PEFT's ``prompt_embeddings`` [n, L 2 g d] from the whole tensors (the projection's output)."""
    if "transform.2.weight" not in state:
        return state["embedding.weight"]
    u = torch.tanh(F.linear(state["embedding.weight"], state["transform.0.weight"], state["transform.0.bias"]))
    return F.linear(u, state["transform.2.weight"], state["transform.2.bias"])


def has_prefix(model) -> bool:
    return prefix_tokens(model) > 0


# -- files ------------------------------------------------------------------------------------------------
def save(model, directory, peft_cfg, model_cfg, base=None) -> Path:
    """Write the table (and, with the projection, the encoder's tensors) from global rank 0 (all ranks call)."""
    directory = Path(directory)
    gpt = unwrap_model(model)
    state = full_state(gpt)
    heads = heads_of(gpt)
    distributed = dist.is_available() and dist.is_initialized()
    if not distributed or dist.get_rank() == 0:
        table = table_of(state)
        meta = {"format_version": FORMAT_VERSION, **plain_config(peft_cfg), "method": "prefix_tuning",
                "base": dict(base or {}), "num_virtual_tokens": int(table.shape[0]),
                "num_layers": int(gpt.config.num_layers), "num_key_value_heads": heads.groups,
                "head_dim": heads.head_dim, "model": model_cfg.to_dict()}
        with atomic_directory(directory) as tmp:
            save_file({TABLE_KEY: table.contiguous()}, str(tmp / TABLE_FILE), metadata={"format": "pt"})
            if "transform.2.weight" in state:
                save_file({k: v.contiguous() for k, v in state.items()}, str(tmp / ENCODER_FILE),
                          metadata={"format": "pt"})
            with open(tmp / CONFIG_FILE, "w") as f:
                yaml.safe_dump(meta, f, sort_keys=False)
    if distributed:
        dist.barrier()
    return directory


def read_table(directory) -> tuple[dict, torch.Tensor]:
    """adapter.yaml and the [n, L 2 g d] table of a prefix-tuning directory."""
    directory = Path(directory)
    cfg_path, table_path = directory / CONFIG_FILE, directory / TABLE_FILE
    for p in (cfg_path, table_path):
        if not p.is_file():
            raise PrefixError(f"{p} not found: not a prefix-tuning adapter directory")
    with open(cfg_path) as f:
        meta = yaml.safe_load(f) or {}
    if meta.get("format_version") != FORMAT_VERSION:
        raise PrefixError(f"{cfg_path}: format_version {meta.get('format_version')!r}, this code reads {FORMAT_VERSION}")
    if meta.get("method") != "prefix_tuning":
        raise PrefixError(f"{cfg_path}: method {meta.get('method')!r}; this model loads 'prefix_tuning'")
    tensors = load_file(str(table_path))
    if TABLE_KEY not in tensors:
        raise PrefixError(f"{table_path} has no {TABLE_KEY!r} tensor (keys: {sorted(tensors)})")
    return meta, tensors[TABLE_KEY]


def load(model, directory, model_cfg) -> dict:
    """Load a directory written by :func:`save` (or converted from HF PEFT) into a prefix-tuned model at any
    layout. A model with the projection needs the encoder file and checks that it reproduces the table; a
    model without it takes the table (HF PEFT's inference mode)."""
    directory = Path(directory)
    meta, table = read_table(directory)
    gpt = unwrap_model(model)
    heads, n = heads_of(gpt), prefix_tokens(gpt)
    want = (n, gpt.config.num_layers * 2 * heads.token_dim)
    if tuple(table.shape) != want:
        raise PrefixError(f"{directory / TABLE_FILE}: {TABLE_KEY} has shape {tuple(table.shape)}, the model expects "
                          f"{want} (num_virtual_tokens x num_layers * 2 * KV heads * head_dim)")
    if getattr(gpt, "prefix_encoder", None) is None:
        set_full_state(gpt, {"embedding.weight": table.float()})
        return meta
    path = directory / ENCODER_FILE
    if not path.is_file():
        raise PrefixError(f"{path} not found: this directory holds only the exported table; load it with "
                          f"peft.prefix_projection=false (inference), or train from a save with the projection")
    state = load_file(str(path))
    set_full_state(gpt, state)
    got = table_of({k: v.float() for k, v in state.items()})
    if not torch.allclose(got, table.float(), atol=1e-5, rtol=1e-4):
        raise PrefixError(f"{path}: the encoder does not reproduce the saved table (max diff "
                          f"{(got - table).abs().max().item():.3g}); the files do not belong together")
    return meta


# -- registry interface ------------------------------------------------------------------------------------
def apply_from_config(model, peft_cfg, model_cfg) -> None:
    apply_prefix_tuning(model, int(peft_cfg.num_virtual_tokens), bool(peft_cfg.get("prefix_projection", False)),
                        peft_cfg.get("encoder_hidden_size"), peft_cfg.get("init_weights"), seed=peft_cfg.get("seed"))


def config_problems(cfg, model_cfg) -> list[str]:
    """What needs the model: its position embeddings, positions that fit, and a sliding window with packing
    (the keys' values are checked by framework/config/peft.py's section)."""
    peft = cfg.peft
    n = peft.get("num_virtual_tokens")
    if not isinstance(n, int) or n < 1:
        return []
    problems = []
    if model_cfg.sliding_window is not None and cfg.data.get("packing"):
        # the window would be measured from the packed row's start, not each sample's: later samples of a
        # row would see the prefix columns through another window than alone
        problems.append(f"peft.method=prefix_tuning with data.packing=true is not supported on a model with a "
                        f"sliding window (sliding_window={model_cfg.sliding_window}); use data.packing=false")
    kind = getattr(model_cfg, "position_embedding_type", "rope")
    if kind not in POSITION_TYPES:
        problems.append(f"peft.method=prefix_tuning needs model.arch.position_embedding_type in "
                        f"{list(POSITION_TYPES)}, the model has {kind!r}")
    max_len = cfg.data.get("max_length")
    if isinstance(max_len, int) and n + max_len > model_cfg.max_position_embeddings:
        problems.append(f"peft.num_virtual_tokens={n} + data.max_length={max_len} = {n + max_len} positions, more "
                        f"than the model's max_position_embeddings={model_cfg.max_position_embeddings} (the real "
                        f"tokens sit after the prefix positions)")
    return problems

