"""Encoder-decoder (T5) samples and batches from prompt/completion JSONL (the records of
framework/data/prompt_completion.py, read and validated by it).

Sample, as Hugging Face T5 fine-tuning builds it::

    encoder input   encode(prompt) + [eos]
    labels          encode(completion) + [eos]                    every label is a target
    decoder input   [decoder_start] + labels[:-1]                 decoder_start = the tokenizer's pad id

(T5's ``decoder_start_token_id`` is its pad token, and no BOS is used.) It is stored as one flat
:class:`~framework.data.sample.Sample`, ``input_ids = encoder input + labels`` with ``loss_mask`` 0 over the
encoder input and 1 over the labels, so the tokenise-once cache, the validation split and the evaluation
padding (framework/data/views.py) take it unchanged. The Sample's meaning holds: label ``j`` is predicted
from everything before it, the whole encoder input (through cross-attention) and ``labels[:j]`` (through
the causal decoder). :func:`split` recovers the two sides: the encoder input is the prefix up to the first
target.

Truncation, each side on its own (counted in the file's report, like the SFT path):

- encoder: at most ``max_length`` (``data.max_length``) tokens, eos included; a longer prompt loses tokens
  from ``truncation_side`` (left: keep its end; right: keep its start); eos stays.
- decoder: at most ``decoder_max_length`` labels (``data.decoder_max_length``; null: ``data.max_length``),
  eos included; a longer completion keeps its first ``decoder_max_length`` tokens and gets *no* eos there
  (the text goes on, so the model must not learn to stop at the cut).

Batches (:func:`collate_seq2seq`), right-padded, each side to its longest row rounded up to ``multiple``
(sequence parallelism splits both sequences over TP ranks)::

    encoder_tokens [b, se]  encoder_mask [b, se] (1 = token, 0 = padding: hidden from the encoder's
                            self-attention and the decoder's cross-attention)
    tokens [b, sd]          decoder input; labels [b, sd]; loss_mask [b, sd] (0 on padding); position_ids

The decoder is causal, so its padding (after every real position) is never seen; padded labels are the pad
id (a valid row for megatron's vocab-parallel cross entropy) and carry no loss.

The job maps ``data.format=prompt_completion`` to this tokenisation for an encoder-decoder model
(:func:`use_seq2seq_format`); chat ``messages`` and packing are refused for it (:func:`problems`).
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator

import torch
from omegaconf import OmegaConf

from framework.data.prompt_completion import TRUNCATION_SIDES, read_prompt_completion
from framework.data.report import FileReport
from framework.data.sample import Sample
from framework.models.kinds import ENCODER_DECODER
from framework.models.registry import FAMILIES

SEQ2SEQ = "seq2seq"


def is_encoder_decoder(cfg) -> bool:
    """Whether the job's model family (``model.arch.family``) builds an encoder-decoder (T5)."""
    family = FAMILIES.get(OmegaConf.select(cfg, "model.arch.family", default=None))
    return family is not None and family.kind is ENCODER_DECODER


def decoder_max_length(data) -> int:
    """``data.decoder_max_length``, or ``data.max_length`` when it is null or absent."""
    value = data.get("decoder_max_length")
    return int(data.max_length if value is None else value)


def problems(cfg) -> list[str]:
    """What the ``data`` keys of a job cannot do with its model: seq2seq data needs an encoder-decoder model,
    and an encoder-decoder model takes prompt/completion records, unpacked."""
    data = cfg.data
    data_format = data.get("format", "prompt_completion")
    if not is_encoder_decoder(cfg):
        if data_format == SEQ2SEQ:
            return [f"data.format={SEQ2SEQ} needs an encoder-decoder model (T5); model.arch.family="
                    f"{cfg.model.arch.family!r} is decoder-only: use data.format=prompt_completion"]
        return []
    out = []
    if data_format not in ("prompt_completion", SEQ2SEQ):
        out.append(f"data.format={data_format!r}: an encoder-decoder model (T5) trains on prompt/completion "
                   f"records (encoder input = prompt, decoder target = completion); chat messages are not "
                   f"supported for it, use data.format=prompt_completion")
    if data.get("packing", False):
        out.append("data.packing=true is not supported for encoder-decoder models (T5): set data.packing=false")
    dmax = data.get("decoder_max_length")
    if dmax is not None and (isinstance(dmax, bool) or not isinstance(dmax, int) or dmax < 1):
        out.append(f"data.decoder_max_length={dmax!r}: expected a positive integer (decoder tokens, eos "
                   f"included) or null (= data.max_length)")
    return out


def use_seq2seq_format(cfg) -> None:
    """For an encoder-decoder model, tokenise prompt/completion records as seq2seq samples: sets
    ``data.format`` (in place) so that every file of the run, the cache key and the saved config agree."""
    if is_encoder_decoder(cfg) and cfg.data.get("format", "prompt_completion") == "prompt_completion":
        OmegaConf.update(cfg, "data.format", SEQ2SEQ, force_add=True)


