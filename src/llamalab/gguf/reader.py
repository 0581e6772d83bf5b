"""GGUF checkpoints (llama.cpp's format): the header from ``gguf.header``, data read per tensor.

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
from llamalab.gguf.header import TensorRecord, read_gguf_header

__all__ = ["GGUFReader", "llama3_rope_factors"]

SUPPORTED_ARCHITECTURES = ("llama",)


class GGUFReader(CheckpointReader):
    format = "gguf"

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self._meta_values, table = read_gguf_header(path)
        arch = self._meta_values.get("general.architecture")
        if arch not in SUPPORTED_ARCHITECTURES:
            raise LlamalabError(
                f"{path}: unsupported architecture {arch!r} (llamalab runs {', '.join(SUPPORTED_ARCHITECTURES)})"
            )
        size = path.stat().st_size
        self._tensors: dict[str, TensorRecord] = {}
        self._extra: dict[str, TensorRecord] = {}
        for record in table:
            end = record.offset + record.n_bytes
            if end > size:
                raise LlamalabError(
                    f"{path}: truncated: tensor {record.name} ends at byte {end}, the file has {size}"
                )
            canonical = tensor_names.from_format(record.name, "gguf")
            if canonical is not None:
                self._tensors[canonical] = record
            else:
                self._extra[record.name] = record
        try:
            self._config = self._read_config()
        except (KeyError, TypeError, ValueError, ZeroDivisionError) as exc:
            raise LlamalabError(f"{path}: invalid model metadata: {exc!r}") from None

    def _meta(self, key: str, default: Any = None, required: bool = False) -> Any:
        value = self._meta_values.get(f"llama.{key}", default)
        if required and value is None:
            raise LlamalabError(f"{self.path}: GGUF metadata lacks llama.{key}")
        return value

    def _read_config(self) -> ModelConfig:
        dim = int(self._meta("embedding_length", required=True))
        n_heads = int(self._meta("attention.head_count", required=True))
        vocab = self._meta("vocab_size")
        if vocab is None:
            tokens = self._meta_values.get("tokenizer.ggml.tokens")
            vocab = len(tokens) if tokens is not None else self._shape("tok_embeddings.weight")[0]
        head_dim = dim // n_heads
        rope_dims = self._meta("rope.dimension_count")
        if rope_dims is not None and int(rope_dims) != head_dim:
            raise LlamalabError(f"{self.path}: partial rotary embeddings ({rope_dims} of {head_dim}) are not supported")
        return ModelConfig(
            name=str(self._meta_values.get("general.name", "")),
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
        factors = tuple(float(x) for x in self._read_bytes_of(freqs).view(np.float32))
        expected = llama3_rope_factors(head_dim, float(self._meta("rope.freq_base", 10000.0)))
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

    def info(self, name: str) -> TensorInfo:
        tensor = self._tensors[name]
        return TensorInfo(tensor.shape, tensor.qtype.name, tensor.n_bytes)

    def _read_bytes(self, name: str) -> np.ndarray:
        """A tensor's stored bytes, read from the file rather than through the mapping.

        Pages read through the reader's memory map stay resident (and counted) until the
        file is closed; a plain read into a buffer that is dropped after use keeps peak
        memory at one copy of the weights.
        """
        return self._read_bytes_of(self._tensors[name])

    def _read_bytes_of(self, tensor: TensorRecord) -> np.ndarray:
        buffer = np.empty(tensor.n_bytes, dtype=np.uint8)
        with open(self.path, "rb") as f:
            f.seek(tensor.offset)
            if f.readinto(memoryview(buffer)) != buffer.nbytes:
                raise LlamalabError(f"{self.path}: tensor {tensor.name} is cut short (truncated file?)")
        return buffer

    def load(self, name: str) -> torch.Tensor:
        from llamalab.gguf.dequant import dequantize

        tensor = self._tensors[name]
        if tensor.qtype.name == "F32":  # read straight into the result: no second copy
            out = torch.empty(tensor.shape, dtype=torch.float32)
            with open(self.path, "rb") as f:
                f.seek(tensor.offset)
                if f.readinto(memoryview(out.numpy()).cast("B")) != out.numel() * 4:
                    raise LlamalabError(f"{self.path}: tensor {tensor.name} is cut short (truncated file?)")
            return out
        return dequantize(self._read_bytes(name), tensor.qtype, tensor.shape)

    def raw(self, name: str):
        from llamalab.quant.linear import GGUFWeight

        tensor = self._tensors[name]
        return GGUFWeight(self._read_bytes(name), tensor.qtype, tensor.shape)

    def tokenizer_kind(self) -> str | None:
        model = self._meta_values.get("tokenizer.ggml.model")
        if model is None:
            return None
        pre = self._meta_values.get("tokenizer.ggml.pre")
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
