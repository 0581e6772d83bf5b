"""What every checkpoint reader offers: a config and lazily loaded canonical tensors.

Readers translate names and layouts so that ``load(name)`` always returns the tensor as
the model wants it (Meta's names, Meta's q/k order). They load one tensor at a time, so
loading and converting hold about one copy of the model, never two.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from llamalab.config import ModelConfig
from llamalab.errors import LlamalabError

if TYPE_CHECKING:  # readers load torch only when a tensor is asked for
    import torch


@contextmanager
def naming_the_file(source: Path | str, what: str = "invalid value") -> Iterator[None]:
    """Turn a failure to build a config from ``source`` into one error that names the file.

    ModelConfig's range checks know nothing of files, and a malformed value (a string
    where a number belongs) fails with a plain Python error: both become
    ``SOURCE: WHAT: message``.
    """
    try:
        yield
    except LlamalabError as exc:
        message = str(exc)
        if message.startswith(f"{source}:"):
            raise
        raise LlamalabError(f"{source}: {what}: {message.removeprefix('config: ')}") from None
    except (TypeError, ValueError, ZeroDivisionError, AttributeError, OverflowError) as exc:
        raise LlamalabError(f"{source}: {what}: {exc}") from None


@dataclass(frozen=True)
class TensorInfo:
    """Shape (PyTorch order) and stored type ("F32", "BF16", "Q4_1" ...) of one tensor."""

    shape: tuple[int, ...]
    stored_type: str
    nbytes: int


class CheckpointReader(ABC):
    """One checkpoint on disk, opened lazily."""

    format: str  # "gguf", "hf" or "meta"

    def __init__(self, path: Path) -> None:
        self.path = path

    @property
    @abstractmethod
    def config(self) -> ModelConfig:
        """The model's shape, read from the checkpoint and validated."""

    @abstractmethod
    def names(self) -> list[str]:
        """Canonical names of the tensors this checkpoint holds."""

    @abstractmethod
    def info(self, name: str) -> TensorInfo:
        """Shape, stored type and size of one tensor, without loading it."""

    @abstractmethod
    def load(self, name: str) -> torch.Tensor:
        """The tensor in canonical layout, in its stored float type (quantized → float32)."""

    def raw(self, name: str):
        """The tensor in the form a packed linear layer is built from (see ``quant/linear.py``).

        Float formats hand over the float tensor; GGUF hands over its stored bytes, so that
        quantized weights never pass through a float32 copy.
        """
        return self.load(name)

    def stored_types(self) -> dict[str, int]:
        """How many tensors of each stored type."""
        counts: dict[str, int] = {}
        for name in self.names():
            kind = self.info(name).stored_type
            counts[kind] = counts.get(kind, 0) + 1
        return counts

    def weights_nbytes(self) -> int:
        """The stored size of every tensor together."""
        return sum(self.info(name).nbytes for name in self.names())

    def tokenizer_kind(self) -> str | None:
        """A short description of the tokenizer the checkpoint carries, if any."""
        return None

    def close(self) -> None:  # a default that readers without open files keep
        """Release open files (readers hold memory maps)."""


def release_pages(tensor: torch.Tensor) -> None:
    """Drop the resident pages of a tensor that views a read-only file mapping.

    Only for tensors that view a private file mapping nobody wrote to (``torch.load(mmap=True)``):
    on ordinary memory, MADV_DONTNEED would turn the data into zeros.

    Pages of a memory-mapped checkpoint count toward the process's resident memory once
    read; after a tensor has been copied out (merged, converted) they are dead weight.
    The mapping stays valid: the kernel re-reads the file if the pages are touched again.
    """
    import ctypes
    import mmap

    nbytes = tensor.numel() * tensor.element_size()
    if nbytes < mmap.PAGESIZE or not tensor.is_contiguous():
        return
    start = tensor.data_ptr()
    aligned = -(-start // mmap.PAGESIZE) * mmap.PAGESIZE  # only whole pages inside the tensor
    length = (start + nbytes - aligned) // mmap.PAGESIZE * mmap.PAGESIZE
    if length > 0:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.madvise(ctypes.c_void_p(aligned), ctypes.c_size_t(length), mmap.MADV_DONTNEED)


_TORCH_TYPE_NAMES = {"float32": "F32", "float16": "F16", "bfloat16": "BF16", "float64": "F64"}


def torch_type_name(dtype: torch.dtype) -> str:
    """A torch dtype's name in the checkpoint formats' spelling ("F32", "BF16" ...)."""
    name = str(dtype).removeprefix("torch.")
    return _TORCH_TYPE_NAMES.get(name, name)
