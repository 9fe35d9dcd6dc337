"""Training checkpoints of a run: where they live, how one is written safely, which to keep, where to resume.

    OUTPUT_DIR/checkpoints/step-000012/adapters/NAME/   (or weights/ for peft.method=none)
                                       train_state/     (framework/training/train_state.py)
                           latest                       text file: the name of the newest complete checkpoint
                           best                         text file: the checkpoint with the best validation loss

Crash safety. A checkpoint is written into a hidden ``.step-NNNNNN.tmp-*`` directory beside its final
name and renamed into place (``framework/runtime/atomic.py``) only after every rank has finished and
``train_state/state.json`` (written last) exists; then ``latest`` (and ``best``) are replaced atomically
(a temporary file + ``os.replace``). A process killed at any moment therefore leaves the previous complete
checkpoint under its name and at most a hidden temporary directory, which is ignored and removed when the
run starts again. All ranks must see the same filesystem (as for megatron dist_checkpointing).

Pruning. After each save, only the ``keep_last`` newest checkpoints (by step) and the one ``best`` names
are kept.

Background saves (``trainer.async_save``). The writer of a checkpoint may hand parts of it to megatron's
async dist_checkpointing as ``AsyncRequest``s (the train state hands over the optimizer state, the bulk of
a checkpoint). Each request is scheduled on a megatron ``AsyncCallsQueue``: its tensors are staged to host
memory and a forked process writes them (the fork is the snapshot: training goes on changing the tensors
in place). Its finalize functions run on every rank only once every rank's writer has finished: megatron's
own (the ``.metadata`` and ``metadata.json`` of the optimizer directory), then the train state's
``state.json``, and last the publication above (rename, ``latest``/``best``, pruning). A checkpoint is
therefore never visible under its name before all of it is on disk, and a crash before finalization leaves
the previous checkpoint as ``latest`` and the new one as a hidden temporary directory. At most one
checkpoint is in flight: a save first finalizes the previous one, the job polls (without blocking) after
every step and finalizes (blocking) before it exits (:meth:`Checkpoints.finalize`). On a CPU the same path
runs with gloo (the CPU compatibility layer serves megatron's ``torch.cuda`` calls of
``strategies/async_utils.py``); the writer is megatron's ``TemporalAsyncCaller`` (a fork per save), not its
persistent worker, whose spawned process calls ``torch.cuda.set_device``.

Resume. ``trainer.resume=auto`` continues from the newest complete checkpoint under OUTPUT_DIR/checkpoints
(none: a fresh start); ``never`` starts afresh (earlier checkpoints in OUTPUT_DIR are removed, so that a
later auto-resume cannot pick them up); a path resumes from that checkpoint directory (or the newest one
of a ``checkpoints`` directory).
"""

from __future__ import annotations

import functools
import logging
import os
import re
import shutil
from pathlib import Path
from typing import Callable

import torch.distributed as dist

from framework.runtime.atomic import publish, temp_dir_beside
from framework.runtime.errors import ConfigError
from framework.training.train_state import STATE_FILE

log = logging.getLogger("framework.checkpointing")

CHECKPOINTS_DIR = "checkpoints"
TRAIN_STATE_DIR = "train_state"
LATEST, BEST = "latest", "best"
_STEP_DIR = re.compile(r"^step-(\d+)$")
_LEFTOVER = re.compile(r"^\.(step-\d+|latest|best)\.(tmp|old)-")


def step_dir_name(step: int) -> str:
    return f"step-{step:06d}"


def is_complete(path: Path) -> bool:
    """A checkpoint directory whose train state was written to the end (it is renamed into place only then)."""
    return (Path(path) / TRAIN_STATE_DIR / STATE_FILE).is_file()


