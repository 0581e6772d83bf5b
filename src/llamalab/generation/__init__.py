"""Text generation: pure sampling functions, stop strings, and the batching engine.

Names are imported on first use, so that ``llamalab.generation.params`` (the sampling
settings, which the command line's parser shows) loads without torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_LAZY = {
    "Engine": "llamalab.generation.engine",
    "Generation": "llamalab.generation.engine",
    "GenerationEvent": "llamalab.generation.engine",
    "Request": "llamalab.generation.engine",
    "Grammar": "llamalab.generation.grammar",
    "GREEDY": "llamalab.generation.params",
    "SamplingParams": "llamalab.generation.params",
}

__all__ = [
    "GREEDY",
    "Engine",
    "Generation",
    "GenerationEvent",
    "Grammar",
    "Request",
    "SamplingParams",
]

if TYPE_CHECKING:  # pragma: no cover
    from llamalab.generation.engine import Engine, Generation, GenerationEvent, Request
    from llamalab.generation.grammar import Grammar
    from llamalab.generation.params import GREEDY, SamplingParams


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'llamalab.generation' has no attribute {name!r}")
