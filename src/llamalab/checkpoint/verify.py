"""Check a checkpoint's bytes and structure; write the checksum lists that let others check it.

Three kinds of evidence, each optional but the structure:

- **Checksum lists.** A Meta folder carries ``checklist.chk`` (md5, Meta's own file, as
  ``md5sum`` writes it); any file or folder may carry a ``SHA256SUMS`` list as coreutils'
  ``sha256sum`` writes it (``<hex>  <name>``, ``<hex> *<name>`` for binary mode, a leading
  backslash for escaped names, or the ``--tag`` form ``SHA256 (<name>) = <hex>``). A single
  file's list may also be ``<file>.sha256`` beside it. Names are relative to the folder the
  list sits in, which is how ``cd FOLDER && sha256sum -c LIST`` reads them.
- **Structure.** Every tensor lies inside its file, the shapes agree with the config, and an
  HF index names only shards that exist and tensors those shards hold. The existing
  readers do the parsing (``load.open_checkpoint`` and ``validate``, ``gguf.header``,
  ``meta_format.load_pth``); only safetensors' small JSON header is read here, since the
  safetensors library does not tell where a tensor's bytes lie.
- **Tensor digests** (``tensor_digests``): the sha256 of each tensor's stored bytes, as
  llama.cpp's ``gguf-hash`` prints them, to compare two files tensor by tensor whatever
  their headers say.

Hashing streams each file once in 16 MiB reads, however many lists name it, so memory
stays flat for files of any size. Writers call :func:`write_checksums` (folders) or
:func:`write_file_checksum` (single files) on what they wrote.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import os
import re
import struct
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llamalab.errors import LlamalabError
from llamalab.files import check_regular_file, open_regular, read_file_bounded

SUMS_FILE = "SHA256SUMS"
CHECKLIST_FILE = "checklist.chk"  # Meta's md5 list
SUMS_SUFFIX = ".sha256"  # the list of a single file, beside it
CHUNK = 16 << 20
# A checksum list names files, one a line; a list past this size is not one.
MAX_LIST_BYTES = 64 << 20
# safetensors' own limit on its JSON header (100 MB in the Rust crate).
MAX_SAFETENSORS_HEADER = 100_000_000

# Digest length in hex characters → algorithm, for lines that do not say which.
_BY_LENGTH = {32: "md5", 40: "sha1", 64: "sha256", 128: "sha512"}
_TAGS = {"MD5": "md5", "SHA1": "sha1", "SHA256": "sha256", "SHA512": "sha512"}
_PLAIN_LINE = re.compile(r"^([0-9a-fA-F]+) [ *](.+)$", re.DOTALL)
_TAG_LINE = re.compile(r"^(MD5|SHA1|SHA256|SHA512) \((.+)\) = ([0-9a-fA-F]+)$", re.DOTALL)


# --- checksum lists -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Entry:
    """One line of a checksum list: a file name (as written), its digest and algorithm."""

    name: str
    digest: str
    algorithm: str
    source: Path
    line: int


def _unescape(name: str, source: Path, line: int) -> str:
    """Undo coreutils' escaping of a name that holds a backslash or a line break."""
    out, i = [], 0
    while i < len(name):
        ch = name[i]
        if ch == "\\":
            nxt = name[i + 1 : i + 2]
            if nxt not in ("\\", "n", "r"):
                raise LlamalabError(f"{source}: line {line}: bad escape in file name {name!r}")
            out.append({"\\": "\\", "n": "\n", "r": "\r"}[nxt])
            i += 2
        else:
            out.append(ch)
            i += 1
    return "".join(out)


