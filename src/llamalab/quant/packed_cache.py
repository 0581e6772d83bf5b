"""Packed weights written once per model file, and memory-mapped on every later load.

Packing a GGUF file's weights into the layout llamalab's kernels read (``linear.pack_vnni``)
took seconds per load (211 layers for SmolLM2). The packed bytes depend only on the file
and on the packing code, so the first load writes them to a cache file, and every later
load maps that file: no packing, no copy, and the weights' resident pages are the page
cache's, shared with every process that maps the same file.

Where: ``$LLAMALAB_PACKED_CACHE``, else ``$LLAMALAB_CACHE/packed``, else
``~/.cache/llamalab/packed``, one file per model path (a changed model replaces its
file). ``LLAMALAB_PACKED_CACHE=0`` turns the cache off. The layout is the same whatever
instruction set runs it.

A cache file is never trusted: it is used only if its header (checked by its SHA-256)
names the same model file (path, size, mtime, inode, device and the SHA-256 of the GGUF
header and tensor table), the same packing code (a hash of the code that packs) and the
same format, if its size is exactly what the header says, every entry lies inside it
with the byte count its shape needs, and the CRC-32 of its data matches. Anything else
is rebuilt. The CRC-32 (0.5 s over a 0.9B model's 0.6 GB) is computed once per version of
the cache file: the writer, and the first load that checks it, leave a stamp beside it
(``NAME.llpack.checked``) with the file's size, mtime, ctime, inode and device, its
header's SHA-256 and its CRC; a later load whose file matches the stamp exactly skips the
CRC. Any write to the file moves its mtime and ctime (a write within the same clock tick
as the stamp could go unseen on kernels without fine-grained timestamps, before Linux
6.13), and anything else about the stamp that does not match means a full check. The
CRC guards against a damaged file; it is no defence against whoever may write the cache
folder, who could write a whole file with a matching CRC: the structural checks above
are what keep every read inside the file. Files are written under a temporary name and renamed, so a reader sees a
whole file or none, and a file already mapped is never written into (a rebuild makes a
new file). Everything here before :meth:`PackedFile.tensor` works without torch, so the
check runs while torch is still importing.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import mmap
import os
import stat
import struct
import sys
import tempfile
import threading
import zlib
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

__all__ = [
    "Entry",
    "PackedFile",
    "cache_dir",
    "cache_file_for",
    "code_version",
    "lookup",
    "model_identity",
    "prefetch",
    "write_packed",
]

MAGIC = b"LLPACK\x00\x01"
FORMAT_VERSION = 1
# magic, header length, SHA-256 of the header (JSON, UTF-8)
_PREFIX = struct.Struct("<8sQ32s")
_ALIGN = 4096  # the data starts on a page
_MAX_HEADER = 64 << 20  # far above any header (211 entries take about 30 KB)
# The code whose output the file holds: any change to it makes every cache file stale.
_PACKING_CODE = ("quant/linear.py", "quant/plan.py", "gguf/dequant.py")
KINDS = ("vnni", "rows")  # a packed linear weight; a GGUF tensor's rows as stored


def cache_dir() -> Path | None:
    """The folder of the packed-weight files, or None where ``$LLAMALAB_PACKED_CACHE=0``."""
    explicit = os.environ.get("LLAMALAB_PACKED_CACHE")
    if explicit in ("0", "off"):
        return None
    if explicit:
        return Path(explicit)
    root = os.environ.get("LLAMALAB_CACHE") or Path.home() / ".cache" / "llamalab"
    return Path(root) / "packed"


def cache_file_for(model: Path, folder: Path) -> Path:
    """The cache file of a model file: one per resolved path, replaced when the model changes."""
    digest = hashlib.sha256(os.fsencode(str(model.resolve()))).hexdigest()[:24]
    return folder / f"{digest}.llpack"


@functools.cache
def code_version() -> str:
    """A hash of the packing code's sources and the file format: any change rebuilds the files."""
    h = hashlib.sha256(f"format {FORMAT_VERSION}".encode())
    package = Path(__file__).resolve().parent.parent
    for name in _PACKING_CODE:
        try:
            h.update((package / name).read_bytes())
        except OSError:  # an install without sources: the format alone decides
            h.update(name.encode())
    return h.hexdigest()


