"""Batched generation at any TP/PP: greedy or sampled, with megatron's KV cache or by full recomputation.

Every rank of the model-parallel group calls :func:`generate` with the same prompts (lists of token ids,
unpadded, of any lengths). A row stops at a stop id (``stop_ids``, e.g. EOS; the stop id is not part of
its completion) or after ``max_new_tokens``; the batch stops when every row has.

Cache slots. With the KV cache (``use_cache=True``, the default) a batch of b prompts is laid out in
b rows of slots, each slot holding a token, its position and whether it is real:

    [n virtual tokens of a prompt method (if any)] [prompt, padded to the longest] [generated tokens]

``padding_side`` decides where the padding goes:

* ``right`` (megatron's static-batching scheme): every prompt starts at slot n, position = slot. The
  first forward (prefill) takes the slots before the shortest prompt's end; from then on one slot per
  step: rows whose prompt is longer feed their next prompt token, the others their last generated
  token. No slot is ever padding, so no attention mask is needed (causal prefill, then one query that
  sees the whole cache): it works with any core attention, Transformer Engine's included.
* ``left`` (transformers' scheme): prompts end together at slot n + L (L the longest); row r's
  ``L - len_r`` padding slots come first and are masked out of every attention (an explicit mask, so the
  local layer spec's attention only). Its positions restart after them (``n + j`` for its j-th real
  token) for learned position embeddings; RoPE takes the slot indices (megatron's cache path), which
  shifts all of the row's real tokens by the same amount and so leaves every query-key score unchanged
  (RoPE scores depend on the distance only). One prefill covers every prompt; all rows then generate
  together.
* ``auto`` (the default): ``left`` when every layer's core attention applies explicit masks (the local
  layer spec), else ``right``. Left needs (longest - shortest) fewer forward passes for a batch of
  uneven prompts.

Both give each row the tokens it gets alone (greedy: the same up to float rounding). Virtual tokens
(prompt tuning, P-tuning: framework/peft/virtual_tokens.py) enter in the prefill only; decode steps
switch the prefix splice off, since their one new token must not be replaced by the prompt table. Prefix
tuning (framework/peft/prefix_tuning.py) takes no slot: each layer puts its keys and values in front of the
cached ones at every call, and the model's positions and RoPE angles start after them; its rows are padded
on the right.

Without the cache (``use_cache=False``) every step re-runs the whole of every unfinished row
(prompt + tokens so far, right-padded) through :func:`framework.inference.logits.forward_logits`: slow,
simple, and the reference the cached path is tested against; it also serves models built with sequence
parallelism (which the one-token decode cannot use).

Encoder-decoder models (T5) take the encoder inputs as prompts and go through
framework/inference/encoder_decoder.py instead: the encoder once per batch, then the decoder re-run over its
whole prefix at every step (no KV cache: megatron-core 0.16.1's inference context does not serve T5; there
``use_cache``, ``padding_side`` and ``micro_batch_size`` do not apply). Stopping, sampling and agreement
between ranks are the ones below.

Agreement between ranks. The last pipeline stage decides the next tokens (:mod:`sampling`: argmax, or a
draw with each row's own generator, seeded per prompt); TP rank 0 of that stage broadcasts them over TP,
then the last stage over the pipeline, so every rank holds the same tokens and leaves the loop together.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math

import torch
import torch.distributed as dist

from framework.data.seq2seq import split
from framework.inference import encoder_decoder
from framework.inference.kv_cache import CachedForward
from framework.inference.logits import forward_logits
from framework.inference.sampling import Sampling, next_tokens, row_generators
from framework.models.unwrap import unwrap_model
from framework.peft import prefix_tuning
from framework.peft.virtual_tokens import num_virtual_tokens

PADDING_SIDES = ("auto", "right", "left")
FINISH_STOP, FINISH_LENGTH = "stop", "length"


@dataclasses.dataclass(frozen=True)
class GenerationConfig:
    max_new_tokens: int = 32
    sampling: Sampling = Sampling()
    stop_ids: tuple[int, ...] = ()     # generating one of these ends the row (it is not kept)
    padding_side: str = "auto"         # auto | right | left (see the module docstring)
    use_cache: bool = True             # False: recompute the whole sequence every step
    micro_batch_size: int | None = None  # pipeline micro-batches of a batch (must divide it); None: one
    seed: int = 1234                   # sampling: row i of a call draws with seed + i unless seeds are given

    def problems(self, prefix: str = "") -> list[str]:
        out = []
        n = self.max_new_tokens
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            out.append(f"{prefix}max_new_tokens={n!r}: expected an integer >= 1")
        if self.padding_side not in PADDING_SIDES:
            out.append(f"{prefix}padding_side={self.padding_side!r}: expected one of {list(PADDING_SIDES)}")
        mbs = self.micro_batch_size
        if mbs is not None and (isinstance(mbs, bool) or not isinstance(mbs, int) or mbs < 1):
            out.append(f"{prefix}micro_batch_size={mbs!r}: expected an integer >= 1 or null")
        return out + self.sampling.problems(prefix)


@dataclasses.dataclass
class Completion:
    tokens: list[int]       # generated ids, the stop id excluded
    finish_reason: str      # "stop" (a stop id) | "length" (max_new_tokens)


# -- agreement between ranks ----------------------------------------------------------------------------
def _share_from_last_stage(values: torch.Tensor, device) -> torch.Tensor:
    """``values`` as TP rank 0 of the last pipeline stage holds them, on every model-parallel rank."""
    from megatron.core import parallel_state as ps

    t = values.to(device)
    if ps.get_tensor_model_parallel_world_size() > 1 and ps.is_pipeline_last_stage():
        dist.broadcast(t, src=ps.get_tensor_model_parallel_src_rank(), group=ps.get_tensor_model_parallel_group())
    if ps.get_pipeline_model_parallel_world_size() > 1:
        dist.broadcast(t, src=ps.get_pipeline_model_parallel_last_rank(), group=ps.get_pipeline_model_parallel_group())
    return t.cpu()


class Rows:
    """Per-row progress: completions so far, which rows are done, the draws of the sampling rows (shared by
    the decoder-only loops here and the encoder-decoder one)."""

    def __init__(self, b: int, cfg: GenerationConfig, seeds: list[int]):
        self.cfg = cfg
        self.out = [Completion([], FINISH_LENGTH) for _ in range(b)]
        self.done = [False] * b
        self.generators = row_generators(seeds) if cfg.sampling.do_sample else None

    def decide(self, logits: torch.Tensor | None, rows: list[int], device) -> torch.Tensor:
        """The next token of each of ``rows`` (all ranks get the same), from [len(rows), V] logits
        on the deciding stage (None elsewhere). Only these rows' generators advance."""
        if not rows:  # every unfinished row still feeds its prompt (right padding)
            return torch.empty(0, dtype=torch.long)
        if logits is not None:
            gens = None if self.generators is None else [self.generators[r] for r in rows]
            new = next_tokens(logits, self.cfg.sampling, gens)
        else:
            new = torch.zeros(len(rows), dtype=torch.long)
        return _share_from_last_stage(new, device)

    def accept(self, row: int, token: int) -> None:
        if token in self.cfg.stop_ids:
            self.out[row].finish_reason, self.done[row] = FINISH_STOP, True
            return
        self.out[row].tokens.append(token)
        if len(self.out[row].tokens) >= self.cfg.max_new_tokens:
            self.done[row] = True


