"""What marks a folder as the ``out_dir`` of a ``llamalab train`` run.

Both the loop (which writes ``run.json``) and the export (which reads it to turn a run
into a Meta folder) need this; it lives here so neither imports the other for it.
"""

from __future__ import annotations

from pathlib import Path

RUN_FILE = "run.json"


def is_run_folder(path: str | Path) -> bool:
    """Whether ``path`` is the ``out_dir`` of a ``llamalab train`` run."""
    return (Path(path) / RUN_FILE).is_file()
