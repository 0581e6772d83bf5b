"""Packed rows whose documents stay apart, and the replicated model of a torchrun fine-tune.

Several instruction items share a row of ``seq_len`` positions (`data.instruct.pack_examples`),
and each must see only itself: `DocumentMasked` runs the model with a block-diagonal causal
mask and positions that start at 0 again for every document, so an item's loss and
gradients are what it gives alone (up to float rounding), and no position is wasted on
padding. The model's attention takes the mask through its existing ``mask`` argument.
"""

from __future__ import annotations

import inspect

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from llamalab.model import rope_rotation


def document_attention(
    model: torch.nn.Module, documents: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The rotation and attention mask that keep the documents of packed rows apart.

    ``documents`` (B, T) numbers each position's document, in runs (as
    `data.instruct.to_packed_rows` makes it). Returns the rotary table at each position's
    place in its own document (B, T, 1, head_dim/2, 2), so every document starts at
    position 0, and a boolean mask (B, 1, T, T), true where a query may attend: earlier
    or same positions of the same document.
    """
    T = documents.shape[1]
    at = torch.arange(T, device=documents.device)
    starts = torch.ones_like(documents, dtype=torch.bool)
    starts[:, 1:] = documents[:, 1:] != documents[:, :-1]
    first = torch.where(starts, at, 0).cummax(dim=1).values  # each position's document start
    rope = rope_rotation(model.rope_table(T)[at - first])
    same = documents.unsqueeze(2) == documents.unsqueeze(1)
    mask = same & (at.unsqueeze(1) >= at.unsqueeze(0))
    return rope, mask.unsqueeze(1)


class DocumentMasked(nn.Module):
    """``model`` run on packed rows, each document attending only to itself.

    ``forward(rows, targets=None)`` takes ``rows`` (B, 2, T): the tokens and their
    document ids (:func:`document_attention`), and returns what ``model(tokens,
    targets=targets)`` returns. The model's own forward runs unchanged; a pre-hook on
    each attention layer hands it the per-document rotation and mask in place of the
    whole-row causal ones, only during this wrapper's forward.
    """

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model
        self._current: tuple[torch.Tensor, torch.Tensor] | None = None
        self._hooks = [
            layer.attention.register_forward_pre_hook(self._substitute, with_kwargs=True)
            for layer in model.layers
        ]

    def _substitute(self, module, args, kwargs):
        if self._current is None:
            return None
        # Attention.forward(x, rope, cache=None, mask=None), by position or by name.
        args = list(args)
        if (args[2] if len(args) > 2 else kwargs.get("cache")) is not None:
            raise RuntimeError("packed rows run without a KV cache")
        for i, name, value in zip((1, 3), ("rope", "mask"), self._current, strict=True):
            if len(args) > i:
                args[i] = value
            else:
                kwargs[name] = value
        return tuple(args), kwargs

    def forward(self, rows: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor:
        tokens, documents = rows[:, 0], rows[:, 1]
        self._current = document_attention(self.model, documents)
        try:
            return self.model(tokens, targets=targets)
        finally:
            self._current = None

    def remove(self) -> None:
        """Take the hooks off the model."""
        for hook in self._hooks:
            hook.remove()


class Replicated(DistributedDataParallel):
    """DistributedDataParallel with FSDP2's switch for a step's micro-batches."""

    def set_requires_gradient_sync(self, sync: bool) -> None:
        """Whether the next backward all-reduces (the step's last micro-batch only)."""
        self.require_backward_grad_sync = sync  # what no_sync() sets and restores


def replicate(module: torch.nn.Module) -> Replicated:
    """``module`` under DistributedDataParallel: gradients averaged over every rank.

    `loop.train_step` calls ``set_requires_gradient_sync`` on it as on an FSDP model, so
    only the step's last micro-batch all-reduces. Buffers are not re-broadcast before
    every forward (the rotary table is the same on every rank).
    """
    # torch 2.13 names that switch forward_sync_buffers and deprecates broadcast_buffers.
    params = inspect.signature(DistributedDataParallel).parameters
    quiet = "forward_sync_buffers" if "forward_sync_buffers" in params else "broadcast_buffers"
    return Replicated(module, **{quiet: False})
