"""Validate and tokenise the data files of a run: the one entry point shared by the training job and
``launch/prepare_data.py``, so a file that passes ``prepare_data`` is exactly what training will see.

A file whose samples are *all* dropped is an error (training on nothing is never intended); partial
drops are allowed, counted in the report and logged as a warning.

Files of a run (``prepare_config``, driven by the ``data`` config node):

- ``data.train``;
- validation: ``data.validation`` (a file) or ``data.validation_split`` (a fraction of the training file's
  kept samples, held out of training by a permutation seeded with the run's ``seed``; see
  ``framework.data.views.holdout_split``). Training needs exactly one of the two; the held-out count is
  in the training file's report, and the split gets a report row of its own;
- ``data.test`` (optional): evaluated once after training, as validation is.

Cache. With ``data.cache_dir`` set (by default ``$FRAMEWORK_CACHE/data``; null turns it off) each file is
tokenised once into memory-mapped arrays that later runs and the other ranks map instead of tokenising
(``framework.data.cache``); the samples are then a ``CachedSamples`` rather than a list, with the same
``len`` / indexing, and the stored report is the one the tokenisation wrote.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path

from framework.config.data import DataSection, given
from framework.config.job import section_problems
from framework.data.cache import default_dir, load_or_build
from framework.data.chat import iter_messages
from framework.data.prompt_completion import iter_prompt_completion
from framework.data.report import FileReport
from framework.data.sample import Sample
from framework.data.seq2seq import SEQ2SEQ, iter_seq2seq
from framework.data.views import Subset, holdout_split
from framework.runtime.errors import DataError

log = logging.getLogger("framework.data")

# format -> iter(path, tokenizer, max_length, truncation_side, report, **format options): the kept samples.
# seq2seq: prompt/completion records for an encoder-decoder model (the job sets it; framework/data/seq2seq.py)
FORMATS = {"prompt_completion": iter_prompt_completion, "messages": iter_messages, SEQ2SEQ: iter_seq2seq}


def check_options(max_length, truncation_side: str, data_format: str = "prompt_completion",
                  loss_on: str = "assistant") -> None:
    """Raise ``ValueError`` naming the config key for options no file could satisfy (the checks of
    framework/config/data.py, plus the formats this reader takes)."""
    problems = DataSection.option_problems(max_length, truncation_side, data_format, loss_on)
    if not problems and data_format not in FORMATS:
        problems = [f"data.format: expected one of {tuple(FORMATS)}, got {data_format!r}"]
    if problems:
        raise ValueError(problems[0])


def _given(data, key):
    """data[key], with an absent key, null and "" all meaning "not given"."""
    return given(data.get(key))


def check_files(data, require_validation: bool = True) -> None:
    """Raise ``ValueError`` naming the key when the ``data`` node's keys cannot work (types, exactly one
    validation source when ``require_validation``, the options): framework/config/data.py's checks."""
    problems = section_problems("data", data, require_validation)
    if problems:
        raise ValueError(problems[0])


def cache_dir(data) -> Path | None:
    """The cache directory of a ``data`` config node: ``data.cache_dir`` (``~`` expanded), None when it is
    null (no cache), ``framework.data.cache.default_dir()`` when the key is absent."""
    if "cache_dir" not in data:
        return default_dir()
    value = _given(data, "cache_dir")
    return None if value is None else Path(os.path.expanduser(str(value)))


