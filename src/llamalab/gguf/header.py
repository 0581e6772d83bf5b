"""Read the header of a GGUF file: its metadata (key/value) section and its tensor table.

Both sit at the front of the file, before the tensor data. ``gguf.GGUFReader`` builds a
numpy view for every element of every array, which took 18 s for Llama 3's 128k tokens
and 280k merges, and 4–5 s and 167 MB for SmolLM2's vocabulary, before a single weight
was read; this sequential parse takes well under a second and never touches the tensor
data. Tests check it against ``gguf.GGUFReader`` field by field and tensor by tensor.

The header comes from a file we may not trust, so the parse checks its structure before
acting on it: every length and count against the bytes left in the file (not the buffer),
array nesting (``MAX_ARRAY_DEPTH``), value types, duplicate keys and tensor names,
``general.alignment`` (a uint32 power of two), and each tensor's dimensions (1 to
``MAX_TENSOR_DIMS``, none empty, whole quantization blocks), offset (aligned) and data
(inside the file). Anything wrong is one ``LlamalabError`` naming the file. The model's
own values (``llama.*``) are checked by ``checkpoint.gguf_format`` and ``ModelConfig``.
"""

from __future__ import annotations

import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

from llamalab.errors import LlamalabError

GGUF_MAGIC = b"GGUF"

# GGUF value types (gguf spec) → struct format of one scalar.
_SCALAR = {
    0: "B",
    1: "b",
    2: "H",
    3: "h",
    4: "I",
    5: "i",
    6: "f",
    7: "?",
    10: "Q",
    11: "q",
    12: "d",
}
_NUMPY = {
    0: "<u1",
    1: "<i1",
    2: "<u2",
    3: "<i2",
    4: "<u4",
    5: "<i4",
    6: "<f4",
    7: "?",
    10: "<u8",
    11: "<i8",
    12: "<f8",
}
_UINT32, _STRING, _ARRAY = 4, 8, 9


def has_gguf_magic(head: bytes) -> bool:
    """Whether the first bytes of a file are GGUF's magic number."""
    return head[:4] == GGUF_MAGIC


def read_file_head(path: str | Path, n: int) -> bytes:
    """The first ``n`` bytes of a file (fewer if it is shorter), to tell its format by."""
    try:
        with open(path, "rb") as f:
            return f.read(n)
    except OSError as exc:
        raise LlamalabError(f"{path}: cannot read: {exc.strerror or exc}") from None


def is_gguf(path: str | Path) -> bool:
    """Whether a file starts with the GGUF magic bytes."""
    try:
        with open(path, "rb") as f:
            return has_gguf_magic(f.read(4))
    except OSError:
        return False


# Nesting of arrays: llama.cpp reads an array of arrays at most; one level more than that
# is already generous, and a bound keeps a forged file from exhausting the Python stack.
MAX_ARRAY_DEPTH = 2
# GGML_MAX_DIMS: ggml tensors have at most four dimensions.
MAX_TENSOR_DIMS = 4
# The fewest bytes one entry can take, used to refuse counts the file cannot hold before
# looping over them: a key/value pair (key length, value type, a 1-byte value), a string
# (its length), a nested array (element type and count), a tensor-table entry (name length,
# dimension count, one dimension, type, offset).
_MIN_KV_BYTES = 8 + 4 + 1
_MIN_STRING_BYTES = 8
_MIN_ARRAY_BYTES = 4 + 8
_MIN_TENSOR_BYTES = 8 + 4 + 8 + 4 + 8


