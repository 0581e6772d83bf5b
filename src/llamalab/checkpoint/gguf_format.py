"""GGUF files (llama.cpp's format), read with the ``gguf`` package's memory-mapped reader.

GGUF keeps LLaMA's q/k rows in Meta's order, so only names change. The config comes from
the ``llama.*`` metadata; a ``rope_freqs`` tensor carries per-frequency RoPE divisors
(Llama 3.1's scaling), which we map back to the llama3 rule when it matches.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from llamalab.checkpoint import names as tensor_names
from llamalab.checkpoint.reader import CheckpointReader, TensorInfo
from llamalab.config import LLAMA3_ROPE_SCALING, ModelConfig, RopeScaling
from llamalab.errors import LlamalabError

GGUF_MAGIC = b"GGUF"
SUPPORTED_ARCHITECTURES = ("llama",)


def is_gguf(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(4) == GGUF_MAGIC


def open_gguf(path: Path) -> Any:
    """Open a GGUF file with the ``gguf`` reader, turning its failures into one clear error."""
    import gguf

    try:
        return gguf.GGUFReader(path, "r")
    except Exception as exc:  # the reader raises ValueError, IndexError, struct errors...
        size = path.stat().st_size
        raise LlamalabError(
            f"{path}: not a readable GGUF file ({size} bytes; truncated or corrupt?): {exc}"
        ) from None


def field_value(reader: Any, key: str, default: Any = None) -> Any:
    """A metadata value as a Python object (str, number, bool, list), or ``default``."""
    field = reader.fields.get(key)
    if field is None:
        return default
    return field.contents()


class GGUFReader(CheckpointReader):
    format = "gguf"

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self._reader = open_gguf(path)
        arch = field_value(self._reader, "general.architecture")
        if arch not in SUPPORTED_ARCHITECTURES:
            raise LlamalabError(
                f"{path}: unsupported architecture {arch!r} (llamalab runs {', '.join(SUPPORTED_ARCHITECTURES)})"
            )
        self._tensors: dict[str, Any] = {}
        self._extra: dict[str, Any] = {}
        for tensor in self._reader.tensors:
            canonical = tensor_names.from_format(tensor.name, "gguf")
            if canonical is not None:
                self._tensors[canonical] = tensor
            else:
                self._extra[tensor.name] = tensor
        self._config = self._read_config()

    def _meta(self, key: str, default: Any = None, required: bool = False) -> Any:
        value = field_value(self._reader, f"llama.{key}", default)
        if required and value is None:
            raise LlamalabError(f"{self.path}: GGUF metadata lacks llama.{key}")
        return value

    def _read_config(self) -> ModelConfig:
        dim = int(self._meta("embedding_length", required=True))
        n_heads = int(self._meta("attention.head_count", required=True))
        vocab = self._meta("vocab_size")
        if vocab is None:
            tokens = self._reader.fields.get("tokenizer.ggml.tokens")
            vocab = len(tokens.data) if tokens is not None else self._shape("tok_embeddings.weight")[0]
        head_dim = dim // n_heads
        rope_dims = self._meta("rope.dimension_count")
        if rope_dims is not None and int(rope_dims) != head_dim:
            raise LlamalabError(f"{self.path}: partial rotary embeddings ({rope_dims} of {head_dim}) are not supported")
        return ModelConfig(
            name=str(field_value(self._reader, "general.name", "")),
            dim=dim,
            n_layers=int(self._meta("block_count", required=True)),
            n_heads=n_heads,
            n_kv_heads=int(self._meta("attention.head_count_kv", n_heads)),
            vocab_size=int(vocab),
            ffn_hidden_dim=int(self._meta("feed_forward_length", required=True)),
            norm_eps=_float32(self._meta("attention.layer_norm_rms_epsilon", 1e-5)),
            rope_theta=_float32(self._meta("rope.freq_base", 10000.0)),
            rope_scaling=self._rope_scaling(head_dim),
            context_length=int(self._meta("context_length", 2048)),
            tie_embeddings="output.weight" not in self._tensors,
        )

    def _rope_scaling(self, head_dim: int) -> RopeScaling | None:
        kind = self._meta("rope.scaling.type")
        if kind == "linear":
            return RopeScaling(kind="linear", factor=float(self._meta("rope.scaling.factor", 1.0)))
        if kind not in (None, "none"):
            raise LlamalabError(f"{self.path}: unsupported RoPE scaling {kind!r}")
        freqs = self._extra.get("rope_freqs.weight")
        if freqs is None:
            return None
        factors = tuple(float(x) for x in np.asarray(freqs.data, dtype=np.float32).reshape(-1))
        expected = llama3_rope_factors(head_dim, float(self._meta("rope.freq_base", 10000.0)))
        if np.allclose(factors, expected, rtol=1e-5, atol=0):
            return LLAMA3_ROPE_SCALING
        return RopeScaling(kind="factors", factors=factors)

    def _shape(self, name: str) -> tuple[int, ...]:
        # GGUF lists dimensions innermost first; PyTorch lists them outermost first.
        return tuple(int(d) for d in reversed(self._tensors[name].shape))

    @property
    def config(self) -> ModelConfig:
        return self._config

    @property
    def metadata(self) -> Any:
        """The underlying ``gguf.GGUFReader`` (fields, tokenizer keys)."""
        return self._reader

    def names(self) -> list[str]:
        return list(self._tensors)

    def info(self, name: str) -> TensorInfo:
        tensor = self._tensors[name]
        return TensorInfo(self._shape(name), tensor.tensor_type.name, int(tensor.n_bytes))

    def _read_bytes(self, name: str) -> np.ndarray:
        """A tensor's stored bytes, read from the file rather than through the mapping.

        Pages read through the reader's memory map stay resident (and counted) until the
        file is closed; a plain read into a buffer that is dropped after use keeps peak
        memory at one copy of the weights.
        """
        tensor = self._tensors[name]
        buffer = np.empty(int(tensor.n_bytes), dtype=np.uint8)
        with open(self.path, "rb") as f:
            f.seek(int(tensor.data_offset))
            if f.readinto(memoryview(buffer)) != buffer.nbytes:
                raise LlamalabError(f"{self.path}: tensor {tensor.name} is cut short (truncated file?)")
        return buffer

    def load(self, name: str) -> torch.Tensor:
        from llamalab.quant.gguf_dequant import dequantize

        tensor = self._tensors[name]
        if tensor.tensor_type.name == "F32":  # read straight into the result: no second copy
            out = torch.empty(self._shape(name), dtype=torch.float32)
            with open(self.path, "rb") as f:
                f.seek(int(tensor.data_offset))
                if f.readinto(memoryview(out.numpy()).cast("B")) != out.numel() * 4:
                    raise LlamalabError(f"{self.path}: tensor {tensor.name} is cut short (truncated file?)")
            return out
        return dequantize(self._read_bytes(name), tensor.tensor_type, self._shape(name))

    def raw(self, name: str):
        from llamalab.quant.linear import GGUFWeight

        tensor = self._tensors[name]
        return GGUFWeight(self._read_bytes(name), tensor.tensor_type, self._shape(name))

    def tokenizer_kind(self) -> str | None:
        model = field_value(self._reader, "tokenizer.ggml.model")
        if model is None:
            return None
        pre = field_value(self._reader, "tokenizer.ggml.pre")
        return f"{model} (pre-tokenizer {pre})" if pre else str(model)


def _float32(value: float) -> float:
    """GGUF stores these as float32: read back the shortest decimal that rounds to it (1e-5, not 9.99e-6)."""
    return float(str(np.float32(value)))


def llama3_rope_factors(head_dim: int, theta: float) -> tuple[float, ...]:
    """The divisors llama.cpp stores as ``rope_freqs`` for Llama 3.1's default scaling, as float32."""
    from llamalab.model import rope_frequencies

    base = rope_frequencies(head_dim, theta, None)
    scaled = rope_frequencies(head_dim, theta, LLAMA3_ROPE_SCALING)
    return tuple(float(x) for x in (base / scaled).float())
