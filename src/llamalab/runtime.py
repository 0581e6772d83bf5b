"""Load what a command needs to run a model: the weights in the chosen form, and the tokenizer."""

from __future__ import annotations

import sys
from pathlib import Path

from llamalab.errors import LlamalabError

DTYPE_CHOICES = ("auto", "float32")


def resolve_model_ref(ref: str | None) -> Path:
    """The model to run: the given path, else ``$LLAMALAB_MODEL``, else the embedded default."""
    if ref:
        return Path(ref)
    from llamalab.default_model import default_model_path

    return default_model_path()


def load_runtime(ref: str | None, dtype: str = "auto", *, progress: bool | None = None):
    """Return ``(model, tokenizer)`` for a checkpoint.

    ``dtype="float32"`` dequantizes every weight: the exact reference maths.
    ``dtype="auto"`` runs the fastest form the kernels allow on this device.
    """
    import torch

    from llamalab.checkpoint.load import load_model
    from llamalab.tokenizer import load_tokenizer

    if dtype not in DTYPE_CHOICES:
        raise LlamalabError(f"unknown --dtype {dtype!r}; expected one of {', '.join(DTYPE_CHOICES)}")
    path = resolve_model_ref(ref)
    if progress is None:
        progress = sys.stderr.isatty()
    tokenizer = load_tokenizer(path)
    model = load_model(path, dtype=torch.float32, progress=progress, packed=dtype == "auto" and packed_kernels_available())
    return model, tokenizer


def packed_kernels_available() -> bool:
    """Whether this torch build has the CPU kernels that packed linear layers run on."""
    from llamalab.quant.linear import fp16_kernel_available

    return fp16_kernel_available()