class _Cursor:
    """Reads values from the front of a file held (in part) in ``buf``.

    ``buf`` starts at byte 0 of the file, so positions in it are file offsets. Every
    length and count is checked against the size of the whole file before anything is
    read or allocated: a forged header that claims more bytes than the file has fails at
    once instead of reading gigabytes first.
    """

    def __init__(self, buf: bytes, path: Path, whole: bool, file_size: int) -> None:
        self.buf, self.pos, self.path, self.whole = buf, 0, path, whole
        self.file_size = file_size
        self.key: str | None = None  # the metadata key being read, named in errors

    def error(self, what: str) -> LlamalabError:
        where = f"metadata key {self.key!r}: " if self.key is not None else ""
        return LlamalabError(f"{self.path}: {where}{what}")

    def short(self, end: int) -> Exception:
        """The error for wanting bytes up to ``end``, past the end of ``buf``."""
        # Past the end of the file: broken. Past the end of a partial read: read more.
        if self.whole or end > self.file_size:
            return self.error("GGUF metadata is truncated")
        return _Truncated(end)

    def need(self, count: int, min_bytes: int, what: str) -> None:
        """Refuse ``count`` entries of at least ``min_bytes`` each if the file cannot hold them."""
        if count * min_bytes > self.file_size - self.pos:
            raise self.error(
                f"GGUF metadata is truncated or invalid: {what} of {count} entries "
                f"at byte {self.pos} does not fit in the file ({self.file_size} bytes)"
            )

    def take(self, n: int) -> bytes:
        end = self.pos + n
        if end > len(self.buf):
            raise self.short(end)
        out = self.buf[self.pos : end]
        self.pos = end
        return out

    def scalar(self, fmt: str) -> Any:
        size = struct.calcsize("<" + fmt)
        return struct.unpack("<" + fmt, self.take(size))[0]

    def string(self) -> str:
        raw = self.take(self.scalar("Q"))
        # Token texts are meant to be UTF-8; a broken one must not make the file unreadable.
        return raw.decode("utf-8", errors="replace")

    def value(self, vtype: int, depth: int = 0) -> Any:
        if vtype in _SCALAR:
            return self.scalar(_SCALAR[vtype])
        if vtype == _STRING:
            return self.string()
        if vtype == _ARRAY:
            if depth >= MAX_ARRAY_DEPTH:
                raise self.error(f"GGUF arrays nested more than {MAX_ARRAY_DEPTH} deep")
            itype, count = self.scalar("I"), self.scalar("Q")
            if itype in _NUMPY:
                dtype = np.dtype(_NUMPY[itype])
                # take() checks count × size against the file before anything is copied.
                return np.frombuffer(self.take(count * dtype.itemsize), dtype=dtype).copy()
            if itype == _STRING:
                return self._strings(count)
            if itype == _ARRAY:
                self.need(count, _MIN_ARRAY_BYTES, "an array of arrays")
                return [self.value(itype, depth + 1) for _ in range(count)]
            raise self.error(f"unknown GGUF array element type {itype}")
        raise self.error(f"unknown GGUF value type {vtype}")

    def _strings(self, count: int) -> list[str]:
        self.need(count, _MIN_STRING_BYTES, "an array of strings")
        # The hot loop for vocabularies: hundreds of thousands of short strings, so no
        # check inside it. A length past the end makes the slice short and moves ``pos``
        # past the end, where the next unpack fails or the check after the loop does.
        buf, pos = self.buf, self.pos
        unpack = struct.Struct("<Q").unpack_from
        out: list[str] = []
        append = out.append
        try:
            for _ in range(count):
                (n,) = unpack(buf, pos)
                pos += 8
                append(buf[pos : pos + n].decode("utf-8", "replace"))
                pos += n
        except (struct.error, OverflowError):  # OverflowError: a length near 2**64
            raise self.short(pos + 8) from None
        if pos > len(buf):
            raise self.short(pos)
        self.pos = pos
        return out


class _Truncated(Exception):
    """The partial read ended before the header did; ``end`` is the byte offset wanted."""

    def __init__(self, end: int) -> None:
        super().__init__(end)
        self.end = end


# The metadata sits at the front of the file. This much covers a 50k-token vocabulary
# (SmolLM2's header is about 2 MB); a longer one (Llama 3's is about 8 MB) is read on in
# doubling steps. Reading more than the header costs time at every start.
_FIRST_READ = 4 << 20


