"""Prompts (and, for evaluation, references) read from JSONL, tokenised the way training tokenised them.

Each non-blank line is one JSON object with exactly one of:

    "prompt": str          token ids [bos] + encode(prompt): the prefix a prompt/completion training
                           sample has before its completion (framework/data/prompt_completion.py)
    "messages": [...]      OpenAI-style chat (framework/data/chat.py rules), rendered with the tokenizer's
                           chat template and ``add_generation_prompt=True``, as transformers'
                           ``apply_chat_template(..., add_generation_prompt=True)`` renders it

Other keys are kept and written back with the output. For evaluation each record also needs its
reference: ``"completion"`` (a string, or a list of strings: metrics take the best, the loss uses the
first) with ``"prompt"``; with ``"messages"`` the last message must be an assistant message with string
content, which is the reference, and the messages before it are the prompt.

The reference sample scored by the loss is the training sample of the record (prompt/completion:
``build_sample``, loss on the completion and EOS, the prompt cut from the left to fit ``max_length``; chat:
loss on the last assistant turn, earliest exchanges dropped to fit). A reference that cannot fit is a
``DataError`` naming the line. Generation prompts longer than ``max_prompt_tokens`` keep their last
``max_prompt_tokens`` tokens (counted in ``Request.truncated``).

Encoder-decoder models (``seq2seq=True``, T5) read ``"prompt"`` records only (as their training does):
the prompt ids are the encoder input ``encode(prompt) + [eos]`` (no bos); a longer one keeps its last
``max_prompt_tokens - 1`` prompt tokens and the eos. The reference sample is framework/data/seq2seq.py's
(encoder input and, as targets, ``encode(completion) + [eos]``), each side at most ``max_length`` tokens: the
prompt is cut from the left, and a reference longer than that is a ``DataError`` naming the line.
"""

from __future__ import annotations

import dataclasses
import os

from framework.data.chat import ChatEncoder, TemplateMarkError, parse_record
from framework.data.chat_template import ChatTemplateError
from framework.data.jsonl import read_jsonl, type_name
from framework.data.prompt_completion import build_sample
from framework.data.sample import Sample
from framework.data.seq2seq import build_seq2seq
from framework.runtime.errors import DataError


@dataclasses.dataclass
class Request:
    line: int
    record: dict
    prompt_ids: list[int]
    truncated: int = 0                    # prompt tokens cut from the start to fit
    references: list[str] | None = None   # evaluation only
    target: Sample | None = None          # evaluation only: the reference as a training sample


def _references(path, line: int, obj: dict) -> list[str]:
    if "completion" not in obj:
        raise DataError(path, line, 'evaluation needs a reference: missing key "completion"')
    ref = obj["completion"]
    refs = [ref] if isinstance(ref, str) else ref
    if not isinstance(refs, list) or not refs or not all(isinstance(r, str) for r in refs):
        raise DataError(path, line, f'"completion": expected a string or a non-empty list of strings, got '
                                    f'{type_name(ref)}')
    if refs[0] == "":
        raise DataError(path, line, 'empty "completion": the loss would have no target token besides EOS')
    return refs


class _Encoder:
    def __init__(self, tokenizer, path, seq2seq: bool = False):
        self.tokenizer, self.path, self.seq2seq, self._chat = tokenizer, path, seq2seq, None

    def chat(self, loss_on: str = "last"):
        if self._chat is None:
            try:
                self._chat = ChatEncoder(self.tokenizer, loss_on=loss_on)
            except DataError as e:
                raise DataError(self.path, None, f'"messages" records need a chat template: {e}') from None
        return self._chat

    def prompt_ids(self, text: str) -> list[int]:
        if self.seq2seq:  # the encoder input
            return self.tokenizer.encode(text) + [self.tokenizer.eos_id]
        bos = self.tokenizer.bos_id
        return ([] if bos is None else [bos]) + self.tokenizer.encode(text)

    def render(self, line: int, messages, tools) -> list[int]:
        try:
            return self.tokenizer.encode(self.chat().render(messages, tools, add_generation_prompt=True))
        except ChatTemplateError as e:
            raise DataError(self.path, line, str(e)) from None