def build_seq2seq(prompt_ids: list[int], completion_ids: list[int], eos_id: int, max_length: int,
                  decoder_max_length: int, truncation_side: str = "left") -> tuple[Sample, int, int]:
    """``(sample, prompt tokens cut, label tokens cut)`` under the truncation rules above (a completion of
    exactly ``decoder_max_length`` tokens loses its eos: one label token cut)."""
    if truncation_side not in TRUNCATION_SIDES:
        raise ValueError(f"data.truncation_side: expected one of {TRUNCATION_SIDES}, got {truncation_side!r}")
    budget = max_length - 1  # eos
    prompt_cut = max(0, len(prompt_ids) - budget)
    if prompt_cut:
        prompt_ids = prompt_ids[prompt_cut:] if truncation_side == "left" else prompt_ids[:budget]
    labels = list(completion_ids) + [eos_id]
    completion_cut = max(0, len(labels) - decoder_max_length)  # label tokens lost, eos included
    if completion_cut:
        labels = list(completion_ids[:decoder_max_length])
    encoder = list(prompt_ids) + [eos_id]
    return Sample(encoder + labels, [0] * len(encoder) + [1] * len(labels)), prompt_cut, completion_cut


def iter_seq2seq(path: str | os.PathLike, tokenizer, max_length: int, truncation_side: str, report: FileReport,
                 decoder_max_length: int | None = None) -> Iterator[Sample]:
    """Yield the seq2seq sample of every record of a prompt/completion file, counting each in ``report``.
    Nothing is dropped: each side is truncated instead."""
    dmax = max_length if decoder_max_length is None else decoder_max_length
    for line, prompt, completion in read_prompt_completion(path):
        sample, prompt_cut, completion_cut = build_seq2seq(tokenizer.encode(prompt), tokenizer.encode(completion),
                                                           tokenizer.eos_id, max_length, dmax, truncation_side)
        report.add_kept(line, len(sample), sample.num_targets, prompt_cut, completion_cut)
        yield sample


def split(sample: Sample) -> tuple[list[int], list[int]]:
    """``(encoder input, labels)`` of a flat seq2seq sample: the prefix before the first target, and the
    targets. A zero-target sample (evaluation padding) has no labels."""
    mask = list(sample.loss_mask)
    k = mask.index(1) if 1 in mask else len(mask)
    return list(sample.input_ids[:k]), list(sample.input_ids[k:])


def collate_seq2seq(samples: list[Sample], pad_id: int, decoder_start_id: int, multiple: int = 1,
                    encoder_length: int | None = None, decoder_length: int | None = None) -> dict[str, torch.Tensor]:
    """Batch-first tensors of seq2seq samples (see the module docstring); each side padded to its longest
    row (or to the given length) rounded up to ``multiple``."""
    if not samples:
        raise ValueError("collate_seq2seq: no samples")
    pairs = [split(s) for s in samples]
    se = encoder_length or max(len(e) for e, _ in pairs)
    sd = decoder_length or max(1, max(len(y) for _, y in pairs))  # a zero-target row still needs a position
    se, sd = (math.ceil(n / multiple) * multiple for n in (se, sd))
    b = len(samples)
    enc = torch.full((b, se), pad_id, dtype=torch.long)
    enc_mask = torch.zeros((b, se), dtype=torch.long)
    tokens = torch.full((b, sd), pad_id, dtype=torch.long)
    labels = torch.full((b, sd), pad_id, dtype=torch.long)
    loss_mask = torch.zeros((b, sd), dtype=torch.float32)
    for row, (e, y) in enumerate(pairs):
        if len(e) > se or len(y) > sd:
            raise ValueError(f"collate_seq2seq: a sample needs {len(e)} encoder and {len(y)} decoder positions, "
                             f"more than {se} and {sd}")
        enc[row, :len(e)] = torch.as_tensor(e, dtype=torch.long)
        enc_mask[row, :len(e)] = 1
        if y:
            tokens[row, :len(y)] = torch.as_tensor([decoder_start_id] + y[:-1], dtype=torch.long)
            labels[row, :len(y)] = torch.as_tensor(y, dtype=torch.long)
            loss_mask[row, :len(y)] = 1.0
    position_ids = torch.arange(sd, dtype=torch.long).unsqueeze(0).expand(b, sd).contiguous()
    return {"encoder_tokens": enc, "encoder_mask": enc_mask, "tokens": tokens, "labels": labels,
            "loss_mask": loss_mask, "position_ids": position_ids}


def lengths(samples: list[Sample]) -> tuple[int, int]:
    """(longest encoder input, longest label sequence) of ``samples``: one padding for every micro-batch
    of a step."""
    pairs = [split(s) for s in samples]
    return max(len(e) for e, _ in pairs), max(1, max(len(y) for _, y in pairs))
