"""A checkpoint directory as one ``.tar`` file (DESIGN.md: "a `.tar` of it is accepted and produced on
request"), for object stores and copying between clusters.

Plain (uncompressed) tar: weights do not compress, and an uncompressed archive streams at disk speed.
Writing is atomic (``NAME.tar.tmp-PID`` renamed into place). Reading unpacks once per archive version
(path, size, mtime) into ``$FRAMEWORK_CACHE/unpacked/`` under a file lock, so ranks that start together
unpack it once and later runs reuse it; members that would land outside the target (absolute paths,
``..``, links) are refused by the ``data`` extraction filter.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tarfile
from pathlib import Path

from framework.runtime.shared_files import cache_root, file_lock

SUFFIX = ".tar"
_DONE = ".unpacked"


class ArchiveError(ValueError):
    """An archive that is not a checkpoint, is damaged, or holds unsafe members."""


def is_archive(path) -> bool:
    return str(path).endswith(SUFFIX)


def pack(directory, tar_path) -> Path:
    """Write ``directory``'s contents to ``tar_path`` (members relative to the directory)."""
    directory, tar_path = Path(directory), Path(tar_path)
    if not directory.is_dir():
        raise ArchiveError(f"{directory} is not a directory")
    tar_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = tar_path.with_name(f".{tar_path.name}.tmp-{os.getpid()}")
    try:
        with tarfile.open(tmp, "w") as tar:
            for item in sorted(directory.rglob("*")):
                tar.add(item, arcname=str(item.relative_to(directory)), recursive=False)
        os.replace(tmp, tar_path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return tar_path


def _target(tar_path: Path) -> Path:
    st = tar_path.stat()
    key = hashlib.sha256(f"{tar_path.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:16]
    return cache_root() / "unpacked" / f"{tar_path.stem}-{key}"


def unpacked(path) -> Path:
    """``path`` itself for a directory; for a ``.tar``, the directory it unpacks to (unpacked on first use)."""
    path = Path(path)
    if not is_archive(path):
        return path
    if not path.is_file():
        raise ArchiveError(f"{path} does not exist")
    target = _target(path)
    if (target / _DONE).is_file():
        return target
    with file_lock(target.with_name(target.name + ".lock")):
        if (target / _DONE).is_file():
            return target
        if target.exists():  # a half-unpacked leftover of a crash
            shutil.rmtree(target)
        tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
        try:
            with tarfile.open(path, "r:") as tar:
                tar.extractall(tmp, filter="data")
            (tmp / _DONE).write_text(str(path))
            os.replace(tmp, target)
        except tarfile.FilterError as e:  # a TarError too: test it first
            raise ArchiveError(f"{path} holds an unsafe member: {e}") from None
        except (tarfile.TarError, EOFError) as e:
            raise ArchiveError(f"{path} is not a readable tar archive (truncated or damaged?): {e}") from None
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    return target
