"""Training checkpoints with torch.distributed.checkpoint (DCP), written atomically.

``out_dir/checkpoints/step-00001000/`` holds:

- the DCP files of ``{"model": …, "optim": …}`` — every rank writes its own shards, and
  a checkpoint saved by W ranks loads into any other number (DCP reshards on load);
- ``rng-RANK.pt``: each rank's random-number state;
- ``train_state.json``: step, tokens, sampler position — written last.

Atomicity: everything is written into ``checkpoints/.tmp-step-…`` and renamed to
``step-…`` only after every rank has finished and the files are synced. A rename is
atomic, so a run killed mid-write leaves at most a hidden temporary folder, which
`latest_checkpoint` never considers and the next save of that step removes.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from llamalab.errors import LlamalabError
from llamalab.train.parallel import World, barrier

CHECKPOINTS = "checkpoints"
STATE_FILE = "train_state.json"
_STEP_DIR = re.compile(r"^step-(\d{8,})$")


def step_dir(out_dir: Path, step: int) -> Path:
    return out_dir / CHECKPOINTS / f"step-{step:08d}"


def list_checkpoints(out_dir: Path) -> list[tuple[int, Path]]:
    """Whole checkpoints in ``out_dir``, oldest first (temporary folders are ignored)."""
    folder = Path(out_dir) / CHECKPOINTS
    if not folder.is_dir():
        return []
    found = []
    for child in folder.iterdir():
        m = _STEP_DIR.match(child.name)
        if m and child.is_dir() and (child / STATE_FILE).is_file():
            found.append((int(m.group(1)), child))
    return sorted(found)


def latest_checkpoint(out_dir: Path) -> Path | None:
    """The newest whole checkpoint, or ``None``."""
    found = list_checkpoints(out_dir)
    return found[-1][1] if found else None


def _fsync_tree(folder: Path) -> None:
    for path in [*folder.iterdir(), folder]:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextmanager
def quiet_single_process() -> Iterator[None]:
    """DCP warns on every single-process save and load (even with ``no_dist=True``), which
    is this code's intent, not news."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is .*single process")
        yield


def _rng_state(world: World) -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state()}
    if world.device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(world.device)
    return state


def save_checkpoint(
    out_dir: Path,
    step: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    train_state: dict[str, Any],
    world: World,
    *,
    keep: int = 2,
) -> Path:
    """Save a checkpoint of ``step`` on every rank (a collective call); return its folder."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    final = step_dir(out_dir, step)
    tmp = final.with_name(f".tmp-{final.name}")
    if world.is_main:
        if tmp.exists():  # left by a run killed while writing this very step
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
    barrier(world)
    model_sd, optim_sd = get_state_dict(model, optimizer)
    with quiet_single_process():
        dcp.save(
            {"model": model_sd, "optim": optim_sd},
            checkpoint_id=str(tmp),
            no_dist=not world.distributed,
        )
    torch.save(_rng_state(world), tmp / f"rng-{world.rank}.pt")
    barrier(world)
    if world.is_main:
        (tmp / STATE_FILE).write_text(json.dumps({**train_state, "step": step}, indent=2) + "\n")
        _fsync_tree(tmp)
        if final.exists():  # the same step saved before (a resumed run that stopped early)
            shutil.rmtree(final)
        os.rename(tmp, final)
        _fsync_tree(final.parent)
        for _, old in list_checkpoints(out_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    barrier(world)
    return final


def load_failure(exc: BaseException) -> str:
    """One line for a failed DCP load: its message carries every rank's whole traceback."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    last = lines[-1] if lines else type(exc).__name__
    if last in ("EOFError", "UnpicklingError") or last.endswith("Error"):
        last = f"{last} (a file is truncated or corrupt)"
    return last[:300]


def load_checkpoint(
    folder: Path, model: nn.Module, optimizer: torch.optim.Optimizer, world: World
) -> dict[str, Any]:
    """Restore model, optimiser and RNG from ``folder``; return its train state."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    try:
        state = json.loads((folder / STATE_FILE).read_text())
    except (OSError, ValueError) as exc:
        raise LlamalabError(f"{folder}: unreadable {STATE_FILE}: {exc}") from None
    model_sd, optim_sd = get_state_dict(model, optimizer)
    sd = {"model": model_sd, "optim": optim_sd}
    try:
        with quiet_single_process():
            dcp.load(sd, checkpoint_id=str(folder), no_dist=not world.distributed)
    except (CheckpointException, RuntimeError, ValueError, KeyError, OSError, EOFError) as exc:
        raise LlamalabError(f"{folder}: cannot load this checkpoint: {load_failure(exc)}") from None
    set_state_dict(model, optimizer, model_state_dict=sd["model"], optim_state_dict=sd["optim"])
    rng = folder / f"rng-{world.rank}.pt"
    if rng.is_file():  # absent when resuming with more ranks than saved: keep fresh state
        saved = torch.load(rng, weights_only=True)
        torch.set_rng_state(saved["torch"])
        if "cuda" in saved and world.device.type == "cuda":
            torch.cuda.set_rng_state(saved["cuda"], world.device)
    return state


def load_newest_checkpoint(
    out_dir: Path, model: nn.Module, optimizer: torch.optim.Optimizer, world: World
) -> tuple[Path, dict[str, Any], list[tuple[Path, str]]] | None:
    """Restore the newest checkpoint in ``out_dir`` that loads; ``None`` if there is none.

    A checkpoint that fails to load (a file truncated by a full disk, say) is passed
    over for the next older one, and left in place (it is replaced when the resumed run
    saves that step again). Returns the folder loaded, its train state, and the
    ``(folder, reason)`` of each newer checkpoint passed over. Raises when checkpoints
    exist but none loads. A failed load may have written into the model and optimiser
    before failing; the next load overwrites every tensor, so nothing of it remains.
    """
    found = list_checkpoints(out_dir)
    skipped: list[tuple[Path, str]] = []
    for _, folder in reversed(found):
        try:
            return folder, load_checkpoint(folder, model, optimizer, world), skipped
        except LlamalabError as exc:
            skipped.append((folder, str(exc).removeprefix(f"{folder}: ")))
    if skipped:
        folder, reason = skipped[0]
        more = f" (nor do the {len(skipped) - 1} older ones)" if len(skipped) > 1 else ""
        raise LlamalabError(
            f"{folder}: {reason}{more}; no checkpoint in {Path(out_dir) / CHECKPOINTS} "
            "loads, so the run cannot resume (move that folder away to start over)"
        )
    return None
