"""Virtual tokens (prompt tuning, P-tuning): n learned embeddings in front of every sequence.

Semantics (as Hugging Face PEFT for causal LMs). A row of ``s`` positions becomes ``n + s`` positions:

    embeddings   [P_0 .. P_{n-1}, E(t_0) .. E(t_{s-1})]      P = the method's prompt table [n, h]
    positions    0 .. n-1 for the virtual tokens, then the row's own positions + n
    labels       n placeholders in front, with loss_mask 0 (virtual positions never carry loss)
    attention    causal over all n + s positions (every real token sees every virtual one)

Batches. :func:`extend_batch` does this to a micro-batch's tensors: ``tokens`` gets n placeholder ids (0;
their word embeddings are computed and then replaced), ``labels``/``loss_mask`` get n ignored positions,
``position_ids`` shift by n. Every pipeline stage extends its micro-batches the same way, so the schedule's
``seq_length`` (the p2p buffer shape) is ``n + s`` on all stages; only the first stage holds P. Under
sequence parallelism the total is right-padded (loss_mask 0) to a multiple of TP.

Packing. A packed row (framework/data/packing.py) carries a block-diagonal ``attention_mask``
[b, 1, s, s] (True = masked) and positions that restart at every sample. The extension keeps that exact:
the virtual tokens attend causally among themselves, every real position also attends to all n virtual
tokens, and the per-sample positions are shifted by n. Each packed sample therefore sees
``[P, its own tokens]`` at positions ``0 .. n + len - 1``, exactly what it sees alone (the virtual tokens'
hidden states depend only on P, so sharing them across a row's samples changes nothing).

First stage. :class:`VirtualTokenSource` is the trainable module (a plain table or a prompt encoder),
attached to the GPTModel as ``prompt_encoder``; a forward hook on ``gpt.embedding`` replaces the first n
positions of its output by P. That output is [s, b, h], or this rank's sequence slice [s/TP, b, h] under
SP, so each TP rank replaces the part of P that falls in its slice. P is replicated on every TP rank; under
SP each rank's gradient of it is partial (its own positions only), so its parameters carry
``sequence_parallel = True`` and megatron's gradient finalisation all-reduces them over TP, as for norms.

Files. ``adapter.safetensors`` holds ``prompt_embeddings`` [n, h] (Hugging Face PEFT's key), the table the
model uses at inference; ``adapter.yaml`` the method and its settings. A method with an encoder (P-tuning)
also writes the encoder's own weights to ``prompt_encoder.safetensors`` so training can continue.
"""

from __future__ import annotations

import contextlib
import math
from pathlib import Path

import torch
import torch.distributed as dist
import yaml
from omegaconf import DictConfig, OmegaConf
from safetensors.torch import load_file, save_file
from torch import nn

from framework.models.unwrap import unwrap_model
from framework.runtime.atomic import atomic_directory

FORMAT_VERSION = 1
TABLE_FILE = "adapter.safetensors"
CONFIG_FILE = "adapter.yaml"
TABLE_KEY = "prompt_embeddings"
PLACEHOLDER_ID = 0  # the id in virtual positions; any valid id works (its embedding is replaced)


class VirtualTokenError(ValueError):
    """A prompt adapter that does not fit the model, or a model without virtual tokens."""


def _gpt(model):
    return unwrap_model(model)


def num_virtual_tokens(model) -> int:
    """n of the model (every stage knows it), 0 without virtual tokens."""
    return int(getattr(_gpt(model), "num_virtual_tokens", 0))


# -- batches ----------------------------------------------------------------------------------------
def _causal_with_prefix(mask: torch.Tensor, n: int) -> torch.Tensor:
    """[b, 1, s, s] masked-out (True) -> [b, 1, n + s, n + s]: prefix causal, all real rows see the prefix."""
    b, _, s, _ = mask.shape
    out = torch.ones(b, 1, n + s, n + s, dtype=torch.bool, device=mask.device)
    out[:, :, :n, :n] = ~torch.ones(n, n, dtype=torch.bool, device=mask.device).tril()
    out[:, :, n:, :n] = False
    out[:, :, n:, n:] = mask
    return out


def extend_batch(batch: dict, n: int, multiple: int = 1) -> dict:
    """The micro-batch with n virtual positions in front and right padding to a multiple of ``multiple``
    (see the module docstring). Keys other than tokens/labels/loss_mask/position_ids/attention_mask are
    kept as they are; absent keys stay absent."""
    if n <= 0:
        return batch
    b, s = batch["tokens"].shape
    total = math.ceil((n + s) / multiple) * multiple
    pad = total - n - s
    out = dict(batch)
    for key, fill in (("tokens", PLACEHOLDER_ID), ("labels", PLACEHOLDER_ID), ("loss_mask", 0)):
        if key in batch:
            t = batch[key]
            out[key] = torch.cat([t.new_full((b, n), fill), t, t.new_full((b, pad), fill)], dim=1)
    if "position_ids" in batch:
        p = batch["position_ids"]
        prefix = torch.arange(n, dtype=p.dtype, device=p.device).expand(b, n)
        tail = p[:, -1:] + n + 1 + torch.arange(pad, dtype=p.dtype, device=p.device)
        out["position_ids"] = torch.cat([prefix, p + n, tail], dim=1)
    if batch.get("attention_mask") is not None:
        m = batch["attention_mask"]
        if pad:  # padding rows see only themselves (and the prefix): no all-masked softmax row
            grown = torch.ones(b, 1, s + pad, s + pad, dtype=torch.bool, device=m.device)
            grown[:, :, :s, :s] = m
            idx = torch.arange(s, s + pad, device=m.device)
            grown[:, :, idx, idx] = False
            m = grown
        out["attention_mask"] = _causal_with_prefix(m, n)
    return out


