"""Preference pairs for DPO: JSONL records -> (chosen, rejected) token sequences that share one prompt.

Formats (``data.format: preference``; each line picks its form by its keys)::

    {"prompt": "What is 17 + 25?", "chosen": "42", "rejected": "41"}                      text
    {"messages": [{"role": "user", "content": "..."}], "chosen": "...", "rejected": "..."}   chat

In the chat form ``messages`` is the shared context (OpenAI style, checked as the SFT ``messages`` format
checks it, tools and tool calls included, with ``tools`` beside it) and each response is a string (the
assistant's content), an assistant message object, or a list of messages ending with the assistant's
(TRL's conversational form, where ``prompt`` may also hold the context list instead of ``messages``).
An optional ``"margin"`` (a number) is kept with the pair for reward-model training (TRL's margin,
framework/training/reward.py; DPO ignores it). Other keys are ignored.

Sequences. Text: each row is ``[bos] + encode(prompt) + encode(response) + [eos]`` with the loss mask on
the response tokens and the eos, exactly the SFT prompt/completion sample
(``framework.data.prompt_completion.build_sample``). Chat: the context plus the response rendered with the
chat template (``framework.data.chat.ChatEncoder``), the mask on that last assistant turn and its
end-of-turn token (``loss_on: last``). DPO's log-probability of a response is the sum over these target
tokens (framework/training/dpo.py).

Truncation (``max_length`` counts every token of a row). Both rows keep the same prompt: text cuts prompt
tokens from ``truncation_side`` until the *longer* response fits (bos, responses and eos are never cut;
if the longer response alone does not fit the pair is dropped, ``completion_too_long``); chat drops whole
earliest exchanges (system messages kept) until both rows fit, else ``too_long``. Every cut and drop is
counted in the ``FileReport``, whose token counts cover both rows.

Bad records. These kinds follow ``data.bad_records``: ``error`` (default) stops with ``FILE:LINE: what``;
``skip`` drops the record and counts it in the report under its reason:

- ``missing_chosen`` / ``missing_rejected``: the key is absent or null;
- ``empty_prompt``: an empty (or whitespace-only) prompt, or a chat context with no message;
- ``empty_response``: an empty chosen or rejected response;
- ``identical_responses``: chosen and rejected are the same, so the pair carries no preference.

Anything else malformed (invalid JSON, a response of the wrong type, a malformed message) is always an
error naming file and line.

Batches. Unpacked (``collate_pairs``): a micro-batch of ``m`` pairs is ``2m`` rows, the ``m`` chosen rows
first, then the rejected ones in the same order; sequence ``k`` is row ``k``. Packed (``data.packing``,
``collate_packed_pairs``): whole pairs go into bins (``framework.data.packing.pack`` over each pair's
positions, chosen plus rejected), each bin one row holding its pairs' sequences side by side (chosen 1,
rejected 1, chosen 2, ...) with ``collate_packed``'s block-diagonal mask and restarting positions, so every
sequence sees only itself and its log-probabilities are those of the unpacked row. A pair's two sequences
always share a row, hence a micro-batch (where its loss is computed). ``sequence_index`` [rows, s] names
each position's sequence in the unpacked order (the ``j``-th pair of the micro-batch: chosen ``j``,
rejected ``m + j``; padding ``2m``, a slot that is discarded), so per-sequence sums are taken per segment
and everything downstream sees ``2m`` sequences in the same order either way; ``pairs`` holds ``m``.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Sequence
from pathlib import Path

import torch

from framework.data.batching import collate
from framework.data.chat import NO_TARGETS, TOO_LONG, ChatEncoder, parse_record
from framework.data.chat_template import ChatTemplateError
from framework.data.jsonl import read_jsonl, type_name
from framework.data.packing import collate_packed, sample_positions
from framework.data.prepare import check_files, hold_out
from framework.data.prompt_completion import COMPLETION_TOO_LONG, TRUNCATION_SIDES, build_sample
from framework.data.report import FileReport
from framework.data.sample import Sample
from framework.runtime.errors import DataError

log = logging.getLogger("framework.data")

FORMAT = "preference"
from framework.config.data import BAD_RECORDS  # noqa: E402  (one list of the choices: the data section)

MISSING_CHOSEN, MISSING_REJECTED = "missing_chosen", "missing_rejected"
EMPTY_PROMPT, EMPTY_RESPONSE, IDENTICAL = "empty_prompt", "empty_response", "identical_responses"


@dataclasses.dataclass(frozen=True)
class PreferencePair:
    """The chosen and the rejected sequence of one record (same prompt tokens, different targets)."""
    chosen: Sample
    rejected: Sample
    margin: float | None = None   # the record's "margin" (reward models), None without one

    def __len__(self) -> int:  # tokens of both rows (what the report counts)
        return len(self.chosen) + len(self.rejected)

    @property
    def num_targets(self) -> int:
        return self.chosen.num_targets + self.rejected.num_targets

    @property
    def longest(self) -> int:  # the longer row: what a batch must make room for
        return max(len(self.chosen), len(self.rejected))


class _Bad(Exception):
    """A record of one of the kinds ``data.bad_records`` governs (reason, message)."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason, self.message = reason, message


