"""``llamalab convert``: write any checkpoint we read as a Hugging Face, Meta or GGUF checkpoint.

Every writer pulls tensors one at a time from a reader (canonical names and layout) and
writes them before asking for the next, so peak memory stays near one copy of the model
or less.

Output is written into a staging folder created exclusively beside the destination and
moved into place at the end by a rename that never replaces anything (see ``staging``):
an interrupted conversion leaves nothing behind (one killed outright leaves its staging
folder, which the next conversion to that destination removes), two conversions never
touch each other's work, and whatever appears at the destination meanwhile is never
overwritten.

Every output carries a way to check it (see ``checkpoint/verify.py``): a folder gets a
``SHA256SUMS`` (and a Meta folder Meta's md5 ``checklist.chk``), a single file a
``FILE.sha256`` beside it; ``cd`` to where they lie and ``sha256sum -c`` checks them, as
does ``llamalab verify``.
"""

from __future__ import annotations

import ctypes
import errno
import functools
import json
import os
import re
import shutil
import socket
import stat
import sys
import tempfile
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from llamalab.checkpoint import names as tensor_names
from llamalab.checkpoint.load import open_checkpoint, validate
from llamalab.checkpoint.reader import CheckpointReader
from llamalab.checkpoint.verify import checksum_path, write_checksums, write_file_checksum
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
    lora: Iterable[tuple[str | Path, float]] = (),
) -> Path:
    """Convert checkpoint ``src`` to format ``to`` ("hf", "meta" or "gguf") at ``dst``.

    ``dtype`` is the tensor type to write (one of ``llamalab.gguf.WRITE_TYPES``; the
    quantized ones for GGUF only); ``progress`` shows bars while tensors are written and
    the output is hashed.

    ``lora`` is LoRA adapters ``[(path, scale), ...]`` (PEFT folders or GGUF adapters) to
    merge: each adapted weight is written as its float32 value plus ``scale`` times the
    adapter's update, then in ``dtype`` (the default for a quantized source is f32). Every
    adapter is checked against the source before anything is written.

    A folder gets ``SHA256SUMS`` (a Meta folder ``checklist.chk`` too), a GGUF file a
    ``DST.sha256`` beside it (see the module's docstring).

    ``dst`` (and a GGUF's ``DST.sha256``) must not exist; they are never overwritten, even
    if they appear during the conversion. Returns ``dst``.
    """
    dst = Path(dst)
    sidecar = checksum_path(dst) if to == "gguf" else None
    for path in (dst, sidecar):
        if path is not None and os.path.lexists(path):  # a dangling link is in the way too
            raise LlamalabError(
                f"{path}: already exists; choose a new destination (nothing was overwritten)"
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
        lora = list(lora)
        if lora:
            from llamalab.checkpoint.lora_files import merged_reader, read_adapters

            reader = merged_reader(reader, read_adapters(lora, reader.config))
        out_type = dtype or source_float_type(reader)
        with staging(dst, sidecar=sidecar) as tmp:
            try:
                # The progress flag goes by position, as the writers' other arguments do.
                if to == "hf":
                    write_hf(reader, tmp, TORCH_DTYPES[out_type], progress)
                elif to == "meta":
                    write_meta(reader, tmp, TORCH_DTYPES[out_type], shards, progress)
                else:
                    from llamalab.checkpoint.gguf_format import write_gguf

                    write_gguf(reader, tmp, out_type, progress=progress)
                if to == "gguf":
                    write_file_checksum(tmp, tmp.with_name(sidecar.name), progress=progress)
                else:
                    write_checksums(tmp, meta=to == "meta", progress=progress)
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
def staging(dst: Path, *, sidecar: Path | None = None) -> Iterator[Path]:
    """Yield a fresh path to write the output at; publish it as ``dst`` if the block succeeds.

    The path lies in a staging folder that ``mkdtemp`` creates exclusively beside ``dst``
    (``.NAME.XXXXXXXX``, on the same file system, so the final move is a rename): two
    conversions to one destination never share it. The folder holds a marker naming its
    owner (see :func:`remove_stale_staging`), so that a later conversion to ``dst`` can
    remove it if this process is killed outright; nothing here deletes the staging of a
    process that is alive, or a folder without our marker. The output then gets the
    permissions a plain ``open``/``mkdir`` would give (some writers create files 0600)
    and is moved to ``dst`` by :func:`rename_noreplace`. If ``dst`` appeared meanwhile,
    it is left untouched, the output is kept beside it (see :func:`_keep_aside`) and a
    ``LlamalabError`` says so. ``sidecar`` names a second file the block writes beside
    the output in the staging folder (a checksum list), published after ``dst`` the same
    way. The staging folder is removed however the block ends, KeyboardInterrupt included.
    """
    parent = dst.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        remove_stale_staging(dst)
        # The name says whose staging it is; cut so that the random suffix still fits in
        # the 255 bytes a file name may take.
        folder = Path(tempfile.mkdtemp(dir=parent, prefix=_staging_prefix(dst)))
    except OSError as exc:
        blocker = _file_in_the_way(parent)
        if blocker is not None:
            raise LlamalabError(
                f"{dst}: cannot create it: {blocker} is a file, not a folder"
            ) from None
        raise LlamalabError(f"{dst}: cannot create it: {exc.strerror or exc}") from None
    try:
        _write_marker(folder, dst)
        dir_mode, file_mode = _default_modes(folder)
        out = folder / dst.name
        yield out
        _set_modes(out, dir_mode, file_mode)
        _publish(out, dst)
        if sidecar is not None:
            staged = folder / sidecar.name
            _set_modes(staged, dir_mode, file_mode)
            try:
                rename_noreplace(staged, sidecar)
            except FileExistsError:
                raise LlamalabError(
                    f"{sidecar}: appeared during the conversion and was not overwritten; "
                    f"{dst} was written: check it with `llamalab verify {dst}` against "
                    "a list of your own"
                ) from None
            except OSError as exc:
                raise LlamalabError(f"{sidecar}: cannot move it into place: {exc}") from None
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _publish(out: Path, dst: Path) -> None:
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


# The file in a staging folder that says whose it is: a JSON object with the destination's
# name, the owner's host, pid, process start time and boot.
STAGING_MARKER = ".llamalab-convert"
_MARKER_MAX_BYTES = 4096


def _staging_prefix(dst: Path) -> str:
    return f".{dst.name[:200]}."


def _process_start(pid: int) -> str | None:
    """When process ``pid`` started (clock ticks since boot, Linux), to tell a reused pid."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            text = f.read().decode("ascii", "replace")
    except OSError:
        return None
    # The command name (field 2) is in parentheses and may hold spaces: count after it.
    fields = text[text.rfind(")") + 2 :].split()
    return fields[19] if len(fields) > 19 else None


def _boot_id() -> str | None:
    try:
        with open("/proc/sys/kernel/random/boot_id", encoding="ascii") as f:
            return f.read().strip()
    except OSError:
        return None


def _write_marker(folder: Path, dst: Path) -> None:
    owner = {
        "dst": dst.name,
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "start": _process_start(os.getpid()),
        "boot": _boot_id(),
    }
    (folder / STAGING_MARKER).write_text(json.dumps(owner), encoding="utf-8")


def _owner_is_gone(owner: dict) -> bool:
    """Whether the process a marker names has certainly ended (on doubt: it has not)."""
    pid = owner.get("pid")
    if owner.get("host") != socket.gethostname() or not isinstance(pid, int) or pid <= 0:
        return False  # another machine's (a shared file system), or not a marker we wrote
    boot = _boot_id()
    if owner.get("boot") is not None and boot is not None and owner["boot"] != boot:
        return True  # written before the last reboot
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:  # alive, another user's
        return False
    start = _process_start(pid)
    return owner.get("start") is not None and start is not None and start != owner["start"]


def remove_stale_staging(dst: Path) -> list[Path]:
    """Remove staging folders of conversions to ``dst`` whose process was killed; return them.

    A folder is removed only if everything says it is such a leftover: its name is
    ``.NAME.`` and mkdtemp's eight characters, it is a folder (not a link) of this user
    holding our marker, the marker names ``dst`` and a process on this machine that has
    ended (its pid is gone, or now belongs to a process started later, or the machine
    has rebooted since). Anything else is left as it is.
    """
    parent = dst.parent
    prefix = _staging_prefix(dst)
    pattern = re.compile(re.escape(prefix) + r"[a-z0-9_]{8}")
    removed = []
    try:
        children = list(parent.iterdir())
    except OSError:
        return removed
    for child in children:
        if not pattern.fullmatch(child.name):
            continue
        try:
            st = child.lstat()
            if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid():
                continue
            marker = child / STAGING_MARKER
            if not stat.S_ISREG(marker.lstat().st_mode):
                continue
            with open(marker, "rb") as f:
                owner = json.loads(f.read(_MARKER_MAX_BYTES))
        except (OSError, ValueError):
            continue
        if not isinstance(owner, dict) or owner.get("dst") != dst.name:
            continue
        if _owner_is_gone(owner):
            shutil.rmtree(child, ignore_errors=True)
            removed.append(child)
    return removed


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


def tensors(
    reader: CheckpointReader, dtype: torch.dtype, progress: bool = False, desc: str = "writing"
) -> Iterator[tuple[str, torch.Tensor]]:
    """The checkpoint's tensors in canonical order, converted to ``dtype``, one at a time.

    ``progress`` shows a bar on stderr, one step a tensor.
    """
    config = reader.config
    names = tensor_names.canonical_names(config.n_layers, config.tie_embeddings)
    if progress:
        from tqdm import tqdm

        names = tqdm(names, desc=desc, unit="tensor", leave=False)
    for name in names:
        yield name, reader.load(name).to(dtype)


def copy_tokenizer_files(reader: CheckpointReader, folder: Path, tok=None) -> None:
    """Give ``folder`` the source's tokenizer, so that the converted checkpoint runs.

    A folder's tokenizer files (see ``TOKENIZER_FILES``) are copied as they are; a
    tokenizer held elsewhere (a GGUF file's metadata) is written out in the folder
    formats' own files (``tok``, if already loaded). A source that carries no tokenizer
    gives a folder without one.
    """
    if reader.path.is_dir():
        copied = [f for f in TOKENIZER_FILES if (reader.path / f).is_file()]
        for file in copied:
            shutil.copyfile(reader.path / file, folder / file)
        if any(f in copied for f in ("tokenizer.json", "tokenizer.model")):
            return
    from llamalab.tokenizer.export import write_tokenizer_files

    tok = tok if tok is not None else source_tokenizer(reader)
    if tok is None:
        return  # no tokenizer in the source: the weights alone are converted
    write_tokenizer_files(tok, folder, context_length=reader.config.context_length)


def write_hf(
    reader: CheckpointReader, folder: Path, dtype: torch.dtype, progress: bool = False
) -> None:
    """A transformers-loadable folder: config.json + safetensors (split above 4 GiB, indexed).

    The config and a ``generation_config.json`` carry the tokenizer's BOS and EOS ids and
    every token that ends a turn, so that transformers' ``generate`` stops where
    llamalab's does (see :func:`generation_ids`).
    """
    from safetensors.torch import save_file

    from llamalab.checkpoint.hf_format import INDEX_FILE, SINGLE_FILE, config_to_hf

    config = reader.config
    folder.mkdir(parents=True)
    tok = source_tokenizer(reader)
    ids = generation_ids(tok)
    # config.json names the EOS token alone (as SmolLM2's own does); generation_config.json
    # lists every token generate() stops on.
    ids["eos_token_id"] = tok.eos_id if tok is not None else None
    hf_config = config_to_hf(config, **ids)
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

    for name, tensor in tensors(reader, dtype, progress):
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
    copy_tokenizer_files(reader, folder, tok)
    if not (folder / "generation_config.json").is_file():  # the source's own is kept
        write_generation_config(folder, tok)


def source_tokenizer(reader: CheckpointReader):
    """The source's tokenizer, or None if it carries none."""
    from llamalab.tokenizer import load_tokenizer

    try:
        return load_tokenizer(reader.path)
    except LlamalabError:
        return None


def generation_ids(tok) -> dict[str, int | list[int] | None]:
    """``bos_token_id``, ``eos_token_id`` and ``pad_token_id`` as transformers' configs spell them.

    ``eos_token_id`` is the EOS id alone, or a list of it and every other token that ends
    generation (a chat model's ``<|im_end|>`` or ``<|eot_id|>``), as transformers' own
    Llama 3 exports list them. Without a tokenizer, all are None.
    """
    if tok is None:
        return {"bos_token_id": None, "eos_token_id": None, "pad_token_id": None}
    stops = sorted(tok.stop_ids)
    if tok.eos_id is not None:
        stops = [tok.eos_id, *(i for i in stops if i != tok.eos_id)]
    eos: int | list[int] | None = stops[0] if len(stops) == 1 else (stops or None)
    pad = None
    for name in ("<pad>", "<|pad|>", "<|finetune_right_pad_id|>"):
        pad = tok.piece_to_id(name)
        if pad is not None:
            break
    return {"bos_token_id": tok.bos_id, "eos_token_id": eos, "pad_token_id": pad}


def write_generation_config(folder: Path, tok) -> None:
    """A ``generation_config.json`` with the token ids ``generate`` starts and stops on."""
    if tok is None:
        return
    data = {k: v for k, v in generation_ids(tok).items() if v is not None}
    data["_from_model_config"] = False
    (folder / "generation_config.json").write_text(json.dumps(data, indent=2) + "\n")


def write_meta(
    reader: CheckpointReader,
    folder: Path,
    dtype: torch.dtype,
    shards: int,
    progress: bool = False,
) -> None:
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
        desc = f"writing shard {rank + 1}/{shards}" if shards > 1 else "writing"
        for name, tensor in tensors(reader, dtype, progress, desc):
            dim = split_dim(name)
            if dim is not None and shards > 1:
                tensor = tensor.chunk(shards, dim=dim)[rank].clone()
            shard[name] = tensor.contiguous()
        torch.save(shard, folder / f"consolidated.{rank:02d}.pth")
        del shard
    copy_tokenizer_files(reader, folder)
