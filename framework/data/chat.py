"""Conversational JSONL in the OpenAI ``messages`` format, rendered with the model's chat template.

Format. One JSON object per line::

    {"messages": [{"role": "system", "content": "..."}, {"role": "user", "content": "..."},
                  {"role": "assistant", "content": null,
                   "tool_calls": [{"id": "call_1", "type": "function",
                                   "function": {"name": "get_weather", "arguments": "{\\"city\\": \\"Paris\\"}"}}]},
                  {"role": "tool", "tool_call_id": "call_1", "content": "18 C"},
                  {"role": "assistant", "content": "It is 18 C in Paris."}],
     "tools": [{"type": "function", "function": {"name": "get_weather", ...}}]}

Roles are ``system``, ``user``, ``assistant``, ``tool``. ``content`` is a string (an assistant message with
``tool_calls`` may omit it or set it to null). Tool-call ``arguments`` may be a JSON string (OpenAI) or an
object; a string is parsed into an object, which is what chat templates expect. Every tool call needs an
``id`` answered by a later ``tool`` message with that ``tool_call_id``, and every tool message must answer
an earlier call. ``tools`` (optional) is a list of objects passed to the template as is. Other keys are
ignored. Any violation is a ``DataError`` naming file, line and the offending field
(``messages[2].role: expected one of system, user, assistant, tool, got "bot"``).

Rendering. The conversation is rendered with the tokenizer's chat template exactly as ``transformers``'
``apply_chat_template(messages, tools=tools, tokenize=True)`` renders it (see ``chat_template``), then
the text is tokenised in one piece with special tokens in the text mapped to their ids, so ``input_ids`` are
token-identical to transformers'. Nothing is added around it (the template writes bos/eos itself).

Loss (``loss_on``):

- ``assistant`` (default): every assistant turn is a target: its content, its tool calls, and the template
  text after it up to and including the first *special* token (the end-of-turn token: ``<|eot_id|>``,
  ``</s>``, ``<end_of_turn>``, ``<|im_end|>``), so the model learns to stop. Headers (``<|im_start|>assistant``)
  and everything written by other roles are not targets.
- ``last``: only the last assistant turn (same span rule); earlier turns are context.
- ``all``: every token except the first (nothing precedes it).

How turns are found. The conversation is rendered a second time with each message's content (and each
tool call's name) replaced by a unique marker; the markers give the character spans, which the tokenizer's
offsets turn into token spans (a token overlapping a span is a target). The marked rendering, with the
markers replaced by the real values, must reproduce the real rendering (a template may ``trim`` content);
if it does not, for instance because the template rewrites or reorders content, the template cannot mark
where assistant content starts and ends and encoding fails with that message, never falling back to
training on every token (``loss_on: all`` is the explicit way to do that). For a turn made only of tool
calls, the span starts right after the template's generation prompt (``add_generation_prompt`` text).

Length. ``max_length`` counts every token. A longer conversation is truncated by dropping whole *exchanges*
from the start (a user message with the assistant and tool messages that follow it); leading system
messages are always kept and tokens are never cut, so the template's structure stays valid. If even the
last exchange does not fit, the sample is dropped (reason ``too_long``); a sample whose mask ends up empty
(e.g. an empty assistant reply) is dropped as ``no_targets``. Each truncation and drop is counted in the
``FileReport`` (for chat, "prompt tokens cut" counts the tokens of the dropped exchanges).
``truncation_side`` is accepted for interface compatibility and ignored: chat always drops the earliest turns.
"""

from __future__ import annotations

import copy
import json
import os
import re
import secrets
from collections.abc import Iterator

from framework.data.chat_template import ChatTemplateError, render, special_tokens
from framework.runtime.errors import DataError
from framework.data.jsonl import read_jsonl, type_name
from framework.data.report import FileReport
from framework.data.sample import Sample

ROLES = ("system", "user", "assistant", "tool")
from framework.config.data import LOSS_ON  # noqa: E402  (one list of the choices: the data section)
TOO_LONG = "too_long"
NO_TARGETS = "no_targets"


class TemplateMarkError(ValueError):
    """The chat template cannot mark where assistant turns start and end."""


# --- validation -----------------------------------------------------------------------------------------