# --- records ------------------------------------------------------------------------------------------


def _response(path, line, obj: dict, key: str, chat: bool):
    """The text (or, in chat form, the assistant message) under ``key``; raises _Bad / DataError."""
    value = obj.get(key)
    if value is None:
        raise _Bad(MISSING_CHOSEN if key == "chosen" else MISSING_REJECTED, f'missing "{key}" response')
    if isinstance(value, str):
        if value == "":
            raise _Bad(EMPTY_RESPONSE, f'empty "{key}" response')
        return {"role": "assistant", "content": value} if chat else value
    if not chat:
        raise DataError(path, line, f'"{key}": expected a string (the response to "prompt"), got {type_name(value)}')
    if isinstance(value, list):  # TRL's conversational form: [..., {"role": "assistant", ...}]
        if len(value) != 1:
            raise DataError(path, line, f'"{key}": expected one assistant message, got a list of {len(value)}')
        value = value[0]
    if not isinstance(value, dict) or value.get("role") != "assistant":
        got = value.get("role") if isinstance(value, dict) else type_name(value)
        raise DataError(path, line, f'"{key}": expected a string or an assistant message, got {got!r}')
    if value.get("content") in (None, "") and not value.get("tool_calls"):
        raise _Bad(EMPTY_RESPONSE, f'empty "{key}" response')
    return value


