"""``load_config`` and ``load_model``: any checkpoint reference to a config or a ready model.

A reference is a GGUF file, a Hugging Face folder, a Meta folder, or (for configs) a preset
name. Formats are told apart by what the files contain, never by their names.

Loading builds the model on the ``meta`` device (no memory), then fills it tensor by
tensor with ``load_state_dict(assign=True)``: peak memory is about one copy of the weights.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from llamalab.checkpoint.names import canonical_names, expected_shapes
from llamalab.checkpoint.reader import CheckpointReader
from llamalab.config import PRESETS, ModelConfig
from llamalab.errors import LlamalabError

if TYPE_CHECKING:  # torch loads with the weights; opening and checking need none
    import torch


def open_checkpoint(ref: str | Path) -> CheckpointReader:
    """Open a checkpoint lazily, detecting its format from its contents.

    Opening a GGUF file loads no torch (``llamalab info`` stays light); the Meta and
    Hugging Face readers need it.
    """
    from llamalab.default_model import resolve_model_path
    from llamalab.files import refuse_special
    from llamalab.gguf.header import has_gguf_magic, read_file_head

    path = resolve_model_path(ref)
    if not path.exists():
        hint = f" (known presets: {', '.join(PRESETS)})" if "/" not in str(ref) else ""
        raise LlamalabError(f"{path}: no such file or folder{hint}")
    refuse_special(path)  # a FIFO or a device: say which, never open it
    if path.is_file():
        magic = read_file_head(path, 4)
        if has_gguf_magic(magic):
            from llamalab.checkpoint.gguf_format import GGUFReader

            return GGUFReader(path)
        raise LlamalabError(
            f"{path}: not a model file (starts with {magic!r}, a GGUF file starts with b'GGUF'); "
            "pass the folder for Hugging Face or Meta checkpoints"
        )
    from llamalab.checkpoint.hf_format import HFReader, is_hf_folder
    from llamalab.checkpoint.meta_format import MetaReader, is_meta_folder

    if is_meta_folder(path):
        return MetaReader(path)
    if is_hf_folder(path):
        return HFReader(path)
    raise LlamalabError(f"{path}: no checkpoint here (expected params.json or config.json)")


def load_config(ref: str | Path) -> ModelConfig:
    """The ModelConfig of a preset name or a checkpoint (GGUF file, HF folder, Meta folder)."""
    if isinstance(ref, str) and ref in PRESETS:
        return PRESETS[ref]
    reader = open_checkpoint(ref)
    try:
        return reader.config
    finally:
        reader.close()


def default_dtype(device: torch.device) -> torch.dtype:
    """The dtype a model is loaded in when none is asked for, on ``device``."""
    # This class of CPU has no fast bf16/fp16 matmul; GPUs are fastest in bf16.
    import torch

    return torch.bfloat16 if device.type == "cuda" else torch.float32


def resolve_placement(
    device: torch.device | str | None, dtype: torch.dtype | str | None
) -> tuple[torch.device, torch.dtype]:
    """The device (default: the CPU) and dtype (a name, or :func:`default_dtype`) to load in."""
    import torch

    device = torch.device(device or "cpu")
    if isinstance(dtype, str):
        dtype = resolve_dtype(dtype)
    return device, dtype or default_dtype(device)


def load_model(
    ref: str | Path,
    *,
    dtype: torch.dtype | str | None = None,
    device: torch.device | str | None = None,
    progress: bool = False,
    packed: bool = False,
) -> torch.nn.Module:
    """Load a checkpoint into a :class:`~llamalab.model.Transformer`, in eval mode.

    ``dtype`` defaults to float32 on the CPU and bfloat16 on CUDA; ``device`` to the CPU.
    ``progress`` shows a progress bar on stderr while the tensors load. ``packed`` (CPU
    inference only) builds the linear layers as packed
    :class:`~llamalab.quant.linear.QuantizedLinear`
    modules straight from the stored weights — GGUF bytes are never expanded to a float32
    copy — for faster decoding; the embedding and norms stay in ``dtype``.
    """
    device, dtype = resolve_placement(device, dtype)
    reader = open_checkpoint(ref)
    try:
        return build_model(reader, dtype, device, progress=progress, packed=packed)
    finally:
        reader.close()


def validate(reader: CheckpointReader) -> None:
    """Check that the checkpoint holds every tensor its config needs, each of the right shape."""
    config = reader.config
    # Names first: a config that claims more layers than the checkpoint holds is refused
    # before a model of that many layers is built, even on the meta device.
    needed = canonical_names(config.n_layers, config.tie_embeddings)
    present = set(reader.names())
    missing = [n for n in needed if n not in present]
    if missing:
        shown = ", ".join(missing[:3]) + (
            f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        )
        raise LlamalabError(f"{reader.path}: missing tensor(s) {shown}")
    expected = expected_shapes(config)
    for name in needed:
        shape = reader.info(name).shape
        if shape != expected[name]:
            raise LlamalabError(
                f"{reader.path}: tensor {name} has shape {list(shape)}, "
                f"the config needs {list(expected[name])}"
            )


def build_model(
    reader: CheckpointReader,
    dtype: torch.dtype,
    device: torch.device,
    *,
    progress: bool = False,
    packed: bool = False,
) -> torch.nn.Module:
    """An eval-mode Transformer filled from an open ``reader`` (see :func:`load_model`)."""
    import torch

    from llamalab.model import Transformer

    validate(reader)
    config = reader.config
    with torch.device("meta"):
        model = Transformer(config)
    state: dict[str, torch.Tensor] = {}
    names = canonical_names(config.n_layers, config.tie_embeddings)
    if packed:
        if device.type != "cpu":
            raise LlamalabError("packed linear layers run on the CPU only")
        from gguf.constants import GGMLQuantizationType

        from llamalab.quant.linear import (
            GGUFWeight,
            PackedEmbedding,
            fuse_projections,
            quantize_model,
        )

        present = set(reader.names())
        look = _packed_lookup(reader)
        hit = look.file if look is not None else None
        from_file = lambda name: reader.raw(name) if name in present else None
        source = from_file if hit is None else _cached_linears(hit, reader, from_file)
        replaced = {
            f"{name}.weight"
            for name in quantize_model(model, source, progress=progress and hit is None)
        }
        if hit is not None and _matches(hit, _EMBEDDING, reader, "tok_embeddings.weight"):
            entry = hit.entries[_EMBEDDING]
            weight = GGUFWeight(
                hit.tensor(_EMBEDDING), GGMLQuantizationType[entry.stored_type], entry.shape
            )
            model.tok_embeddings = PackedEmbedding(weight, dtype, copy=False)
            hit.release(_EMBEDDING)  # a lookup touches a few rows; the check read them all
            replaced.add("tok_embeddings.weight")
        else:
            embedding = reader.raw("tok_embeddings.weight")
            if isinstance(embedding, GGUFWeight) and embedding.qtype != GGMLQuantizationType.F32:
                model.tok_embeddings = PackedEmbedding(embedding, dtype)
                replaced.add("tok_embeddings.weight")
        if look is not None and hit is None and look.target is not None:
            _write_packed_cache(model, look)
        names = [n for n in names if n not in replaced]
    if progress:
        from tqdm import tqdm

        names = tqdm(names, desc="loading", unit="tensor", leave=False)
    for name in names:
        tensor = reader.load(name).to(device=device, dtype=dtype)
        # What is left beside packed layers is small (norms): copies let the file's memory
        # map go, instead of keeping its pages resident for a few kilobytes.
        state[name] = tensor.clone() if packed else tensor
    if config.tie_embeddings and isinstance(model.output, torch.nn.Linear):
        state["output.weight"] = state["tok_embeddings.weight"]
    model.load_state_dict(state, strict=True, assign=True)
    if packed:
        from llamalab.kernels.decode_path import choose

        fuse_projections(model)
        choose(model, packed=True)
        _release_freed_memory()
    model.tie_weights()
    model.init_buffers(device)
    return model.eval()


_EMBEDDING = "tok_embeddings"
# The order a cache file holds a block's weights in: the parts that fuse_projections joins
# (q, k, v; w1, w3) lie back to back, so the joined weight is a view of the file too.
_CACHE_ORDER = {
    "attention.wq": 0, "attention.wk": 1, "attention.wv": 2, "attention.wo": 3,
    "feed_forward.w1": 4, "feed_forward.w3": 5, "feed_forward.w2": 6,
}  # fmt: skip


def _packed_lookup(reader: CheckpointReader):
    """The packed-weight cache's lookup for a GGUF file whose weights go to llamalab's
    kernels (the only layout the cache holds), else None."""
    from llamalab.kernels.native import vnni_available

    if reader.format != "gguf" or not vnni_available():
        return None
    from llamalab.quant import packed_cache

    return packed_cache.lookup(reader.path, reader.data_start)


def _matches(hit, entry_name: str, reader: CheckpointReader, tensor: str) -> bool:
    """Whether the cache file holds ``entry_name`` as the shape and type the model file
    stores ``tensor`` in (a forged header that hashes right still does not pass)."""
    entry = hit.entries.get(entry_name)
    if entry is None or tensor not in reader.names():
        return False
    info = reader.info(tensor)
    expected_kind = "rows" if entry_name == _EMBEDDING else "vnni"
    return (
        entry.kind == expected_kind
        and entry.shape == tuple(info.shape)
        and entry.stored_type == info.stored_type
    )


def _cached_linears(hit, reader: CheckpointReader, fallback):
    """A weight source for ``quantize_model``: a cache file's packed layers, else ``fallback``."""
    from llamalab.quant.linear import QuantizedLinear
    from llamalab.quant.plan import VnniLayout

    present = set(reader.names())

    def source(name: str):
        module = name.removesuffix(".weight")
        # A tied output layer is packed from the embedding's bytes.
        tensor = name if name in present or module != "output" else "tok_embeddings.weight"
        # The embedding's entry is its rows as stored, never a packed layer: a tied output
        # the file does not hold (the kernels did not take it) is built from the model file.
        if module == _EMBEDDING or not _matches(hit, module, reader, tensor):
            return fallback(name)
        entry = hit.entries[module]
        out_features, in_features = entry.shape
        vnni = (hit.tensor(module), VnniLayout(*entry.layout))
        return QuantizedLinear(in_features, out_features, None, None, entry.stored_type, vnni=vnni)

    return source


