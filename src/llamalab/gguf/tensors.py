"""A GGUF tensor's data, read from the file by its record in the tensor table.

The header parser (``gguf.header``) has already checked that every record's data lies
inside the file; these reads still check that they got every byte, because the file can
shrink between the parse and the read.

Tensors are read with plain file reads rather than through a memory map: pages read
through a map stay resident (and counted) until the file is closed, while a buffer that
is dropped after use keeps peak memory at one copy of the weights.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from llamalab.errors import LlamalabError
from llamalab.gguf.header import TensorRecord

if TYPE_CHECKING:  # torch loads only when a float tensor is asked for
    import torch

__all__ = ["read_tensor", "read_tensor_bytes"]


def _read_into(path: Path, record: TensorRecord, buffer: memoryview) -> None:
    with open(path, "rb") as f:
        f.seek(record.offset)
        if f.readinto(buffer) != buffer.nbytes:
            raise LlamalabError(f"{path}: tensor {record.name} is cut short (truncated file?)")


def read_tensor_bytes(path: Path, record: TensorRecord) -> np.ndarray:
    """A tensor's stored bytes (``record.n_bytes`` of them) as a new uint8 array."""
    buffer = np.empty(record.n_bytes, dtype=np.uint8)
    _read_into(path, record, memoryview(buffer))
    return buffer


def read_tensor(path: Path, record: TensorRecord) -> torch.Tensor:
    """A tensor as float32 of ``record.shape``: F32 read as is, other types dequantized."""
    import torch

    if record.qtype.name == "F32":  # read straight into the result: no second copy
        out = torch.empty(record.shape, dtype=torch.float32)
        _read_into(path, record, memoryview(out.numpy()).cast("B"))
        return out
    from llamalab.gguf.dequant import dequantize

    return dequantize(read_tensor_bytes(path, record), record.qtype, record.shape)
