"""``llamalab convert``: write any checkpoint we read as a Hugging Face, Meta or GGUF checkpoint.

Every writer pulls tensors one at a time from a reader (canonical names and layout) and
writes them before asking for the next, so peak memory stays near one copy of the model
or less.

Output is written into a staging folder created exclusively beside the destination and
moved into place at the end by a rename that never replaces anything (see ``staging``):
an interrupted conversion leaves nothing behind, two conversions never touch each other's
work, and whatever appears at the destination meanwhile is never overwritten.
"""

from __future__ import annotations

import ctypes
import errno
import functools
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from llamalab.checkpoint import names as tensor_names
from llamalab.checkpoint.load import open_checkpoint, validate
from llamalab.checkpoint.reader import CheckpointReader
from llamalab.errors import LlamalabError
from llamalab.gguf import QUANT_TYPES, WRITE_TYPES

TORCH_DTYPES = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}
# Files that describe a tokenizer; copied along when converting between folders.
TOKENIZER_FILES = (
    "tokenizer.model",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "generation_config.json",
)
HF_MAX_FILE_BYTES = 4 << 30


def convert(
    src: str | Path,
    dst: str | Path,
    *,
    to: str,
    dtype: str | None = None,
    shards: int = 1,
    progress: bool = False,
) -> Path:
    """Convert checkpoint ``src`` to format ``to`` ("hf", "meta" or "gguf") at ``dst``.

    ``dtype`` is the tensor type to write (one of ``llamalab.gguf.WRITE_TYPES``; the
    quantized ones for GGUF only); ``progress`` shows a bar while a GGUF is written.

    ``dst`` must not exist; it is never overwritten, even if it appears during the conversion.
    Returns ``dst``.
    """
    dst = Path(dst)
    if os.path.lexists(dst):  # a dangling symbolic link is in the way too
        raise LlamalabError(
            f"{dst}: already exists; choose a new destination (nothing was overwritten)"
        )
    if to not in ("hf", "meta", "gguf"):
        raise LlamalabError(f"unknown target format {to!r}; expected hf, meta or gguf")
    if dtype is not None and dtype not in WRITE_TYPES:
        raise LlamalabError(f"unknown dtype {dtype!r}; expected {', '.join(WRITE_TYPES)}")
    if dtype in QUANT_TYPES and to != "gguf":
        raise LlamalabError(f"{dtype} can only be written to GGUF")
    if shards != 1 and to != "meta":
        raise LlamalabError("--shards applies to Meta checkpoints only")
    reader = open_checkpoint(src)
    try:
        validate(reader)
        out_type = dtype or source_float_type(reader)
        with staging(dst) as tmp:
            try:
                if to == "hf":
                    write_hf(reader, tmp, TORCH_DTYPES[out_type])
                elif to == "meta":
                    write_meta(reader, tmp, TORCH_DTYPES[out_type], shards)
                else:
                    from llamalab.gguf.writer import write_gguf

                    write_gguf(reader, tmp, out_type, progress=progress)
            except OSError as exc:  # a full disk, a vanished source: the user's to fix
                raise LlamalabError(f"{dst}: conversion failed: {exc}") from None
    finally:
        reader.close()
    return dst


def source_float_type(reader: CheckpointReader) -> str:
    """The float type to keep when none is asked for: the embedding's (f32 if quantized)."""
    stored = reader.info("tok_embeddings.weight").stored_type.lower()
    return stored if stored in TORCH_DTYPES else "f32"


@contextmanager
def staging(dst: Path) -> Iterator[Path]:
    """Yield a fresh path to write the output at; publish it as ``dst`` if the block succeeds.

    The path lies in a staging folder that ``mkdtemp`` creates exclusively beside ``dst``
    (``.NAME.XXXXXXXX``, on the same file system, so the final move is a rename): two
    conversions to one destination never share it, and nothing here deletes another
    process's staging. The output then gets the permissions a plain ``open``/``mkdir``
    would give (some writers create files 0600) and is moved to ``dst`` by
    :func:`rename_noreplace`. If ``dst`` appeared meanwhile, it is left untouched, the
    output is kept beside it (see :func:`_keep_aside`) and a ``LlamalabError`` says so.
    The staging folder is removed however the block ends, KeyboardInterrupt included.
    """
    parent = dst.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        # The name says whose staging it is; cut so that the random suffix still fits in
        # the 255 bytes a file name may take.
        folder = Path(tempfile.mkdtemp(dir=parent, prefix=f".{dst.name[:200]}."))
    except OSError as exc:
        blocker = _file_in_the_way(parent)
        if blocker is not None:
            raise LlamalabError(
                f"{dst}: cannot create it: {blocker} is a file, not a folder"
            ) from None
        raise LlamalabError(f"{dst}: cannot create it: {exc.strerror or exc}") from None
    try:
        dir_mode, file_mode = _default_modes(folder)
        out = folder / dst.name
        yield out
        _set_modes(out, dir_mode, file_mode)
        try:
            rename_noreplace(out, dst)
        except FileExistsError:
            kept = _keep_aside(out, dst)
            where = f"; the output was kept as {kept}" if kept else ""
            raise LlamalabError(
                f"{dst}: appeared during the conversion; nothing was overwritten{where}"
            ) from None
        except OSError as exc:
            raise LlamalabError(f"{dst}: cannot move the output into place: {exc}") from None
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _file_in_the_way(folder: Path) -> Path | None:
    """The nearest existing ancestor of ``folder`` (itself included) when it is not a folder."""
    for candidate in (folder, *folder.parents):
        if os.path.lexists(candidate):
            return None if candidate.is_dir() else candidate
    return None


