"""Validate and tokenise the data files of a run: the one entry point shared by the training job and
``launch/prepare_data.py``, so a file that passes ``prepare_data`` is exactly what training will see.

A file whose samples are *all* dropped is an error (training on nothing is never intended); partial
drops are allowed, counted in the report and logged as a warning.
"""

from __future__ import annotations

import logging
import os

from framework.data.errors import DataError
from framework.data.prompt_completion import TRUNCATION_SIDES, tokenize_prompt_completion
from framework.data.report import FileReport
from framework.data.sample import Sample

log = logging.getLogger("framework.data")

FORMATS = {"prompt_completion": tokenize_prompt_completion}


def check_options(max_length, truncation_side: str, data_format: str = "prompt_completion") -> None:
    """Raise ``ValueError`` naming the config key for options no file could satisfy."""
    if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 2:
        raise ValueError(f"data.max_length: expected an integer >= 2 (room for a token and eos), got {max_length!r}")
    if truncation_side not in TRUNCATION_SIDES:
        raise ValueError(f"data.truncation_side: expected one of {TRUNCATION_SIDES}, got {truncation_side!r}")
    if data_format not in FORMATS:
        raise ValueError(f"data.format: expected one of {tuple(FORMATS)}, got {data_format!r}")


def prepare(paths: list[str | os.PathLike], tokenizer, max_length: int, truncation_side: str = "left",
            data_format: str = "prompt_completion") -> tuple[list[list[Sample]], list[FileReport]]:
    """Tokenise each file; return ``(samples per file, report per file)`` in the order of ``paths``.

    Raises ``DataError`` (file:line: message) on the first invalid record, or when a file keeps no samples.
    """
    check_options(max_length, truncation_side, data_format)
    tokenize = FORMATS[data_format]
    all_samples, reports = [], []
    for path in paths:
        samples, report = tokenize(path, tokenizer, max_length, truncation_side)
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