# -- with the KV cache ------------------------------------------------------------------------------------
@dataclasses.dataclass
class _SlotLayout:
    tokens: torch.Tensor      # [b, W] token of each slot (placeholders in virtual and padding slots)
    real: torch.Tensor        # [b, W] bool, False for padding slots
    positions: torch.Tensor   # [b, W] position of each slot (for learned position embeddings)
    first_new: list[int]      # per row, the first slot it generates into
    padded: bool              # any padding slot (then every forward needs the explicit mask)


def _layout(prompts: list[list[int]], n_virtual: int, max_new: int, side: str, pad_id: int) -> _SlotLayout:
    b, longest = len(prompts), max(len(p) for p in prompts)
    width = n_virtual + longest + max_new
    tokens = torch.full((b, width), pad_id, dtype=torch.long)
    real = torch.ones(b, width, dtype=torch.bool)
    positions = torch.arange(width).repeat(b, 1)
    first_new = []
    for r, p in enumerate(prompts):
        pad = longest - len(p) if side == "left" else 0
        start = n_virtual + pad
        tokens[r, start:start + len(p)] = torch.as_tensor(p, dtype=torch.long)
        real[r, n_virtual:start] = False
        positions[r, n_virtual:] = (torch.arange(width - n_virtual) - pad).clamp(min=0) + n_virtual
        first_new.append(start + len(p))
    return _SlotLayout(tokens, real, positions, first_new, padded=not bool(real.all()))