def _default_modes(folder: Path) -> tuple[int, int]:
    """The permissions new folders and files get here: 0777 and 0666 less the umask.

    Found by creating a folder rather than by ``os.umask``, which can only be read by
    setting it, for every thread of the process at once.
    """
    probe = folder / "mode-probe"
    probe.mkdir(0o777)
    dir_mode = probe.stat().st_mode & 0o777
    probe.rmdir()
    return dir_mode, dir_mode & 0o666


def _set_modes(out: Path, dir_mode: int, file_mode: int) -> None:
    if not out.is_dir():
        os.chmod(out, file_mode)
        return
    os.chmod(out, dir_mode)
    for root, dirs, files in os.walk(out):
        for name in dirs:
            os.chmod(os.path.join(root, name), dir_mode)
        for name in files:
            os.chmod(os.path.join(root, name), file_mode)


def _keep_aside(out: Path, dst: Path) -> Path | None:
    """Move the finished output to a free sibling of ``dst`` (``NAME.converted.EXT``), if any."""
    for i in range(1, 100):
        tag = "converted" if i == 1 else f"converted-{i}"
        candidate = dst.with_name(f"{dst.stem}.{tag}{dst.suffix}")
        try:
            rename_noreplace(out, candidate)
            return candidate
        except FileExistsError:
            continue
        except OSError:
            return None
    return None


# renameat2(2) flag and "relative to the working directory" (Linux's <fcntl.h>, <linux/fs.h>).
_RENAME_NOREPLACE = 1
_AT_FDCWD = -100


@functools.cache
def _libc_renameat2() -> Callable[..., int] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        function = ctypes.CDLL(None, use_errno=True).renameat2  # glibc 2.28+, musl 1.2.2+
    except (OSError, AttributeError):
        return None
    function.argtypes = [
        ctypes.c_int,
        ctypes.c_char_p,
        ctypes.c_int,
        ctypes.c_char_p,
        ctypes.c_uint,
    ]
    function.restype = ctypes.c_int
    return function


def _renameat2(src: Path, dst: Path) -> bool:
    """Rename atomically unless ``dst`` exists; False where the system or file system cannot."""
    function = _libc_renameat2()
    if function is None:
        return False
    if function(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), _RENAME_NOREPLACE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):  # e.g. some network file systems
        return False
    raise OSError(code, os.strerror(code), str(dst))  # EEXIST becomes FileExistsError


def rename_noreplace(src: Path, dst: Path) -> None:
    """Rename ``src`` (a file or a folder) to ``dst``; raise FileExistsError if ``dst`` exists.

    On Linux this is one atomic ``renameat2(RENAME_NOREPLACE)``. Elsewhere (or on a file
    system without it): Windows' rename never replaces; a file is hard-linked to ``dst``
    (which fails if anything is there) and then unlinked; a folder is renamed onto an
    empty placeholder folder created exclusively at ``dst`` a moment before, so anything
    that lands there meanwhile makes the rename fail (ENOTEMPTY, ENOTDIR) rather than be
    replaced. Where hard links are not supported, a file falls back to checking for
    ``dst`` and renaming: best effort, with a window of microseconds.
    """
    if _renameat2(src, dst):
        return
    if os.name == "nt":
        os.rename(src, dst)
    elif src.is_dir() and not src.is_symlink():
        _rename_folder(src, dst)
    else:
        _rename_file(src, dst)


def _rename_file(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except FileExistsError:
        raise
    except OSError:  # no hard links here (FAT, some network file systems): best effort
        if os.path.lexists(dst):
            raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(dst)) from None
        os.rename(src, dst)
        return
    os.unlink(src)


def _rename_folder(src: Path, dst: Path) -> None:
    os.mkdir(dst, 0o700)  # FileExistsError if anything is there
    try:
        os.rename(src, dst)  # replaces only our placeholder, and only while it is empty
    except OSError as exc:
        try:
            os.rmdir(dst)  # our placeholder, if it is still empty; else leave it be
        except OSError:
            pass
        if exc.errno in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR):
            raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(dst)) from None
        raise


