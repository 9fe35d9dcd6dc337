"""safetensors files read and written one tensor at a time, with plain file I/O (no memory map).

Reading: ``safe_open`` memory-maps the file, and every page a tensor touches then counts in the process's
resident memory until the handle is closed, so reading a whole model through open handles grows the
resident set to the model's size. :class:`SafetensorsReader` parses the header itself and reads each
tensor with ``os.preadv`` straight into a fresh tensor: the page cache holds the file, the process holds
one tensor. ``pread`` has no shared file position, so several threads may read at once.

Writing: a safetensors file starts with a JSON header holding every tensor's dtype, shape and byte range,
so a writer must know all tensors before the first byte of data. :class:`SafetensorsStreamWriter` takes
that list up front (names, dtypes and shapes are known from the model config), writes the header, then
appends each tensor's bytes as it arrives, in the listed order. Format: 8-byte little-endian header
length, the header (padded with spaces to a multiple of 8), then the tensors' bytes back to back.
"""

from __future__ import annotations

import json
import os
import struct
import threading
from pathlib import Path

import torch

DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
          "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
          "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}
NAMES = {v: k for k, v in DTYPES.items()}
_MAX_HEADER = 100 * 2**20  # safetensors' own limit


def _byte_view(t: torch.Tensor):
    """A writable/readable uint8 numpy view of a contiguous tensor's bytes (no copy)."""
    return t.reshape(-1).view(torch.uint8).numpy()


class SafetensorsReader:
    """``reader.read(path, name)`` -> a new tensor holding that tensor of the file, read with ``preadv``.

    A file whose header cannot be parsed, a name it lacks or a byte range beyond its end raises ``error``
    (an exception class) naming the file and the tensor.
    """

    def __init__(self, error: type[Exception] = ValueError):
        self.error = error
        self._files: dict[Path, tuple[int, int, dict, int]] = {}  # path -> (fd, data start, header, size)
        self._lock = threading.Lock()

    def _open(self, path: Path):
        with self._lock:
            if path in self._files:
                return self._files[path]
            fd = os.open(path, os.O_RDONLY)
            try:
                size = os.fstat(fd).st_size
                head = os.pread(fd, 8, 0)
                n = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
                if n < 2 or n > _MAX_HEADER or 8 + n > size:
                    raise self.error(f"{path} cannot be read (truncated or corrupted?): bad header length")
                try:
                    header = json.loads(os.pread(fd, n, 8))
                except (UnicodeDecodeError, json.JSONDecodeError) as e:
                    raise self.error(f"{path} cannot be read (truncated or corrupted?): header: {e}") from None
            except BaseException:
                os.close(fd)
                raise
            self._files[path] = (fd, 8 + n, header, size)
            return self._files[path]

    def read(self, path, name: str) -> torch.Tensor:
        path = Path(path)
        fd, start, header, size = self._open(path)
        info = header.get(name)
        if not isinstance(info, dict):
            raise self.error(f"{path} holds no tensor {name!r}")
        try:
            dtype, shape, (begin, end) = DTYPES[info["dtype"]], list(info["shape"]), info["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise self.error(f"{path}: tensor {name!r} has a malformed header entry {info}") from None
        t = torch.empty(shape, dtype=dtype)
        nbytes = t.numel() * t.element_size()
        if end - begin != nbytes or start + end > size:
            raise self.error(f"{path}: tensor {name!r} ({info['dtype']} {shape}) has byte range {begin}..{end} "
                             f"(file data is {size - start} bytes): truncated or corrupted")
        if nbytes:
            view, offset = memoryview(_byte_view(t)), start + begin
            while len(view):
                got = os.preadv(fd, [view], offset)
                if got <= 0:
                    raise self.error(f"{path}: unexpected end of file reading tensor {name!r}")
                view, offset = view[got:], offset + got
        return t

    def close(self) -> None:
        with self._lock:
            for fd, *_ in self._files.values():
                os.close(fd)
            self._files.clear()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class SafetensorsStreamWriter:
    """One safetensors file of known ``entries`` [(name, dtype, shape)], written tensor by tensor in order."""

    def __init__(self, path, entries: list[tuple[str, torch.dtype, tuple]], metadata: dict | None = None):
        self.path = Path(path)
        self.entries = list(entries)
        header: dict = {"__metadata__": metadata} if metadata else {}
        offset = 0
        for name, dtype, shape in self.entries:
            n = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
            header[name] = {"dtype": NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + n]}
            offset += n
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        self.nbytes = offset
        self._next = 0
        self._f = open(self.path, "wb")
        self._f.write(struct.pack("<Q", len(raw)) + raw)

    def write(self, name: str, t: torch.Tensor) -> None:
        if self._next >= len(self.entries) or self.entries[self._next][0] != name:
            want = self.entries[self._next][0] if self._next < len(self.entries) else "nothing more"
            raise ValueError(f"{self.path.name}: tensor {name!r} written out of order (expected {want})")
        _, dtype, shape = self.entries[self._next]
        if t.dtype != dtype or tuple(t.shape) != tuple(shape):
            raise ValueError(f"{self.path.name}: tensor {name!r} is {t.dtype} {tuple(t.shape)}, the header says "
                             f"{dtype} {tuple(shape)}")
        if t.numel():
            self._f.write(memoryview(_byte_view(t.detach().cpu().contiguous())))
        self._next += 1

    def close(self) -> None:
        """Finish the file; every listed tensor must have been written."""
        self._f.close()
        if self._next != len(self.entries):
            raise ValueError(f"{self.path.name}: {len(self.entries) - self._next} tensor(s) not written, first "
                             f"{self.entries[self._next][0]!r}")

    def abort(self) -> None:
        self._f.close()