def prepare_one(path: str | os.PathLike, tokenizer, max_length: int, truncation_side: str = "left",
                data_format: str = "prompt_completion", loss_on: str = "assistant", chat_template=None,
                cache_dir: str | os.PathLike | None = None,
                decoder_max_length: int | None = None) -> tuple[Sequence[Sample], FileReport]:
    """Tokenise one file (through the cache in ``cache_dir`` when given); return ``(samples, report)``.

    ``loss_on`` (assistant | last | all) and ``chat_template`` (a template overriding the tokenizer's) apply
    to the ``messages`` format only; see ``framework.data.chat``. ``decoder_max_length`` (None: max_length)
    applies to ``seq2seq`` only.
    Raises ``DataError`` (file:line: message) on the first invalid record, or when the file keeps no samples.
    """
    check_options(max_length, truncation_side, data_format, loss_on)
    tokenize = FORMATS[data_format]
    extra = {"loss_on": loss_on, "chat_template": chat_template} if data_format == "messages" else {}
    if data_format == SEQ2SEQ:
        extra = {"decoder_max_length": max_length if decoder_max_length is None else int(decoder_max_length)}

    def stream(report):
        return tokenize(path, tokenizer, max_length, truncation_side, report, **extra)

    if cache_dir is not None and Path(path).is_file():  # a missing file: the reader names it below
        options = {"format": data_format, "max_length": max_length, "truncation_side": truncation_side}
        if data_format == "messages":
            template = chat_template if chat_template is not None else getattr(tokenizer, "chat_template", None)
            options |= {"loss_on": loss_on,
                        "chat_template_sha256": hashlib.sha256(json.dumps(template).encode()).hexdigest()}
        options |= extra if data_format == SEQ2SEQ else {}
        samples, report = load_or_build(cache_dir, path, tokenizer, options, stream)
    else:
        report = FileReport(path=os.fspath(path), max_length=max_length)
        samples = list(stream(report))
    if not len(samples):
        reasons = ", ".join(f"{n} {r}" for r, n in sorted(report.dropped.items()))
        raise DataError(path, None, f"all {report.read} samples dropped ({reasons}) with "
                                    f"data.max_length={max_length}; raise data.max_length")
    if report.dropped_total:
        log.warning("%s: dropped %d of %d samples (%s)", report.path, report.dropped_total, report.read,
                    ", ".join(f"{n} {r}" for r, n in sorted(report.dropped.items())))
    return samples, report


def prepare(paths: list[str | os.PathLike], tokenizer, max_length: int, truncation_side: str = "left",
            data_format: str = "prompt_completion", loss_on: str = "assistant", chat_template=None,
            cache_dir: str | os.PathLike | None = None) -> tuple[list[Sequence[Sample]], list[FileReport]]:
    """``prepare_one`` for each file; ``(samples per file, report per file)`` in the order of ``paths``."""
    done = [prepare_one(p, tokenizer, max_length, truncation_side, data_format, loss_on, chat_template, cache_dir)
            for p in paths]
    return [s for s, _ in done], [r for _, r in done]


def prepare_file(data, tokenizer, path) -> tuple[Sequence[Sample], FileReport]:
    """``prepare_one`` of ``path`` with the options (and cache) of the ``data`` config node."""
    template = data.get("chat_template")
    if template:  # a path to a Jinja file overriding the tokenizer's own template
        template = Path(template).read_text(encoding="utf-8")
    return prepare_one(path, tokenizer, int(data.max_length), data.truncation_side,
                       data.get("format", "prompt_completion"), data.get("loss_on", "assistant"), template,
                       cache_dir(data), data.get("decoder_max_length"))


@dataclasses.dataclass
class PreparedData:
    train: Sequence[Sample]
    validation: Sequence[Sample] | None
    test: Sequence[Sample] | None
    reports: list[FileReport]  # train, then validation (file or split), then test, for those present


def hold_out(samples: Sequence[Sample], report: FileReport, fraction: float, seed: int):
    """``(train, validation, validation report)``: ``data.validation_split`` of a training file's kept
    samples; ``report.held_out`` records how many left training."""
    try:
        train_idx, val_idx = holdout_split(len(samples), fraction, seed)
    except ValueError:
        raise DataError(report.path, None, f"data.validation_split={fraction}: only {len(samples)} sample kept, "
                                           "none can be held out; give a validation file (data.validation)") from None
    report.held_out, report.held_out_note = len(val_idx), f"data.validation_split={fraction}, seed={seed}"
    validation = Subset(samples, val_idx)
    val_report = FileReport(path=f"{report.path} [validation_split={fraction}]", max_length=report.max_length,
                            read=len(val_idx), kept=len(val_idx))
    for s in validation:
        val_report.tokens += len(s)
        val_report.target_tokens += s.num_targets
    return Subset(samples, train_idx), validation, val_report


def prepare_config(data, tokenizer, seed: int = 0) -> PreparedData:
    """Every file of the ``data`` config node (see the module docstring); ``seed`` draws the validation split.
    The fine-tuning job and launch/prepare_data.py both call this, so they validate identically."""
    check_files(data, require_validation=False)
    train, report = prepare_file(data, tokenizer, data.train)
    reports, validation, test = [report], None, None
    if _given(data, "validation"):
        validation, val_report = prepare_file(data, tokenizer, data.validation)
        reports.append(val_report)
    elif _given(data, "validation_split"):
        train, validation, val_report = hold_out(train, report, float(data.validation_split), seed)
        reports.append(val_report)
    if _given(data, "test"):
        test, test_report = prepare_file(data, tokenizer, data.test)
        reports.append(test_report)
    return PreparedData(train, validation, test, reports)
