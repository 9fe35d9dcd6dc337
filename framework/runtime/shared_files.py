"""Files that processes share before (or without) torch.distributed: the cache root and a file lock.

Ranks that start together on one node (before any process group exists) must not convert a model,
tokenise a data set or unpack an archive twice: the first takes an exclusive ``fcntl.flock`` and builds,
the others wait on the lock and then reuse what it built.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from pathlib import Path


def cache_root() -> Path:
    """$FRAMEWORK_CACHE, default ~/.cache/megatron-finetune."""
    return Path(os.environ.get("FRAMEWORK_CACHE") or Path.home() / ".cache" / "megatron-finetune").expanduser()


@contextlib.contextmanager
def file_lock(path: Path):
    """Exclusive advisory lock on ``path`` across processes (works before torch.distributed starts)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
