"""Loading a checkpoint for tensor parallelism: each rank materialises only its own slices.

The model is built on the ``meta`` device (no memory), then every parameter is replaced by
this rank's part of it, read from the checkpoint one tensor at a time, as
:func:`~llamalab.parallel.tensor.shard_spec` says. A Hugging Face folder's safetensors
files are read slice by slice, so a rank reads and holds about 1/N of the weights (plus
the norms, which every rank holds whole). A GGUF file's slices are read from the file
as byte ranges: whole rows for a split of the output features, each row's run of whole
blocks for a split of the input features (a split that would cut a quantization block is
refused). A Meta folder's ``consolidated.NN.pth`` shards, of any model-parallel degree,
are memory-mapped and each rank copies out only the pieces of its slices. Other formats
read a whole tensor, keep the slice and drop the rest: the peak is then 1/N of the
weights plus one tensor.

With ``packed=True`` (CPUs) the linear layers and the embedding stay in their stored
GGUF type: each rank builds llamalab's packed layers (``quant/linear.py``) from its
slice's bytes, and :func:`~llamalab.parallel.tensor.wire_packed` joins them. Otherwise
the slices are dequantized to the model's dtype and split with DTensor.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from llamalab.checkpoint import names as tensor_names
from llamalab.checkpoint.load import (
    _release_freed_memory,
    open_checkpoint,
    resolve_placement,
    validate,
)
from llamalab.checkpoint.reader import CheckpointReader
from llamalab.errors import LlamalabError
from llamalab.parallel.tensor import (
    Slice,
    apply_tp,
    check_degree,
    shard_parameters,
    shard_spec,
    wire_packed,
)


def check_blocks(reader: CheckpointReader, world: int, exact: bool = False) -> None:
    """One clear error where a split by columns would cut a GGUF quantization block.

    Rows are always whole blocks (a GGUF row is a run of blocks); a column split must
    start and end on a block boundary on every rank."""
    if reader.format != "gguf":
        return
    from llamalab.gguf.dequant import BLOCK_LAYOUTS

    records = reader._tensors  # type: ignore[attr-defined]
    for rank in range(world):
        for name, cut in shard_spec(reader.config, world, rank, exact).items():
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
    if reader.format == "meta":
        return _meta_slice(reader, name, cut)
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


def _meta_slice(reader: CheckpointReader, name: str, cut: Slice | None) -> torch.Tensor:
    # Meta's shards (consolidated.NN.pth, memory-mapped) split each tensor along Meta's
    # own dimension (column-parallel weights by rows, row-parallel ones by columns, the
    # embedding by columns in LLaMA 1/2, by rows in Llama 3), in any number of pieces
    # that need not match the ranks. Each shard's piece of the rank's cut is taken from
    # the map and copied; pages outside the cut are never touched.
    from llamalab.checkpoint.meta_format import split_dim

    shards = [shard[name] for shard in reader._shards]  # type: ignore[attr-defined]
    mp_dim = split_dim(name, reader._tok_dim) if len(shards) > 1 else None  # type: ignore[attr-defined]
    if mp_dim is None:
        shards = shards[:1]  # replicated (or one shard): shard 0 holds the whole tensor
    if cut is None:
        parts = shards
    elif cut.dim != mp_dim:
        # Cut across the shards' split: the same rows or columns from every shard.
        parts = [p.narrow(cut.dim, cut.start, cut.stop - cut.start) for p in shards]
    else:
        # Cut along it: only the shards that overlap the cut, each trimmed to it.
        parts, at = [], 0
        for p in shards:
            size = p.shape[mp_dim]
            lo, hi = max(cut.start, at), min(cut.stop, at + size)
            if lo < hi:
                parts.append(p.narrow(mp_dim, lo - at, hi - lo))
            at += size
    try:
        return torch.cat(parts, dim=mp_dim or 0) if len(parts) > 1 else parts[0].clone()
    except RuntimeError as exc:
        raise LlamalabError(f"{reader.path}: shards of {name} do not fit together: {exc}") from None


def _gguf_slice(reader: CheckpointReader, name: str, cut: Slice) -> torch.Tensor:
    from llamalab.gguf.dequant import dequantize

    weight = gguf_slice_bytes(reader, name, cut)
    return dequantize(weight.data, weight.qtype, weight.shape)


def gguf_slice_bytes(reader: CheckpointReader, name: str, cut: Slice | None):
    """The part ``cut`` of GGUF tensor ``name`` as stored (a
    :class:`~llamalab.quant.linear.GGUFWeight`: its bytes, type and the part's shape).

    A GGUF tensor is row-major, each row a run of whole blocks (GGUF keeps q/k rows in
    Meta's order): a row split is one byte range, a column split one range per row
    (block-aligned, see :func:`check_blocks`). Only those bytes are read.
    """
    from llamalab.gguf.dequant import BLOCK_LAYOUTS
    from llamalab.quant.linear import GGUFWeight

    record = reader._tensors[name]  # type: ignore[attr-defined]
    rows, cols = record.shape
    block, block_bytes = BLOCK_LAYOUTS[record.qtype]
    row_bytes = cols // block * block_bytes
    if cut is None:
        cut = Slice(0, 0, rows)
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
    return GGUFWeight(data.reshape(-1), record.qtype, shape)


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
    packed: bool = False,
    exact: bool = False,
) -> torch.nn.Module:
    """Load a checkpoint split across ``mesh`` (1-D, the tensor-parallel ranks).

    Every rank calls it with the same ``ref``; each reads only its own slices. Returns an
    eval-mode :class:`~llamalab.model.Transformer` whose forward pass gives the full
    logits on every rank. ``dtype`` and ``device`` as for
    :func:`~llamalab.checkpoint.load.load_model`. Float weights are split with DTensor
    (:func:`~llamalab.parallel.tensor.apply_tp`); ``packed`` (CPU only) keeps the linear
    layers packed, GGUF weights in their stored type, as ``load_model(packed=True)``
    does in one process. ``exact``: ``wo`` and ``w2`` split by output rows with their
    input gathered, for one process's float logits bit for bit (``parallel/tensor.py``).
    """
    from llamalab.model import Transformer

    device, dtype = resolve_placement(device, dtype)
    if packed and device.type != "cpu":
        raise LlamalabError("packed linear layers run on the CPU only")
    reader = open_checkpoint(ref)
    try:
        validate(reader)
        config = reader.config
        check_degree(config, mesh.size())
        check_blocks(reader, mesh.size(), exact)
        with torch.device("meta"):
            model = Transformer(config)
        if packed:
            _fill_packed(model, reader, mesh, dtype, exact)
        else:

            def read(name: str, cut: Slice | None) -> torch.Tensor:
                return read_slice(reader, name, cut).to(device=device, dtype=dtype)

            shard_parameters(model, mesh, read, exact)
    finally:
        reader.close()
    if packed:
        wire_packed(model, mesh, exact)
    else:
        apply_tp(model, mesh, exact)
    model.init_buffers(device)
    return model.eval()


_BAND = 1024  # output rows packed at a time for a large vnni weight (a multiple of its 16)


def _banded_linear(source, kernel):
    """``QuantizedLinear.from_gguf`` of a slice, a band of :data:`_BAND` rows at a time where
    the vnni kernel takes it: packing a band of 4,096 rows costs about 0.2 GB of transients
    (2,048 columns), which was most of a packed rank's peak over its weights (the output
    layer). The bands' buffers are whole tiles of 16 rows, so they join as stored."""
    from llamalab.kernels.native import vnni_available
    from llamalab.quant.linear import QuantizedLinear
    from llamalab.quant.plan import vnni_takes

    rows, cols = source.shape
    qtype = source.qtype
    whole = kernel in (None, "vnni") and vnni_takes(qtype.name, source.shape)
    if rows <= _BAND or not whole or not vnni_available():
        return QuantizedLinear.from_gguf(source.data, qtype, source.shape, kernel=kernel)
    row_bytes = source.data.size // rows
    data = source.data.reshape(rows, row_bytes)
    parts = []
    for start in range(0, rows, _BAND):
        band = data[start : start + _BAND]
        layer = QuantizedLinear.from_gguf(band.reshape(-1), qtype, (band.shape[0], cols))
        if layer.kernel != "vnni":  # scales beyond float16: one process's choice, whole
            return QuantizedLinear.from_gguf(source.data, qtype, source.shape, kernel=kernel)
        parts.append(layer._vnni)
    buffer = torch.cat([buffer for buffer, _ in parts])
    return QuantizedLinear(cols, rows, None, None, qtype.name, vnni=(buffer, parts[0][1]))


def _kernel_of_one_process(qtype, full: tuple[int, int], local: tuple[int, int]):
    """The kernel for a rank's slice: the one that one process picks for the whole weight
    (None: the default choice), so that the ranks compute what one process computes.
    Only a slice that takes the vnni kernel where the whole weight does not needs a say
    (an output layer of 321 rows is cut into 161 and 160): it keeps one process's kernel."""
    from llamalab.kernels.native import vnni_available
    from llamalab.quant.linear import fp16_kernel_available, int4_kernel_available
    from llamalab.quant.plan import int4_takes, vnni_takes

    if not vnni_available() or vnni_takes(qtype.name, full) or not vnni_takes(qtype.name, local):
        return None
    if int4_takes(qtype.name, full) and int4_takes(qtype.name, local) and int4_kernel_available():
        return "int4"
    return "fp16" if fp16_kernel_available() else "float32"


def _fill_packed(
    model: torch.nn.Module, reader: CheckpointReader, mesh, dtype, exact: bool = False
) -> None:
    """Give ``model`` (on ``meta``) this rank's slices as packed layers, the way
    ``checkpoint/load.py`` builds one process's: every ``layers.*`` linear and the output
    as a :class:`~llamalab.quant.linear.QuantizedLinear` (from the slice's GGUF bytes, or
    its float values for other formats), a quantized GGUF embedding as a
    :class:`~llamalab.quant.linear.PackedEmbedding` of the rank's vocabulary rows, norms
    as floats; then q/k/v and w1/w3 fused, as in one process."""
    from gguf.constants import GGMLQuantizationType

    from llamalab.quant.linear import (
        PackedEmbedding,
        QuantizedLinear,
        fuse_projections,
        quantizable_linears,
    )

    config = model.config
    spec = shard_spec(config, mesh.size(), mesh.get_local_rank(), exact)
    gguf = reader.format == "gguf"

    def stored(name: str, cut: Slice | None):
        return gguf_slice_bytes(reader, name, cut) if gguf else read_slice(reader, name, cut)

    for module_name in quantizable_linears(model):
        name = f"{module_name}.weight"
        cut = spec[name]
        if name == "output.weight" and config.tie_embeddings:
            name = "tok_embeddings.weight"  # packed from the embedding's rows, as one process
        source = stored(name, cut)
        if gguf:
            full = tuple(model.get_submodule(module_name).weight.shape)
            kernel = _kernel_of_one_process(source.qtype, full, source.shape)
            layer = _banded_linear(source, kernel)
        else:
            layer = QuantizedLinear.from_float(source)
        parent, _, child = module_name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, layer)
        del source
        # Each layer's read buffer and packing transients are freed, but glibc keeps the
        # pages: handed back layer by layer, they never pile up into the rank's peak.
        _release_freed_memory()
    cut = spec["tok_embeddings.weight"]
    embedding = stored("tok_embeddings.weight", cut)
    if gguf and embedding.qtype != GGMLQuantizationType.F32:
        model.tok_embeddings = PackedEmbedding(embedding, dtype)
    else:
        if gguf:
            embedding = read_slice(reader, "tok_embeddings.weight", cut)
        weight = embedding.to(dtype=dtype).contiguous()
        model.tok_embeddings = torch.nn.Embedding.from_pretrained(weight, freeze=True)
    for name, cut in spec.items():
        if cut is None:  # the norms: whole on every rank
            owner, attr = name.rsplit(".", 1)
            tensor = read_slice(reader, name, None).to(dtype=dtype).clone()
            setattr(model.get_submodule(owner), attr, torch.nn.Parameter(tensor, False))
    fuse_projections(model)
    _release_freed_memory()