@dataclass(frozen=True)
class TensorRecord:
    """One entry of the tensor table: where a tensor lies and how it is stored.

    ``shape`` is in PyTorch order (outermost first); ``offset`` is absolute in the file;
    ``n_bytes`` is the size of its stored data.
    """

    name: str
    qtype: GGMLQuantizationType
    shape: tuple[int, ...]
    offset: int
    n_bytes: int


DEFAULT_ALIGNMENT = 32


@dataclass(frozen=True)
class GGUFHeader:
    """Everything before a GGUF file's tensor data.

    ``metadata`` maps each key to its value (arrays of numbers as numpy arrays, of strings
    as lists); ``types`` maps each key to its GGUF value type and, for arrays, element
    type, so values can be written back unchanged; ``tensors`` is the tensor table.
    """

    metadata: dict[str, Any]
    types: dict[str, tuple[int, int | None]]
    tensors: list[TensorRecord]


# Loading a model reads the header twice (the tokenizer and the weights each need it), and
# a vocabulary takes a noticeable time to parse: keep the last header, keyed by the file's
# identity, so a second read of an unchanged file costs nothing.
_last_header: tuple[tuple[int, int, int, int], GGUFHeader] | None = None


def read_header(path: str | Path) -> GGUFHeader:
    """Parse a GGUF file's header (metadata, value types, tensor table) once per file version.

    Raises ``LlamalabError`` for a file that is not GGUF, is truncated, or whose header is
    malformed (see the module's docstring for what is checked).
    """
    global _last_header
    path = Path(path)
    try:
        st = path.stat()
    except OSError as exc:
        raise LlamalabError(f"{path}: cannot read GGUF file: {exc.strerror or exc}") from None
    key = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
    cached = _last_header
    if cached is not None and cached[0] == key:
        return cached[1]
    header = _read_uncached(path)
    _last_header = (key, header)
    return header


def read_gguf_header(path: str | Path) -> tuple[dict[str, Any], list[TensorRecord]]:
    """A GGUF file's metadata and its tensor table (offsets are absolute in the file)."""
    header = read_header(path)
    return dict(header.metadata), list(header.tensors)


def read_gguf_metadata(
    path: str | Path, types: dict[str, tuple[int, int | None]] | None = None
) -> dict[str, Any]:
    """A GGUF file's metadata; ``types``, if given, is filled with each key's value types."""
    header = read_header(path)
    if types is not None:
        types.update(header.types)
    return dict(header.metadata)


def _read_uncached(path: Path) -> GGUFHeader:
    try:
        with open(path, "rb") as f:
            file_size = os.fstat(f.fileno()).st_size
            data = f.read(_FIRST_READ)
            while True:
                try:
                    return _parse(data, path, whole=len(data) >= file_size, file_size=file_size)
                except _Truncated as short:
                    # Read on to where the parse stopped, at least doubling what we hold, so
                    # that a long header costs a few re-parses, never one per missing piece.
                    want = min(file_size, max(short.end, 2 * len(data)))
                    more = f.read(want - len(data))
                    if not more:  # the file shrank while we read it
                        raise LlamalabError(f"{path}: GGUF metadata is truncated") from None
                    data += more
    except OSError as exc:
        raise LlamalabError(f"{path}: cannot read GGUF file: {exc}") from None