def with_virtual_tokens(model, micro_batches: list[dict]) -> list[dict]:
    """``micro_batches`` extended for ``model``'s virtual tokens (unchanged without them)."""
    n = num_virtual_tokens(model)
    if not n:
        return micro_batches
    gpt = _gpt(model)
    multiple = gpt.config.tensor_model_parallel_size if gpt.config.sequence_parallel else 1
    return [extend_batch(mb, n, multiple) for mb in micro_batches]


# -- the first stage's trainable prompt --------------------------------------------------------------
class VirtualTokenSource(nn.Module):
    """Base of the modules that produce the prompt table P [n, h]; subclasses define ``prompt()``."""

    num_virtual_tokens: int

    def prompt(self) -> torch.Tensor:
        raise NotImplementedError

    def splice(self, embedding, args, output: torch.Tensor) -> torch.Tensor:
        """Forward hook of ``gpt.embedding``: its output [s(/TP), b, h] with the first n positions := P."""
        prompt = self.prompt()  # computed on every rank (same RNG use everywhere, e.g. encoder dropout)
        s_local, b, h = output.shape
        start = self.tp_rank * s_local if self.sequence_parallel else 0
        k = max(0, min(self.num_virtual_tokens - start, s_local))
        # Even when k == 0 (an SP rank whose slice holds no virtual token) P enters the graph as an empty
        # slice: every TP rank's activations then require grad, so all ranks run the same backward
        # collectives (a rank without that would skip SP's reduce-scatters and deadlock the others).
        head = prompt[start:start + k].to(output.dtype).unsqueeze(1).expand(k, b, h)
        return torch.cat([head, output[k:]], dim=0)


def attach(model, source: VirtualTokenSource | None, n: int) -> None:
    """Freeze the model and give every stage its n; the first stage (``source`` not None) gets the source
    as ``prompt_encoder`` and the embedding hook. Call on every stage; ``source`` is ignored elsewhere."""
    from megatron.core import parallel_state as ps

    gpt = _gpt(model)
    if getattr(gpt, "num_virtual_tokens", 0):
        raise VirtualTokenError("the model already has virtual tokens")
    for p in gpt.parameters():
        p.requires_grad_(False)
    gpt.num_virtual_tokens = int(n)
    if not gpt.pre_process:
        return
    if source is None:
        raise VirtualTokenError("the first pipeline stage needs the prompt source")
    source.num_virtual_tokens = int(n)
    source.sequence_parallel = bool(gpt.config.sequence_parallel)
    source.tp_rank = ps.get_tensor_model_parallel_rank()
    for p in source.parameters():
        p.requires_grad_(True)
        if source.sequence_parallel:  # partial gradient per TP rank -> all-reduced over TP
            p.sequence_parallel = True
    gpt.prompt_encoder = source
    gpt.embedding.register_forward_hook(source.splice)


def install(model, n: int, make, seed: int | None = None) -> VirtualTokenSource | None:
    """Add n virtual tokens to this stage (call on every stage). On the first stage the source is built by
    ``make(gpt, device)`` on the CPU (the meta device when the model is on it) under :func:`seeded`, so its
    initial values come from ``seed`` alone (no device RNG), then moved to the embedding's device and dtype.
    Returns the source (None off the first stage)."""
    gpt = _gpt(model)
    source = None
    if gpt.pre_process:
        like = embedding_like(model)
        with seeded(seed):
            source = make(gpt, "meta" if like.is_meta else "cpu")
        source.to(device=like.device, dtype=like.dtype)
    attach(model, source, n)
    return source


def prompt_source(model) -> VirtualTokenSource | None:
    """This stage's prompt module (None off the first stage)."""
    return getattr(_gpt(model), "prompt_encoder", None)


def embedding_like(model) -> torch.Tensor:
    """The first stage's word-embedding weight (for the device and dtype of new prompt parameters)."""
    return _gpt(model).embedding.word_embeddings.weight