def parse_checksum_list(path: Path) -> list[Entry]:
    """The entries of a ``sha256sum``/``md5sum`` list (GNU or ``--tag`` form), strictly.

    A line that is neither form, a digest of an unknown length, or one name listed twice
    with different digests is an error naming the list and the line.
    """
    data = read_file_bounded(path, MAX_LIST_BYTES)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise LlamalabError(f"{path}: not a checksum list (not UTF-8 text)") from None
    entries: list[Entry] = []
    seen: dict[str, str] = {}
    for number, raw in enumerate(text.split("\n"), start=1):
        line = raw.removesuffix("\r")  # a list saved with Windows line ends
        if not line.strip():
            continue
        escaped = line.startswith("\\")
        body = line[1:] if escaped else line
        if match := _TAG_LINE.match(body):
            algorithm, name, digest = _TAGS[match.group(1)], match.group(2), match.group(3)
            if len(digest) * 4 != hashlib.new(algorithm).digest_size * 8:
                raise LlamalabError(f"{path}: line {number}: {algorithm} digest of wrong length")
        elif match := _PLAIN_LINE.match(body):
            digest, name = match.group(1), match.group(2)
            algorithm = _BY_LENGTH.get(len(digest))
            if algorithm is None:
                raise LlamalabError(
                    f"{path}: line {number}: a digest of {len(digest)} hex digits "
                    "(expected md5, sha1, sha256 or sha512)"
                )
        else:
            raise LlamalabError(
                f"{path}: line {number}: not a checksum line (expected '<hex>  <file name>')"
            )
        if escaped:
            name = _unescape(name, path, number)
        digest = digest.lower()
        key = f"{algorithm}:{name}"
        if seen.get(key, digest) != digest:
            raise LlamalabError(f"{path}: line {number}: {name} is listed twice, differently")
        seen[key] = digest
        entries.append(Entry(name, digest, algorithm, path, number))
    if not entries:
        raise LlamalabError(f"{path}: an empty checksum list")
    return entries


def _escape(name: str) -> tuple[str, str]:
    """The name as coreutils writes it, and the prefix (a backslash if it had to escape)."""
    if not any(c in name for c in "\\\n\r"):
        return name, ""
    return name.replace("\\", "\\\\").replace("\n", "\\n").replace("\r", "\\r"), "\\"


def format_line(digest: str, name: str) -> str:
    """One line of a list in ``sha256sum``'s text-mode form, name escaped as coreutils does."""
    escaped, prefix = _escape(name)
    return f"{prefix}{digest}  {escaped}\n"


# --- hashing ------------------------------------------------------------------------------------


def _progress_bar(total: int, enabled: bool, desc: str):
    from tqdm import tqdm

    return tqdm(
        total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=desc,
        disable=not enabled, leave=False,
    )  # fmt: skip


def hash_files(jobs: dict[Path, set[str]], *, progress: bool = False) -> dict[Path, dict[str, str]]:
    """Each file's hex digests in the algorithms asked of it, each file read once.

    Reads go in ``CHUNK``-byte pieces into one reused buffer (hashlib releases the GIL
    on them); ``progress`` shows a byte-counting bar on stderr.
    """
    # Only regular files: a FIFO or a device would block or never end.
    sizes = {path: check_regular_file(path).st_size for path in jobs}
    out: dict[Path, dict[str, str]] = {}
    buf = bytearray(CHUNK)
    view = memoryview(buf)
    with _progress_bar(sum(sizes.values()), progress, "hashing") as bar:
        for path, algorithms in jobs.items():
            hashers = [hashlib.new(a) for a in sorted(algorithms)]
            try:
                # Opened without blocking and checked again: the path may have been
                # replaced by a FIFO since the check above.
                with open_regular(path) as f:
                    if hasattr(os, "posix_fadvise"):
                        os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_SEQUENTIAL)
                    while n := f.readinto(buf):
                        for h in hashers:
                            h.update(view[:n])
                        bar.update(n)
            except OSError as exc:
                raise LlamalabError(f"{path}: cannot read: {exc.strerror or exc}") from None
            out[path] = {h.name: h.hexdigest() for h in hashers}
    return out


def _files_under(folder: Path) -> list[Path]:
    """Every regular file under ``folder`` (links not followed), sorted by relative path."""
    found = []
    for root, dirs, files in os.walk(folder):
        dirs.sort()
        for name in files:
            path = Path(root) / name
            if path.is_file() and not path.is_symlink():
                found.append(path)
    return sorted(found, key=lambda p: p.relative_to(folder).as_posix())


