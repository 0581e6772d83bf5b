"""Write GGUF files that llama.cpp loads, streaming one tensor at a time.

The header (metadata and every tensor's name, shape and type) is written first, then each
tensor's data as it is produced, so at most one tensor is held in memory beyond the source.
Like llama.cpp's own converter, 1-D tensors (norms, rope_freqs) stay float32, and a matrix
whose rows do not divide into Q8_0 blocks falls back to float16.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from llamalab.checkpoint import names as tensor_names
from llamalab.checkpoint.reader import CheckpointReader
from llamalab.config import ModelConfig
from llamalab.errors import LlamalabError

ARCHITECTURE = "llama"


def _gguf_types():  # imported lazily: gguf is only needed when writing
    import gguf

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


def encode_tensor(tensor: torch.Tensor, qtype) -> np.ndarray:
    """The bytes GGUF stores for ``tensor`` in type ``qtype``, as a numpy array."""
    import gguf

    array = tensor.detach().to(torch.float32).contiguous().numpy()
    if qtype == gguf.GGMLQuantizationType.F32:
        return array
    if qtype == gguf.GGMLQuantizationType.F16:
        return array.astype(np.float16)
    return gguf.quants.quantize(array, qtype)  # BF16 and Q8_0 by gguf's reference code


def tensor_type_for(tensor: torch.Tensor, wanted):
    """Which type a tensor is written in: norms and odd-width rows cannot take the wanted type."""
    import gguf

    if tensor.dim() == 1:
        return gguf.GGMLQuantizationType.F32
    block, _ = gguf.GGML_QUANT_SIZES[wanted]
    if tensor.shape[-1] % block:
        return gguf.GGMLQuantizationType.F16
    return wanted


def add_model_metadata(writer, config: ModelConfig) -> None:
    """The ``general.name`` and ``llama.*`` keys llama.cpp reads a model's shape from."""
    writer.add_name(config.name or "llama")
    writer.add_context_length(config.context_length)
    writer.add_embedding_length(config.dim)
    writer.add_block_count(config.n_layers)
    writer.add_feed_forward_length(config.ffn_hidden_dim)
    writer.add_head_count(config.n_heads)
    writer.add_head_count_kv(config.n_kv_heads)
    writer.add_layer_norm_rms_eps(config.norm_eps)
    writer.add_rope_freq_base(config.rope_theta)
    writer.add_rope_dimension_count(config.head_dim)
    writer.add_vocab_size(config.vocab_size)
    scaling = config.rope_scaling
    if scaling is not None and scaling.kind == "linear":
        import gguf

        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(scaling.factor)


def rope_freqs_tensor(config: ModelConfig) -> torch.Tensor | None:
    """llama.cpp's ``rope_freqs``: per-frequency divisors, for llama3 and explicit scaling."""
    from llamalab.model import rope_frequencies

    scaling = config.rope_scaling
    if scaling is None or scaling.kind == "linear":
        return None
    base = rope_frequencies(config.head_dim, config.rope_theta, None)
    return (base / rope_frequencies(config.head_dim, config.rope_theta, scaling)).float()


def write_gguf(
    reader: CheckpointReader, path: Path, out_type: str, *, progress: bool = False
) -> None:
    """Write ``reader``'s model and tokenizer to a new GGUF file at ``path``.

    ``out_type`` (one of ``llamalab.gguf.WRITE_TYPES``) is the type of the matrices; see
    the module's docstring for the tensors that stay in another type. ``progress`` shows
    a bar on stderr as tensors are encoded (quantizing takes a while).
    """
    import gguf

    types = _gguf_types()
    if out_type not in types:
        raise LlamalabError(
            f"cannot write GGUF tensors as {out_type!r}; expected {', '.join(types)}"
        )
    wanted, file_type = types[out_type]
    config = reader.config
    writer = gguf.GGUFWriter(path=None, arch=ARCHITECTURE)
    add_model_metadata(writer, config)
    writer.add_file_type(int(file_type))
    if not _add_tokenizer(writer, reader):
        writer.add_tokenizer_model("none")

    # Plan every tensor's type and size up front: the header precedes all data.
    names = tensor_names.canonical_names(config.n_layers, config.tie_embeddings)
    plan: list[tuple[str, object]] = []
    extra = rope_freqs_tensor(config)
    if extra is not None:
        plan.append(("rope_freqs.weight", gguf.GGMLQuantizationType.F32))
        writer.add_tensor_info(
            "rope_freqs.weight", tuple(extra.shape), np.dtype(np.float32), extra.numel() * 4
        )
    for name in names:
        info = reader.info(name)
        qtype = tensor_type_for(torch.empty(info.shape, device="meta"), wanted)
        block, block_bytes = gguf.GGML_QUANT_SIZES[qtype]
        numel = int(np.prod(info.shape))
        gguf_name = tensor_names.to_format(name, "gguf")
        writer.add_tensor_info(
            gguf_name,
            info.shape,
            np.dtype(np.float32),
            numel // block * block_bytes,
            raw_dtype=qtype,
        )
        plan.append((name, qtype))

    writer.write_header_to_file(path)
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    steps = plan
    if progress:
        from tqdm import tqdm

        steps = tqdm(plan, desc=f"writing {out_type}", unit="tensor", leave=False)
    for name, qtype in steps:
        tensor = extra if name == "rope_freqs.weight" else reader.load(name)
        writer.write_tensor_data(encode_tensor(tensor, qtype))
    writer.close()


def _add_tokenizer(writer, reader: CheckpointReader) -> bool:
    """Carry the source's tokenizer into the GGUF; False when the source has none."""
    from llamalab.gguf.vocab import add_vocab_to_gguf

    return add_vocab_to_gguf(writer, reader.path)