def _request(enc: _Encoder, line: int, obj: dict, references: bool, max_length: int | None) -> Request:
    path, tok = enc.path, enc.tokenizer
    kinds = [k for k in ("prompt", "messages") if k in obj]
    if len(kinds) != 1:
        keys = ", ".join(f'"{k}"' for k in list(obj)[:8]) or "none"
        raise DataError(path, line, f'expected exactly one of "prompt" or "messages" (keys present: {keys})')
    if kinds == ["prompt"]:
        if not isinstance(obj["prompt"], str):
            raise DataError(path, line, f'expected a string under "prompt", got {type_name(obj["prompt"])}')
        req = Request(line, obj, enc.prompt_ids(obj["prompt"]))
        if references:
            req.references = _references(path, line, obj)
            if enc.seq2seq:
                req.target = _seq2seq_target(path, line, tok, obj["prompt"], req.references[0], max_length)
            else:
                req.target, _ = build_sample(tok.encode(obj["prompt"]), tok.encode(req.references[0]), tok.bos_id,
                                             tok.eos_id, max_length)
        return _check_target(req, path, max_length)
    if enc.seq2seq:
        raise DataError(path, line, '"messages" records are not supported for an encoder-decoder model (T5), '
                                    'whose training reads prompt/completion records: give "prompt" (and, to '
                                    'evaluate, "completion")')
    messages, tools = parse_record(path, line, obj)
    if not references:
        return Request(line, obj, enc.render(line, messages, tools))
    last = messages[-1]
    if last["role"] != "assistant" or not isinstance(last.get("content"), str) or last["content"] == "":
        raise DataError(path, line, "evaluation needs a reference: the last message must be an assistant message "
                                    "with non-empty string content")
    req = Request(line, obj, enc.render(line, messages[:-1], tools), references=[last["content"]])
    try:
        req.target, _reason, _cut = enc.chat().build(messages, tools, max_length)
    except (ChatTemplateError, TemplateMarkError) as e:
        raise DataError(path, line, str(e)) from None
    return _check_target(req, path, max_length)


def _seq2seq_target(path, line: int, tok, prompt: str, reference: str, max_length: int | None) -> Sample:
    """The encoder-decoder training sample of a reference (the prompt cut from the left to fit)."""
    completion = tok.encode(reference)
    limit = max_length or len(completion) + 1
    if len(completion) + 1 > limit:
        raise DataError(path, line, f"the reference is {len(completion)} tokens + eos, more than the {limit} "
                                    "decoder tokens scored; raise the evaluation max_length")
    prompt_ids = tok.encode(prompt)
    sample, _, _ = build_seq2seq(prompt_ids, completion, tok.eos_id, max_length or len(prompt_ids) + 1, limit)
    return sample


def _check_target(req: Request, path, max_length) -> Request:
    if req.references is not None and req.target is None:
        raise DataError(path, req.line, f"the reference does not fit in {max_length} tokens (with its prompt "
                                        "cut as far as possible); raise the evaluation max_length")
    return req


def read_requests(path: str | os.PathLike, tokenizer, max_prompt_tokens: int, references: bool = False,
                  max_length: int | None = None, seq2seq: bool = False) -> list[Request]:
    """Every record of ``path`` as a :class:`Request` (see the module docstring); ``DataError`` on bad input.
    ``max_length``: the longest reference sample (evaluation); ``seq2seq``: for an encoder-decoder model."""
    if max_prompt_tokens < (2 if seq2seq else 1):
        raise ValueError(f"max_prompt_tokens={max_prompt_tokens}: no room for a prompt")
    enc = _Encoder(tokenizer, os.fspath(path), seq2seq)
    out = []
    for line, obj in read_jsonl(path):
        req = _request(enc, line, obj, references, max_length)
        if len(req.prompt_ids) > max_prompt_tokens:
            req.truncated = len(req.prompt_ids) - max_prompt_tokens
            req.prompt_ids = req.prompt_ids[-max_prompt_tokens:]  # an encoder input keeps its final eos
        if not req.prompt_ids:  # an empty prompt without bos: nothing to condition on
            raise DataError(path, line, "the prompt has no tokens (empty, and the tokenizer has no bos)")
        out.append(req)
    return out