class Checkpoints:
    """The checkpoints directory of one run (``OUTPUT_DIR/checkpoints``)."""

    def __init__(self, root, async_save: bool = False):
        self.root = Path(root)
        self.async_save = async_save  # write() returns AsyncRequests: schedule them instead of running them now
        self._queue = None            # megatron's AsyncCallsQueue, once a background save was scheduled

    # -- reading ------------------------------------------------------------------------------------------
    def complete(self) -> dict[int, Path]:
        """{step: directory} of every complete checkpoint, ascending."""
        if not self.root.is_dir():
            return {}
        found = {int(m.group(1)): p for p in self.root.iterdir()
                 if (m := _STEP_DIR.match(p.name)) and p.is_dir() and is_complete(p)}
        return dict(sorted(found.items()))

    def newest(self) -> Path | None:
        done = self.complete()
        return done[max(done)] if done else None

    def pointer(self, name: str) -> Path | None:
        """The checkpoint directory the ``latest``/``best`` file names, if it names an existing one."""
        try:
            target = self.root / (self.root / name).read_text().strip()
        except OSError:
            return None
        return target if _STEP_DIR.match(target.name) and target.is_dir() else None

    # -- writing (global rank 0 only) ------------------------------------------------------------------
    def remove_leftovers(self) -> list[str]:
        """Delete hidden temporary directories and pointer files left by a process killed mid-save."""
        removed = []
        if self.root.is_dir():
            for p in self.root.iterdir():
                if not _LEFTOVER.match(p.name):
                    continue
                if p.is_dir():
                    shutil.rmtree(p, ignore_errors=True)
                else:
                    p.unlink(missing_ok=True)
                removed.append(p.name)
        return removed

    def set_pointer(self, name: str, target: Path) -> None:
        tmp = self.root / f".{name}.tmp-{os.getpid()}"
        with open(tmp, "w") as f:
            f.write(target.name + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.root / name)

    def prune(self, keep_last: int | None) -> list[Path]:
        """Delete all but the ``keep_last`` newest checkpoints and the best; returns what was deleted."""
        if keep_last is None:
            return []
        done = self.complete()
        keep = set(sorted(done)[-keep_last:])
        best = self.pointer(BEST)
        removed = [p for s, p in done.items() if s not in keep and p != best]
        for p in removed:
            # rename first so a half-deleted directory never looks like a checkpoint
            trash = self.root / f".{p.name}.old-{os.getpid()}"
            os.replace(p, trash)
            shutil.rmtree(trash, ignore_errors=True)
        return removed

    def remove_all(self) -> None:
        if self.root.is_dir():
            trash = self.root.parent / f".{self.root.name}.old-{os.getpid()}"
            os.replace(self.root, trash)
            shutil.rmtree(trash, ignore_errors=True)

    # -- one save, all ranks -------------------------------------------------------------------------------
    def save(self, step: int, write: Callable[[Path], list | None], *, best: bool, keep_last: int | None) -> Path:
        """Write checkpoint ``step`` with ``write(tmp_dir)`` (a collective: every rank calls it with the same
        directory), then publish it, point ``latest`` (and ``best``) at it and prune. All ranks call.

        ``write`` returns the megatron ``AsyncRequest``s of what it left unwritten (None: nothing); their
        finalize functions must complete the directory. With ``async_save`` they are scheduled in the
        background and the checkpoint is published when :meth:`finalize` finds them done on every rank;
        otherwise they run here. The previous background save is finalized first."""
        self.finalize()
        target = self.root / step_dir_name(step)
        box = [str(temp_dir_beside(target)) if dist.get_rank() == 0 else None]
        dist.broadcast_object_list(box, src=0)
        tmp = Path(box[0])
        try:
            requests = list(write(tmp) or [])
            background = self.async_save and bool(requests)
            for request in [] if background else requests:
                request.execute_sync()
        except BaseException:
            self._discard(tmp)
            raise
        finish = functools.partial(self._publish, tmp, target, best, keep_last, background)
        if not background:
            finish()
            return target
        from megatron.core.dist_checkpointing.strategies.async_utils import AsyncCallsQueue

        if self._queue is None:
            self._queue = AsyncCallsQueue(persistent=False)
        requests[-1].add_finalize_fn(finish)  # after the request's own finalization (state.json last)
        for request in requests:
            self._queue.schedule_async_request(request)
        return target

    def finalize(self, blocking: bool = True) -> list[int]:
        """Publish the background saves that every rank has finished writing (``blocking``: wait for all of
        them); returns megatron's indices of the finalized calls. All ranks call (it is a collective when a
        save is pending). Raises megatron's CheckpointException if a rank's writer failed."""
        if self._queue is None or not self._queue.get_num_unfinalized_calls():
            return []
        return self._queue.maybe_finalize_async_calls(blocking=blocking)

    @property
    def pending(self) -> int:
        """Background saves not yet finalized."""
        return 0 if self._queue is None else self._queue.get_num_unfinalized_calls()

    def _publish(self, tmp: Path, target: Path, best: bool, keep_last: int | None, background: bool) -> None:
        """Every rank has written ``tmp`` completely: rename it to ``target``, set the pointers, prune."""
        dist.barrier()
        try:
            if dist.get_rank() == 0:
                if not is_complete(tmp):
                    raise RuntimeError(f"checkpoint {tmp} has no {TRAIN_STATE_DIR}/{STATE_FILE} after writing")
                publish(tmp, target)
                self.set_pointer(LATEST, target)
                if best:
                    self.set_pointer(BEST, target)
                for p in self.prune(keep_last):
                    log.debug("removed checkpoint %s (trainer.keep_last=%s)", p, keep_last)
                if background:
                    log.info("checkpoint %s written in the background and published", target)
        finally:
            self._discard(tmp)
        dist.barrier()

    @staticmethod
    def _discard(tmp: Path) -> None:
        if dist.get_rank() == 0 and tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)

    # -- where to resume ------------------------------------------------------------------------------------
    def resume_point(self, resume) -> Path | None:
        """The checkpoint directory to continue from for ``trainer.resume`` (read-only: every rank may call)."""
        if resume in (None, "never"):
            return None
        if resume == "auto":
            newest = self.newest()
            pointed = self.pointer(LATEST)
            if newest is not None and pointed is not None and pointed != newest:
                log.info("checkpoints/latest names %s but %s is newer and complete; resuming from the newer one",
                         pointed.name, newest.name)
            return newest
        path = Path(str(resume))
        if path.is_file() and path.name in (LATEST, BEST):  # a pointer file
            target = Checkpoints(path.parent).pointer(path.name)
            path = target if target is not None else path
        elif path.is_dir() and not is_complete(path) and Checkpoints(path).complete():  # a checkpoints dir
            path = Checkpoints(path).newest()
        if not is_complete(path):
            raise ConfigError(f"trainer.resume={resume}: not a complete checkpoint (expected a directory with "
                              f"{TRAIN_STATE_DIR}/{STATE_FILE}, a checkpoints directory, or its latest/best file)")
        return path.absolute()
