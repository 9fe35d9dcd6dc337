"""Errors a user can fix by editing their data or tokenizer files.

Every error names the file and, where one exists, the 1-based line, so the message alone is enough to
find the problem: ``data/x.jsonl:12: expected a string under "completion", got int``. Launchers print
``error: <message>`` and exit non-zero instead of showing a stack trace.
"""

from __future__ import annotations

import os


class DataError(ValueError):
    """A problem in a data file: ``path``, ``line`` (1-based, or None for whole-file problems), ``message``."""

    def __init__(self, path: str | os.PathLike, line: int | None, message: str):
        self.path = str(path)
        self.line = line
        self.message = message
        super().__init__(str(self))

    def __str__(self) -> str:
        where = self.path if self.line is None else f"{self.path}:{self.line}"
        return f"{where}: {self.message}"

    def __reduce__(self):  # keep the three fields when pickled across processes
        return (type(self), (self.path, self.line, self.message))


class TokenizerError(DataError):
    """A missing or unusable tokenizer directory (``line`` is None, or the line of a bad JSON file)."""
