"""GGUF checkpoints (llama.cpp's format): GGUF records to a model, and a model to a GGUF file.

Reading: the header from ``gguf.header``, each tensor's data by ``gguf.tensors``. GGUF
keeps LLaMA's q/k rows in Meta's order, so only names change. The config comes from the
``llama.*`` metadata; a ``rope_freqs`` tensor carries per-frequency RoPE divisors (Llama
3.1's scaling), which we map back to the llama3 rule when it matches.

Writing: the ``llama.*`` keys, the canonical tensors under their GGUF names, a
``rope_freqs`` tensor for scaled RoPE and the source's tokenizer, streamed by
``gguf.writer`` one tensor at a time.
"""

from __future__ import annotations

import dataclasses
import math
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from llamalab.checkpoint import names as tensor_names
from llamalab.checkpoint.reader import CheckpointReader, TensorInfo, naming_the_file
from llamalab.config import LLAMA3_ROPE_SCALING, ModelConfig, RopeScaling
from llamalab.errors import LlamalabError
from llamalab.gguf.header import TensorRecord, read_gguf_header
from llamalab.gguf.tensors import read_tensor, read_tensor_bytes

if TYPE_CHECKING:  # torch loads only when a tensor is asked for: `info` never needs it
    import gguf
    import torch

    from llamalab.quant.linear import GGUFWeight

__all__ = [
    "ARCHITECTURE",
    "GGUFReader",
    "add_model_metadata",
    "llama3_rope_factors",
    "rope_freqs_tensor",
    "write_gguf",
]

ARCHITECTURE = "llama"
SUPPORTED_ARCHITECTURES = (ARCHITECTURE,)


# A layer index as the tensor table spells it; longer numbers than this cannot be a layer.
_LAYER_INDEX = re.compile(r"^layers\.(0|[1-9][0-9]{0,8})\.")