def _parse(buf: bytes, path: Path, *, whole: bool, file_size: int) -> GGUFHeader:
    cur = _Cursor(buf, path, whole, file_size)
    if not has_gguf_magic(cur.take(4)):
        raise cur.error("not a GGUF file (no GGUF magic bytes)")
    version = cur.scalar("I")
    if version not in (2, 3):
        hint = " (a big-endian file?)" if version > 0xFFFF else ""
        raise cur.error(f"unsupported GGUF version {version}{hint}")
    n_tensors = cur.scalar("Q")
    n_kv = cur.scalar("Q")
    cur.need(n_kv, _MIN_KV_BYTES, "the metadata count")
    cur.need(n_tensors, _MIN_TENSOR_BYTES, "the tensor count")
    meta: dict[str, Any] = {}
    types: dict[str, tuple[int, int | None]] = {}
    for _ in range(n_kv):
        cur.key = None
        key = cur.string()
        if key in meta:
            raise cur.error(f"GGUF metadata key {key!r} appears twice")
        vtype = cur.scalar("I")
        # The element type of an array is the next uint32; peek at it.
        sub = (
            struct.unpack_from("<I", cur.buf, cur.pos)[0]
            if vtype == _ARRAY and cur.pos + 4 <= len(cur.buf)
            else None
        )
        types[key] = (vtype, sub)
        cur.key = key
        meta[key] = cur.value(vtype)
    cur.key = None
    alignment = _alignment(meta, types, cur)
    table = []
    seen: set[str] = set()
    for _ in range(n_tensors):
        name = cur.string()
        if name in seen:
            raise cur.error(f"tensor {name} appears twice in the tensor table")
        seen.add(name)
        n_dims = cur.scalar("I")
        if not 1 <= n_dims <= MAX_TENSOR_DIMS:
            raise cur.error(
                f"tensor {name} has {n_dims} dimensions (1 to {MAX_TENSOR_DIMS} allowed)"
            )
        dims = struct.unpack(f"<{n_dims}Q", cur.take(8 * n_dims))
        ggml_type, offset = cur.scalar("I"), cur.scalar("Q")
        table.append((name, ggml_type, dims, offset))
    data_start = -(-cur.pos // alignment) * alignment
    tensors = [_tensor_record(cur, alignment, data_start, *entry) for entry in table]
    return GGUFHeader(meta, types, tensors)


def _alignment(meta: dict[str, Any], types: dict[str, tuple[int, int | None]], cur: _Cursor) -> int:
    """``general.alignment``: a power of two stored as uint32 (the gguf spec), else the default."""
    if "general.alignment" not in meta:
        return DEFAULT_ALIGNMENT
    value = meta["general.alignment"]
    if types["general.alignment"][0] != _UINT32 or value <= 0 or value & (value - 1):
        shown = repr(value) if isinstance(value, int | float | str) else "an array"
        raise cur.error(f"general.alignment must be a power of two stored as uint32, got {shown}")
    return int(value)


def _tensor_record(
    cur: _Cursor,
    alignment: int,
    data_start: int,
    name: str,
    ggml_type: int,
    dims: tuple[int, ...],
    offset: int,
) -> TensorRecord:
    """One tensor-table entry, checked: known type, whole blocks, aligned, inside the file."""
    try:
        qtype = GGMLQuantizationType(ggml_type)
        block, block_bytes = GGML_QUANT_SIZES[qtype]
    except (ValueError, KeyError):
        raise cur.error(f"tensor {name} has unknown GGML type {ggml_type}") from None
    if not all(dims):
        raise cur.error(f"tensor {name} has an empty dimension: {list(dims)}")
    # GGUF lists dimensions innermost first; blocks run along the innermost one.
    if dims[0] % block:
        raise cur.error(
            f"tensor {name}: rows of {dims[0]} values do not divide into "
            f"{qtype.name} blocks of {block}"
        )
    if offset % alignment:
        raise cur.error(
            f"tensor {name}: data offset {offset} is not a multiple of the alignment {alignment}"
        )
    n_bytes = math.prod(dims) // block * block_bytes
    start = data_start + offset
    # Every size is bounded by the file: the data must lie inside it.
    if start + n_bytes > cur.file_size:
        raise cur.error(
            f"truncated: tensor {name} ends at byte {start + n_bytes}, the file has {cur.file_size}"
        )
    return TensorRecord(name, qtype, tuple(reversed(dims)), start, n_bytes)
