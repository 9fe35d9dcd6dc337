"""Kept while the move to framework/runtime/errors.py lands everywhere."""

from framework.runtime.errors import ConfigError  # noqa: F401