def tensors(reader: CheckpointReader, dtype: torch.dtype) -> Iterator[tuple[str, torch.Tensor]]:
    """The checkpoint's tensors in canonical order, converted to ``dtype``, one at a time."""
    config = reader.config
    for name in tensor_names.canonical_names(config.n_layers, config.tie_embeddings):
        yield name, reader.load(name).to(dtype)


def copy_tokenizer_files(reader: CheckpointReader, folder: Path) -> None:
    """Give ``folder`` the source's tokenizer, so that the converted checkpoint runs.

    A folder's tokenizer files (see ``TOKENIZER_FILES``) are copied as they are; a
    tokenizer held elsewhere (a GGUF file's metadata) is written out in the folder
    formats' own files. A source that carries no tokenizer gives a folder without one.
    """
    if reader.path.is_dir():
        copied = [f for f in TOKENIZER_FILES if (reader.path / f).is_file()]
        for file in copied:
            shutil.copyfile(reader.path / file, folder / file)
        if any(f in copied for f in ("tokenizer.json", "tokenizer.model")):
            return
    from llamalab.tokenizer import load_tokenizer
    from llamalab.tokenizer.export import write_tokenizer_files

    try:
        tok = load_tokenizer(reader.path)
    except LlamalabError:
        return  # no tokenizer in the source: the weights alone are converted
    write_tokenizer_files(tok, folder, context_length=reader.config.context_length)


def write_hf(reader: CheckpointReader, folder: Path, dtype: torch.dtype) -> None:
    """A transformers-loadable folder: config.json + safetensors (split above 4 GiB, indexed)."""
    from safetensors.torch import save_file

    from llamalab.checkpoint.hf_format import INDEX_FILE, SINGLE_FILE, config_to_hf

    config = reader.config
    folder.mkdir(parents=True)
    hf_config = config_to_hf(config)
    hf_config["torch_dtype"] = str(dtype).removeprefix("torch.")
    (folder / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")

    parts: list[list[str]] = []  # the tensor names of each file written so far
    pending: dict[str, torch.Tensor] = {}
    pending_bytes = 0

    def flush() -> None:
        # Files get provisional names until we know how many there are.
        nonlocal pending, pending_bytes
        save_file(
            pending, str(folder / f"part-{len(parts):05d}.safetensors"), metadata={"format": "pt"}
        )
        parts.append(list(pending))
        pending, pending_bytes = {}, 0

    for name, tensor in tensors(reader, dtype):
        if tensor_names.is_query_or_key(name):
            heads = config.n_heads if name.endswith("wq.weight") else config.n_kv_heads
            tensor = tensor_names.meta_to_hf_qk(tensor, heads)
        nbytes = tensor.numel() * tensor.element_size()
        if pending and pending_bytes + nbytes > HF_MAX_FILE_BYTES:
            flush()
        pending[tensor_names.to_format(name, "hf")] = tensor.contiguous()
        pending_bytes += nbytes
    flush()

    if len(parts) == 1:
        (folder / "part-00000.safetensors").rename(folder / SINGLE_FILE)
    else:
        weight_map = {}
        for i, keys in enumerate(parts):
            final = f"model-{i + 1:05d}-of-{len(parts):05d}.safetensors"
            (folder / f"part-{i:05d}.safetensors").rename(folder / final)
            weight_map.update(dict.fromkeys(keys, final))
        index = {"metadata": {}, "weight_map": weight_map}
        (folder / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
    copy_tokenizer_files(reader, folder)


def write_meta(reader: CheckpointReader, folder: Path, dtype: torch.dtype, shards: int) -> None:
    """Meta's layout: params.json + ``shards`` consolidated.NN.pth files, split as Meta did."""
    from llamalab.checkpoint.meta_format import params_for, split_dim

    config = reader.config
    if shards < 1:
        raise LlamalabError(f"--shards must be at least 1, got {shards}")
    for what, size in (
        ("n_heads", config.n_heads),
        ("n_kv_heads", config.n_kv_heads),
        ("ffn hidden size", config.ffn_hidden_dim),
        ("vocab_size", config.vocab_size),
        ("dim", config.dim),
    ):
        if size % shards:
            raise LlamalabError(
                f"cannot split into {shards} shards: {what} {size} is not divisible by {shards}"
            )
    folder.mkdir(parents=True)
    (folder / "params.json").write_text(json.dumps(params_for(config), indent=2) + "\n")
    # One shard at a time: its slices are cloned so that torch.save writes only the slice,
    # not the whole tensor the slice views.
    for rank in range(shards):
        shard: dict[str, torch.Tensor] = {}
        for name, tensor in tensors(reader, dtype):
            dim = split_dim(name)
            if dim is not None and shards > 1:
                tensor = tensor.chunk(shards, dim=dim)[rank].clone()
            shard[name] = tensor.contiguous()
        torch.save(shard, folder / f"consolidated.{rank:02d}.pth")
        del shard
    copy_tokenizer_files(reader, folder)
