"""llamalab's own CPU kernels: matrix products on packed weights, decode attention and
the whole decode step (``csrc/kernels.cpp``), one source built per instruction set.

* :mod:`llamalab.kernels.cpu`: the CPU's flags, parsed once, and the path they allow.
* :mod:`llamalab.kernels.native`: the build, the cache and the loading (imports torch).
* :mod:`llamalab.kernels.decode_path`: which code runs a model's cached passes (the
  native step, a compiled block or the model's blocks) and its attention, chosen once
  at load; the one place that wires the kernels into a model (imports torch).

Nothing here imports torch at module level: ``llamalab info`` asks which path a model
would take without loading it.
"""

from __future__ import annotations

import os
import shutil
from typing import Any

from llamalab.kernels.cpu import chosen_isa

__all__ = ["UNPACK_ROWS", "compiler", "isa_in_use", "loaded_isa", "planned_isa"]

# From this many rows per call a pass leaves the native step for the model's blocks,
# whose attention is torch's blocked kernel, and an int4 layer unpacks to bfloat16 for
# one GEMM (measured break-even on a 576 x 3072 weight: about 55 rows).
UNPACK_ROWS = 64


def compiler() -> str | None:
    """The C++ compiler the kernels are built with (``$CXX``, else g++ or c++), if any."""
    return shutil.which(os.environ.get("CXX", "g++")) or shutil.which("c++")


def planned_isa() -> str:
    """The path a model loaded now would take: :func:`~llamalab.kernels.cpu.chosen_isa`,
    or ``torch`` where no compiler can build the kernels. Decided without torch."""
    isa = chosen_isa()
    return isa if isa == "torch" or compiler() is not None else "torch"


def isa_in_use(model: Any = None) -> str:
    """The path a loaded ``model`` runs its packed layers on: ``avx512``, ``avxvnni``,
    ``avx2``, or ``torch`` where no layer is on the native kernels. Without a model,
    :func:`planned_isa`."""
    if model is None:
        return planned_isa()
    path = getattr(model, "decode_path", None)  # decode_path.py's DecodePath, if any
    if (path is None or path.native_step is None) and not any(
        getattr(module, "kernel", None) == "vnni" for module in model.modules()
    ):
        return "torch"
    return loaded_isa()


# The build that claimed torch.ops.llamalab in this process (set by kernels/native.py).
_loaded: list[str] = []


def loaded_isa() -> str:
    """The build behind ``torch.ops.llamalab`` in this process, or ``torch`` if none."""
    return _loaded[0] if _loaded else "torch"