def _mask(layout: _SlotLayout, start: int, end: int) -> torch.Tensor:
    """[b, 1, end - start, end] True = masked: causal over slots, padding slots hidden (a padding query
    still sees itself, so no softmax row is empty)."""
    q = torch.arange(start, end)[:, None]
    k = torch.arange(end)[None, :]
    allowed = (k <= q) & layout.real[:, None, :end]
    allowed |= k == q
    return ~allowed[:, None]


@contextlib.contextmanager
def _prefix_splice_off(gpt):
    """Decode steps: the virtual-token hook must leave the one new token's embedding alone."""
    source = getattr(gpt, "prompt_encoder", None)
    if source is None:
        yield
        return
    n = source.num_virtual_tokens
    source.num_virtual_tokens = 0
    try:
        yield
    finally:
        source.num_virtual_tokens = n


def _applies_masks(gpt) -> bool:
    """Every layer's core attention honours an explicit attention mask (our SDPA attention does; Transformer
    Engine's takes its mask type from the layer and would ignore it)."""
    from framework.models.attention import SDPAttention

    return all(isinstance(getattr(getattr(layer, "self_attention", None), "core_attention", None), SDPAttention)
               for layer in gpt.decoder.layers)


def _padding_side(gpt, wanted: str) -> str:
    if prefix_tuning.has_prefix(gpt):
        # Prefix keys carry no rotation, so a query's score against them depends on its absolute RoPE angle:
        # left padding would shift a row's angles (its slots) away from the positions it has alone.
        if wanted == "left":
            raise ValueError("padding_side='left' shifts a row's RoPE angles relative to prefix tuning's keys; "
                             "use padding_side='right' (or 'auto')")
        return "right"
    if wanted == "auto":
        return "left" if _applies_masks(gpt) else "right"
    if wanted == "left" and not _applies_masks(gpt):
        raise ValueError("padding_side='left' masks padding slots with an explicit attention mask, which only "
                         "the local layer spec's attention applies; use padding_side='right' (or 'auto')")
    return wanted


def _generate_cached(model, prompts, cfg: GenerationConfig, rows: Rows, pad_id: int) -> None:
    gpt = unwrap_model(model)
    n = num_virtual_tokens(gpt)
    lay = _layout(prompts, n, cfg.max_new_tokens, _padding_side(gpt, cfg.padding_side), pad_id)
    b, width = lay.tokens.shape
    fwd = CachedForward(model, b, width, _micro_batch(b, cfg.micro_batch_size))
    device = fwd.device
    cur = min(lay.first_new)  # the slot whose token is decided next
    logits = fwd(lay.tokens[:, :cur], lay.positions[:, :cur], _mask(lay, 0, cur) if lay.padded else None)
    with _prefix_splice_off(gpt):
        while True:
            generating = [r for r in range(b) if not rows.done[r] and cur >= lay.first_new[r]]
            new = rows.decide(None if logits is None else logits[generating], generating, device)
            for r, t in zip(generating, new.tolist()):
                rows.accept(r, t)
                lay.tokens[r, cur] = t
            if all(rows.done) or cur + 1 >= width:
                return
            logits = fwd(lay.tokens[:, cur:cur + 1], lay.positions[:, cur:cur + 1],
                         _mask(lay, cur, cur + 1) if lay.padded else None)
            cur += 1


def _micro_batch(b: int, wanted: int | None) -> int:
    """The largest divisor of b not above ``wanted`` (the schedule needs equal micro-batches)."""
    if not wanted or wanted >= b:
        return b
    return max(d for d in range(1, wanted + 1) if b % d == 0)


# -- without the cache ------------------------------------------------------------------------------------
def _generate_uncached(model, prompts, cfg: GenerationConfig, rows: Rows, pad_id: int) -> None:
    gpt = unwrap_model(model)
    tp = gpt.config.tensor_model_parallel_size
    multiple = tp if gpt.config.sequence_parallel else 1
    device = next(gpt.parameters()).device
    seqs = [list(p) for p in prompts]
    while not all(rows.done):
        active = [r for r in range(len(seqs)) if not rows.done[r]]
        longest = math.ceil(max(len(seqs[r]) for r in active) / multiple) * multiple
        # Right padding never affects earlier positions under a causal mask.
        batch = torch.tensor([seqs[r] + [pad_id] * (longest - len(seqs[r])) for r in active], dtype=torch.long)
        logits = forward_logits(model, batch.to(device))
        last = logits[torch.arange(len(active)), torch.tensor([len(seqs[r]) - 1 for r in active])]
        new = rows.decide(last, active, device)
        for r, t in zip(active, new.tolist()):
            rows.accept(r, t)
            seqs[r].append(t)


