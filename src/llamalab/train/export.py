"""Write the trained weights as a Meta checkpoint folder that every llamalab command loads.

``out_dir/export/`` gets ``params.json``, ``consolidated.00.pth``, the tokenizer files
the data was made with, and ``SHA256SUMS`` and ``checklist.chk`` listing them
(``cd out_dir/export && sha256sum -c SHA256SUMS``), so ``llamalab generate --model out_dir/export`` runs it and
``llamalab convert out_dir/export --to gguf`` carries model and vocabulary to llama.cpp.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from llamalab.config import ModelConfig
from llamalab.errors import LlamalabError
from llamalab.train.run_dir import RUN_FILE, is_run_folder

__all__ = ["EXPORT", "export_meta", "export_run", "is_run_folder", "staged_folder"]

EXPORT = "export"


def export_meta(
    state_dict: dict[str, torch.Tensor], config: ModelConfig, tokenizer_dir: Path, out_dir: Path
) -> Path:
    """Write ``out_dir/export`` (replacing an earlier export whole); return its path."""
    from llamalab.checkpoint.meta_format import params_for
    from llamalab.checkpoint.verify import write_checksums

    with staged_folder(out_dir, EXPORT) as stage:
        (stage / "params.json").write_text(json.dumps(params_for(config), indent=2) + "\n")
        tensors = {
            k: v.detach().to("cpu", torch.float32).contiguous()
            for k, v in state_dict.items()
            if not (config.tie_embeddings and k == "output.weight")
        }
        torch.save(tensors, stage / "consolidated.00.pth")
        for f in sorted(tokenizer_dir.iterdir()):
            if f.is_file():
                shutil.copy2(f, stage / f.name)
        # SHA256SUMS (``sha256sum -c``) and Meta's md5 checklist.chk, as convert writes
        # for a Meta folder: written in the stage, so the export appears with its lists.
        write_checksums(stage, meta=True)
    return out_dir / EXPORT


@contextmanager
def staged_folder(parent: Path, name: str) -> Iterator[Path]:
    """A new folder to fill that becomes ``parent/name`` whole when the block ends.

    It is written beside the old ``parent/name`` and swapped in by renames, so a kill at
    any point leaves one whole folder (old or new) there; an error removes the stage.
    """
    dst = parent / name
    stage = Path(tempfile.mkdtemp(dir=parent, prefix=f".{name}.tmp-"))
    try:
        os.chmod(stage, 0o755)
        yield stage
        if dst.exists():
            old = Path(tempfile.mkdtemp(dir=parent, prefix=f".{name}.old-"))
            os.rename(dst, old / name)
            os.rename(stage, dst)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(stage, dst)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise


def export_run(run_dir: Path, into: Path) -> Path:
    """Write the newest whole checkpoint of the run in ``run_dir`` as a Meta folder.

    The folder is ``into/export`` (``into`` is an existing folder). The tokenizer is the one the run's data was made with (the
    data folder named in ``run.json``, or else the run's last export). This is what
    ``llamalab convert RUN_DIR DST`` converts from.
    """
    import torch.distributed.checkpoint as dcp

    from llamalab.config import ModelConfig
    from llamalab.model import Transformer
    from llamalab.train.checkpoint import latest_checkpoint, load_failure, quiet_single_process

    run_dir = Path(run_dir)
    try:
        record = json.loads((run_dir / RUN_FILE).read_text())
        config = ModelConfig.from_dict(record["model"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise LlamalabError(f"{run_dir / RUN_FILE}: not a readable llamalab run: {exc}") from None
    checkpoint = latest_checkpoint(run_dir)
    if checkpoint is None:
        raise LlamalabError(f"{run_dir}: the run has no whole checkpoint yet")
    tokenizer_dir = None
    data = record.get("config", {}).get("data")
    for candidate in ([Path(data) / "tokenizer"] if data else []) + [run_dir / EXPORT]:
        if (candidate / "tokenizer.model").is_file():
            tokenizer_dir = candidate
            break
    if tokenizer_dir is None:
        raise LlamalabError(
            f"{run_dir}: cannot find the run's tokenizer (neither {data}/tokenizer nor "
            f"{run_dir / EXPORT} holds a tokenizer.model)"
        )
    with torch.device("meta"):
        model = Transformer(config)
    model.to_empty(device="cpu")
    state = {"model": model.state_dict()}
    try:
        with quiet_single_process():
            dcp.load(state, checkpoint_id=str(checkpoint), no_dist=True)
    except Exception as exc:  # noqa: BLE001  (DCP raises many kinds; all mean one thing here)
        raise LlamalabError(
            f"{checkpoint}: cannot load this checkpoint: {load_failure(exc)}"
        ) from None
    return export_meta(state["model"], config, tokenizer_dir, Path(into))
