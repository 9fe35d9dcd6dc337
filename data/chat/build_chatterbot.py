"""Build ``data/chat/{train,val}.jsonl`` (``messages`` format) from the English ChatterBot corpus.

Source: the PyPI package ``chatterbot-corpus==1.3.3`` (BSD-3-Clause, Copyright (c) 2016, Gunther Cox),
files ``chatterbot_corpus/data/english/*.yml``. Each YAML ``conversations`` entry is a list of turns that
alternate user, assistant, user, ...; it becomes one ``{"messages": [...], "source": "<file>:<index>"}``
record (a trailing unanswered user turn is dropped, as are entries with fewer than two turns). Everything is
read as text (YAML ``BaseLoader``, so "yes" stays "yes"); leading/trailing whitespace is stripped.
Split: record ``i`` (0-based, in sorted-file then corpus order) goes to ``val.jsonl`` when ``i % 10 == 3``.

Usage: ``pip install --no-deps chatterbot-corpus==1.3.3 pyyaml`` then ``python data/chat/build_chatterbot.py``
(or ``--corpus DIR`` pointing at an unpacked ``chatterbot_corpus/data/english``). Deterministic: re-running
reproduces the committed files byte for byte.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import yaml

OUT = Path(__file__).resolve().parent


def corpus_dir() -> Path:
    import chatterbot_corpus

    return Path(chatterbot_corpus.__file__).resolve().parent / "data" / "english"


def records(directory: Path):
    for path in sorted(directory.glob("*.yml")):
        doc = yaml.load(path.read_text(encoding="utf-8"), Loader=yaml.BaseLoader)
        for k, conv in enumerate(doc.get("conversations") or []):
            turns = [t.strip() for t in conv if isinstance(t, str) and t.strip()]
            if len(turns) != len(conv):
                continue  # nested or empty turns: not a plain dialogue
            turns = turns[: len(turns) // 2 * 2]
            if len(turns) < 2:
                continue
            messages = [{"role": "user" if j % 2 == 0 else "assistant", "content": t} for j, t in enumerate(turns)]
            yield {"messages": messages, "source": f"{path.name}:{k}"}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--corpus", type=Path, default=None, help="directory of the English *.yml files")
    args = ap.parse_args()
    recs = list(records(args.corpus or corpus_dir()))
    splits = {"train": [], "val": []}
    for i, r in enumerate(recs):
        splits["val" if i % 10 == 3 else "train"].append(r)
    for name, rows in splits.items():
        with open(OUT / f"{name}.jsonl", "w", encoding="utf-8", newline="\n") as f:
            for r in rows:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
        print(f"{name}.jsonl: {len(rows)} conversations")


if __name__ == "__main__":
    main()
