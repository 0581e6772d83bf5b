"""A preallocated key/value cache, and the per-step view that tells the model how to use it.

Each attention layer owns a :class:`KVCache`: keys and values for ``max_batch`` rows of
``max_seq_len`` slots, allocated once. A forward pass over new tokens receives a
:class:`CacheView`, built by the caller (the generation engine, a test) with
:func:`cache_view`: which rows the batch occupies, the position of every new token,
how many slots attention covers, and the attention mask, computed once per step rather
than once per layer.

Positions arrive as a tensor, not a Python int, and the cache never changes shape, so a
decode step is the same graph at every position and ``torch.compile`` can capture it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True, eq=False)
class CacheView:
    """How one forward pass reads and extends the KV cache.

    Attributes:
        input_pos: absolute position of every new token, (B, T); a single row (1, T)
            means every batch row uses the same positions.
        row: batch row i lives in cache row ``row + i``.
        kv_len: attention covers cache slots ``0 .. kv_len`` (at least the largest
            position plus one); attending over fewer than all slots keeps a step's cost
            proportional to the text so far.
        start: set when every batch row's new tokens take the consecutive slots
            ``start .. start + T``; the write is then a slice copy instead of a scatter.
        mask: additive attention mask (B or 1, 1, T, kv_len), 0 where a query may look and
            -inf elsewhere; ``None`` when the single new token sees every slot in view,
            which lets attention skip masking altogether.
        last_only: the caller needs the logits of the last position only (a prefill
            chooses just the next token), so the output head runs on that one.
    """

    input_pos: torch.Tensor
    row: int
    kv_len: int
    start: int | None
    mask: torch.Tensor | None
    last_only: bool = False

    @property
    def n_tokens(self) -> int:
        """Number of new tokens per batch row (T)."""
        return self.input_pos.shape[-1]


@dataclass(frozen=True, eq=False)
class Segments:
    """Several cache views served by one forward pass (decode rows beside a prefill chunk).

    Their tokens are packed one after another into a single (1, N) batch, so every
    linear layer runs once over all of them (per-pass overhead, not arithmetic, dominates
    a small step on a CPU); only attention runs per view. ``shapes`` is each view's
    (B, T): view i owns the next B·T packed tokens, row by row.
    """

    views: tuple[CacheView, ...]
    shapes: tuple[tuple[int, int], ...]

    def bounds(self) -> list[tuple[int, int]]:
        """Where each view's tokens lie in the packed batch: [(start, end), ...]."""
        out, at = [], 0
        for b, t in self.shapes:
            out.append((at, at + b * t))
            at += b * t
        return out


def cache_view(
    input_pos: torch.Tensor,
    *,
    row: int = 0,
    kv_len: int | None = None,
    last_only: bool = False,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> CacheView:
    """Build the :class:`CacheView` for new tokens at ``input_pos`` (T,), (1, T) or (B, T).

    ``kv_len`` defaults to the largest position plus one. The mask is built in ``dtype``
    (the model's; a model of another dtype converts it once per forward pass) and every
    tensor is moved to ``device``. Pass ``input_pos`` on the CPU where possible: finding
    out whether positions are consecutive then costs no device round trip.
    """
    if input_pos.dim() == 1:
        input_pos = input_pos.unsqueeze(0)
    if input_pos.dim() != 2 or input_pos.shape[-1] == 0:
        raise ValueError(
            f"input_pos must be (T,) or (B, T) with T ≥ 1, got {tuple(input_pos.shape)}"
        )
    on_host = input_pos.cpu()
    last = int(on_host.max())
    kv_len = last + 1 if kv_len is None else kv_len
    if kv_len <= last:
        raise ValueError(f"kv_len {kv_len} does not cover position {last}")
    T = input_pos.shape[1]
    # Rows sharing one run of consecutive positions (every prefill chunk, and decoding a
    # single sequence) are written with a slice copy.
    start = None
    if input_pos.shape[0] == 1 and (T == 1 or bool((on_host[0].diff() == 1).all())):
        start = int(on_host[0, 0])
    mask = None
    if not (T == 1 and start is not None and kv_len == start + 1):
        # A query at position p sees its own row's slots 0..p: additive, 0 where visible.
        slots = torch.arange(kv_len, device=device)
        visible = slots.view(1, 1, -1) <= input_pos.to(device).unsqueeze(-1)  # (B, T, S)
        mask = torch.zeros(visible.shape, dtype=dtype, device=device)
        mask = mask.masked_fill_(~visible, float("-inf")).unsqueeze(1)  # (B, 1, T, S)
    return CacheView(input_pos.to(device), row, kv_len, start, mask, last_only)


class KVCache(nn.Module):
    """Keys and values of one attention layer: (max_batch, n_kv_heads, max_seq_len, head_dim)."""

    def __init__(
        self,
        max_batch_size: int,
        n_kv_heads: int,
        max_seq_len: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        shape = (max_batch_size, n_kv_heads, max_seq_len, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(
        self, k: torch.Tensor, v: torch.Tensor, view: CacheView
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v (B, n_kv_heads, T, head_dim) where ``view`` says; return those rows'
        keys and values for slots ``0 .. view.kv_len``.

        Every row is an independent sequence with its own positions, so one cache serves a
        batch whose members started at different times and have different lengths. Rows
        and slots are contiguous slices: views, never copies.
        """
        B, T = k.shape[0], k.shape[2]
        if view.row + B > self.k.shape[0]:
            raise ValueError(
                f"rows {view.row}..{view.row + B} exceed the cache's {self.k.shape[0]}"
            )
        keys, values = self.k[view.row : view.row + B], self.v[view.row : view.row + B]
        if view.start is not None:
            keys[:, :, view.start : view.start + T] = k
            values[:, :, view.start : view.start + T] = v
        else:
            index = view.input_pos.expand(B, T).reshape(B, 1, T, 1).expand_as(k)
            keys.scatter_(2, index, k.to(keys.dtype))
            values.scatter_(2, index, v.to(values.dtype))
        return keys[:, :, : view.kv_len], values[:, :, : view.kv_len]
