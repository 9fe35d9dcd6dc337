"""Prompt/completion JSONL: one ``{"prompt": str, "completion": str}`` object per line.

Format. Each non-blank line is a JSON object with a string ``prompt`` (may be empty) and a non-empty
string ``completion``; other keys (ids, metadata) are allowed and ignored. Any violation is a
``DataError`` naming the file and line.

Sample. ``input_ids = [bos] + encode(prompt) + encode(completion) + [eos]`` (``bos`` only if the
tokenizer has one). Prompt and completion are encoded separately, so the boundary between them is
exact (a joint encoding could merge the last prompt characters with the first completion characters
into one token, which would then be half prompt, half target). ``loss_mask[i] = 1`` exactly for the
completion tokens and the final eos: the model learns to write the answer and to stop, not to
reproduce the prompt.

Truncation (``max_length`` counts every token, bos and eos included). If the sample is longer than
``max_length``, only *prompt* tokens are cut, never bos, completion or eos:

- ``truncation_side="left"`` (default) cuts from the start of the prompt, keeping its end, the part
  nearest the completion (for code: the signature and docstring right before the body);
- ``truncation_side="right"`` cuts from the end of the prompt, keeping its start.

A prompt may be cut down to nothing. If bos + completion + eos alone exceed ``max_length``, nothing can
be cut and the sample is dropped with reason ``completion_too_long``. Every truncation and every drop is
counted in the ``FileReport``.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

from framework.runtime.errors import DataError
from framework.data.jsonl import read_jsonl, type_name
from framework.data.report import FileReport
from framework.data.sample import Sample

from framework.config.data import TRUNCATION_SIDES  # noqa: E402  (one list of the choices: the data section)
COMPLETION_TOO_LONG = "completion_too_long"


def build_sample(prompt_ids: list[int], completion_ids: list[int], bos_id: int | None, eos_id: int,
                 max_length: int, truncation_side: str = "left") -> tuple[Sample | None, int]:
    """``(sample, prompt tokens cut)`` under the truncation rule above; ``(None, 0)`` if it must be dropped."""
    if truncation_side not in TRUNCATION_SIDES:
        raise ValueError(f"data.truncation_side: expected one of {TRUNCATION_SIDES}, got {truncation_side!r}")
    head = [] if bos_id is None else [bos_id]
    fixed = len(head) + len(completion_ids) + 1
    if fixed > max_length:
        return None, 0
    budget = max_length - fixed
    cut = max(0, len(prompt_ids) - budget)
    if cut:
        # slice by explicit bounds: prompt_ids[-0:] would keep everything
        prompt_ids = prompt_ids[cut:] if truncation_side == "left" else prompt_ids[:budget]
    ids = head + list(prompt_ids) + list(completion_ids) + [eos_id]
    mask = [0] * (len(head) + len(prompt_ids)) + [1] * (len(completion_ids) + 1)
    return Sample(ids, mask), cut


def read_prompt_completion(path: str | os.PathLike):
    """Yield ``(line, prompt, completion)`` for each record of a prompt/completion JSONL file."""
    for line, obj in read_jsonl(path):
        for key in ("prompt", "completion"):
            if key not in obj:
                keys = ", ".join(f'"{k}"' for k in list(obj)[:8]) or "none"
                raise DataError(path, line, f'missing key "{key}" (keys present: {keys})')
            if not isinstance(obj[key], str):
                raise DataError(path, line, f'expected a string under "{key}", got {type_name(obj[key])}')
        if obj["completion"] == "":
            raise DataError(path, line, 'empty "completion": there would be nothing to learn from this sample')
        yield line, obj["prompt"], obj["completion"]


def iter_prompt_completion(path: str | os.PathLike, tokenizer, max_length: int, truncation_side: str,
                           report: FileReport) -> Iterator[Sample]:
    """Yield the kept samples of a file one at a time, counting every sample in ``report`` (so a file
    larger than memory can stream into the tokenise-once cache)."""
    if truncation_side not in TRUNCATION_SIDES:
        raise ValueError(f"data.truncation_side: expected one of {TRUNCATION_SIDES}, got {truncation_side!r}")
    for line, prompt, completion in read_prompt_completion(path):
        sample, cut = build_sample(tokenizer.encode(prompt), tokenizer.encode(completion), tokenizer.bos_id,
                                   tokenizer.eos_id, max_length, truncation_side)
        if sample is None:
            report.add_dropped(line, COMPLETION_TOO_LONG)
            continue
        report.add_kept(line, len(sample), sample.num_targets, cut)
        yield sample


def tokenize_prompt_completion(path: str | os.PathLike, tokenizer, max_length: int,
                               truncation_side: str = "left") -> tuple[list[Sample], FileReport]:
    """Read, validate and tokenise a whole file; return the kept samples and the file's report."""
    report = FileReport(path=os.fspath(path), max_length=max_length)
    return list(iter_prompt_completion(path, tokenizer, max_length, truncation_side, report)), report
