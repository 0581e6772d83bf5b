"""Loading a checkpoint for tensor parallelism: each rank materialises only its own slices.

The model is built on the ``meta`` device (no memory), then every parameter is replaced by
this rank's part of it, read from the checkpoint one tensor at a time, as
:func:`~llamalab.parallel.tensor.shard_spec` says. A Hugging Face folder's safetensors
files are read slice by slice, so a rank reads and holds about 1/N of the weights (plus
the norms, which every rank holds whole). A GGUF file's slices are read from the file
as byte ranges: whole rows for a split by rows, each row's run of whole blocks for a split
by columns, then dequantized to the model's dtype (a split that would cut a quantization
block is refused). Other formats read a whole tensor, keep the slice and drop the rest:
the peak is then 1/N of the weights plus one tensor.

Quantized GGUF weights do not stay packed across ranks yet: each rank dequantizes its
own slices, so it holds 1/N of the float weights.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from llamalab.checkpoint import names as tensor_names
from llamalab.checkpoint.load import open_checkpoint, resolve_placement, validate
from llamalab.checkpoint.reader import CheckpointReader
from llamalab.errors import LlamalabError
from llamalab.parallel.tensor import Slice, apply_tp, check_degree, shard_parameters, shard_spec


def check_blocks(reader: CheckpointReader, world: int) -> None:
    """One clear error where a split by columns would cut a GGUF quantization block.

    Rows are always whole blocks (a GGUF row is a run of blocks); a column split must
    start and end on a block boundary on every rank."""
    if reader.format != "gguf":
        return
    from llamalab.gguf.dequant import BLOCK_LAYOUTS

    records = reader._tensors  # type: ignore[attr-defined]
    for rank in range(world):
        for name, cut in shard_spec(reader.config, world, rank).items():
            if cut is None or cut.dim != 1 or name not in records:
                continue
            record = records[name]
            layout = BLOCK_LAYOUTS.get(record.qtype)
            block = layout[0] if layout is not None else 1
            if cut.start % block or cut.stop % block:
                raise LlamalabError(
                    f"{reader.path}: tensor {record.name} ({record.qtype.name}, blocks of "
                    f"{block} values) cannot be split across {world} ranks: rank {rank}'s "
                    f"columns {cut.start}..{cut.stop} would cut a block (use a degree that "
                    f"divides {record.shape[-1]} into multiples of {block})"
                )


def read_slice(reader: CheckpointReader, name: str, cut: Slice | None) -> torch.Tensor:
    """The part ``cut`` of checkpoint tensor ``name`` (the whole of it for ``None``),
    in canonical (Meta) layout."""
    if cut is not None and reader.format == "hf":
        return _hf_slice(reader, name, cut)
    if cut is not None and reader.format == "gguf":
        return _gguf_slice(reader, name, cut)
    tensor = reader.load(name)
    if cut is None:
        return tensor
    return tensor.narrow(cut.dim, cut.start, cut.stop - cut.start).clone()


def _hf_slice(reader: CheckpointReader, name: str, cut: Slice) -> torch.Tensor:
    # safetensors reads just the asked rows or columns from its memory map. The reader's
    # private tables are used: the reader interface loads whole tensors only.
    file, hf_name = reader._where[name]  # type: ignore[attr-defined]
    view = reader._handles[file].get_slice(hf_name)  # type: ignore[attr-defined]
    if cut.dim == 0:
        part = view[cut.start : cut.stop]
    else:
        part = view[:, cut.start : cut.stop]
    if tensor_names.is_query_or_key(name):
        # Hugging Face permutes the rows within each head; the cut holds whole heads, so
        # undoing the permutation head by head gives Meta's rows of the same heads.
        head_dim = reader.config.head_dim
        part = tensor_names.hf_to_meta_qk(part, (cut.stop - cut.start) // head_dim)
    return part


def _gguf_slice(reader: CheckpointReader, name: str, cut: Slice) -> torch.Tensor:
    # A GGUF tensor is row-major, each row a run of whole blocks (GGUF keeps q/k rows in
    # Meta's order): a row split is one byte range, a column split one range per row
    # (block-aligned, see check_blocks). Only those bytes are read, then dequantized.
    from llamalab.gguf.dequant import BLOCK_LAYOUTS, dequantize

    record = reader._tensors[name]  # type: ignore[attr-defined]
    rows, cols = record.shape
    block, block_bytes = BLOCK_LAYOUTS[record.qtype]
    row_bytes = cols // block * block_bytes
    if cut.dim == 0:
        first, count, skip, width = cut.start, cut.stop - cut.start, 0, row_bytes
        shape = (count, cols)
    else:
        first, count = 0, rows
        skip = cut.start // block * block_bytes
        width = (cut.stop - cut.start) // block * block_bytes
        shape = (rows, cut.stop - cut.start)
    data = np.empty((count, width), dtype=np.uint8)
    with open(reader.path, "rb") as f:
        fd = f.fileno()
        if skip == 0 and width == row_bytes:  # whole rows: one read
            _pread_into(fd, data.reshape(-1), record.offset + first * row_bytes, reader, name)
        else:
            for i in range(count):
                at = record.offset + (first + i) * row_bytes + skip
                _pread_into(fd, data[i], at, reader, name)
    return dequantize(data, record.qtype, shape)


def _pread_into(fd: int, out: np.ndarray, offset: int, reader: CheckpointReader, name: str) -> None:
    view = memoryview(out).cast("B")
    done = 0
    while done < len(view):
        n = os.preadv(fd, [view[done:]], offset + done)
        if n == 0:
            raise LlamalabError(f"{reader.path}: tensor {name} is cut short (truncated file?)")
        done += n


def load_sharded(
    ref: str | Path,
    mesh,
    *,
    dtype: torch.dtype | str | None = None,
    device: torch.device | str | None = None,
) -> torch.nn.Module:
    """Load a checkpoint split across ``mesh`` (1-D, the tensor-parallel ranks), as floats.

    Every rank calls it with the same ``ref``; each reads only its own slices. Returns an
    eval-mode :class:`~llamalab.model.Transformer` wired by
    :func:`~llamalab.parallel.tensor.apply_tp`: its forward pass gives the full logits on
    every rank. ``dtype`` and ``device`` as for :func:`~llamalab.checkpoint.load.load_model`.
    """
    from llamalab.model import Transformer

    device, dtype = resolve_placement(device, dtype)
    reader = open_checkpoint(ref)
    try:
        validate(reader)
        config = reader.config
        check_degree(config, mesh.size())
        check_blocks(reader, mesh.size())
        with torch.device("meta"):
            model = Transformer(config)

        def read(name: str, cut: Slice | None) -> torch.Tensor:
            return read_slice(reader, name, cut).to(device=device, dtype=dtype)

        shard_parameters(model, mesh, read)
    finally:
        reader.close()
    apply_tp(model, mesh)
    model.init_buffers(device)
    return model.eval()