# -- entry points ------------------------------------------------------------------------------------------
@torch.no_grad()
def generate(model, prompts: list[list[int]], cfg: GenerationConfig, pad_id: int = 0,
             seeds: list[int] | None = None, decoder_start_id: int | None = None) -> list[Completion]:
    """Completions of ``prompts`` (see the module docstring). ``seeds``: one sampling seed per prompt
    (default ``cfg.seed + i``), so a prompt draws the same tokens whatever batch it is in. ``pad_id`` fills
    slots that are never attended to. An encoder-decoder model completes its encoder inputs ``prompts``
    from ``decoder_start_id`` (default ``pad_id``: T5's decoder start is its pad token). Does not change the
    model's train/eval mode."""
    problems = cfg.problems()
    if problems:
        raise ValueError("generation settings: " + "; ".join(problems))
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("generate: every prompt needs at least one token (e.g. bos)")
    seeds = list(seeds) if seeds is not None else [cfg.seed + i for i in range(len(prompts))]
    if len(seeds) != len(prompts):
        raise ValueError(f"generate: {len(seeds)} seeds for {len(prompts)} prompts")
    rows = Rows(len(prompts), cfg, seeds)
    was_training = model.training
    model.eval()
    try:
        if encoder_decoder.is_encoder_decoder(model):
            start = pad_id if decoder_start_id is None else decoder_start_id
            encoder_decoder.decode(model, prompts, rows, start, pad_id)
        else:
            (_generate_cached if cfg.use_cache else _generate_uncached)(model, prompts, cfg, rows, pad_id)
    finally:
        model.train(was_training)
    return rows.out


@torch.no_grad()
def greedy_generate(model, prompt_ids: list[int], max_new_tokens: int, eos_id: int | None = None,
                    pad_multiple: int = 1) -> list[int]:
    """Greedy completion of one prompt (ids, prompt and eos excluded). Every rank calls it with the same
    prompt. A model built with sequence parallelism is decoded without the cache (``pad_multiple`` is
    unused: the uncached path pads to the TP size itself)."""
    cfg = GenerationConfig(max_new_tokens=max_new_tokens, stop_ids=() if eos_id is None else (eos_id,),
                           use_cache=not unwrap_model(model).config.sequence_parallel)
    return generate(model, [list(prompt_ids)], cfg, pad_id=prompt_ids[-1])[0].tokens


def t5_greedy(model, encoder_ids: list[int], max_new_tokens: int, decoder_start_id: int, eos_id: int,
              pad_multiple: int = 1) -> list[int]:
    """Greedy completion of one encoder input: the decoder starts from ``decoder_start_id`` and appends the
    argmax token until ``eos_id`` (kept) or ``max_new_tokens``, as transformers' ``generate`` with
    ``do_sample=False``. The encoder runs once, the decoder over the whole prefix at each step
    (framework/inference/encoder_decoder.py); under sequence parallelism both sequences are padded to a multiple of
    the TP size (``pad_multiple`` is unused: the model's config says it). The same on every TP rank."""
    cfg = GenerationConfig(max_new_tokens=max_new_tokens, stop_ids=(eos_id,))
    done = generate(model, [list(encoder_ids)], cfg, pad_id=decoder_start_id, decoder_start_id=decoder_start_id)[0]
    return done.tokens + ([eos_id] if done.finish_reason == "stop" else [])


def complete_sample(kind: str, model, sample, tokenizer, max_new_tokens: int, pad_multiple: int = 1) -> str:
    """Greedy completion of a training sample's prompt, decoded: for a decoder-only model the tokens that
    carry no loss (the prompt), for an encoder-decoder model its encoder input (the prompt + eos; the decoder
    starts from the pad id). ``kind`` is the model's (framework/models/kinds.py)."""
    if kind == "encoder_decoder":
        encoder, _ = split(sample)
        return tokenizer.decode(t5_greedy(model, encoder, max_new_tokens, tokenizer.pad_id, tokenizer.eos_id,
                                          pad_multiple))
    prompt = [t for t, m in zip(sample.input_ids, sample.loss_mask) if not m]
    return tokenizer.decode(greedy_generate(model, prompt, max_new_tokens, eos_id=tokenizer.eos_id,
                                            pad_multiple=pad_multiple))
