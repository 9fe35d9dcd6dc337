"""The rows every training job's summary table shares: steps and status, layout, parameters, checkpoints."""

from __future__ import annotations


def steps(r) -> str:
    """Steps done, and why the run stopped where it did when that was not the end."""
    if r.status == "stopped_early":
        return f"{r.steps} of {r.total_steps}: stopped early (no validation improvement; trainer.early_stopping)"
    if r.status == "paused":
        return f"{r.steps} of {r.total_steps}: paused (trainer.steps_per_run); run the same command to continue"
    return str(r.steps)


def layout(rt) -> str:
    return f"TP={rt.tp} PP={rt.pp} DP={rt.dp} SP={'on' if rt.sp else 'off'} ({rt.backend}, {rt.device.type})"


def parameters(r) -> str:
    return f"{r.trainable_params:,} / {r.total_params:,} ({100 * r.trainable_params / r.total_params:.2f}%)"


def checkpoint_rows(r) -> list[tuple[str, str]]:
    """The best checkpoint and the checkpoint this invocation resumed from, where there are any."""
    rows = []
    if r.best_checkpoint:
        rows.append(("best checkpoint", f"{r.best_checkpoint} (validation loss {r.best_val_loss:.4f} at step "
                                        f"{r.best_step})"))
    if r.resumed_from:
        rows.append(("resumed from", r.resumed_from))
    return rows