def write_checksums(folder: Path, *, meta: bool = False, progress: bool = False) -> None:
    """Give ``folder`` a ``SHA256SUMS`` (and, for a Meta folder, ``checklist.chk``).

    ``SHA256SUMS`` lists every file under the folder but itself, in ``sha256sum``'s
    format, so ``cd FOLDER && sha256sum -c SHA256SUMS`` checks it; with ``meta``,
    ``checklist.chk`` first lists every file but the two lists in md5, as Meta's
    downloads do (``md5sum -c checklist.chk``), and SHA256SUMS covers it too. Each file
    is read once. Lists already in the folder are replaced: they describe this folder's
    files, which its writer has just written.
    """
    folder = Path(folder)
    files = [p for p in _files_under(folder) if p.name not in (SUMS_FILE, CHECKLIST_FILE)]
    algorithms = {"sha256", "md5"} if meta else {"sha256"}
    digests = hash_files({p: set(algorithms) for p in files}, progress=progress)
    names = {p: p.relative_to(folder).as_posix() for p in files}
    if meta:
        checklist = folder / CHECKLIST_FILE
        checklist.write_text(
            "".join(format_line(digests[p]["md5"], names[p]) for p in files), encoding="utf-8"
        )
        digests[checklist] = hash_files({checklist: {"sha256"}})[checklist]
        names[checklist] = CHECKLIST_FILE
        files = sorted([*files, checklist], key=lambda p: names[p])
    (folder / SUMS_FILE).write_text(
        "".join(format_line(digests[p]["sha256"], names[p]) for p in files), encoding="utf-8"
    )


def checksum_path(file: Path) -> Path:
    """Where a single file's list lies: ``<file>.sha256`` beside it."""
    return file.with_name(file.name + SUMS_SUFFIX)


def write_file_checksum(file: Path, into: Path | None = None, *, progress: bool = False) -> Path:
    """Write ``<file>.sha256`` (one ``sha256sum`` line naming the file by its base name).

    ``cd DIR && sha256sum -c FILE.sha256`` checks it, and ``llamalab verify FILE`` finds
    it. ``into`` is where to write it (default: beside ``file``); returns its path.
    """
    file = Path(file)
    target = Path(into) if into is not None else checksum_path(file)
    digest = hash_files({file: {"sha256"}}, progress=progress)[file]["sha256"]
    target.write_text(format_line(digest, file.name), encoding="utf-8")
    return target


# --- structure ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class TensorSpan:
    """Where one tensor's stored bytes lie in a file."""

    file: Path
    name: str
    stored_type: str
    shape: tuple[int, ...]
    offset: int
    nbytes: int


_ST_SIZES = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1,
    "U64": 8, "U32": 4, "U16": 2, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1,
}  # fmt: skip


def is_safetensors(path: Path) -> bool:
    """Whether a file starts like safetensors: a little-endian header length, then ``{``."""
    try:
        with open(path, "rb") as f:
            head = f.read(9)
            size = os.fstat(f.fileno()).st_size
    except OSError:
        return False
    if len(head) < 9:
        return False
    (n,) = struct.unpack("<Q", head[:8])
    return head[8:9] == b"{" and 8 + n <= size


