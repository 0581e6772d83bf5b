"""llamalab: the LLaMA family of language models, end to end, in Python on PyTorch.

The public API is imported lazily so that ``import llamalab`` stays cheap.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_LAZY = {
    "ModelConfig": "llamalab.config",
    "load_config": "llamalab.checkpoint.load",
    "load_model": "llamalab.checkpoint.load",
    "load_tokenizer": "llamalab.tokenizer",
    "Transformer": "llamalab.model",
    "LlamalabError": "llamalab.errors",
    "default_model_path": "llamalab.default_model",
}

__all__ = [
    "LlamalabError",
    "ModelConfig",
    "Transformer",
    "default_model_path",
    "load_config",
    "load_model",
    "load_tokenizer",
]

if TYPE_CHECKING:  # pragma: no cover
    from llamalab.checkpoint.load import load_config, load_model
    from llamalab.config import ModelConfig
    from llamalab.default_model import default_model_path
    from llamalab.errors import LlamalabError
    from llamalab.model import Transformer
    from llamalab.tokenizer import load_tokenizer


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'llamalab' has no attribute {name!r}")