def model_identity(path: Path, header_end: int) -> dict[str, Any]:
    """What a cache file must match: the model file's identity and its header's hash.

    ``header_end`` is where the tensor data starts: the metadata and the tensor table
    before it are hashed, so a file rewritten in place with the same size and mtime but
    another table is still told apart.
    """
    with open(path, "rb") as f:
        st = os.fstat(f.fileno())
        head = f.read(max(0, min(header_end, st.st_size)))
    return {
        "path": str(Path(path).resolve()),
        "size": st.st_size,
        "mtime_ns": st.st_mtime_ns,
        "inode": st.st_ino,
        "device": st.st_dev,
        "header_sha256": hashlib.sha256(head).hexdigest(),
        "code": code_version(),
    }


@dataclass(frozen=True)
class Entry:
    """One tensor of a cache file: where its bytes lie (from the data's start) and what they are.

    ``kind`` ``"vnni"``: a packed linear weight, ``shape`` (out, in), ``layout`` the
    :class:`~llamalab.quant.plan.VnniLayout` fields; ``"rows"``: a GGUF tensor's bytes as
    stored (an embedding), ``stored_type`` its GGUF type name.
    """

    name: str
    kind: str
    offset: int
    nbytes: int
    shape: tuple[int, int]
    stored_type: str
    layout: tuple[int, int, int] | None = None

    def expected_nbytes(self) -> int | None:
        """The byte count the shape and type need, or None where they make no sense."""
        rows, cols = self.shape
        if self.kind == "vnni":
            from llamalab.quant.plan import VNNI_LAYOUTS, VnniLayout

            if self.layout is None or VNNI_LAYOUTS.get(self.stored_type) != self.layout:
                return None
            layout = VnniLayout(*self.layout)
            if rows % 16 or cols % layout.group:
                return None
            return layout.nbytes(rows, cols)
        from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

        if self.layout is not None:
            return None
        try:
            block, block_bytes = GGML_QUANT_SIZES[GGMLQuantizationType[self.stored_type]]
        except KeyError:
            return None
        return None if cols % block else rows * (cols // block) * block_bytes


class CacheMismatch(Exception):
    """Why a cache file cannot be used (it is then rebuilt)."""


class PackedFile:
    """An open, checked cache file: its entries by name, their bytes views of one mapping."""

    def __init__(self, path: Path, mapping: mmap.mmap, data_offset: int, entries: list[Entry]):
        self.path = path
        self._mapping = mapping
        self._data_offset = data_offset
        self.entries = {e.name: e for e in entries}
        self._all: torch.Tensor | None = None

    @classmethod
    def open(cls, path: Path, identity: dict[str, Any]) -> PackedFile:
        """Map ``path`` and check it against ``identity`` (see the module's docstring).

        Raises :class:`CacheMismatch` (saying why) for a file that is missing, cut short,
        corrupted, or made for another model file or another packing code.
        """
        try:
            fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        except FileNotFoundError:
            raise CacheMismatch("no cache file yet") from None
        except OSError as exc:
            raise CacheMismatch(f"cannot open {path}: {exc.strerror or exc}") from None
        try:
            st = os.fstat(fd)
            size = st.st_size
            if size < _PREFIX.size:
                raise CacheMismatch(f"{path} is cut short ({size} bytes)")
            # A private mapping: writable for torch (no read-only tensor warnings), its
            # pages the page cache's until written, which nothing does.
            mapping = mmap.mmap(fd, size, access=mmap.ACCESS_COPY)
        except OSError as exc:
            raise CacheMismatch(f"cannot map {path}: {exc.strerror or exc}") from None
        finally:
            os.close(fd)
        try:
            data_offset, entries = _check(mapping, st, identity, path)
        except CacheMismatch:
            mapping.close()
            raise
        return cls(path, mapping, data_offset, entries)

    def tensor(self, name: str) -> torch.Tensor:
        """The entry's bytes: a flat uint8 tensor viewing the mapping (no copy)."""
        import torch

        if self._all is None:
            self._all = torch.frombuffer(self._mapping, dtype=torch.uint8)
        entry = self.entries[name]
        start = self._data_offset + entry.offset
        return self._all[start : start + entry.nbytes]

    def release(self, name: str) -> None:
        """Drop the entry's pages from this process's resident set (they stay in the page
        cache; touching them maps them again). For entries only a few rows of are read."""
        entry = self.entries[name]
        start = self._data_offset + entry.offset
        first = -(-start // mmap.PAGESIZE) * mmap.PAGESIZE
        end = (start + entry.nbytes) // mmap.PAGESIZE * mmap.PAGESIZE
        if end > first and hasattr(self._mapping, "madvise"):
            self._mapping.madvise(mmap.MADV_DONTNEED, first, end - first)


@dataclass(frozen=True)
class Lookup:
    """What :func:`lookup` found for a model file.

    ``file``: the checked cache file, or None (``reason`` says why); ``target``: where a
    new one is written (None where the cache is off); ``identity``: what it must match.
    """

    file: PackedFile | None
    target: Path | None
    identity: dict[str, Any]
    reason: str = ""


_lock = threading.Lock()
_prefetched: dict[str, Lookup] = {}


def lookup(model: Path, header_end: int) -> Lookup:
    """The cache file of ``model`` (whose tensor data starts at ``header_end``), checked.

    A :func:`prefetch` of the same version of the model file is taken instead of
    checking again (once: a later load checks afresh).
    """
    identity = model_identity(model, header_end)
    with _lock:
        found = _prefetched.pop(_key(identity), None)
    return found if found is not None else _lookup(model, identity)


def prefetch(model: Path, header_end: int) -> None:
    """Check the cache file of ``model`` now, for the next :func:`lookup`: a command calls
    it while torch imports (the check needs no torch; the CRC lets other threads run)."""
    identity = model_identity(model, header_end)
    found = _lookup(model, identity)
    with _lock:
        _prefetched.clear()  # one model at a time: nothing accumulates
        _prefetched[_key(identity)] = found


def _key(identity: dict[str, Any]) -> str:
    return json.dumps(identity, sort_keys=True)


def _lookup(model: Path, identity: dict[str, Any]) -> Lookup:
    folder = cache_dir()
    if folder is None:
        return Lookup(None, None, identity, "the packed-weight cache is off")
    target = cache_file_for(model, folder)
    try:
        return Lookup(PackedFile.open(target, identity), target, identity)
    except CacheMismatch as why:
        return Lookup(None, target, identity, str(why))


def _check(
    mapping: mmap.mmap, st: os.stat_result, identity: dict[str, Any], path: Path
) -> tuple[int, list[Entry]]:
    size = st.st_size
    magic, header_len, digest = _PREFIX.unpack_from(mapping, 0)
    if magic != MAGIC:
        raise CacheMismatch(f"{path} is not a packed-weight cache file")
    if header_len > min(_MAX_HEADER, size - _PREFIX.size):
        raise CacheMismatch(f"{path} is cut short or corrupted (header of {header_len} bytes)")
    raw = mapping[_PREFIX.size : _PREFIX.size + header_len]
    if hashlib.sha256(raw).digest() != digest:
        raise CacheMismatch(f"{path}: the header is corrupted")
    try:
        header = json.loads(raw)
        if header["format"] != FORMAT_VERSION:
            raise CacheMismatch(f"{path}: format {header['format']}, not {FORMAT_VERSION}")
        if header["model"] != identity:
            raise CacheMismatch(f"{path} was made for another version of the model file")
        data_bytes, data_crc = int(header["data_bytes"]), int(header["data_crc32"])
        entries = [
            Entry(
                str(e["name"]),
                str(e["kind"]),
                int(e["offset"]),
                int(e["nbytes"]),
                (int(e["shape"][0]), int(e["shape"][1])),
                str(e["type"]),
                None if e.get("layout") is None else tuple(int(v) for v in e["layout"]),
            )
            for e in header["entries"]
        ]
    except (KeyError, TypeError, ValueError, IndexError) as exc:
        raise CacheMismatch(f"{path}: malformed header ({exc!r})") from None
    data_offset = _aligned(_PREFIX.size + header_len)
    if data_bytes < 0 or data_offset + data_bytes != size:
        raise CacheMismatch(
            f"{path} holds {size} bytes, its header says {data_offset + data_bytes} (cut short?)"
        )
    names = set()
    for e in entries:
        if e.name in names or e.kind not in KINDS:
            raise CacheMismatch(f"{path}: entry {e.name!r} repeated or of unknown kind")
        names.add(e.name)
        if e.offset < 0 or e.offset + e.nbytes > data_bytes or e.expected_nbytes() != e.nbytes:
            raise CacheMismatch(f"{path}: entry {e.name!r} lies outside the data or is mis-sized")
    state = _file_state(st, digest, data_crc)
    if not _checked_before(path, state):
        with memoryview(mapping) as view:
            crc = zlib.crc32(view[data_offset:])  # zlib lets other threads run meanwhile
        if crc != data_crc:
            raise CacheMismatch(f"{path}: the data is corrupted (CRC-32 mismatch)")
        _remember_checked(path, state)
    return data_offset, entries


STAMP_SUFFIX = ".checked"
_MAX_STAMP = 4096


def _file_state(st: os.stat_result, header_digest: bytes, data_crc: int) -> dict[str, Any]:
    """What a stamp records of a cache file whose CRC was checked (see the module)."""
    return {
        "size": st.st_size,
        "mtime_ns": st.st_mtime_ns,
        "ctime_ns": st.st_ctime_ns,
        "ino": st.st_ino,
        "dev": st.st_dev,
        "header_sha256": header_digest.hex(),
        "data_crc32": data_crc,
    }


def _stamp_path(path: Path) -> Path:
    return path.with_name(path.name + STAMP_SUFFIX)


def _checked_before(path: Path, state: dict[str, Any]) -> bool:
    """Whether the stamp beside ``path`` records exactly ``state``; a missing, unreadable,
    oversized or malformed stamp (or one that is not a regular file) is not."""
    try:
        fd = os.open(_stamp_path(path), os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except OSError:
        return False
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return False
        raw = os.read(fd, _MAX_STAMP + 1)
        return len(raw) <= _MAX_STAMP and json.loads(raw) == state
    except (OSError, ValueError):
        return False
    finally:
        os.close(fd)


def _remember_checked(path: Path, state: dict[str, Any]) -> None:
    """Write the stamp beside ``path`` (a temporary file renamed over it). A folder that
    cannot take it only costs the next load the CRC."""
    try:
        fd, tmp = tempfile.mkstemp(prefix=".checked-", suffix=".tmp", dir=path.parent)
    except OSError:
        return
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(state, f)
        os.replace(tmp, _stamp_path(path))
    except OSError:
        with contextlib.suppress(OSError):
            os.unlink(tmp)


def _aligned(n: int) -> int:
    return -(-n // _ALIGN) * _ALIGN


def write_packed(
    path: Path, identity: dict[str, Any], tensors: Iterable[tuple[Entry, torch.Tensor]]
) -> None:
    """Write a cache file at ``path``: each ``(entry, bytes)`` in the order given, back to back.

    ``entry.offset`` is ignored (the offsets are the order's). Written under a temporary
    name in the same folder, then renamed over ``path``. Raises ``OSError`` (a read-only
    folder, a full disk); no temporary file is left behind.
    """
    items = list(tensors)
    entries, at, crc = [], 0, 0
    for entry, data in items:
        nbytes = data.numel() * data.element_size()
        entries.append(
            {
                "name": entry.name,
                "kind": entry.kind,
                "offset": at,
                "nbytes": nbytes,
                "shape": list(entry.shape),
                "type": entry.stored_type,
                "layout": None if entry.layout is None else list(entry.layout),
            }
        )
        crc = zlib.crc32(_bytes(data), crc)
        at += nbytes
    header = json.dumps(
        {"format": FORMAT_VERSION, "model": identity, "data_bytes": at, "data_crc32": crc,
         "entries": entries},
        separators=(",", ":"),
    ).encode()  # fmt: skip
    data_offset = _aligned(_PREFIX.size + len(header))
    digest = hashlib.sha256(header).digest()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".packing-", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(_PREFIX.pack(MAGIC, len(header), digest))
            f.write(header)
            f.write(b"\0" * (data_offset - _PREFIX.size - len(header)))
            for _, data in items:
                f.write(_bytes(data))
            f.flush()
            written = os.fstat(f.fileno()).st_ino
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    # The CRC is of the bytes just written: the next load need not read them all again,
    # unless the file it finds is another one or has been written to since.
    with contextlib.suppress(OSError):
        st = os.stat(path)
        if st.st_ino == written:
            _remember_checked(path, _file_state(st, digest, crc))


def _bytes(data: torch.Tensor) -> memoryview:
    return memoryview(data.contiguous().view(-1).numpy()).cast("B")


def note(message: str) -> None:
    """One line on stderr: the cache cannot be used as it should, and the load goes on."""
    print(f"llamalab: note: {message}", file=sys.stderr)
