"""What happened to every sample of a data file: read, kept, truncated, dropped (and why), tokens.

Invariant: ``read == kept + sum(dropped.values())``; truncated samples are among the kept ones. Nothing
is lost without being counted here, and the first few line numbers of each kind are kept so a user can
look at the offending samples. ``held_out`` counts kept samples that a validation split
(``data.validation_split``) took out of training; they are among the kept ones too.

A report is stored with the tokenise-once cache (``to_dict`` / ``from_dict``, without its path), so a cache
hit reports exactly what the first tokenisation found.
"""

from __future__ import annotations

import dataclasses
from collections import Counter

MAX_LINES_SHOWN = 5  # line numbers remembered per kind; counts are always exact


@dataclasses.dataclass
class FileReport:
    path: str
    max_length: int | None = None
    read: int = 0
    kept: int = 0
    truncated: int = 0
    prompt_tokens_cut: int = 0
    completion_tokens_cut: int = 0  # seq2seq (framework/data/seq2seq.py): label tokens beyond data.decoder_max_length
    tokens: int = 0          # over kept samples, bos/eos included
    target_tokens: int = 0   # tokens that carry loss (completion + eos)
    dropped: Counter = dataclasses.field(default_factory=Counter)
    dropped_lines: dict = dataclasses.field(default_factory=dict)
    truncated_lines: list = dataclasses.field(default_factory=list)
    held_out: int = 0        # kept samples moved to the validation split (data.validation_split)
    held_out_note: str = ""  # how they were chosen, for the table

    def add_kept(self, line: int, num_tokens: int, num_targets: int, prompt_tokens_cut: int = 0,
                 completion_tokens_cut: int = 0) -> None:
        self.read += 1
        self.kept += 1
        self.tokens += num_tokens
        self.target_tokens += num_targets
        if prompt_tokens_cut or completion_tokens_cut:
            self.truncated += 1
            self.prompt_tokens_cut += prompt_tokens_cut
            self.completion_tokens_cut += completion_tokens_cut
            if len(self.truncated_lines) < MAX_LINES_SHOWN:
                self.truncated_lines.append(line)

    def add_dropped(self, line: int, reason: str) -> None:
        self.read += 1
        self.dropped[reason] += 1
        lines = self.dropped_lines.setdefault(reason, [])
        if len(lines) < MAX_LINES_SHOWN:
            lines.append(line)

    @property
    def dropped_total(self) -> int:
        return sum(self.dropped.values())

    def to_dict(self) -> dict:
        """JSON-ready counts, without ``path`` (a cached report is valid for the same bytes at any path)."""
        d = dataclasses.asdict(self)
        del d["path"]
        d["dropped"] = dict(self.dropped)
        return d

    @classmethod
    def from_dict(cls, path: str, d: dict) -> "FileReport":
        return cls(path=path, **{**d, "dropped": Counter(d["dropped"])})

    def format(self) -> str:
        """A small table: one row for this file plus lines explaining truncations and drops."""
        return format_reports([self])


def _lines(lines: list, total: int) -> str:
    shown = ", ".join(str(n) for n in lines)
    return f"line{'s' if total > 1 else ''} {shown}{', ...' if total > len(lines) else ''}"


def format_reports(reports: list[FileReport]) -> str:
    """One table for several files (e.g. train and validation)."""
    header = ("file", "read", "kept", "truncated", "dropped", "tokens", "target tokens")
    rows = [(r.path, r.read, r.kept, r.truncated, r.dropped_total, r.tokens, r.target_tokens) for r in reports]
    cells = [header] + [tuple(str(c) for c in row) for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]

    def fmt(row):  # file name left-aligned, numbers right-aligned
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))

    out = [fmt(cells[0]), "  ".join("-" * w for w in widths)] + [fmt(c) for c in cells[1:]]
    for r in reports:
        if r.truncated:
            cut = f"{r.prompt_tokens_cut} prompt tokens cut"
            if r.completion_tokens_cut:
                cut += f", {r.completion_tokens_cut} completion tokens (eos included) cut by data.decoder_max_length"
            out.append(f"  {r.path}: {r.truncated} truncated to max_length={r.max_length} "
                       f"({cut}; {_lines(r.truncated_lines, r.truncated)})")
        for reason, n in sorted(r.dropped.items()):
            out.append(f"  {r.path}: {n} dropped, {reason} ({_lines(r.dropped_lines[reason], n)})")
        if r.held_out:
            out.append(f"  {r.path}: {r.held_out} of the {r.kept} kept samples held out of training for "
                       f"validation ({r.held_out_note})")
    return "\n".join(out)