def parse_record(path, line: int, obj: dict) -> tuple[list[dict], list | None]:
    """``(messages, tools)`` of one record, validated and normalised; ``DataError`` (file:line) otherwise."""
    def fail(msg):
        raise DataError(path, line, msg)

    if "messages" not in obj:
        keys = ", ".join(f'"{k}"' for k in list(obj)[:8]) or "none"
        fail(f'missing key "messages" (keys present: {keys})')
    raw = obj["messages"]
    if not isinstance(raw, list):
        fail(f'"messages": expected a list of messages, got {type_name(raw)}')
    if not raw:
        fail('"messages": empty conversation')
    tools = obj.get("tools")
    if tools is not None:
        if not isinstance(tools, list):
            fail(f'"tools": expected a list, got {type_name(tools)}')
        for j, t in enumerate(tools):
            if not isinstance(t, dict):
                fail(f"tools[{j}]: expected an object, got {type_name(t)}")
    messages, pending, seen_ids = [], {}, set()
    for i, m in enumerate(raw):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            fail(f"{where}: expected an object, got {type_name(m)}")
        role = m.get("role")
        if role not in ROLES:
            got = "nothing" if "role" not in m else (f'"{role}"' if isinstance(role, str) else type_name(role))
            fail(f"{where}.role: expected one of {', '.join(ROLES)}, got {got}")
        m = dict(m)
        tool_calls = m.get("tool_calls")
        if tool_calls is not None and role != "assistant":
            fail(f"{where}.tool_calls: only assistant messages make tool calls (role is {role})")
        content = m.get("content")
        if content is None and not tool_calls:
            fail(f"{where}.content: missing" + ("" if role != "assistant" else " (and no tool_calls)"))
        if content is not None and not isinstance(content, str):
            fail(f"{where}.content: expected a string, got {type_name(content)}")
        if tool_calls is not None:
            m["tool_calls"] = _parse_tool_calls(fail, where, tool_calls, pending, seen_ids)
        if role == "tool":
            cid = m.get("tool_call_id")
            if not isinstance(cid, str):
                fail(f"{where}.tool_call_id: expected the id (a string) of the tool call this message answers, "
                     f"got {'nothing' if cid is None else type_name(cid)}")
            if cid not in pending:
                fail(f'{where}.tool_call_id: "{cid}" matches no earlier unanswered tool call')
            del pending[cid]
        messages.append(m)
    if pending:
        cid, where = next(iter(pending.items()))
        fail(f'{where}.id: tool call "{cid}" has no tool message answering it (no "tool_call_id": "{cid}")')
    return messages, tools


def _parse_tool_calls(fail, where, tool_calls, pending, seen_ids):
    if not isinstance(tool_calls, list):
        fail(f"{where}.tool_calls: expected a list, got {type_name(tool_calls)}")
    out = []
    for k, tc in enumerate(tool_calls):
        w = f"{where}.tool_calls[{k}]"
        if not isinstance(tc, dict):
            fail(f"{w}: expected an object, got {type_name(tc)}")
        tc = dict(tc)
        if tc.get("type", "function") != "function":
            fail(f'{w}.type: expected "function", got {json.dumps(tc.get("type"))}')
        fn = tc.get("function")
        if not isinstance(fn, dict):
            fail(f"{w}.function: expected an object with name and arguments, got "
                 f"{'nothing' if fn is None else type_name(fn)}")
        fn = dict(fn)
        if not isinstance(fn.get("name"), str) or not fn["name"]:
            fail(f"{w}.function.name: expected a non-empty string")
        args = fn.get("arguments", {})
        if isinstance(args, str):
            try:
                args = json.loads(args)
            except json.JSONDecodeError as e:
                fail(f"{w}.function.arguments: invalid JSON: {e.msg} at column {e.colno}")
        if not isinstance(args, dict):
            fail(f"{w}.function.arguments: expected an object (or a JSON string of one), got {type_name(args)}")
        fn["arguments"] = args
        tc["function"] = fn
        cid = tc.get("id")
        if not isinstance(cid, str) or not cid:
            fail(f"{w}.id: expected a non-empty string (a tool message answers the call by this id)")
        if cid in seen_ids:
            fail(f'{w}.id: duplicate tool call id "{cid}"')
        seen_ids.add(cid)
        pending[cid] = w
        out.append(tc)
    return out


# --- encoding -------------------------------------------------------------------------------------------


