"""The two-column box table the jobs print at their end (training, generation, evaluation summaries)."""

from __future__ import annotations


def table(rows: list[tuple[str, str]], title: str) -> str:
    """``title`` over a box of (name, value) rows, both columns left-aligned to their widest entry."""
    width = max(len(k) for k, _ in rows)
    vwidth = max(len(v) for _, v in rows)
    line = "+" + "-" * (width + 2) + "+" + "-" * (vwidth + 2) + "+"
    out = [title, line] + [f"| {k:<{width}} | {v:<{vwidth}} |" for k, v in rows] + [line]
    return "\n".join(out)