def _cache_rank(name: str) -> tuple[int, int, str]:
    parts = name.split(".", 2)
    if parts[0] == "layers" and len(parts) == 3 and parts[1].isdigit():
        return int(parts[1]), _CACHE_ORDER.get(parts[2], len(_CACHE_ORDER)), name
    return 1 << 62, 0, name  # the output layer after the blocks


def _write_packed_cache(model: torch.nn.Module, look) -> None:
    """Write the model's packed layers (and its packed embedding's rows) to the cache file,
    then let the model use the file's pages instead of its own copies.

    A folder that cannot be written (read-only, full) leaves the model as packed in
    memory, with a note: the next load packs again.
    """
    from llamalab.quant import packed_cache
    from llamalab.quant.linear import PackedEmbedding, QuantizedLinear
    from llamalab.quant.plan import VnniLayout

    layers = sorted(
        (
            (name, module)
            for name, module in model.named_modules()
            if isinstance(module, QuantizedLinear) and module.kernel == "vnni"
        ),
        key=lambda item: _cache_rank(item[0]),
    )
    items = [
        (
            packed_cache.Entry(
                name,
                "vnni",
                0,
                0,
                (m.out_features, m.in_features),
                m.source_type,
                tuple(m._vnni[1]),
            ),
            m._vnni[0],
        )
        for name, m in layers
    ]
    embedding = model.tok_embeddings
    if isinstance(embedding, PackedEmbedding):
        shape = (embedding.num_embeddings, embedding.embedding_dim)
        entry = packed_cache.Entry(_EMBEDDING, "rows", 0, 0, shape, embedding.qtype.name)
        items.append((entry, embedding._rows))
    if not items:
        return
    try:
        packed_cache.write_packed(look.target, look.identity, items)
    except OSError as exc:
        packed_cache.note(
            f"cannot write the packed weights to {look.target.parent} "
            f"({exc.strerror or exc}); they are packed again at every load"
        )
        return
    try:
        written = packed_cache.PackedFile.open(look.target, look.identity)
    except packed_cache.CacheMismatch as why:  # replaced meanwhile by another process
        packed_cache.note(f"the packed weights just written cannot be read back ({why})")
        return
    for name, module in layers:
        module._vnni = (written.tensor(name), VnniLayout(*module._vnni[1]))
    if isinstance(embedding, PackedEmbedding):
        embedding._rows = written.tensor(_EMBEDDING).view(embedding.num_embeddings, -1)
        written.release(_EMBEDDING)


def _release_freed_memory() -> None:
    """Hand the heap's free pages back to the system (glibc keeps them after a load's
    transient buffers are freed, and they would count in the resident size for good)."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to do
        pass


_DTYPE_NAMES = {
    "float32": "float32", "f32": "float32", "fp32": "float32",
    "float16": "float16", "f16": "float16", "fp16": "float16", "half": "float16",
    "bfloat16": "bfloat16", "bf16": "bfloat16",
}  # fmt: skip


def resolve_dtype(name: str) -> torch.dtype:
    """The torch dtype of a name such as "bf16" or "float32"."""
    import torch

    try:
        return getattr(torch, _DTYPE_NAMES[name.lower()])
    except KeyError:
        raise LlamalabError(
            f"unknown dtype {name!r}; expected one of {', '.join(_DTYPE_NAMES)}"
        ) from None
