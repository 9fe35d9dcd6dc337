"""The errors a user can fix, on the ground floor so that every layer raises the same classes.

Launchers turn each into one line, ``error: <message>``, and a non-zero exit instead of a stack trace
(launch/errors.py). Every message names where the problem is: the config key and a value that works, the
data file and its 1-based line (``data/x.jsonl:12: expected a string under "completion", got int``), or the
checkpoint directory and what it lacks.
"""

from __future__ import annotations

import os


class ConfigError(ValueError):
    """A configuration value that cannot work, with the key that holds it."""


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


class CheckpointError(ValueError):
    """A checkpoint directory that is missing, damaged, or does not fit the model being loaded."""