def _margin(path, line: int, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value or abs(value) == float("inf"):
        raise DataError(path, line, f'"margin": expected a finite number (how much chosen should outscore '
                                    f'rejected), got {value!r}')
    return float(value)


def parse_preference(path, line: int, obj: dict):
    """``(context, chosen, rejected, tools)`` of one record: ``context`` is the prompt string (text form) or
    the list of context messages (chat form, then the responses are assistant messages and ``tools`` the
    record's tools). Raises ``_Bad`` for the kinds ``data.bad_records`` governs, ``DataError`` otherwise."""
    context = obj["messages"] if "messages" in obj else obj.get("prompt")
    chat = "messages" in obj or isinstance(context, list)
    if context is None:
        keys = ", ".join(f'"{k}"' for k in list(obj)[:8]) or "none"
        raise DataError(path, line, f'missing "prompt" (text) or "messages" (chat) (keys present: {keys})')
    if not chat and not isinstance(context, str):
        raise DataError(path, line, f'"prompt": expected a string or a list of messages, got {type_name(context)}')
    if (not chat and not context.strip()) or (chat and not context):
        raise _Bad(EMPTY_PROMPT, "empty prompt: a preference needs something the responses answer")
    chosen, rejected = (_response(path, line, obj, k, chat) for k in ("chosen", "rejected"))
    if chosen == rejected:
        raise _Bad(IDENTICAL, "chosen and rejected are identical: the pair expresses no preference")
    if not chat:
        return context, chosen, rejected, None
    # Check the context and each response as one conversation (roles, tool calls answered, ...).
    messages, tools = parse_record(path, line, {"messages": list(context) + [chosen], "tools": obj.get("tools")})
    rejected_msgs, _ = parse_record(path, line, {"messages": list(context) + [rejected], "tools": obj.get("tools")})
    return messages[:-1], messages[-1], rejected_msgs[-1], tools


# --- encoding -----------------------------------------------------------------------------------------


def _text_pair(tokenizer, prompt: str, chosen: str, rejected: str, max_length: int, truncation_side: str):
    """``(pair, prompt tokens cut, None)`` or ``(None, 0, reason)``: one prompt cut for both rows."""
    prompt_ids = tokenizer.encode(prompt)
    responses = [tokenizer.encode(chosen), tokenizer.encode(rejected)]
    longest = max(responses, key=len)
    fits, cut = build_sample(prompt_ids, longest, tokenizer.bos_id, tokenizer.eos_id, max_length, truncation_side)
    if fits is None:
        return None, 0, COMPLETION_TOO_LONG
    if cut:
        keep = len(prompt_ids) - cut
        prompt_ids = prompt_ids[cut:] if truncation_side == "left" else prompt_ids[:keep]
    rows = [build_sample(prompt_ids, r, tokenizer.bos_id, tokenizer.eos_id, max_length, truncation_side)[0]
            for r in responses]
    return PreferencePair(*rows), cut, None


def _chat_pair(encoder, context: list, chosen: dict, rejected: dict, tools, max_length: int):
    """``(pair, tokens of dropped exchanges, None)`` or ``(None, 0, reason)``: the earliest exchanges of
    the context dropped, the same for both rows, until both fit."""
    head = 0
    while head < len(context) and context[head]["role"] == "system":
        head += 1
    starts = [k for k in range(head, len(context)) if k == head or context[k]["role"] == "user"] or [len(context)]
    full = None
    for start in starts:
        kept = context[:head] + context[start:]
        rows = [encoder.encode(kept + [r], tools) for r in (chosen, rejected)]
        if full is None:
            full = sum(len(r) for r in rows)
        if max(len(r) for r in rows) <= max_length:
            if min(r.num_targets for r in rows) == 0:
                return None, 0, NO_TARGETS
            return PreferencePair(*rows), (full - sum(len(r) for r in rows)) // 2, None
    return None, 0, TOO_LONG


def iter_preferences(path: str | os.PathLike, tokenizer, max_length: int, truncation_side: str, report: FileReport,
                     bad_records: str = "error", chat_template=None):
    """Yield the kept pairs of a file, counting every record in ``report`` (see the module docstring)."""
    if truncation_side not in TRUNCATION_SIDES:
        raise ValueError(f"data.truncation_side: expected one of {TRUNCATION_SIDES}, got {truncation_side!r}")
    if bad_records not in BAD_RECORDS:
        raise ValueError(f"data.bad_records: expected one of {BAD_RECORDS}, got {bad_records!r}")
    encoder = None
    for line, obj in read_jsonl(path):
        try:
            context, chosen, rejected, tools = parse_preference(path, line, obj)
        except _Bad as bad:
            if bad_records == "error":
                raise DataError(path, line, f"{bad.message} (data.bad_records=skip drops such records, counted as "
                                            f"{bad.reason})") from None
            report.add_dropped(line, bad.reason)
            continue
        if isinstance(context, str):
            pair, cut, reason = _text_pair(tokenizer, context, chosen, rejected, max_length, truncation_side)
        else:
            encoder = encoder or ChatEncoder(tokenizer, chat_template, loss_on="last")
            try:
                pair, cut, reason = _chat_pair(encoder, context, chosen, rejected, tools, max_length)
            except (ChatTemplateError, ValueError) as e:  # TemplateMarkError is a ValueError
                raise DataError(path, line, str(e)) from None
        if pair is None:
            report.add_dropped(line, reason)
            continue
        if obj.get("margin") is not None:
            pair = dataclasses.replace(pair, margin=_margin(path, line, obj["margin"]))
        report.add_kept(line, len(pair), pair.num_targets, cut)
        yield pair


def tokenize_preferences(path, tokenizer, max_length: int, truncation_side: str = "left", bad_records: str = "error",
                         chat_template=None) -> tuple[list[PreferencePair], FileReport]:
    """Read, check and tokenise a whole preference file; ``(kept pairs, report)``. A file that keeps no pair
    is an error."""
    report = FileReport(path=os.fspath(path), max_length=max_length)
    pairs = list(iter_preferences(path, tokenizer, max_length, truncation_side, report, bad_records, chat_template))
    if not pairs:
        reasons = ", ".join(f"{n} {r}" for r, n in sorted(report.dropped.items()))
        raise DataError(path, None, f"all {report.read} records dropped ({reasons}); see data.max_length and "
                                    "data.bad_records")
    if report.dropped_total:
        log.warning("%s: dropped %d of %d records (%s)", report.path, report.dropped_total, report.read,
                    ", ".join(f"{n} {r}" for r, n in sorted(report.dropped.items())))
    return pairs, report


@dataclasses.dataclass
class PreparedPairs:
    train: Sequence[PreferencePair]
    validation: Sequence[PreferencePair]
    reports: list[FileReport]  # train, then validation (file or split)


def prepare_preferences(data, tokenizer, seed: int = 0) -> PreparedPairs:
    """The training pairs and validation pairs (``data.validation`` file or ``data.validation_split`` of the
    training file, drawn with ``seed``) of a ``data`` config node of format ``preference``."""

    check_files(data, require_validation=True)
    template = data.get("chat_template")
    if template:  # a path to a Jinja file overriding the tokenizer's own template
        template = Path(template).read_text(encoding="utf-8")

    def read(path):
        return tokenize_preferences(path, tokenizer, int(data.max_length), data.get("truncation_side", "left"),
                                    data.get("bad_records", "error"), template)

    train, report = read(data.train)
    if data.get("validation"):
        validation, val_report = read(data.validation)
    else:
        train, validation, val_report = hold_out(train, report, float(data.validation_split), seed)
    return PreparedPairs(train, validation, [report, val_report])


def check_preference_options(data) -> list[str]:
    """Problems with the keys of a ``preference`` data node that no file could satisfy."""
    problems = []
    if data.get("bad_records", "error") not in BAD_RECORDS:
        problems.append(f"data.bad_records={data.get('bad_records')!r}: expected one of {', '.join(BAD_RECORDS)}")
    if data.get("truncation_side", "left") not in TRUNCATION_SIDES:
        problems.append(f"data.truncation_side={data.get('truncation_side')!r}: expected one of "
                        f"{', '.join(TRUNCATION_SIDES)}")
    length = data.get("max_length")
    if isinstance(length, bool) or not isinstance(length, int) or length < 3:
        problems.append(f"data.max_length={length!r}: expected an integer >= 3 (a token, a response token and eos)")
    return problems


def pair_positions(pair: PreferencePair) -> int:
    """Positions a pair takes in a packed row: both of its sequences after the label shift."""
    return sample_positions(pair.chosen) + sample_positions(pair.rejected)


def collate_packed_pairs(bins: list[list[PreferencePair]], pad_id: int, seq_length: int) -> dict:
    """One micro-batch of packed bins: ``collate_packed``'s tensors over each bin's sequences (chosen and
    rejected of each pair side by side), plus ``sequence_index`` (int64 [rows, s]) and ``pairs`` (int64, 0-d):
    see the module docstring."""
    batch = collate_packed([[s for p in b for s in (p.chosen, p.rejected)] for b in bins], pad_id, seq_length)
    m = sum(len(b) for b in bins)
    index = torch.full((len(bins), seq_length), 2 * m, dtype=torch.long)
    j = 0
    for r, b in enumerate(bins):
        at = 0
        for p in b:
            for k, s in ((j, p.chosen), (m + j, p.rejected)):
                n = sample_positions(s)
                index[r, at:at + n] = k
                at += n
            j += 1
    return batch | {"sequence_index": index, "pairs": torch.tensor(m)}


def collate_pairs(pairs: list[PreferencePair], pad_id: int, pad_to_multiple_of: int = 1, seq_length: int | None = None):
    """One micro-batch of ``m`` pairs as ``2m`` rows, the chosen sequences first, then the rejected ones in the
    same order (``framework.data.batching.collate``'s tensors and padding rules)."""
    return collate([p.chosen for p in pairs] + [p.rejected for p in pairs], pad_id, pad_to_multiple_of, seq_length)