class ChatEncoder:
    """Render + tokenise + mask conversations for one tokenizer and template."""

    def __init__(self, tokenizer, chat_template=None, loss_on: str = "assistant"):
        if loss_on not in LOSS_ON:
            raise ValueError(f"data.loss_on: expected one of {LOSS_ON}, got {loss_on!r}")
        template = chat_template if chat_template is not None else getattr(tokenizer, "chat_template", None)
        if template is None:
            where = getattr(tokenizer, "source_dir", None) or "tokenizer"
            raise DataError(where, None, "the tokenizer has no chat_template (needed for data.format: messages); "
                                         "add one to tokenizer_config.json or chat_template.jinja")
        self.tokenizer, self.template, self.loss_on = tokenizer, template, loss_on
        self.variables = special_tokens(tokenizer)
        self.special_strings = sorted(tokenizer.special_tokens, key=len, reverse=True)
        self._marker = f"@@CHATMARK{secrets.token_hex(4)}_"
        self._marker_re = re.compile(re.escape(self._marker) + r"(\d+)@@")

    def render(self, messages, tools=None, add_generation_prompt=False) -> str:
        return render(self.template, messages, tools, add_generation_prompt, **self.variables)

    def encode(self, messages: list[dict], tools=None) -> Sample:
        """The whole conversation as a ``Sample`` (raises ``ChatTemplateError`` / ``TemplateMarkError``)."""
        text = self.render(messages, tools)
        ids, offsets = self.tokenizer.encode_with_offsets(text)
        if self.loss_on == "all":
            return Sample(list(ids), [0] + [1] * (len(ids) - 1))
        ranges = self.target_ranges(messages, tools, text)
        mask = [0] * len(ids)
        for t, (s, e) in enumerate(offsets):
            if any(s < b and e > a for a, b in ranges):
                mask[t] = 1
        return Sample(list(ids), mask)

    # the character spans of assistant turns in the rendered text
    def target_ranges(self, messages, tools, text: str) -> list[tuple[int, int]]:
        marked, values = copy.deepcopy(messages), []

        def mark(value, msg_index, kind, strip_ok):
            values.append((value, msg_index, kind, strip_ok))
            return f"{self._marker}{len(values) - 1}@@"

        for i, m in enumerate(marked):
            if self._marker in json.dumps(m):
                raise TemplateMarkError(f"messages[{i}] contains the internal marker {self._marker!r}")
            if isinstance(m.get("content"), str) and m["content"] != "":
                m["content"] = mark(m["content"], i, "content", True)
            for tc in m.get("tool_calls") or []:
                tc["function"]["name"] = mark(tc["function"]["name"], i, "tool_call", False)
        marked_text = self.render(marked, tools)
        spans = self._match(marked_text, text, values)  # [(msg_index, kind, start, end)] in text order

        wanted = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
        if self.loss_on == "last":
            wanted = wanted[-1:]
        ranges = []
        for i in wanted:
            mine = [s for s in spans if s[0] == i]
            expected = sum(1 for v in values if v[1] == i)
            if len(mine) != expected:
                what = "does not appear" if not mine else "appears more than once"
                raise TemplateMarkError(f"the chat template cannot mark where assistant content starts and ends: "
                                        f"messages[{i}] (assistant) {what} in the rendered text")
            if not mine:
                continue  # an empty assistant turn: nothing to learn
            first, last = mine[0], mine[-1]
            start = first[2]
            if first[1] == "tool_call":
                start = self._after_generation_prompt(messages, tools, text, i, spans, first)
            end = last[3]
            nxt = min((s[2] for s in spans if s[2] >= end and s[0] != i), default=len(text))
            hits = [(text.find(tok, end, nxt), tok) for tok in self.special_strings]
            hits = [(p, tok) for p, tok in hits if p >= 0]
            if hits:
                p, tok = min(hits, key=lambda h: (h[0], -len(h[1])))
                end = p + len(tok)
            ranges.append((start, end))
        return ranges

    def _match(self, marked_text: str, text: str, values) -> list[tuple[int, str, int, int]]:
        """Align the marked rendering with the real one; the real spans of every marked value."""
        pieces = self._marker_re.split(marked_text)  # fixed, key, fixed, key, ..., fixed

        def fail(why):
            raise TemplateMarkError(f"the chat template cannot mark where assistant content starts and ends: "
                                    f"{why}; use a template that writes message contents verbatim, or "
                                    f"data.loss_on: all to train on every token")

        if not text.startswith(pieces[0]):
            fail("the rendering changes when message contents change (template text before the first message)")
        pos, spans = len(pieces[0]), []
        for j in range(1, len(pieces), 2):
            value, msg_index, kind, strip_ok = values[int(pieces[j])]
            after = pieces[j + 1]
            is_last = j + 2 >= len(pieces)
            cands = [value] + ([value.strip(), value.rstrip(), value.lstrip()] if strip_ok else [])
            for c in dict.fromkeys(cands):
                if text.startswith(c, pos) and text.startswith(after, pos + len(c)) and (
                        not is_last or pos + len(c) + len(after) == len(text)):
                    break
            else:
                fail(f"messages[{msg_index}].{kind} is not written verbatim (or the template depends on it)")
            spans.append((msg_index, kind, pos, pos + len(c)))
            pos += len(c) + len(after)
        if pos != len(text):
            fail("the rendering changes when message contents change")
        return spans

    def _after_generation_prompt(self, messages, tools, text, i, spans, first) -> int:
        """Start of a tool-call-only assistant turn: just after the template's generation prompt."""
        try:
            plain = self.render(messages[:i], tools, add_generation_prompt=False)
            prompted = self.render(messages[:i], tools, add_generation_prompt=True)
        except ChatTemplateError as e:
            raise TemplateMarkError(f"cannot find where messages[{i}] (assistant tool calls) starts: {e}") from None
        gen = prompted[len(plain):] if prompted.startswith(plain) else ""
        lo = max((s[3] for s in spans if s[3] <= first[2]), default=0)
        p = text.rfind(gen, lo, first[2]) if gen else -1
        if p < 0:
            raise TemplateMarkError(f"the chat template cannot mark where assistant tool calls start: "
                                    f"messages[{i}]: no generation prompt ({gen!r}) before the first tool call")
        return p + len(gen)

    # --- length ---

    def build(self, messages, tools, max_length: int) -> tuple[Sample | None, str | None, int]:
        """``(sample, None, tokens cut)``, or ``(None, reason, 0)`` when it must be dropped."""
        head = 0
        while head < len(messages) and messages[head]["role"] == "system":
            head += 1
        starts = [k for k in range(head, len(messages)) if k == head or messages[k]["role"] == "user"]
        full = None
        for start in starts:
            sample = self.encode(messages[:head] + messages[start:], tools)
            if full is None:
                full = len(sample)
            if len(sample) <= max_length:
                if sample.num_targets == 0:
                    return None, NO_TARGETS, 0
                return sample, None, full - len(sample)
        return None, TOO_LONG, 0


