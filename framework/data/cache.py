"""Tokenise-once cache: a data file's kept samples as memory-mapped arrays, reused across runs and ranks.

One entry, ``CACHE_DIR/KEY/``:

- ``tokens.bin``: the token ids of every kept sample, concatenated (``uint16`` when the vocabulary fits,
  else ``uint32``);
- ``loss_mask.bin``: one ``uint8`` per token (1 = target), aligned with ``tokens.bin``;
- ``offsets.bin``: ``int64``, ``num_samples + 1`` entries; sample ``i`` is ``[offsets[i], offsets[i + 1])``;
- ``manifest.json``: format version, token dtype, counts, the file's ``FileReport`` (without its path, so
  a cache hit reports exactly what the tokenisation found) and the key's parts, readable.

``CachedSamples`` maps the arrays read-only and behaves like the ``list[Sample]`` of an uncached run
(``len``, indexing, iteration), so batching and packing take either; the OS pages in only what a batch
touches, so a data set larger than memory trains. Building streams too: samples go to disk in chunks of
``FLUSH_TOKENS`` tokens.

Key: SHA-256 over

- the cache format version and the code that turns records into tokens (the source of
  ``TOKENISING_MODULES``, the installed ``tokenizers`` and ``jinja2`` versions);
- the data file's bytes (not its path or mtime: a copy hits the same entry, an edit never does);
- the tokenizer (``Tokenizer.fingerprint``: its files, special tokens and chat template);
- the format and every option its tokeniser takes (``max_length``, ``truncation_side``; for ``messages``
  also ``loss_on`` and the chat template in effect).

Change any of them and the key changes, so a stale entry is never read. Old entries stay until the cache
directory is deleted.

Building once across processes: a process that finds no complete entry takes an exclusive ``flock`` on
``CACHE_DIR/KEY.lock`` (ranks start before any process group exists, so a file lock is what they share),
checks again, and if the entry is still missing tokenises into a hidden temporary directory beside it and
renames that into place (``framework.runtime.atomic``). The others wait on the lock, then map the
finished entry. An entry is complete only when ``manifest.json`` (written last) parses and every array has
the size it records; a crash leaves at most a ``.KEY.tmp-*`` directory, never read, removed by the next
builder of that key.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import json
import logging
import os
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np

from framework.runtime.atomic import atomic_directory
from framework.runtime.errors import ConfigError
from framework.data.report import FileReport
from framework.data.sample import Sample
from framework.data.views import sample_index
from framework.runtime.shared_files import cache_root, file_lock

log = logging.getLogger("framework.data")

FORMAT_VERSION = 1
# framework/data modules whose code decides the tokens or the stored layout: editing one invalidates entries.
TOKENISING_MODULES = ("cache.py", "chat.py", "chat_template.py", "jsonl.py", "prompt_completion.py",
                      "report.py", "sample.py", "seq2seq.py", "tokenizer.py")
MANIFEST, TOKENS, LOSS_MASK, OFFSETS = "manifest.json", "tokens.bin", "loss_mask.bin", "offsets.bin"
FLUSH_TOKENS = 1 << 20  # tokens held in memory while building before they are appended to the arrays


def default_dir() -> Path:
    """``$FRAMEWORK_CACHE/data``, default ``~/.cache/megatron-finetune/data``."""
    return cache_root() / "data"


def _sha256_file(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


@functools.cache
def _code_fingerprint() -> str:
    h = hashlib.sha256()
    here = Path(__file__).parent
    for name in TOKENISING_MODULES:
        h.update(name.encode() + b"\0" + (here / name).read_bytes())
    for package in ("tokenizers", "jinja2"):
        try:
            version = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            version = "absent"
        h.update(f"\0{package}=={version}".encode())
    return h.hexdigest()


def cache_key(data_file, tokenizer, options: dict) -> tuple[str, dict]:
    """``(key, parts)``: the entry name for ``data_file`` tokenised by ``tokenizer`` with ``options``
    (JSON values naming everything the format's tokeniser takes), and what went into it."""
    parts = {"version": FORMAT_VERSION, "code": _code_fingerprint(), "data_sha256": _sha256_file(data_file),
             "tokenizer": tokenizer.fingerprint(), "options": options}
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:32], parts


def _token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16 if vocab_size <= 1 << 16 else np.uint32)


def _map(path: Path, dtype, count: int) -> np.ndarray:
    if count == 0:  # mmap refuses empty files
        return np.zeros(0, dtype=dtype)
    return np.memmap(path, dtype=dtype, mode="r", shape=(count,))


def read_manifest(entry: Path) -> dict | None:
    """The manifest of a complete entry, else None (missing, unparseable, another version, short arrays)."""
    try:
        manifest = json.loads((entry / MANIFEST).read_text(encoding="utf-8"))
        n, t = int(manifest["num_samples"]), int(manifest["num_tokens"])
        sizes = {TOKENS: t * np.dtype(manifest["token_dtype"]).itemsize, LOSS_MASK: t, OFFSETS: 8 * (n + 1)}
        if manifest["version"] != FORMAT_VERSION:
            return None
        if any((entry / name).stat().st_size != size for name, size in sizes.items()):
            return None
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return manifest