class GGUFReader(CheckpointReader):
    """A GGUF file as a checkpoint: the config from its ``llama.*`` metadata, tensors on demand.

    Opening it checks the header (see ``gguf.header``), the metadata's types and ranges,
    and the metadata against the tensor table, before anything is sized from the metadata.
    """

    format = "gguf"

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self._meta_values, table = read_gguf_header(path)
        arch = self._meta_values.get("general.architecture")
        if arch not in SUPPORTED_ARCHITECTURES:
            raise LlamalabError(
                f"{path}: unsupported architecture {_shown(arch)} "
                f"(llamalab runs {', '.join(SUPPORTED_ARCHITECTURES)})"
            )
        # The header parser has already checked that every tensor's data lies inside the file.
        self._tensors: dict[str, TensorRecord] = {}
        self._extra: dict[str, TensorRecord] = {}
        for record in table:
            canonical = tensor_names.from_format(record.name, "gguf")
            if canonical is not None:
                self._tensors[canonical] = record
            else:
                self._extra[record.name] = record
        try:
            self._config = self._read_config()
        except (KeyError, TypeError, ValueError, ZeroDivisionError, OverflowError) as exc:
            raise LlamalabError(f"{path}: invalid model metadata: {exc!r}") from None

    def _meta(self, key: str, default: Any = None, required: bool = False) -> Any:
        value = self._meta_values.get(f"llama.{key}", default)
        if required and value is None:
            raise LlamalabError(f"{self.path}: GGUF metadata lacks llama.{key}")
        return value

    def _int(self, key: str, default: int | None = None, required: bool = False) -> int:
        """A positive integer ``llama.*`` value; strings, floats, bools and arrays are refused."""
        value = self._meta(key, default, required)
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise LlamalabError(
                f"{self.path}: llama.{key} must be a positive integer, got {_shown(value)}"
            )
        return value

    def _float(self, key: str, default: float) -> float:
        """A ``llama.*`` number as the float32 GGUF stores it (range checks are ModelConfig's)."""
        value = self._meta(key, default)
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise LlamalabError(f"{self.path}: llama.{key} must be a number, got {_shown(value)}")
        if not math.isfinite(value) or abs(value) > _FLOAT32_MAX:
            return float(value)  # left for ModelConfig to refuse, with no overflow warning
        return _float32(value)

    def _read_config(self) -> ModelConfig:
        # block_count first: nothing proportional to it may be built before it is checked.
        n_layers = self._int("block_count", required=True)
        self._check_block_count(n_layers)
        dim = self._int("embedding_length", required=True)
        n_heads = self._int("attention.head_count", required=True)
        if "llama.vocab_size" in self._meta_values:
            vocab = self._int("vocab_size")
        else:
            tokens = self._meta_values.get("tokenizer.ggml.tokens")
            embedding = self._tensors.get("tok_embeddings.weight")
            if tokens is not None:
                vocab = len(tokens)
            elif embedding is not None:
                vocab = embedding.shape[0]
            else:
                raise LlamalabError(
                    f"{self.path}: no llama.vocab_size, vocabulary or token_embd.weight"
                )
        with naming_the_file(self.path, "invalid model metadata"):
            config = ModelConfig(
                name=str(self._meta_values.get("general.name", "")),
                dim=dim,
                n_layers=n_layers,
                n_heads=n_heads,
                n_kv_heads=self._int("attention.head_count_kv", n_heads),
                vocab_size=vocab,
                ffn_hidden_dim=self._int("feed_forward_length", required=True),
                norm_eps=self._float("attention.layer_norm_rms_epsilon", 1e-5),
                rope_theta=self._float("rope.freq_base", 10000.0),
                context_length=self._int("context_length", 2048),
                tie_embeddings="output.weight" not in self._tensors,
            )
        self._check_shapes(config)
        head_dim = config.head_dim
        rope_dims = self._meta("rope.dimension_count")
        if rope_dims is not None and self._int("rope.dimension_count") != head_dim:
            raise LlamalabError(
                f"{self.path}: partial rotary embeddings ({rope_dims} of {head_dim}) "
                "are not supported"
            )
        with naming_the_file(self.path, "invalid model metadata"):
            scaling = self._rope_scaling(head_dim, config.rope_theta)
            return config if scaling is None else dataclasses.replace(config, rope_scaling=scaling)

    def _check_block_count(self, n_layers: int) -> None:
        """``llama.block_count`` must count exactly the blocks blk.0 … blk.N-1 the table holds."""
        blocks = {int(m.group(1)) for name in self._tensors if (m := _LAYER_INDEX.match(name))}
        # Distinct indices from 0 to n-1, n of them: exactly range(n), never built as a set.
        if len(blocks) != n_layers or (blocks and max(blocks) != n_layers - 1):
            held = f"blk.{min(blocks)} … blk.{max(blocks)}" if blocks else "none"
            raise LlamalabError(
                f"{self.path}: llama.block_count is {n_layers}, but the tensor table holds "
                f"{len(blocks)} blocks ({held})"
            )

    def _check_shapes(self, config: ModelConfig) -> None:
        """The metadata's sizes against the tensors they describe (the rest is ``validate``'s)."""
        kv_rows = config.n_kv_heads * config.head_dim
        expected = {
            "tok_embeddings.weight": (
                (config.vocab_size, config.dim),
                "vocab_size × embedding_length",
            ),
            "layers.0.attention.wq.weight": ((config.dim, config.dim), "embedding_length²"),
            "layers.0.attention.wk.weight": (
                (kv_rows, config.dim),
                "head_count_kv × embedding_length / head_count, × embedding_length",
            ),
            "layers.0.feed_forward.w1.weight": (
                (config.ffn_hidden_dim, config.dim),
                "feed_forward_length × embedding_length",
            ),
        }
        for name, (shape, rule) in expected.items():
            record = self._tensors.get(name)
            if record is not None and record.shape != shape:
                raise LlamalabError(
                    f"{self.path}: tensor {record.name} has shape {list(record.shape)}, "
                    f"the llama.* metadata says {list(shape)} ({rule})"
                )

    def _rope_scaling(self, head_dim: int, theta: float) -> RopeScaling | None:
        kind = self._meta("rope.scaling.type")
        if kind is not None and not isinstance(kind, str):
            raise LlamalabError(
                f"{self.path}: llama.rope.scaling.type must be a string, got {_shown(kind)}"
            )
        if kind == "linear":
            return RopeScaling(kind="linear", factor=self._float("rope.scaling.factor", 1.0))
        if kind not in (None, "none"):
            raise LlamalabError(f"{self.path}: unsupported RoPE scaling {kind!r}")
        freqs = self._extra.get("rope_freqs.weight")
        if freqs is None:
            return None
        if freqs.qtype.name != "F32" or freqs.shape != (head_dim // 2,):
            raise LlamalabError(
                f"{self.path}: rope_freqs.weight must be {head_dim // 2} F32 values, "
                f"got {freqs.qtype.name} of shape {list(freqs.shape)}"
            )
        factors = tuple(float(x) for x in read_tensor_bytes(self.path, freqs).view(np.float32))
        expected = llama3_rope_factors(head_dim, theta)
        if np.allclose(factors, expected, rtol=1e-5, atol=0):
            return LLAMA3_ROPE_SCALING
        return RopeScaling(kind="factors", factors=factors)

    def _shape(self, name: str) -> tuple[int, ...]:
        return self._tensors[name].shape

    @property
    def config(self) -> ModelConfig:
        return self._config

    @property
    def metadata(self) -> dict[str, Any]:
        """Every metadata key of the file (``general.*``, ``llama.*``, ``tokenizer.*``)."""
        return self._meta_values

    def names(self) -> list[str]:
        return list(self._tensors)

    @property
    def data_start(self) -> int:
        """Where the tensor data starts: every byte before it is metadata and tensor table."""
        offsets = [r.offset for r in (*self._tensors.values(), *self._extra.values())]
        return min(offsets) if offsets else self.path.stat().st_size

    def info(self, name: str) -> TensorInfo:
        tensor = self._tensors[name]
        return TensorInfo(tensor.shape, tensor.qtype.name, tensor.n_bytes)

    def load(self, name: str) -> torch.Tensor:
        return read_tensor(self.path, self._tensors[name])

    def raw(self, name: str) -> GGUFWeight:
        from llamalab.quant.linear import GGUFWeight

        tensor = self._tensors[name]
        return GGUFWeight(read_tensor_bytes(self.path, tensor), tensor.qtype, tensor.shape)

    def tokenizer_kind(self) -> str | None:
        model = self._meta_values.get("tokenizer.ggml.model")
        if model is None:
            return None
        pre = self._meta_values.get("tokenizer.ggml.pre")
        return f"{model} (pre-tokenizer {pre})" if pre else str(model)


_FLOAT32_MAX = float(np.finfo(np.float32).max)


def _shown(value: Any) -> str:
    """A metadata value for an error message: short, whatever its type."""
    if isinstance(value, np.ndarray | list):
        return f"an array of {len(value)} values"
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _float32(value: float) -> float:
    """A float32 as GGUF stores it, read back as the shortest decimal (1e-5, not 9.99e-6)."""
    return float(str(np.float32(value)))


def llama3_rope_factors(head_dim: int, theta: float) -> tuple[float, ...]:
    """The divisors llama.cpp stores as ``rope_freqs`` for Llama 3.1's scaling, as float32."""
    from llamalab.rope import rope_frequencies

    base = rope_frequencies(head_dim, theta, None)
    scaled = rope_frequencies(head_dim, theta, LLAMA3_ROPE_SCALING)
    return tuple(float(x) for x in (base / scaled).float())


def add_model_metadata(writer: gguf.GGUFWriter, config: ModelConfig) -> None:
    """The ``general.name`` and ``llama.*`` keys llama.cpp reads a model's shape from."""
    import gguf

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
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(scaling.factor)


def rope_freqs_tensor(config: ModelConfig) -> torch.Tensor | None:
    """llama.cpp's ``rope_freqs``: per-frequency divisors, for llama3 and explicit scaling."""
    from llamalab.rope import rope_frequencies

    scaling = config.rope_scaling
    if scaling is None or scaling.kind == "linear":
        return None
    base = rope_frequencies(config.head_dim, config.rope_theta, None)
    return (base / rope_frequencies(config.head_dim, config.rope_theta, scaling)).float()


_ROPE_FREQS = "rope_freqs.weight"


def write_gguf(
    reader: CheckpointReader, path: Path, out_type: str, *, progress: bool = False
) -> None:
    """Write ``reader``'s model and tokenizer to a new GGUF file at ``path``.

    ``out_type`` (one of ``llamalab.gguf.WRITE_TYPES``) is the type of the matrices;
    1-D tensors stay float32 and rows that do not divide into its blocks float16 (see
    ``gguf.writer``). ``progress`` shows a bar on stderr as tensors are encoded.
    """
    import gguf

    from llamalab.gguf.writer import PlannedTensor, tensor_type_for, tensor_types, write_tensors
    from llamalab.tokenizer.gguf_vocab import add_vocab_to_gguf

    wanted, file_type = tensor_types(out_type)
    config = reader.config
    writer = gguf.GGUFWriter(path=None, arch=ARCHITECTURE)
    add_model_metadata(writer, config)
    writer.add_file_type(int(file_type))
    if not add_vocab_to_gguf(writer, reader.path):
        writer.add_tokenizer_model("none")

    # The GGUF name of each planned tensor → where its data comes from.
    sources: dict[str, str] = {}
    plan: list[PlannedTensor] = []
    extra = rope_freqs_tensor(config)
    if extra is not None:
        plan.append(PlannedTensor(_ROPE_FREQS, tuple(extra.shape), gguf.GGMLQuantizationType.F32))
    for name in tensor_names.canonical_names(config.n_layers, config.tie_embeddings):
        shape = reader.info(name).shape
        gguf_name = tensor_names.to_format(name, "gguf")
        sources[gguf_name] = name
        plan.append(PlannedTensor(gguf_name, shape, tensor_type_for(shape, wanted)))

    def produce(tensor: PlannedTensor) -> torch.Tensor:
        if tensor.name == _ROPE_FREQS and extra is not None:
            return extra
        return reader.load(sources[tensor.name])

    write_tensors(writer, path, plan, produce, progress=f"writing {out_type}" if progress else None)
