"""Atomic directory writes: build beside the target, then swap into place with ``os.replace``.

A crash while writing leaves only a hidden ``.NAME.tmp-*`` directory; the previous ``NAME`` stays
loadable. Replacing an existing ``NAME`` moves it aside first (``.NAME.old-PID``), then renames the new one
in and deletes the old one, so a reader sees either the old or the new complete directory under ``NAME``,
except during the instant between the two renames, when the old one is still whole at ``.NAME.old-PID``.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path


def temp_dir_beside(target: Path) -> Path:
    """A fresh hidden directory on the same filesystem as ``target`` (so the final rename is atomic)."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))


def publish(tmp: Path, target: Path) -> None:
    """Move the finished ``tmp`` to ``target``, replacing any previous ``target``."""
    target = Path(target)
    old = None
    if target.exists():
        old = target.parent / f".{target.name}.old-{os.getpid()}"
        os.replace(target, old)
    os.replace(tmp, target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def atomic_directory(target):
    """``with atomic_directory(path) as tmp: write files into tmp`` -- published only if the block succeeds."""
    tmp = temp_dir_beside(Path(target))
    try:
        yield tmp
        publish(tmp, Path(target))
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
