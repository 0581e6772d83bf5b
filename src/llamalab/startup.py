"""A command's start-up, made short: torch imported in the background, and the garbage
collector kept out of the way of the objects built at start.

Nothing here imports torch at module level, nor any other part of llamalab.
"""

from __future__ import annotations

import contextlib
import gc
import sys
import threading
from collections.abc import Iterator


@contextlib.contextmanager
def paused_gc() -> Iterator[None]:
    """No cyclic garbage collection inside the block (as it was, after it).

    For building tens of thousands of small containers at start-up, none of them in a
    cycle: each few hundred new ones otherwise start a collection that walks them all.
    """
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


_frozen = False


def freeze_start_up() -> None:
    """Move everything the process holds now out of the garbage collector's sight for
    good, once per process: for a command that has just loaded its model and keeps it
    (and torch's modules) to the end, which every full collection would walk again
    (about 70 ms each once torch is imported).

    Never for a process that loads and drops models (a library's caller, a test run): a
    frozen object in a reference cycle is never freed.
    """
    global _frozen
    if not _frozen:
        _frozen = True
        gc.freeze()


_torch_import: threading.Thread | None = None


def import_torch_in_background() -> threading.Thread | None:
    """Start ``import torch`` in a thread, once, unless it is imported already; join the
    thread before using torch (None: nothing to wait for).

    A command that will load a model calls this first, before its own imports, and
    `load_runtime` joins it. The import runs its own code under the GIL, so a thread only
    gains the parts that let go of it (reading and mapping the libraries, the other
    thread's file reads and zlib): about 0.1-0.2 s of a command's start here. A failed
    import is left for the main thread's own ``import torch`` to report.
    """
    global _torch_import
    if _torch_import is not None:
        return _torch_import
    if "torch" in sys.modules:
        return None

    def run() -> None:
        with contextlib.suppress(BaseException):  # reported by the main thread's import
            import torch  # noqa: F401

    _torch_import = threading.Thread(target=run, name="llamalab-import-torch", daemon=True)
    _torch_import.start()
    return _torch_import