def safetensors_spans(path: Path) -> list[TensorSpan]:
    """Every tensor of a safetensors file with the bytes it takes, each checked to lie inside."""
    size = check_regular_file(path).st_size
    try:
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise LlamalabError(f"{path}: truncated: too short for a safetensors header")
            (n,) = struct.unpack("<Q", head)
            if n > MAX_SAFETENSORS_HEADER or 8 + n > size:
                raise LlamalabError(
                    f"{path}: truncated or not safetensors: a header of {n} bytes "
                    f"does not fit in the file ({size} bytes)"
                )
            raw = f.read(n)
    except OSError as exc:
        raise LlamalabError(f"{path}: cannot read: {exc.strerror or exc}") from None
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise LlamalabError(f"{path}: not a safetensors header: {exc}") from None
    if not isinstance(header, dict):
        raise LlamalabError(f"{path}: not a safetensors header (not a JSON object)")
    start = 8 + n
    spans = []
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (begin, end) = entry["dtype"], entry["shape"], entry["data_offsets"]
            shape = tuple(int(d) for d in shape)
            begin, end = int(begin), int(end)
            width = _ST_SIZES[dtype]
        except (KeyError, TypeError, ValueError):
            raise LlamalabError(f"{path}: tensor {name}: a malformed header entry") from None
        if start + end > size:
            raise LlamalabError(
                f"{path}: truncated: tensor {name} ends at byte {start + end}, the file has {size}"
            )
        if not 0 <= begin <= end or end - begin != math.prod(shape) * width:
            raise LlamalabError(
                f"{path}: tensor {name}: bytes {begin}..{end} do not hold a {dtype} "
                f"tensor of shape {list(shape)}"
            )
        spans.append(TensorSpan(path, name, dtype, shape, start + begin, end - begin))
    spans.sort(key=lambda s: s.offset)
    for a, b in itertools.pairwise(spans):
        if b.offset < a.offset + a.nbytes:
            raise LlamalabError(f"{path}: tensors {a.name} and {b.name} overlap")
    return spans


def _gguf_spans(path: Path) -> list[TensorSpan]:
    from llamalab.gguf.header import read_gguf_header

    _, records = read_gguf_header(path)  # checks every tensor lies inside the file
    # In the tensor table's order, which is the order gguf-hash prints digests in.
    return [TensorSpan(path, r.name, r.qtype.name, r.shape, r.offset, r.n_bytes) for r in records]


def _hf_weights(folder: Path) -> tuple[list[Path], list[TensorSpan]]:
    """The safetensors files an HF folder's index names (each checked to exist), or its one
    file, and the tensors they hold (each file's header read once)."""
    from llamalab.checkpoint.hf_format import INDEX_FILE, SINGLE_FILE, read_json

    index = folder / INDEX_FILE
    if not index.is_file():
        files = [folder / SINGLE_FILE] if (folder / SINGLE_FILE).is_file() else []
        return files, [s for f in files for s in safetensors_spans(f)]
    weight_map = read_json(index).get("weight_map")
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise LlamalabError(f"{index}: no weight_map of tensor names to files")
    files = []
    for name in sorted(set(weight_map.values())):
        file = folder / name
        if Path(name).is_absolute() or ".." in Path(name).parts:
            raise LlamalabError(f"{index}: names a file outside the folder: {name}")
        if not file.is_file():
            raise LlamalabError(f"{index}: names a shard that does not exist: {name}")
        files.append(file)
    spans = [s for f in files for s in safetensors_spans(f)]
    held = {s.name: s.file.name for s in spans}
    for tensor, name in weight_map.items():
        if held.get(tensor) != Path(name).name:
            raise LlamalabError(f"{index}: tensor {tensor} is not in {name}")
    return files, spans


@dataclass
class Structure:
    """What the structure check found: the format, a description, and the stored tensors."""

    kind: str  # "gguf", "hf", "meta", "safetensors", "pth", "file" or "folder"
    summary: str
    spans: list[TensorSpan] = field(default_factory=list)
    pth_files: list[Path] = field(default_factory=list)


def _validated(path: Path) -> str:
    """Open ``path`` with the checkpoint readers and check every shape against the config."""
    from llamalab.checkpoint.load import open_checkpoint, validate

    reader = open_checkpoint(path)
    try:
        validate(reader)
        return f"{len(reader.names())} tensors agree with the config"
    finally:
        reader.close()


