"""Turn named text sources into memory-mapped token shards and a manifest.

Layout of the output folder::

    manifest.json        sources, token counts, the tokenizer's hash, each input's sha256
    tokenizer/           the tokenizer the shards were made with (tokenizer.model ...)
    NAME.bin             every token of source NAME, little-endian uint16 (vocabulary up
                         to 65,536) or uint32, documents back to back

What a document is: a file, except that a file longer than ``doc_chars`` characters
(1 MiB by default) is cut into several, each cut at the first blank line after the
limit (or after four times the limit wherever it is, even inside a line),
so that neither a worker nor the tokenizer ever holds more than a few megabytes of one
huge file. Each document is written as ``BOS tokens… EOS``: EOS separates documents, as
the paper's packed sequences do, and a document starts the way a prompt does at
generation time. Text that looks like a special token (``"</s>"``) is tokenized as text:
a corpus can never inject control tokens.

Files are tokenized in parallel worker processes, one file per task; each worker writes
its file's tokens to a part file and the parts are joined in input order, so the
result does not depend on the number of workers. Bytes that are not UTF-8 are read as
U+FFFD; a UTF-8 byte-order mark opening a file is dropped.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from llamalab.errors import LlamalabError
from llamalab.files import file_sha256, open_regular, refuse_special

MANIFEST = "manifest.json"
FORMAT = "llamalab-token-shards"
VERSION = 1
DEFAULT_DOC_CHARS = 1 << 20
# A worker holds up to four times this of one document: a bound keeps that in memory.
MAX_DOC_CHARS = 1 << 26
# Each worker process holds its own tokenizer: thousands would only exhaust memory.
MAX_WORKERS = 1024


def token_dtype(vocab_size: int) -> np.dtype:
    """The narrowest unsigned type that holds every id of the vocabulary."""
    return np.dtype("<u2") if vocab_size <= 1 << 16 else np.dtype("<u4")


def iter_documents(path: Path, doc_chars: int = DEFAULT_DOC_CHARS) -> Iterator[str]:
    """The documents of one file (see the module docstring), read as a stream."""
    with open_regular(path) as raw:
        # newline="" keeps "\r\n" as it is: the tokenizer sees the file's own text;
        # utf-8-sig drops a byte-order mark opening the file, which is no part of it.
        f = io.TextIOWrapper(raw, encoding="utf-8-sig", errors="replace", newline="")
        parts: list[str] = []
        size = 0
        while line := f.readline(doc_chars):  # bounded: a file with no newline is cut
            parts.append(line)
            size += len(line)
            if size >= doc_chars and (not line.strip() or size >= 4 * doc_chars):
                yield "".join(parts)
                parts, size = [], 0
        if parts:
            yield "".join(parts)


# ------------------------------------------------------------------ worker side
_worker_tokenizer: Any = None


def _init_worker(tokenizer_ref: str) -> None:
    global _worker_tokenizer
    from llamalab.tokenizer import load_tokenizer

    _worker_tokenizer = load_tokenizer(tokenizer_ref)


@dataclass(frozen=True)
class _Task:
    path: Path
    part: Path
    dtype: str
    doc_chars: int


def _tokenize_file(task: _Task) -> dict[str, Any]:
    """Tokenize one file into its part file; return its counts and hash."""
    tok = _worker_tokenizer
    tokens = documents = 0
    with open(task.part, "wb") as out:
        for doc in iter_documents(task.path, task.doc_chars):
            ids = tok.encode(doc, add_bos=True, add_eos=True, special=False)
            np.asarray(ids, dtype=task.dtype).tofile(out)
            tokens += len(ids)
            documents += 1
    return {
        "path": str(task.path),
        "bytes": task.path.stat().st_size,
        "sha256": file_sha256(task.path),
        "documents": documents,
        "tokens": tokens,
    }


# ------------------------------------------------------------------ main side
def is_prepared(folder: Path) -> bool:
    """Whether ``folder`` holds a whole ``data prepare`` output (its manifest is written last)."""
    try:
        manifest = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(manifest, dict) and manifest.get("format") == FORMAT


def _check_out(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise LlamalabError(f"{out}: exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not is_prepared(out):
        raise LlamalabError(
            f"{out}: folder is not empty and is not a previous `llamalab data prepare` output; "
            "choose a new or empty folder (nothing was overwritten)"
        )


def tokenizer_files(tok: Any, folder: Path) -> str:
    """Write the tokenizer into ``folder``; return the sha256 of its main file."""
    from llamalab.tokenizer.export import write_tokenizer_files

    folder.mkdir()
    names = write_tokenizer_files(tok, folder, context_length=1 << 20)
    return file_sha256(folder / names[0])


def prepare(
    sources: dict[str, list[Path]],
    tokenizer: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    workers: int | None = None,
    doc_chars: int = DEFAULT_DOC_CHARS,
    progress: bool = True,
) -> dict[str, Any]:
    """Tokenize ``sources`` (``{name: files}``) into shards in ``out``; return the manifest.

    ``out`` must be new, empty, or a previous output (which is replaced whole). Work is
    staged in a hidden sibling folder and renamed into place at the end, so an
    interrupted run leaves ``out`` as it was.
    """
    from tqdm import tqdm

    from llamalab.tokenizer import load_tokenizer

    out = Path(out)
    _check_out(out)
    if not 1 <= doc_chars <= MAX_DOC_CHARS:
        raise LlamalabError(f"--doc-chars must be from 1 to {MAX_DOC_CHARS}, got {doc_chars}")
    refuse_special(tokenizer)  # a FIFO or a device: say so
    tok = load_tokenizer(tokenizer)
    if tok.bos_id is None or tok.eos_id is None:
        raise LlamalabError(f"{tok.source}: the tokenizer needs BOS and EOS tokens")
    dtype = token_dtype(tok.vocab_size)
    if workers is not None and not 1 <= workers <= MAX_WORKERS:
        raise LlamalabError(f"--workers must be from 1 to {MAX_WORKERS}, got {workers}")
    workers = min(workers or os.cpu_count() or 1, MAX_WORKERS)
    out.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp-"))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(stage, 0o777 & ~umask)  # mkdtemp's 0700 would become the output's mode
    try:
        tok_sha = tokenizer_files(tok, stage / "tokenizer")
        parts = stage / "parts"
        parts.mkdir()
        tasks = [
            (name, _Task(path, parts / f"{name}.{i:08d}", dtype.str, doc_chars))
            for name, files in sources.items()
            for i, path in enumerate(files)
        ]
        total_bytes = sum(t.path.stat().st_size for _, t in tasks)
        bar = tqdm(
            total=total_bytes, unit="B", unit_scale=True, desc="tokenizing", disable=not progress
        )
        results: list[dict[str, Any]] = []
        if workers == 1 or len(tasks) == 1:
            _init_worker(str(tokenizer))
            for _, task in tasks:
                results.append(_tokenize_file(task))
                bar.update(results[-1]["bytes"])
        else:
            import multiprocessing as mp

            # spawn: workers start clean whatever the parent holds (threads, torch).
            ctx = mp.get_context("spawn")
            with ctx.Pool(min(workers, len(tasks)), _init_worker, (str(tokenizer),)) as pool:
                for r in pool.imap(_tokenize_file, [t for _, t in tasks]):
                    results.append(r)
                    bar.update(r["bytes"])
        bar.close()

        manifest_sources: dict[str, Any] = {}
        for name in sources:
            mine = [(t, r) for (n, t), r in zip(tasks, results, strict=True) if n == name]
            with open(stage / f"{name}.bin", "wb") as shard:
                for task, _ in mine:
                    with open(task.part, "rb") as part:
                        shutil.copyfileobj(part, shard, 1 << 20)
                    task.part.unlink()
            manifest_sources[name] = {
                "file": f"{name}.bin",
                "tokens": sum(r["tokens"] for _, r in mine),
                "documents": sum(r["documents"] for _, r in mine),
                "bytes": sum(r["bytes"] for _, r in mine),
                "inputs": [r for _, r in mine],
            }
        parts.rmdir()
        manifest = {
            "format": FORMAT,
            "version": VERSION,
            "dtype": dtype.name,
            "documents": "BOS text EOS; a document is a file, cut at a blank line "
            f"after {doc_chars} characters",
            "doc_chars": doc_chars,
            "tokenizer": {
                "source": str(tokenizer),
                "kind": tok.kind,
                "files": "tokenizer",
                "sha256": tok_sha,
                "vocab_size": tok.vocab_size,
                "bos_id": tok.bos_id,
                "eos_id": tok.eos_id,
            },
            "sources": manifest_sources,
            "total_tokens": sum(s["tokens"] for s in manifest_sources.values()),
        }
        (stage / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
        _replace_folder(stage, out)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    return manifest


def _replace_folder(new: Path, out: Path) -> None:
    """Move ``new`` to ``out``; an old output (already checked to be ours) is removed."""
    if out.is_dir():
        old = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.old-"))
        os.rename(out, old / "x")
        os.rename(new, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(new, out)
