"""Write GGUF files that llama.cpp loads, streaming one tensor at a time.

This is the format alone: tensor types, their encoding, and the order a file is written
in. What a model's file holds (its ``llama.*`` keys, tensor names, tokenizer) is
``checkpoint.gguf_format``'s.

The header (metadata and every tensor's name, shape and type) is written first, then each
tensor's data as it is produced, so at most one tensor is held in memory beyond the source.
Like llama.cpp's own converter, 1-D tensors (norms, rope_freqs) stay float32, and a matrix
whose rows do not divide into the wanted type's blocks falls back to float16.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np
import torch

from llamalab.errors import LlamalabError

__all__ = ["PlannedTensor", "encode_tensor", "tensor_type_for", "tensor_types", "write_tensors"]


def _types() -> dict[str, tuple[gguf.GGMLQuantizationType, gguf.LlamaFileType]]:
    q, f = gguf.GGMLQuantizationType, gguf.LlamaFileType
    return {
        "f32": (q.F32, f.ALL_F32),
        "f16": (q.F16, f.MOSTLY_F16),
        "bf16": (q.BF16, f.MOSTLY_BF16),
        "q8_0": (q.Q8_0, f.MOSTLY_Q8_0),
        "q5_1": (q.Q5_1, f.MOSTLY_Q5_1),
        "q5_0": (q.Q5_0, f.MOSTLY_Q5_0),
        "q4_1": (q.Q4_1, f.MOSTLY_Q4_1),
        "q4_0": (q.Q4_0, f.MOSTLY_Q4_0),
    }


def tensor_types(out_type: str) -> tuple[gguf.GGMLQuantizationType, gguf.LlamaFileType]:
    """The tensor type and the ``general.file_type`` of ``out_type`` (``"q8_0"`` ...).

    Raises:
        LlamalabError: ``out_type`` is not one of ``llamalab.gguf.WRITE_TYPES``.
    """
    types = _types()
    if out_type not in types:
        raise LlamalabError(
            f"cannot write GGUF tensors as {out_type!r}; expected {', '.join(types)}"
        )
    return types[out_type]


def encode_tensor(tensor: torch.Tensor, qtype: gguf.GGMLQuantizationType) -> np.ndarray:
    """The bytes GGUF stores for ``tensor`` in type ``qtype``, as a numpy array."""
    array = tensor.detach().to(torch.float32).contiguous().numpy()
    if qtype == gguf.GGMLQuantizationType.F32:
        return array
    if qtype == gguf.GGMLQuantizationType.F16:
        return array.astype(np.float16)
    return gguf.quants.quantize(array, qtype)  # BF16 and the quants by gguf's reference code


def tensor_type_for(
    shape: Sequence[int], wanted: gguf.GGMLQuantizationType
) -> gguf.GGMLQuantizationType:
    """Which type a tensor is written in: norms and odd-width rows cannot take the wanted type."""
    if len(shape) == 1:
        return gguf.GGMLQuantizationType.F32
    block, _ = gguf.GGML_QUANT_SIZES[wanted]
    if shape[-1] % block:
        return gguf.GGMLQuantizationType.F16
    return wanted


@dataclass(frozen=True)
class PlannedTensor:
    """One tensor of a file being written: its name in the file, shape (PyTorch order), type."""

    name: str
    shape: tuple[int, ...]
    qtype: gguf.GGMLQuantizationType

    @property
    def n_bytes(self) -> int:
        """The size of its data in the file."""
        block, block_bytes = gguf.GGML_QUANT_SIZES[self.qtype]
        return int(np.prod(self.shape)) // block * block_bytes


def write_tensors(
    writer: gguf.GGUFWriter,
    path: Path,
    plan: Sequence[PlannedTensor],
    produce: Callable[[PlannedTensor], torch.Tensor],
    *,
    progress: str | None = None,
) -> None:
    """Write ``writer``'s metadata and the tensors of ``plan`` to a new file at ``path``.

    The whole tensor table precedes the data, so every tensor is planned up front; then
    ``produce`` is asked for each one in turn, and its encoding written before the next
    is asked for. ``progress``, if given, labels a bar on stderr (quantizing takes a while).
    """
    for tensor in plan:
        writer.add_tensor_info(
            tensor.name,
            tensor.shape,
            np.dtype(np.float32),
            tensor.n_bytes,
            raw_dtype=tensor.qtype,
        )
    writer.write_header_to_file(path)
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    steps: Sequence[PlannedTensor] = plan
    if progress is not None:
        from tqdm import tqdm

        steps = tqdm(plan, desc=progress, unit="tensor", leave=False)
    for tensor in steps:
        writer.write_tensor_data(encode_tensor(produce(tensor), tensor.qtype))
    writer.close()
