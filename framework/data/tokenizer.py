"""A tokenizer read from a Hugging Face style directory, using the ``tokenizers`` library only.

Directory layout (what ``save`` writes back):

- ``tokenizer.json`` (required): the full tokenizer (model, pre-tokenizer, added tokens).
- ``tokenizer_config.json`` (optional): ``bos_token``, ``eos_token``, ``pad_token`` as strings or as
  ``{"content": ...}`` objects, and ``chat_template``.
- ``special_tokens_map.json`` (optional): consulted for special tokens that the config does not name.
- ``chat_template.jinja`` (optional): where transformers 5 writes the chat template; used when the
  config has no ``chat_template``.

Rules: ``eos`` must exist (SFT samples end with it; generation stops on it). ``bos`` is optional: when
absent, samples simply do not start with one. ``pad`` falls back to ``eos``: padded positions never carry
loss, so which id fills them does not matter as long as it is a valid embedding row.
``vocab_size`` is the tokenizer's full size *including added tokens* (the number of embedding rows the
model needs at least); a model may pad it further for tensor-parallel divisibility.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

from framework.runtime.errors import TokenizerError

TOKENIZER_FILE = "tokenizer.json"
CONFIG_FILE = "tokenizer_config.json"
SPECIAL_TOKENS_FILE = "special_tokens_map.json"
TEMPLATE_FILE = "chat_template.jinja"
_FILES = (TOKENIZER_FILE, CONFIG_FILE, SPECIAL_TOKENS_FILE, TEMPLATE_FILE)


def _token_string(value, path: Path, key: str) -> str | None:
    """A special token as written by HF: a string, an AddedToken dict with "content", or null."""
    if value is None:
        return None
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    raise TokenizerError(path, None, f'expected a string or an object with "content" under "{key}", '
                                     f"got {type(value).__name__}")


def _read_json(path: Path) -> dict:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise TokenizerError(path, None, f"not UTF-8 ({e.reason} at byte {e.start})") from None
    except OSError as e:
        raise TokenizerError(path, None, f"cannot read: {e.strerror}") from None
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise TokenizerError(path, e.lineno, f"invalid JSON: {e.msg} (column {e.colno})") from None
    if not isinstance(obj, dict):
        raise TokenizerError(path, None, f"expected a JSON object, got {type(obj).__name__}")
    return obj


class Tokenizer:
    """Text <-> token ids, plus the special tokens SFT needs (bos, eos, pad)."""

    def __init__(self, backend, *, bos_token: str | None, eos_token: str | None, pad_token: str | None = None,
                 chat_template: str | None = None, source_dir: str | os.PathLike | None = None):
        self._tok = backend
        self.source_dir = Path(source_dir) if source_dir is not None else None
        self.bos_token, self.eos_token, self.pad_token = bos_token, eos_token, pad_token
        self.chat_template = chat_template  # kept for the chat format; not applied yet
        where = self.source_dir / CONFIG_FILE if self.source_dir else "tokenizer"
        if eos_token is None:
            raise TokenizerError(where, None, 'no eos_token: set "eos_token" in tokenizer_config.json '
                                              "(SFT samples end with it)")
        self._bos_id = self._require_id(bos_token, "bos_token", where)
        self._eos_id = self._require_id(eos_token, "eos_token", where)
        self._pad_id = self._require_id(pad_token, "pad_token", where) if pad_token is not None else self._eos_id

    def _require_id(self, token: str | None, key: str, where) -> int | None:
        if token is None:
            return None
        tid = self._tok.token_to_id(token)
        if tid is None:
            raise TokenizerError(where, None, f'{key} "{token}" is not in the vocabulary of tokenizer.json')
        return tid

    @classmethod
    def from_dir(cls, path: str | os.PathLike) -> "Tokenizer":
        """Load ``path/tokenizer.json`` and the special tokens from ``path/tokenizer_config.json``."""
        from tokenizers import Tokenizer as Backend

        path = Path(path)
        if not path.is_dir():
            raise TokenizerError(path, None, "is a file, expected a tokenizer directory" if path.exists()
                                 else "tokenizer directory not found")
        tok_file = path / TOKENIZER_FILE
        if not tok_file.is_file():
            names = sorted(p.name for p in path.iterdir())
            found = ", ".join(names[:8]) + (f", ... ({len(names)} entries)" if len(names) > 8 else "")
            raise TokenizerError(path, None, f"no {TOKENIZER_FILE} in the tokenizer directory "
                                             f"(found: {found or 'nothing'})")
        try:
            backend = Backend.from_file(str(tok_file))
        except Exception as e:  # the Rust library raises a bare Exception for any malformed file
            first_line = str(e).splitlines()[0] if str(e) else repr(e)
            raise TokenizerError(tok_file, None, f"cannot load tokenizer: {first_line}") from None

        config: dict = {}
        for name in (SPECIAL_TOKENS_FILE, CONFIG_FILE):  # the config wins over the older special-tokens map
            f = path / name
            if f.is_file():
                config.update({k: v for k, v in _read_json(f).items() if v is not None})
        cfg_file = path / CONFIG_FILE
        tokens = {k: _token_string(config.get(k), cfg_file, k) for k in ("bos_token", "eos_token", "pad_token")}
        template = config.get("chat_template")
        if template is None and (path / TEMPLATE_FILE).is_file():
            try:
                template = (path / TEMPLATE_FILE).read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as e:
                raise TokenizerError(path / TEMPLATE_FILE, None, f"cannot read: {e}") from None
        if template is not None and not isinstance(template, (str, list)):
            raise TokenizerError(cfg_file, None,
                                 f'expected a string under "chat_template", got {type(template).__name__}')
        return cls(backend, chat_template=template, source_dir=path, **tokens)

    # --- text <-> ids -------------------------------------------------------------------------------

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``, with no special tokens added (samples add bos/eos themselves)."""
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        """Token ids of ``text`` (special tokens written in the text become their ids) and each token's
        character span, for mapping rendered chat turns onto tokens."""
        enc = self._tok.encode(text, add_special_tokens=False)
        return list(enc.ids), list(enc.offsets)

    @property
    def special_tokens(self) -> set[str]:
        """The strings of every added special token (and eos)."""
        return {t.content for t in self._tok.get_added_tokens_decoder().values() if t.special} | {self.eos_token}

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    # --- special tokens and size --------------------------------------------------------------------

    @property
    def bos_id(self) -> int | None:
        return self._bos_id

    @property
    def eos_id(self) -> int:
        return self._eos_id

    @property
    def pad_id(self) -> int:
        return self._pad_id

    @property
    def vocab_size(self) -> int:
        """Full size including added/special tokens: the least number of embedding rows a model needs."""
        return self._tok.get_vocab_size(with_added_tokens=True)

    def __len__(self) -> int:
        return self.vocab_size

    def __repr__(self) -> str:
        return (f"Tokenizer(vocab_size={self.vocab_size}, bos={self.bos_token!r}, eos={self.eos_token!r}, "
                f"pad={self.pad_token or self.eos_token!r}, "
                f"source={str(self.source_dir) if self.source_dir else None})")

    def fingerprint(self) -> str:
        """SHA-256 of everything that decides this tokenizer's ids: the bytes of its source files (or its
        serialisation when built in memory), its special tokens and chat template; a cache key part."""
        h = hashlib.sha256()
        if self.source_dir is not None:
            for name in _FILES:
                if (self.source_dir / name).is_file():
                    h.update(f"{name}\0{(self.source_dir / name).stat().st_size}\0".encode())
                    h.update((self.source_dir / name).read_bytes())
        else:
            h.update(self._tok.to_str().encode())
        h.update(json.dumps([self.bos_token, self.eos_token, self.pad_token, self.chat_template]).encode())
        return h.hexdigest()

    # --- persistence --------------------------------------------------------------------------------

    def save(self, out_dir: str | os.PathLike) -> Path:
        """Write the files needed to rebuild this tokenizer offline into ``out_dir``.

        Files from the source directory are copied byte for byte (so fields we do not interpret, such
        as a chat template, survive); a tokenizer built in memory is serialised instead.
        """
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        copied = False
        if self.source_dir is not None and out.resolve() != self.source_dir.resolve():
            for name in _FILES:
                if (self.source_dir / name).is_file():
                    shutil.copyfile(self.source_dir / name, out / name)
                    copied = True
        elif self.source_dir is not None:
            copied = True  # saving onto its own source: nothing to do
        if not copied:
            self._tok.save(str(out / TOKENIZER_FILE))
            cfg = {"bos_token": self.bos_token, "eos_token": self.eos_token, "pad_token": self.pad_token}
            if self.chat_template is not None:
                cfg["chat_template"] = self.chat_template
            (out / CONFIG_FILE).write_text(json.dumps(cfg, indent=2) + "\n", encoding="utf-8")
        return out