def tokenize_messages(path: str | os.PathLike, tokenizer, max_length: int, truncation_side: str = "left",
                      loss_on: str = "assistant", chat_template=None) -> tuple[list[Sample], FileReport]:
    """Read, validate and tokenise a whole ``messages`` file; return the kept samples and the file's report."""
    report = FileReport(path=os.fspath(path), max_length=max_length)
    samples = list(iter_messages(path, tokenizer, max_length, truncation_side, report, loss_on, chat_template))
    return samples, report


def iter_messages(path: str | os.PathLike, tokenizer, max_length: int, truncation_side: str, report: FileReport,
                  loss_on: str = "assistant", chat_template=None) -> Iterator[Sample]:
    """Yield the kept samples of a ``messages`` file one at a time, counting every sample in ``report``."""
    encoder = ChatEncoder(tokenizer, chat_template, loss_on)
    for line, obj in read_jsonl(path):
        messages, tools = parse_record(path, line, obj)
        if loss_on != "all" and not any(m["role"] == "assistant" for m in messages):
            raise DataError(path, line, "no assistant message: nothing to train on (loss_on: "
                                        f"{loss_on} trains on assistant turns only)")
        try:
            sample, reason, cut = encoder.build(messages, tools, max_length)
        except (ChatTemplateError, TemplateMarkError) as e:
            raise DataError(path, line, str(e)) from None
        if sample is None:
            report.add_dropped(line, reason)
            continue
        report.add_kept(line, len(sample), sample.num_targets, cut)
        yield sample