@torch.no_grad()
def vocab_rows(model, token_ids: list[int]) -> torch.Tensor:
    """Full rows [len(ids), h] of the (vocabulary-parallel) word embeddings, the same on every TP rank."""
    from megatron.core import parallel_state as ps

    emb = _gpt(model).embedding.word_embeddings
    ids = torch.as_tensor(token_ids, dtype=torch.long)
    if ids.numel() and (ids.min() < 0 or ids.max() >= emb.num_embeddings):
        raise VirtualTokenError(f"token ids must be in [0, {emb.num_embeddings}), got {ids.tolist()}")
    rows = torch.zeros(len(token_ids), emb.weight.shape[1], dtype=torch.float32, device=emb.weight.device)
    mine = (ids >= emb.vocab_start_index) & (ids < emb.vocab_end_index)
    rows[mine.to(rows.device)] = emb.weight[(ids[mine] - emb.vocab_start_index).to(emb.weight.device)].float()
    if ps.get_tensor_model_parallel_world_size() > 1:
        torch.distributed.all_reduce(rows, group=ps.get_tensor_model_parallel_group())
    return rows


@contextlib.contextmanager
def seeded(seed: int | None):
    """RNG context for initialising prompt parameters: the same values on every rank and at every layout."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(torch.initial_seed() if seed is None else int(seed))
        yield


# -- files ----------------------------------------------------------------------------------------------
def plain_config(cfg) -> dict:
    """A PEFT config (OmegaConf node or dict) as a plain dict, for adapter.yaml."""
    return OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else dict(cfg)


def save_prompt_adapter(model, directory, meta: dict, model_cfg, table: torch.Tensor | None,
                        extra_files: dict | None = None) -> Path:
    """Write DIR/adapter.safetensors (``prompt_embeddings``), DIR/adapter.yaml and ``extra_files``
    ({name: {key: tensor}}) atomically from global rank 0, which holds the first stage (all ranks call)."""
    directory = Path(directory)
    distributed = dist.is_available() and dist.is_initialized()
    if not distributed or dist.get_rank() == 0:

        if table is None:
            raise VirtualTokenError("global rank 0 has no prompt table: is it on the first pipeline stage?")
        meta = {"format_version": FORMAT_VERSION, **meta, "num_virtual_tokens": int(table.shape[0]),
                "token_dim": int(table.shape[1]), "model": model_cfg.to_dict()}
        with atomic_directory(directory) as tmp:
            save_file({TABLE_KEY: table.detach().float().cpu().contiguous()}, str(tmp / TABLE_FILE),
                      metadata={"format": "pt"})
            for name, tensors in (extra_files or {}).items():
                save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp / name),
                          metadata={"format": "pt"})
            with open(tmp / CONFIG_FILE, "w") as f:
                yaml.safe_dump(meta, f, sort_keys=False)
    if distributed:
        dist.barrier()
    return directory


def read_prompt_adapter(directory, model, methods: tuple[str, ...]) -> tuple[dict, torch.Tensor]:
    """adapter.yaml and the [n, h] table of DIR, checked against the model's n and hidden size."""
    directory = Path(directory)
    cfg_path, table_path = directory / CONFIG_FILE, directory / TABLE_FILE
    for p in (cfg_path, table_path):
        if not p.is_file():
            raise VirtualTokenError(f"{p} not found: not a prompt adapter directory")
    with open(cfg_path) as f:
        meta = yaml.safe_load(f) or {}
    if meta.get("format_version") != FORMAT_VERSION:
        raise VirtualTokenError(f"{cfg_path}: format_version {meta.get('format_version')!r}, this code reads "
                                f"{FORMAT_VERSION}")
    if meta.get("method") not in methods:
        raise VirtualTokenError(f"{cfg_path}: method {meta.get('method')!r}; this model loads {list(methods)}")
    tensors = load_file(str(table_path))
    if TABLE_KEY not in tensors:
        raise VirtualTokenError(f"{table_path} has no {TABLE_KEY!r} tensor (keys: {sorted(tensors)})")
    table = tensors[TABLE_KEY]
    n, h = num_virtual_tokens(model), _gpt(model).config.hidden_size
    if tuple(table.shape) != (n, h):
        raise VirtualTokenError(f"{table_path}: {TABLE_KEY} has shape {tuple(table.shape)}, the model expects "
                                f"{(n, h)} (num_virtual_tokens x hidden_size)")
    return meta, table


def config_problems(cfg, model_cfg) -> list[str]:
    """Checks shared by the virtual-token methods: positions that still fit the model (n's own value is checked
    by framework/config/peft.py's section)."""
    n = cfg.peft.get("num_virtual_tokens")
    if not isinstance(n, int) or n < 1:
        return []
    problems = []
    max_len = cfg.data.get("max_length")
    tp = cfg.parallel.tensor if cfg.parallel.get("sequence") else 1
    if isinstance(max_len, int):
        longest = math.ceil((max_len + n) / tp) * tp  # n virtual + the longest row, padded under SP
        if longest > model_cfg.max_position_embeddings:
            problems.append(f"peft.num_virtual_tokens={n} + data.max_length={max_len} need up to {longest} "
                            f"positions, more than the model's max_position_embeddings="
                            f"{model_cfg.max_position_embeddings}")
    return problems
