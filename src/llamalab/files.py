"""User files read with a bound, and the sha256 that manifests and locks record of them."""

from __future__ import annotations

import hashlib
from pathlib import Path

from llamalab.errors import LlamalabError


def read_file_bounded(path: Path, limit: int) -> bytes:
    """The bytes of a user's file, refusing what is missing, not a file, or over ``limit``.

    The size is checked before reading, and the read stops one byte past the limit, so a
    file that grows meanwhile (or a device that never ends) cannot take more memory.
    """
    path = Path(path)
    try:
        if not path.is_file():
            raise LlamalabError(f"{path}: no such file")
        size = path.stat().st_size
        if size > limit:
            raise LlamalabError(f"{path}: {size} bytes, more than the {limit} allowed")
        with open(path, "rb") as f:
            data = f.read(limit + 1)
    except OSError as exc:
        raise LlamalabError(f"{path}: cannot read: {exc.strerror or exc}") from None
    if len(data) > limit:
        raise LlamalabError(f"{path}: more than the {limit} bytes allowed")
    return data


def file_sha256(path: str | Path, block: int = 1 << 20) -> str:
    """The hex sha256 of the file at ``path``, read ``block`` bytes at a time."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(block):
            h.update(chunk)
    return h.hexdigest()
