"""Pretraining with the LLaMA paper's recipe, from one CPU process to torchrun clusters.

- `config`: the TOML config (`TrainConfig`, `load_config`, ``--set`` overrides).
- `schedule`: warmup + cosine learning rate (`lr_at`).
- `optim`: AdamW with decay on matrices only.
- `parallel`: process group, FSDP2, activation checkpointing, compile.
- `checkpoint`: DCP checkpoints, atomic, resumable with any world size.
- `metrics`: ``metrics.jsonl`` and the loss plot.
- `export`: the trained model as a Meta folder llamalab (and llama.cpp, via convert) run.
- `loop`: `train`, the loop that ties them together.

Imports here stay light; `train` is imported from `llamalab.train.loop` when used.
"""

from __future__ import annotations

from llamalab.train.config import TrainConfig, load_config
from llamalab.train.schedule import lr_at

__all__ = ["TrainConfig", "load_config", "lr_at"]