class CachedSamples(Sequence):
    """The samples of one cache entry, memory-mapped: ``len``, ``[i]`` -> ``Sample``, iteration."""

    def __init__(self, entry: str | os.PathLike):
        self.entry = Path(entry)
        manifest = read_manifest(self.entry)
        if manifest is None:
            raise ValueError(f"{self.entry}: not a complete data cache entry")
        self.manifest = manifest
        n, t = manifest["num_samples"], manifest["num_tokens"]
        self._tokens = _map(self.entry / TOKENS, np.dtype(manifest["token_dtype"]), t)
        self._mask = _map(self.entry / LOSS_MASK, np.uint8, t)
        self._offsets = _map(self.entry / OFFSETS, np.int64, n + 1)

    def __len__(self) -> int:
        return len(self._offsets) - 1

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        i = sample_index(i, len(self))
        a, b = int(self._offsets[i]), int(self._offsets[i + 1])
        return Sample(self._tokens[a:b].tolist(), self._mask[a:b].tolist())

    def lengths(self) -> np.ndarray:
        """Token count of every sample, without reading the tokens."""
        return np.diff(self._offsets)

    def report(self, path: str | os.PathLike) -> FileReport:
        """The report stored at build time, under ``path`` (the name the data file has in this run)."""
        return FileReport.from_dict(os.fspath(path), self.manifest["report"])

    def __reduce__(self):  # pickled as its location, never as a copy of the arrays
        return (CachedSamples, (self.entry,))

    def __repr__(self) -> str:
        return f"CachedSamples({len(self)} samples, {self.manifest['num_tokens']} tokens, {self.entry})"


class _Writer:
    """Appends samples to the three arrays of an entry being built, a chunk at a time."""

    def __init__(self, directory: Path, token_dtype: np.dtype):
        self._files = [open(directory / name, "wb") for name in (TOKENS, LOSS_MASK, OFFSETS)]
        self._dtypes = (token_dtype, np.uint8, np.int64)
        self._ids, self._mask, self._offsets = [], [], [0]
        self.num_samples = self.num_tokens = 0

    def append(self, sample: Sample) -> None:
        self._ids.extend(sample.input_ids)
        self._mask.extend(sample.loss_mask)
        self.num_samples += 1
        self.num_tokens += len(sample)
        self._offsets.append(self.num_tokens)
        if len(self._ids) >= FLUSH_TOKENS:
            self.flush()

    def flush(self) -> None:
        for f, values, dtype in zip(self._files, (self._ids, self._mask, self._offsets), self._dtypes):
            np.asarray(values, dtype=dtype).tofile(f)  # an id that does not fit the dtype raises
        self._ids, self._mask, self._offsets = [], [], []

    def close(self) -> None:
        for f in self._files:
            f.close()


def _build(entry: Path, report: FileReport, samples: Iterator[Sample], token_dtype: np.dtype,
           parts: dict) -> None:
    for leftover in entry.parent.glob(f".{entry.name}.tmp-*"):  # a crashed builder's; we hold the lock
        shutil.rmtree(leftover, ignore_errors=True)
    with atomic_directory(entry) as tmp:
        writer = _Writer(tmp, token_dtype)
        try:
            for sample in samples:
                writer.append(sample)
            writer.flush()
        finally:
            writer.close()
        manifest = {"version": FORMAT_VERSION, "num_samples": writer.num_samples, "num_tokens": writer.num_tokens,
                    "token_dtype": token_dtype.name, "report": report.to_dict(), "key": parts}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n", encoding="utf-8")


def load_or_build(cache_dir: str | os.PathLike, data_file: str | os.PathLike, tokenizer, options: dict,
                  tokenize: Callable[[FileReport], Iterator[Sample]]) -> tuple[CachedSamples, FileReport]:
    """The cached samples and report of ``data_file``, tokenising it (``tokenize(report)`` yields the kept
    samples and fills ``report``) only when no process has done so for the same key.
    A ``DataError`` while tokenising propagates and leaves no entry."""
    cache_dir = Path(cache_dir)
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"data.cache_dir={cache_dir}: cannot create the data cache ({e.strerror}); set "
                          "data.cache_dir to a writable directory, or to null to tokenise without a cache") from None
    key, parts = cache_key(data_file, tokenizer, options)
    entry = cache_dir / key
    if read_manifest(entry) is None:
        with file_lock(cache_dir / f"{key}.lock"):
            if read_manifest(entry) is None:  # nobody built it while we waited for the lock
                start = time.monotonic()
                report = FileReport(path=os.fspath(data_file), max_length=options.get("max_length"))
                _build(entry, report, tokenize(report), _token_dtype(tokenizer.vocab_size), parts)
                log.info("%s: tokenised into the data cache %s (%.1f s)", data_file, entry,
                         time.monotonic() - start)
    samples = CachedSamples(entry)
    log.info("%s: %d samples mapped from the data cache %s", data_file, len(samples), entry)
    return samples, samples.report(data_file)
