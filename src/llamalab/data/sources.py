"""Named text sources: ``NAME=PATH`` where PATH is a file, a folder or a glob pattern."""

from __future__ import annotations

import glob
import re
from pathlib import Path

from llamalab.errors import LlamalabError
from llamalab.files import not_regular_message

SOURCE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


def parse_source_spec(spec: str) -> tuple[str, str]:
    """Split ``NAME=PATH``; the name becomes a file name, so it is kept to a safe alphabet."""
    name, sep, path = spec.partition("=")
    if not sep or not path:
        raise LlamalabError(f"expected NAME=PATH, got {spec!r}")
    if not SOURCE_NAME.match(name):
        raise LlamalabError(
            f"source name {name!r}: use letters, digits, '_', '-' or '.' (at most 64, "
            "starting with a letter or digit)"
        )
    return name, path


def expand_source(path: str) -> list[Path]:
    """The regular files a source path names, in a stable (sorted) order.

    A file is itself; a folder is every file under it, recursively, hidden ones
    (a name starting with ``.``) left out; anything else is a glob pattern (``**`` works).
    Only regular files are taken: a FIFO or device named directly is refused, one met in
    a folder or a pattern is passed over.
    """
    p = Path(path)
    if p.is_file():
        return [p]
    if p.is_dir():
        files = [
            f
            for f in p.rglob("*")
            if f.is_file() and not any(part.startswith(".") for part in f.relative_to(p).parts)
        ]
    elif p.exists():  # a FIFO or a device: reading it would wait forever or never end
        raise LlamalabError(not_regular_message(p, p.stat().st_mode, "folder"))
    elif glob.has_magic(path):
        files = [Path(f) for f in glob.glob(path, recursive=True) if Path(f).is_file()]
    else:
        raise LlamalabError(f"{path}: no such file or folder")
    if not files:
        raise LlamalabError(f"{path}: names no files")
    return sorted(files)


def parse_sources(specs: list[str]) -> dict[str, list[Path]]:
    """``{name: files}`` for ``NAME=PATH`` arguments; a name given twice is an error."""
    sources: dict[str, list[Path]] = {}
    for spec in specs:
        name, path = parse_source_spec(spec)
        if name in sources:
            raise LlamalabError(f"source {name!r} given twice")
        sources[name] = expand_source(path)
    if not sources:
        raise LlamalabError("no sources given (expected NAME=PATH ...)")
    return sources
