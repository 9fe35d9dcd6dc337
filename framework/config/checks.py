"""Small predicates shared by the sections' ``problems()``: each returns a problem naming the key, or None."""

from __future__ import annotations


def at_least(key: str, value, minimum, nullable: bool = False, what: str = "an integer") -> str | None:
    if value is None:
        return None if nullable else f"{key} is required ({what} >= {minimum})"
    if value < minimum:
        return f"{key}={value!r}: expected {what} >= {minimum}{' or null' if nullable else ''}"
    return None


def one_of(key: str, value, choices) -> str | None:
    return None if value in choices else f"{key}={value!r}: expected one of {list(choices)}"


def fraction(key: str, value, closed_low: bool = True) -> str | None:
    """A value in [0, 1) (``closed_low``) or (0, 1)."""
    ok = (0.0 <= value < 1.0) if closed_low else (0.0 < value < 1.0)
    return None if ok else f"{key}={value!r}: expected a number in {'[0, 1)' if closed_low else '(0, 1)'}"
