"""The table printed at the end of a run."""

from __future__ import annotations

import math


def table(rows: list[tuple[str, str]], title: str) -> str:
    width = max(len(k) for k, _ in rows)
    vwidth = max(len(v) for _, v in rows)
    line = "+" + "-" * (width + 2) + "+" + "-" * (vwidth + 2) + "+"
    out = [title, line] + [f"| {k:<{width}} | {v:<{vwidth}} |" for k, v in rows] + [line]
    return "\n".join(out)


def summary_table(result, rt) -> str:
    r = result
    rows = [
        ("steps", _steps(r)),
        ("layout", f"TP={rt.tp} PP={rt.pp} DP={rt.dp} SP={'on' if rt.sp else 'off'} ({rt.backend}, {rt.device.type})"),
        ("tokens/s", f"{r.tokens_per_s:,.0f}"),
        ("train loss first -> last", f"{r.train_losses[0]:.4f} -> {r.train_losses[-1]:.4f}"),
        ("validation loss before -> after", f"{r.val_loss_before:.4f} -> {_loss(r.val_loss_after)}"),
        ("trainable / total parameters",
         f"{r.trainable_params:,} / {r.total_params:,} ({100 * r.trainable_params / r.total_params:.2f}%)"),
        ("run directory", r.output_dir),
    ]
    if getattr(r, "test_loss", None) is not None:  # data.test, evaluated after training: next to validation
        at = 1 + next(i for i, (k, _) in enumerate(rows) if k.startswith("validation loss"))
        rows.insert(at, ("test loss (perplexity)", f"{r.test_loss:.4f} ({math.exp(r.test_loss):.2f})"))
    if r.adapter_dir:
        rows.append(("adapter", r.adapter_dir))
    rows += checkpoint_rows(r)
    text = table(rows, "Run summary")
    if r.completion_before is not None and r.completion_after is not None:
        text += ("\n\nHeld-out prompt, greedy completion WITHOUT the adapter (base model):\n"
                 f"{r.completion_before!r}\n\nWITH the adapter:\n{r.completion_after!r}")
    return text


def checkpoint_rows(r) -> list[tuple[str, str]]:
    """The best checkpoint and the checkpoint this invocation resumed from, where there are any."""
    rows = []
    if r.best_checkpoint:
        rows.append(("best checkpoint", f"{r.best_checkpoint} (validation loss {r.best_val_loss:.4f} at step "
                                        f"{r.best_step})"))
    if r.resumed_from:
        rows.append(("resumed from", r.resumed_from))
    return rows


def _steps(r) -> str:
    if r.status == "stopped_early":
        return f"{r.steps} of {r.total_steps}: stopped early (no validation improvement; trainer.early_stopping)"
    if r.status == "paused":
        return f"{r.steps} of {r.total_steps}: paused (trainer.steps_per_run); run the same command to continue"
    return str(r.steps)


def _loss(value) -> str:
    return "n/a" if value is None else f"{value:.4f}"
