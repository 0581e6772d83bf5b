"""Loading a checkpoint for tensor parallelism: each rank materialises only its own slices.

The model is built on the ``meta`` device (no memory), then every parameter is replaced by
this rank's part of it, read from the checkpoint one tensor at a time, as
:func:`~llamalab.parallel.tensor.shard_spec` says. A Hugging Face folder's safetensors
files are read slice by slice, so a rank reads and holds about 1/N of the weights (plus
the norms, which every rank holds whole). Other float formats read a whole tensor, keep
the slice and drop the rest: the peak is then 1/N of the weights plus one tensor.

Quantized GGUF weights are refused for now: their blocks would have to be sliced whole
and stay packed, which the packed layers do not yet do across ranks.
"""

from __future__ import annotations

from pathlib import Path

import torch

from llamalab.checkpoint import names as tensor_names
from llamalab.checkpoint.load import open_checkpoint, resolve_placement, validate
from llamalab.checkpoint.reader import CheckpointReader
from llamalab.errors import LlamalabError
from llamalab.parallel.tensor import Slice, apply_tp, check_degree, shard_parameters

FLOAT_TYPES = {"F32", "F16", "BF16", "F64"}


def refuse_quantized(reader: CheckpointReader) -> None:
    """One clear error where the checkpoint stores a quantized weight (GGUF blocks)."""
    quantized = {
        reader.info(name).stored_type
        for name in reader.names()
        if reader.info(name).stored_type not in FLOAT_TYPES
    }
    if quantized:
        raise LlamalabError(
            f"{reader.path}: tensor parallelism loads float weights only; this file stores "
            f"{', '.join(sorted(quantized))} blocks (convert it to a float checkpoint first)"
        )


def read_slice(reader: CheckpointReader, name: str, cut: Slice | None) -> torch.Tensor:
    """The part ``cut`` of checkpoint tensor ``name`` (the whole of it for ``None``),
    in canonical (Meta) layout."""
    if cut is not None and reader.format == "hf":
        return _hf_slice(reader, name, cut)
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


def load_sharded(
    ref: str | Path,
    mesh,
    *,
    dtype: torch.dtype | str | None = None,
    device: torch.device | str | None = None,
) -> torch.nn.Module:
    """Load a float checkpoint split across ``mesh`` (1-D, the tensor-parallel ranks).

    Every rank calls it with the same ``ref``; each reads only its own slices. Returns an
    eval-mode :class:`~llamalab.model.Transformer` wired by
    :func:`~llamalab.parallel.tensor.apply_tp`: its forward pass gives the full logits on
    every rank. ``dtype`` and ``device`` as for :func:`~llamalab.checkpoint.load.load_model`.
    """
    from llamalab.model import Transformer

    device, dtype = resolve_placement(device, dtype)
    reader = open_checkpoint(ref)
    try:
        refuse_quantized(reader)
        validate(reader)
        config = reader.config
        check_degree(config, mesh.size())
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