def check_structure(path: Path) -> Structure:
    """Check the structure of a checkpoint at ``path``; raise ``LlamalabError`` naming the problem.

    Anything that is not a checkpoint (a tokenizer folder, a text file) passes with kind
    "file" or "folder": there is no structure to check.
    """
    from llamalab.checkpoint.hf_format import is_hf_folder
    from llamalab.checkpoint.meta_format import SHARD_PATTERN, is_meta_folder, load_pth
    from llamalab.gguf.header import is_gguf

    if path.is_dir():
        if is_meta_folder(path):
            shards = sorted(p for p in path.iterdir() if SHARD_PATTERN.match(p.name))
            summary = _validated(path)
            return Structure("meta", f"{len(shards)} shard(s); {summary}", pth_files=shards)
        if is_hf_folder(path):
            files, spans = _hf_weights(path)
            summary = _validated(path)
            return Structure("hf", f"{len(files)} safetensors file(s); {summary}", spans)
        return Structure("folder", "not a checkpoint: no structure to check")
    check_regular_file(path)
    if is_gguf(path):
        spans = _gguf_spans(path)
        summary = _validated(path) if spans else "no tensors (a vocabulary-only file)"
        return Structure("gguf", summary, spans)
    if is_safetensors(path):
        spans = safetensors_spans(path)
        return Structure("safetensors", f"{len(spans)} tensors inside the file", spans)
    if path.suffix == ".pth":
        tensors, _ = load_pth(path)
        return Structure("pth", f"{len(tensors)} tensors readable", pth_files=[path])
    return Structure("file", "not a checkpoint: no structure to check")


# --- tensor digests -----------------------------------------------------------------------------


@dataclass(frozen=True)
class TensorDigest:
    """The sha256 of one tensor's stored bytes."""

    name: str
    file: Path
    stored_type: str
    shape: tuple[int, ...]
    sha256: str


def _span_digest(f, span: TensorSpan, buf: bytearray, bar) -> str:
    h = hashlib.sha256()
    f.seek(span.offset)
    left = span.nbytes
    view = memoryview(buf)
    while left:
        n = f.readinto(view[: min(left, len(buf))])
        if not n:
            raise LlamalabError(f"{span.file}: truncated inside tensor {span.name}")
        h.update(view[:n])
        left -= n
        bar.update(n)
    return h.hexdigest()


def _pth_digests(path: Path, bar) -> Iterator[TensorDigest]:
    import torch

    from llamalab.checkpoint.meta_format import load_pth
    from llamalab.checkpoint.reader import torch_type_name

    tensors, _ = load_pth(path)
    for name, tensor in tensors.items():
        # The tensor's elements in row-major order, as the file stores them: a view of
        # the mapped file when contiguous, never the whole file at once.
        flat = tensor.detach().contiguous().reshape(-1).view(torch.uint8).numpy()
        h = hashlib.sha256()
        for start in range(0, flat.nbytes, CHUNK):
            piece = flat[start : start + CHUNK]
            h.update(piece.data)
            bar.update(piece.nbytes)
        yield TensorDigest(
            name, path, torch_type_name(tensor.dtype), tuple(tensor.shape), h.hexdigest()
        )


def tensor_digests(structure: Structure, *, progress: bool = False) -> Iterator[TensorDigest]:
    """The sha256 of every tensor's stored bytes, file by file, in each file's own order.

    GGUF and safetensors tensors are read straight from their byte ranges; a ``.pth``
    shard's tensors from its memory map.
    """
    total = sum(s.nbytes for s in structure.spans) + sum(
        check_regular_file(p).st_size for p in structure.pth_files
    )
    buf = bytearray(CHUNK)
    with _progress_bar(total, progress, "tensors") as bar:
        by_file: dict[Path, list[TensorSpan]] = {}
        for span in structure.spans:
            by_file.setdefault(span.file, []).append(span)
        for file, spans in by_file.items():
            try:
                with open(file, "rb", buffering=0) as f:
                    for span in spans:
                        digest = _span_digest(f, span, buf, bar)
                        yield TensorDigest(span.name, file, span.stored_type, span.shape, digest)
            except OSError as exc:
                raise LlamalabError(f"{file}: cannot read: {exc.strerror or exc}") from None
        for file in structure.pth_files:
            yield from _pth_digests(file, bar)


# --- the whole check ----------------------------------------------------------------------------


@dataclass
class FileCheck:
    """One file checked against one list: ``ok``, or why not."""

    name: str
    algorithm: str
    source: str
    ok: bool
    problem: str = ""


