"""Write the trained weights as a Meta checkpoint folder that every llamalab command loads.

``out_dir/export/`` gets ``params.json``, ``consolidated.00.pth`` and the tokenizer files
the data was made with, so ``llamalab generate --model out_dir/export`` runs it and
``llamalab convert out_dir/export --to gguf`` carries model and vocabulary to llama.cpp.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

from llamalab.config import ModelConfig

EXPORT = "export"


def export_meta(
    state_dict: dict[str, torch.Tensor], config: ModelConfig, tokenizer_dir: Path, out_dir: Path
) -> Path:
    """Write ``out_dir/export`` (replacing an earlier export whole); return its path."""
    from llamalab.checkpoint.meta_format import params_for

    dst = out_dir / EXPORT
    stage = Path(tempfile.mkdtemp(dir=out_dir, prefix=f".{EXPORT}.tmp-"))
    try:
        os.chmod(stage, 0o755)
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
        if dst.exists():
            old = Path(tempfile.mkdtemp(dir=out_dir, prefix=f".{EXPORT}.old-"))
            os.rename(dst, old / EXPORT)
            os.rename(stage, dst)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(stage, dst)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    return dst
