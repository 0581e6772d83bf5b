"""Reading JSON Lines with bounds: a hostile or mistaken file gives a clear error, not a hang."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path

from llamalab import files
from llamalab.errors import LlamalabError

MAX_FILE_BYTES = 256 << 20
MAX_LINE_BYTES = 1 << 20
MAX_LINES = 1_000_000


def read_file_bounded(path: Path, limit: int = MAX_FILE_BYTES) -> bytes:
    """The bytes of a user's task file, at most ``limit`` (see :func:`llamalab.files.read_file_bounded`)."""
    return files.read_file_bounded(path, limit)


def iter_jsonl(data: bytes, source: str) -> Iterator[tuple[int, dict]]:
    """(0-based line number, object) for each non-blank line; an error names the line.

    A UTF-8 byte-order mark opening the data is skipped (editors on Windows write one).
    """
    lines = files.strip_bom(data).split(b"\n")
    if len(lines) > MAX_LINES:
        raise LlamalabError(f"{source}: more than {MAX_LINES} lines")
    for number, raw in enumerate(lines):
        if not raw.strip():
            continue
        where = f"{source}:{number + 1}"
        if len(raw) > MAX_LINE_BYTES:
            raise LlamalabError(f"{where}: line longer than {MAX_LINE_BYTES} bytes")
        try:
            obj = json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError:
            raise LlamalabError(f"{where}: not valid UTF-8") from None
        except (json.JSONDecodeError, RecursionError) as exc:
            raise LlamalabError(f"{where}: not valid JSON ({getattr(exc, 'msg', exc)})") from None
        except ValueError:  # Python's limit on integer digits (sys.get_int_max_str_digits)
            raise LlamalabError(
                f"{where}: holds a number of more than {sys.get_int_max_str_digits()} digits"
            ) from None
        if not isinstance(obj, dict):
            raise LlamalabError(f"{where}: expected a JSON object, got {type(obj).__name__}")
        yield number, obj
