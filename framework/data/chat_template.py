"""Render a Hugging Face chat template (Jinja) exactly as ``transformers``' ``apply_chat_template`` does.

Same environment (``ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)`` with the
``loopcontrols`` extension), the same helpers (``raise_exception``, ``strftime_now``, a ``tojson`` filter
that does not HTML-escape, ``dict``, ``namespace``), and the same variables: ``messages``, ``tools``,
``documents`` (None), ``add_generation_prompt`` and the tokenizer's special tokens (``bos_token``,
``eos_token``, ``pad_token``; only those that exist). Keys whose value is ``None`` are dropped from
messages first, as transformers does. The ``{% generation %}`` tag is accepted (rendered as its body).
"""

from __future__ import annotations

import functools
import json
from datetime import datetime

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment


class ChatTemplateError(ValueError):
    """The template raised (``raise_exception``) or could not be compiled or rendered."""


class _GenerationTag(jinja2.ext.Extension):
    """``{% generation %}...{% endgeneration %}``: rendered as its body (transformers uses it for masks)."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(["name:endgeneration"], drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller):
        return caller()


def _raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt):
    return datetime.now().strftime(fmt)


class _TemplateDict:
    def __call__(self, *args, **kwargs):
        return dict(*args, **kwargs)

    def fromkeys(self, *args, **kwargs):
        return dict.fromkeys(*args, **kwargs)


class _Namespace(jinja2.utils.Namespace):
    def __init__(*args, **kwargs):  # same signature trick as jinja's Namespace
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _Namespace._check(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name, value):
        _Namespace._check(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check(name):
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"chat templates cannot set underscore attributes ({name!r})")


@functools.lru_cache(maxsize=16)
def compile_template(source: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[_GenerationTag, jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals["dict"] = _TemplateDict()
    env.globals["namespace"] = _Namespace
    try:
        return env.from_string(source)
    except jinja2.exceptions.TemplateSyntaxError as e:
        raise ChatTemplateError(f"chat template does not compile: {e.message} (template line {e.lineno})") from None


def select_template(template, has_tools: bool) -> str:
    """A template string; for a named list/dict of templates pick ``tool_use`` (with tools) or ``default``."""
    if isinstance(template, str):
        return template
    if isinstance(template, list):  # [{"name": ..., "template": ...}] as stored in tokenizer_config.json
        template = {t["name"]: t["template"] for t in template}
    if isinstance(template, dict):
        if has_tools and "tool_use" in template:
            return template["tool_use"]
        if "default" in template:
            return template["default"]
        raise ChatTemplateError(f"named chat templates {sorted(template)} have no 'default'")
    raise ChatTemplateError(f"expected a chat template string, got {type(template).__name__}")


def special_tokens(tokenizer) -> dict:
    """The special-token variables transformers passes to templates (only tokens that exist)."""
    names = ("bos_token", "eos_token", "pad_token", "unk_token")
    return {n: getattr(tokenizer, n) for n in names if getattr(tokenizer, n, None) is not None}


def render(template, messages: list[dict], tools: list | None = None, add_generation_prompt: bool = False,
           **variables) -> str:
    """The rendered conversation text (raises ``ChatTemplateError`` when the template raises)."""
    source = select_template(template, bool(tools))
    messages = [{k: v for k, v in m.items() if v is not None} for m in messages]
    try:
        return compile_template(source).render(messages=messages, tools=tools, documents=None,
                                               add_generation_prompt=add_generation_prompt, **variables)
    except jinja2.exceptions.TemplateError as e:
        raise ChatTemplateError(f"chat template error: {e.message or e}") from None
    except (TypeError, KeyError, IndexError, AttributeError) as e:
        raise ChatTemplateError(f"chat template failed: {type(e).__name__}: {e}") from None
