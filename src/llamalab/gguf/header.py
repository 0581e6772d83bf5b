"""Read the header of a GGUF file: its metadata (key/value) section and its tensor table.

Both sit at the front of the file, before the tensor data. ``gguf.GGUFReader`` builds a
numpy view for every element of every array, which took 18 s for Llama 3's 128k tokens
and 280k merges, and 4–5 s and 167 MB for SmolLM2's vocabulary, before a single weight
was read; this sequential parse takes well under a second and never touches the tensor
data. Tests check it against ``gguf.GGUFReader`` field by field and tensor by tensor.
"""

from __future__ import annotations

import math
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
_STRING, _ARRAY = 8, 9


def has_gguf_magic(head: bytes) -> bool:
    """Whether the first bytes of a file are GGUF's magic number."""
    return head[:4] == GGUF_MAGIC


def is_gguf(path: str | Path) -> bool:
    """Whether a file starts with the GGUF magic bytes."""
    try:
        with open(path, "rb") as f:
            return has_gguf_magic(f.read(4))
    except OSError:
        return False


class _Cursor:
    def __init__(self, buf: memoryview, path: Path, whole: bool) -> None:
        self.buf, self.pos, self.path, self.whole = buf, 0, path, whole

    def truncated(self) -> Exception:
        # Past the end of a partial read: read more. Past the end of the file: broken.
        if self.whole:
            return LlamalabError(f"{self.path}: GGUF metadata is truncated")
        return _Truncated()

    def take(self, n: int) -> memoryview:
        if self.pos + n > len(self.buf):
            raise self.truncated()
        out = self.buf[self.pos : self.pos + n]
        self.pos += n
        return out

    def scalar(self, fmt: str) -> Any:
        size = struct.calcsize("<" + fmt)
        return struct.unpack("<" + fmt, self.take(size))[0]

    def string(self) -> str:
        raw = bytes(self.take(self.scalar("Q")))
        # Token texts are meant to be UTF-8; a broken one must not make the file unreadable.
        return raw.decode("utf-8", errors="replace")

    def value(self, vtype: int) -> Any:
        if vtype in _SCALAR:
            return self.scalar(_SCALAR[vtype])
        if vtype == _STRING:
            return self.string()
        if vtype == _ARRAY:
            itype, count = self.scalar("I"), self.scalar("Q")
            if itype in _NUMPY:
                dtype = np.dtype(_NUMPY[itype])
                return np.frombuffer(self.take(count * dtype.itemsize), dtype=dtype).copy()
            if itype == _STRING:
                return self._strings(count)
            return [self.value(itype) for _ in range(count)]
        raise LlamalabError(f"{self.path}: unknown GGUF value type {vtype}")

    def _strings(self, count: int) -> list[str]:
        # The hot loop for vocabularies: hundreds of thousands of short strings.
        buf, pos, end = self.buf, self.pos, len(self.buf)
        unpack = struct.Struct("<Q").unpack_from
        out: list[str] = []
        append = out.append
        for _ in range(count):
            if pos + 8 > end:
                raise self.truncated()
            (n,) = unpack(buf, pos)
            pos += 8
            if pos + n > end:
                raise self.truncated()
            append(str(buf[pos : pos + n], "utf-8", "replace"))
            pos += n
        self.pos = pos
        return out


class _Truncated(Exception):
    pass


# The metadata sits at the front of the file; this much covers every vocabulary seen so
# far (Llama 3's is about 8 MB) without reading gigabytes of tensors.
_FIRST_READ = 32 << 20


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
    """Parse a GGUF file's header (metadata, value types, tensor table) once per file version."""
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
    types: dict[str, tuple[int, int | None]] = {}
    tensors: list[TensorRecord] = []
    try:
        with open(path, "rb") as f:
            data = f.read(_FIRST_READ)
            try:
                meta = _parse(
                    memoryview(data), path, whole=len(data) < _FIRST_READ, types=types, tensors=tensors
                )
            except _Truncated:
                data += f.read()
                types.clear()
                tensors.clear()
                meta = _parse(memoryview(data), path, whole=True, types=types, tensors=tensors)
    except _Truncated:
        raise LlamalabError(f"{path}: GGUF metadata is truncated") from None
    except OSError as exc:
        raise LlamalabError(f"{path}: cannot read GGUF file: {exc}") from None
    return GGUFHeader(meta, types, tensors)


def _parse(
    buf: memoryview,
    path: Path,
    *,
    whole: bool,
    types: dict[str, tuple[int, int | None]] | None,
    tensors: list[TensorRecord] | None = None,
) -> dict[str, Any]:
    cur = _Cursor(buf, path, whole)
    if not has_gguf_magic(bytes(cur.take(4))):
        raise LlamalabError(f"{path}: not a GGUF file (no GGUF magic bytes)")
    version = cur.scalar("I")
    if version not in (2, 3):
        hint = " (a big-endian file?)" if version > 0xFFFF else ""
        raise LlamalabError(f"{path}: unsupported GGUF version {version}{hint}")
    n_tensors = cur.scalar("Q")
    n_kv = cur.scalar("Q")
    meta: dict[str, Any] = {}
    for _ in range(n_kv):
        key = cur.string()
        vtype = cur.scalar("I")
        if types is not None:
            # The element type of an array is the next uint32; peek at it.
            sub = (
                struct.unpack_from("<I", cur.buf, cur.pos)[0]
                if vtype == _ARRAY and cur.pos + 4 <= len(cur.buf)
                else None
            )
            types[key] = (vtype, sub)
        meta[key] = cur.value(vtype)
    if tensors is not None:
        table = []
        for _ in range(n_tensors):
            name = cur.string()
            dims = [cur.scalar("Q") for _ in range(cur.scalar("I"))]
            ggml_type, offset = cur.scalar("I"), cur.scalar("Q")
            # GGUF lists dimensions innermost first; PyTorch outermost first.
            table.append((name, ggml_type, tuple(reversed(dims)), offset))
        alignment = int(meta.get("general.alignment", DEFAULT_ALIGNMENT))
        data_start = -(-cur.pos // alignment) * alignment
        for name, ggml_type, shape, offset in table:
            try:
                qtype = GGMLQuantizationType(ggml_type)
            except ValueError:
                raise LlamalabError(
                    f"{path}: tensor {name} has unknown GGML type {ggml_type}"
                ) from None
            block, block_bytes = GGML_QUANT_SIZES[qtype]
            n_bytes = math.prod(shape) // block * block_bytes
            tensors.append(TensorRecord(name, qtype, shape, data_start + offset, n_bytes))
    return meta
