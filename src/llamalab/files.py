"""User files read with a bound, and the sha256 that manifests and locks record of them.

A path a user hands llamalab may name anything: a folder, a FIFO that nobody writes to
(opening it for reading would wait forever), ``/dev/zero`` (reading it never ends), a
socket. Every such path is refused with a message that says what it is, before and
after opening: the path is checked with ``stat`` first (so a device is never opened at
all), then opened without blocking and checked again on the open descriptor (so a
FIFO swapped in between cannot hang the read).
"""

from __future__ import annotations

import hashlib
import os
import stat
from typing import BinaryIO

from llamalab.errors import LlamalabError

UTF8_BOM = b"\xef\xbb\xbf"


def file_kind(mode: int) -> str:
    """What a ``st_mode`` names, in words: ``"a FIFO"``, ``"a character device"``, ..."""
    if stat.S_ISREG(mode):
        return "a regular file"
    if stat.S_ISDIR(mode):
        return "a folder"
    if stat.S_ISFIFO(mode):
        return "a FIFO (named pipe)"
    if stat.S_ISCHR(mode):
        return "a character device"
    if stat.S_ISBLK(mode):
        return "a block device"
    if stat.S_ISSOCK(mode):
        return "a socket"
    if stat.S_ISLNK(mode):
        return "a symbolic link"
    return "not a regular file"


def not_regular_message(path: str | os.PathLike[str], mode: int, expected: str = "file") -> str:
    """``"PATH: is a FIFO (named pipe), not a regular file"``: one line for an error."""
    kind = "a regular file" if expected == "file" else f"a regular file or {expected}"
    return f"{path}: is {file_kind(mode)}, not {kind}"


def check_regular_file(path: str | os.PathLike[str]) -> os.stat_result:
    """The ``stat`` of ``path``; a missing path or anything but a regular file is refused."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise LlamalabError(f"{path}: no such file") from None
    except OSError as exc:
        raise LlamalabError(f"{path}: cannot read: {exc.strerror or exc}") from None
    if not stat.S_ISREG(st.st_mode):
        raise LlamalabError(not_regular_message(path, st.st_mode))
    return st


def refuse_special(path: str | os.PathLike[str]) -> None:
    """Refuse a path that exists but is neither a regular file nor a folder, saying what it is.

    For references that may be a file or a folder (a model, a tokenizer): a missing path is
    left to the caller, whose message knows what was expected there.
    """
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return
    if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
        raise LlamalabError(not_regular_message(path, mode, "folder"))


def open_regular(path: str | os.PathLike[str]) -> BinaryIO:
    """``path`` opened for binary reading; it must be a regular file, and nothing blocks.

    Raises:
        LlamalabError: missing, unreadable, or not a regular file (the message says what
            it is instead).
    """
    check_regular_file(path)  # a device is never opened: opening some has side effects
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0)
    try:
        fd = os.open(path, flags | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise LlamalabError(f"{path}: no such file") from None
    except OSError as exc:
        raise LlamalabError(f"{path}: cannot read: {exc.strerror or exc}") from None
    try:
        # The path may have been replaced between the stat and the open.
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise LlamalabError(not_regular_message(path, mode))
        if hasattr(os, "set_blocking"):
            os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def read_file_bounded(path: str | os.PathLike[str], limit: int) -> bytes:
    """The bytes of a user's file, refusing what is missing, not a regular file, or over ``limit``.

    The size is checked before reading, and the read stops one byte past the limit, so a
    file that grows meanwhile cannot take more memory.
    """
    with open_regular(path) as f:
        try:
            size = os.fstat(f.fileno()).st_size
            if size > limit:
                raise LlamalabError(f"{path}: {size} bytes, more than the {limit} allowed")
            data = f.read(limit + 1)
        except OSError as exc:
            raise LlamalabError(f"{path}: cannot read: {exc.strerror or exc}") from None
    if len(data) > limit:
        raise LlamalabError(f"{path}: more than the {limit} bytes allowed")
    return data


def read_text_bounded(path: str | os.PathLike[str], limit: int, what: str = "file") -> str:
    """A user's UTF-8 text file, read as :func:`read_file_bounded` does.

    A leading byte-order mark is dropped: it marks the encoding and is no part of the
    text (editors on Windows write one). Bytes that are not UTF-8 are an error naming
    the first one and its offset.
    """
    raw = read_file_bounded(path, limit)
    data = strip_bom(raw)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        offset = exc.start + len(raw) - len(data)  # an offset into the file, BOM included
        raise LlamalabError(
            f"{path}: the {what} is not valid UTF-8 "
            f"(byte {data[exc.start]:#04x} at offset {offset})"
        ) from None


def strip_bom(data: bytes) -> bytes:
    """``data`` without a leading UTF-8 byte-order mark (U+FEFF), which is no part of the text."""
    return data.removeprefix(UTF8_BOM)


def file_sha256(path: str | os.PathLike[str], block: int = 1 << 20) -> str:
    """The hex sha256 of the regular file at ``path``, read ``block`` bytes at a time."""
    h = hashlib.sha256()
    with open_regular(path) as f:
        while chunk := f.read(block):
            h.update(chunk)
    return h.hexdigest()
