"""Reading JSON Lines files record by record, with every problem pinned to a file and line.

Rules: the file is UTF-8 (a leading byte-order mark is accepted); one JSON object per line; blank lines
(only whitespace) are skipped; anything else is a ``DataError`` naming the 1-based line. A file with no
records at all is an error too: an empty training or validation file is always a mistake.
Lines are split on ``\\n`` only, in bytes, so a U+2028 inside a JSON string is not a line break.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator

from framework.runtime.errors import DataError

_TYPE_NAMES = {type(None): "null", bool: "bool", int: "int", float: "float", str: "string", list: "list",
               dict: "object"}


def type_name(value) -> str:
    """The name a user sees for a JSON value's type in error messages."""
    return _TYPE_NAMES.get(type(value), type(value).__name__)


def read_jsonl(path: str | os.PathLike) -> Iterator[tuple[int, dict]]:
    """Yield ``(line_number, object)`` for each non-blank line of ``path``; raise ``DataError`` on bad input."""
    path = os.fspath(path)
    try:
        f = open(path, "rb")
    except FileNotFoundError:
        raise DataError(path, None, "file not found") from None
    except IsADirectoryError:
        raise DataError(path, None, "is a directory, expected a JSONL file") from None
    except OSError as e:
        raise DataError(path, None, f"cannot open: {e.strerror}") from None
    records = 0
    with f:
        for line_no, raw in enumerate(f, start=1):
            try:
                text = raw.decode("utf-8-sig" if line_no == 1 else "utf-8")
            except UnicodeDecodeError as e:
                msg = f"not UTF-8: byte 0x{raw[e.start]:02x} at column {e.start + 1}"
                raise DataError(path, line_no, msg) from None
            if not text.strip():
                continue
            try:
                obj = json.loads(text)
            except json.JSONDecodeError as e:
                raise DataError(path, line_no, f"invalid JSON: {e.msg} at column {e.colno}") from None
            if not isinstance(obj, dict):
                raise DataError(path, line_no, f"expected a JSON object, got {type_name(obj)}")
            records += 1
            yield line_no, obj
    if records == 0:
        raise DataError(path, None, "no samples: the file is empty or has only blank lines")
