"""``llamalab convert``: write any checkpoint we read as a Hugging Face, Meta or GGUF checkpoint.

Every writer pulls tensors one at a time from a reader (canonical names and layout) and
writes them before asking for the next, so peak memory stays near one copy of the model
or less. Output goes to a temporary sibling first and is renamed into place at the end:
an interrupted conversion never leaves a half-written checkpoint under the real name, and
an existing destination is never overwritten.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from llamalab.checkpoint import names as tensor_names
from llamalab.checkpoint.load import open_checkpoint, validate
from llamalab.checkpoint.reader import CheckpointReader
from llamalab.errors import LlamalabError

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
    src: str | Path, dst: str | Path, *, to: str, dtype: str | None = None, shards: int = 1
) -> Path:
    """Convert checkpoint ``src`` to format ``to`` ("hf", "meta", "gguf") at ``dst``; return ``dst``."""
    dst = Path(dst)
    if dst.exists():
        raise LlamalabError(f"{dst}: already exists; choose a new destination (nothing was overwritten)")
    if to not in ("hf", "meta", "gguf"):
        raise LlamalabError(f"unknown target format {to!r}; expected hf, meta or gguf")
    if dtype is not None and dtype not in (*TORCH_DTYPES, "q8_0"):
        raise LlamalabError(f"unknown dtype {dtype!r}; expected f32, f16, bf16 or q8_0")
    if dtype == "q8_0" and to != "gguf":
        raise LlamalabError("q8_0 can only be written to GGUF")
    if shards != 1 and to != "meta":
        raise LlamalabError("--shards applies to Meta checkpoints only")
    reader = open_checkpoint(src)
    try:
        validate(reader)
        out_type = dtype or source_float_type(reader)
        with staging(dst) as tmp:
            if to == "hf":
                write_hf(reader, tmp, TORCH_DTYPES[out_type])
            elif to == "meta":
                write_meta(reader, tmp, TORCH_DTYPES[out_type], shards)
            else:
                from llamalab.gguf.writer import write_gguf

                write_gguf(reader, tmp, out_type)
    finally:
        reader.close()
    return dst


def source_float_type(reader: CheckpointReader) -> str:
    """The float type to keep when none is asked for: the embedding's, or f32 for quantized sources."""
    stored = reader.info("tok_embeddings.weight").stored_type.lower()
    return stored if stored in TORCH_DTYPES else "f32"


@contextmanager
def staging(dst: Path) -> Iterator[Path]:
    """Yield a temporary path beside ``dst``; move it to ``dst`` only if the block succeeds."""
    tmp = dst.with_name(f".{dst.name}.partial")
    if tmp.exists():
        shutil.rmtree(tmp) if tmp.is_dir() else tmp.unlink()
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        yield tmp
    except BaseException:
        if tmp.exists():
            shutil.rmtree(tmp) if tmp.is_dir() else tmp.unlink()
        raise
    tmp.rename(dst)


def tensors(reader: CheckpointReader, dtype: torch.dtype) -> Iterator[tuple[str, torch.Tensor]]:
    """The checkpoint's tensors in canonical order, converted to ``dtype``, one at a time."""
    config = reader.config
    for name in tensor_names.canonical_names(config.n_layers, config.tie_embeddings):
        yield name, reader.load(name).to(dtype)


def copy_tokenizer_files(reader: CheckpointReader, folder: Path) -> None:
    if not reader.path.is_dir():
        return
    for file in TOKENIZER_FILES:
        if (reader.path / file).is_file():
            shutil.copyfile(reader.path / file, folder / file)


def write_hf(reader: CheckpointReader, folder: Path, dtype: torch.dtype) -> None:
    """A transformers-loadable folder: config.json + safetensors (split above 4 GiB, with an index)."""
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
        save_file(pending, str(folder / f"part-{len(parts):05d}.safetensors"), metadata={"format": "pt"})
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
    """Meta's layout: params.json + ``shards`` consolidated.NN.pth files, split as Meta split them."""
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
            raise LlamalabError(f"cannot split into {shards} shards: {what} {size} is not divisible by {shards}")
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