@dataclass
class Report:
    """Everything ``verify`` found; ``ok`` when nothing failed."""

    path: Path
    kind: str = ""
    structure: str = ""
    lists: list[str] = field(default_factory=list)
    files: list[FileCheck] = field(default_factory=list)
    unlisted: list[str] = field(default_factory=list)
    tensors: list[TensorDigest] = field(default_factory=list)
    signature: str = ""
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_json(self) -> dict[str, Any]:
        """A machine-readable form of the report."""
        return {
            "path": str(self.path),
            "ok": self.ok,
            "kind": self.kind,
            "structure": self.structure,
            "lists": self.lists,
            "files": [vars(c) for c in self.files],
            "unlisted": self.unlisted,
            "tensors": [
                {
                    "name": t.name,
                    "file": str(t.file),
                    "type": t.stored_type,
                    "shape": list(t.shape),
                    "sha256": t.sha256,
                }
                for t in self.tensors
            ],
            "signature": self.signature,
            "problems": self.problems,
        }


def _inside(path: Path, root: Path) -> bool:
    try:
        path.resolve().relative_to(root.resolve())
        return True
    except ValueError:
        return False


def _lists_for(path: Path, sums: Path | None) -> list[Path]:
    if sums is not None:
        return [sums]
    if path.is_dir():
        return [p for p in (path / CHECKLIST_FILE, path / SUMS_FILE) if p.is_file()]
    for candidate in (checksum_path(path), path.parent / SUMS_FILE):
        if candidate.is_file():
            return [candidate]
    return []


def _entries_for(path: Path, lists: list[Path], explicit: bool) -> list[tuple[Path, Entry]]:
    """(file, entry) pairs: for a folder every entry, for a file the entries naming it."""
    pairs = []
    for lst in lists:
        # A list names files relative to where it lies; one given for a folder, relative to it.
        base = path if path.is_dir() else lst.parent
        for entry in parse_checksum_list(lst):
            target = base / entry.name
            if path.is_dir():
                if not _inside(target, path):
                    raise LlamalabError(
                        f"{lst}: line {entry.line}: {entry.name} lies outside {path}"
                    )
                pairs.append((target, entry))
            elif target.resolve() == path.resolve() or Path(entry.name).name == path.name:
                pairs.append((path, entry))
        if not path.is_dir() and explicit and not pairs:
            raise LlamalabError(f"{lst}: does not list {path.name}")
    return pairs


def verify(
    path: str | Path,
    *,
    sums: str | Path | None = None,
    tensors: bool = False,
    progress: bool = False,
    on_file: Callable[[FileCheck], None] | None = None,
    on_structure: Callable[[Structure], None] | None = None,
) -> Report:
    """Check ``path`` (a file or folder): structure, checksum lists, optionally tensor digests.

    ``sums`` is a checksum list to use instead of those found (``checklist.chk`` and
    ``SHA256SUMS`` in a folder; ``<file>.sha256`` or ``SHA256SUMS`` beside a file).
    A structure that does not hold raises ``LlamalabError`` at once (nothing else is
    worth hashing); digest mismatches are collected in the report's ``problems``.
    ``on_structure`` and ``on_file`` are called as the structure's and each file's result
    are known.
    """
    path = Path(path)
    if not os.path.lexists(path):
        raise LlamalabError(f"{path}: no such file or folder")
    report = Report(path)
    structure = check_structure(path)  # refuses a FIFO or a device first
    report.kind, report.structure = structure.kind, structure.summary
    if on_structure is not None:
        on_structure(structure)

    lists = _lists_for(path, Path(sums) if sums is not None else None)
    report.lists = [str(p) for p in lists]
    pairs = _entries_for(path, lists, explicit=sums is not None)
    jobs: dict[Path, set[str]] = {}
    for file, entry in pairs:
        if file.is_file():
            jobs.setdefault(file, set()).add(entry.algorithm)
    digests = hash_files(jobs, progress=progress)
    for file, entry in pairs:
        name = file.relative_to(path).as_posix() if path.is_dir() else file.name
        source = entry.source.name
        if file not in digests:
            check = FileCheck(name, entry.algorithm, source, False, "missing")
        elif digests[file][entry.algorithm] != entry.digest:
            check = FileCheck(
                name, entry.algorithm, source, False, f"{entry.algorithm} differs from {source}"
            )
        else:
            check = FileCheck(name, entry.algorithm, source, True)
        report.files.append(check)
        if not check.ok:
            report.problems.append(f"{name}: {check.problem}")
        if on_file is not None:
            on_file(check)
    if path.is_dir():
        listed = {file.resolve() for file, _ in pairs} | {p.resolve() for p in lists}
        report.unlisted = [
            p.relative_to(path).as_posix() for p in _files_under(path) if p.resolve() not in listed
        ]
    if tensors:
        report.tensors = list(tensor_digests(structure, progress=progress))
    return report


