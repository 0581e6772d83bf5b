"""AdamW as the paper sets it: β 0.9/0.95, weight decay 0.1, on the matrices only.

Decay applies to every parameter with two or more dimensions (the projections, the
embedding and the output matrix) and not to the RMSNorm gains: shrinking a gain towards
0 rescales a whole activation rather than regularising weights, which is why GPT-2,
nanoGPT and torchtitan leave norms out. LLaMA has no biases; any 1-D parameter would be
left out the same way.
"""

from __future__ import annotations

import torch
from torch import nn

from llamalab.train.config import TrainConfig


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two AdamW groups: matrices with ``weight_decay``, the rest (norms) without."""
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """The run's AdamW (its learning rate is set before every step by the schedule)."""
    return torch.optim.AdamW(
        parameter_groups(model, cfg.weight_decay),
        lr=cfg.lr,
        betas=(cfg.beta1, cfg.beta2),
        eps=cfg.eps,
    )
