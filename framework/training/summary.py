"""The table printed at the end of a run."""

from __future__ import annotations


def table(rows: list[tuple[str, str]], title: str) -> str:
    width = max(len(k) for k, _ in rows)
    vwidth = max(len(v) for _, v in rows)
    line = "+" + "-" * (width + 2) + "+" + "-" * (vwidth + 2) + "+"
    out = [title, line] + [f"| {k:<{width}} | {v:<{vwidth}} |" for k, v in rows] + [line]
    return "\n".join(out)


def summary_table(result, rt) -> str:
    r = result
    rows = [
        ("steps", str(r.steps)),
        ("layout", f"TP={rt.tp} PP={rt.pp} DP={rt.dp} SP={'on' if rt.sp else 'off'} ({rt.backend}, {rt.device.type})"),
        ("tokens/s", f"{r.tokens_per_s:,.0f}"),
        ("train loss first -> last", f"{r.train_losses[0]:.4f} -> {r.train_losses[-1]:.4f}"),
        ("validation loss before -> after", f"{r.val_loss_before:.4f} -> {r.val_loss_after:.4f}"),
        ("trainable / total parameters",
         f"{r.trainable_params:,} / {r.total_params:,} ({100 * r.trainable_params / r.total_params:.2f}%)"),
        ("run directory", r.output_dir),
    ]
    if r.adapter_dir:
        rows.append(("adapter", r.adapter_dir))
    text = table(rows, "Run summary")
    if r.completion_before is not None:
        text += ("\n\nHeld-out prompt, greedy completion WITHOUT the adapter (base model):\n"
                 f"{r.completion_before!r}\n\nWITH the adapter:\n{r.completion_after!r}")
    return text
