"""Validate and tokenise the data files of a run: the one entry point shared by the training job and
``launch/prepare_data.py``, so a file that passes ``prepare_data`` is exactly what training will see.

A file whose samples are *all* dropped is an error (training on nothing is never intended); partial
drops are allowed, counted in the report and logged as a warning.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from framework.data.chat import LOSS_ON, tokenize_messages
from framework.data.errors import DataError
from framework.data.prompt_completion import TRUNCATION_SIDES, tokenize_prompt_completion
from framework.data.report import FileReport
from framework.data.sample import Sample

log = logging.getLogger("framework.data")

FORMATS = {"prompt_completion": tokenize_prompt_completion, "messages": tokenize_messages}


def check_options(max_length, truncation_side: str, data_format: str = "prompt_completion",
                  loss_on: str = "assistant") -> None:
    """Raise ``ValueError`` naming the config key for options no file could satisfy."""
    if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 2:
        raise ValueError(f"data.max_length: expected an integer >= 2 (room for a token and eos), got {max_length!r}")
    if truncation_side not in TRUNCATION_SIDES:
        raise ValueError(f"data.truncation_side: expected one of {TRUNCATION_SIDES}, got {truncation_side!r}")
    if data_format not in FORMATS:
        raise ValueError(f"data.format: expected one of {tuple(FORMATS)}, got {data_format!r}")
    if loss_on not in LOSS_ON:
        raise ValueError(f"data.loss_on: expected one of {LOSS_ON}, got {loss_on!r}")


def prepare(paths: list[str | os.PathLike], tokenizer, max_length: int, truncation_side: str = "left",
            data_format: str = "prompt_completion", loss_on: str = "assistant",
            chat_template=None) -> tuple[list[list[Sample]], list[FileReport]]:
    """Tokenise each file; return ``(samples per file, report per file)`` in the order of ``paths``.

    ``loss_on`` (assistant | last | all) and ``chat_template`` (a template overriding the tokenizer's) apply
    to the ``messages`` format only; see ``framework.data.chat``.
    Raises ``DataError`` (file:line: message) on the first invalid record, or when a file keeps no samples.
    """
    check_options(max_length, truncation_side, data_format, loss_on)
    tokenize = FORMATS[data_format]
    extra = {"loss_on": loss_on, "chat_template": chat_template} if data_format == "messages" else {}
    all_samples, reports = [], []
    for path in paths:
        samples, report = tokenize(path, tokenizer, max_length, truncation_side, **extra)
        if not samples:
            reasons = ", ".join(f"{n} {r}" for r, n in sorted(report.dropped.items()))
            raise DataError(path, None, f"all {report.read} samples dropped ({reasons}) with "
                                        f"data.max_length={max_length}; raise data.max_length")
        if report.dropped_total:
            log.warning("%s: dropped %d of %d samples (%s)", report.path, report.dropped_total, report.read,
                        ", ".join(f"{n} {r}" for r, n in sorted(report.dropped.items())))
        all_samples.append(samples)
        reports.append(report)
    return all_samples, reports


def prepare_config(data, tokenizer) -> tuple[list[list[Sample]], list[FileReport]]:
    """``prepare`` driven by the job's ``data`` config node: data.train, then data.validation if set.
    The fine-tuning job and launch/prepare_data.py both call this, so they validate identically."""
    files = [data.train] + ([data.validation] if data.get("validation") else [])
    template = data.get("chat_template")
    if template:  # a path to a Jinja file overriding the tokenizer's own template
        template = Path(template).read_text(encoding="utf-8")
    return prepare(files, tokenizer, int(data.max_length), data.truncation_side,
                   data.get("format", "prompt_completion"), data.get("loss_on", "assistant"), template)
