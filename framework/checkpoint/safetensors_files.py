"""Opening a safetensors file so that a truncated or corrupted one is a clear error naming the file."""

from __future__ import annotations

from safetensors import safe_open


def open_safetensors(path, error: type[Exception]):
    """``safe_open(path)`` as a context manager; a file that cannot be read raises ``error`` with its path,
    instead of safetensors' own message from deep inside the reader."""
    try:
        return safe_open(str(path), framework="pt")
    except Exception as e:  # safetensors raises SafetensorError, OSError or ValueError depending on the damage
        raise error(f"{path} cannot be read (truncated or corrupted?): {e}") from None