# --- signatures (model-signing, optional) -------------------------------------------------------

_INSTALL_HINT = (
    "signatures need the model-signing package: pip install 'llamalab[sign]' "
    "(or pip install model-signing==1.1.1)"
)


def _model_signing():
    try:
        import model_signing.hashing
        import model_signing.signing
        import model_signing.verifying
    except ImportError:
        raise LlamalabError(_INSTALL_HINT) from None
    return model_signing


def _hashing_config(ms, model: Path, ignore: Iterable[Path]):
    """model-signing's own CLI configuration: sha256 per file, the signature and git files left out."""
    root = model.resolve()
    ignored = []
    for p in ignore:
        try:
            ignored.append(p.resolve().relative_to(root))
        except ValueError:
            continue
    return ms.hashing.Config().set_ignored_paths(paths=ignored, ignore_git_paths=True)


def default_signature_path(path: Path) -> Path:
    """Where ``sign`` puts a signature: ``FOLDER/model.sig`` (left out of the hash), ``FILE.sig``."""
    return path / "model.sig" if path.is_dir() else path.with_name(path.name + ".sig")


def sign(path: str | Path, private_key: str | Path, signature: str | Path | None = None) -> Path:
    """Sign ``path`` with an elliptic-curve private key (PEM), as ``model_signing sign key`` does.

    The signature (a Sigstore bundle) goes to ``signature`` (default:
    :func:`default_signature_path`), which must not exist; returns its path.
    """
    ms = _model_signing()
    path, key = Path(path), Path(private_key)
    if not path.exists():
        raise LlamalabError(f"{path}: no such file or folder")
    out = Path(signature) if signature is not None else default_signature_path(path)
    try:
        # Claim the name first: an existing file is never overwritten.
        with open(out, "x"):
            pass
    except FileExistsError:
        raise LlamalabError(f"{out}: already exists (nothing was overwritten)") from None
    except OSError as exc:
        raise LlamalabError(f"{out}: cannot create it: {exc.strerror or exc}") from None
    try:
        ms.signing.Config().use_elliptic_key_signer(private_key=key).set_hashing_config(
            _hashing_config(ms, path, [out])
        ).sign(path, out)
    except BaseException as exc:
        out.unlink(missing_ok=True)
        if isinstance(exc, (ValueError, OSError, TypeError)):
            raise LlamalabError(f"{key}: cannot sign with this key: {exc}") from None
        raise
    return out


def verify_signature(path: str | Path, signature: str | Path, public_key: str | Path) -> str:
    """Check a model-signing signature (elliptic-curve key) of ``path``; return a summary.

    Raises ``LlamalabError`` naming the files that differ, or why the signature fails.
    """
    ms = _model_signing()
    path, sig, key = Path(path), Path(signature), Path(public_key)
    for p in (sig, key):
        if not p.is_file():
            raise LlamalabError(f"{p}: no such file")
    try:
        ms.verifying.Config().use_elliptic_key_verifier(public_key=key).set_hashing_config(
            _hashing_config(ms, path, [sig])
        ).verify(path, sig)
    except Exception as exc:  # noqa: BLE001 (model-signing raises ValueError and its deps' own)
        message = " ".join(str(exc).split()) or type(exc).__name__
        raise LlamalabError(f"{path}: signature {sig} does not verify: {message}") from None
    return f"signed with the key {key.name}"
