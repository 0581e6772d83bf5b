"""A preallocated key/value cache addressed by tensor positions.

Positions arrive as a tensor, not a Python int, and the cache never changes shape, so a
decode step is the same graph at every position and ``torch.compile`` can capture it.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn


class CacheSlice(NamedTuple):
    """Which part of the cache a forward pass uses.

    Batch row i is cache row ``row + i``; attention covers slots ``0 .. kv_len``. ``start``
    is set when the batch is one sequence whose new tokens take the consecutive slots from
    ``start`` on (every prefill and single-sequence decode): then the write is a plain slice
    copy rather than a scatter.
    """

    row: int
    kv_len: int
    start: int | None = None


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
        self, input_pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor, where: CacheSlice
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v (B, n_kv_heads, T, head_dim) at positions input_pos (B, T) of the rows
        ``where`` names; return those rows' keys and values for its slots ``0 .. kv_len``.

        Every row is an independent sequence with its own positions, so one cache serves a
        batch whose members started at different times and have different lengths. Rows
        and slots are contiguous slices: views, never copies.
        """
        B, T = k.shape[0], k.shape[2]
        keys, values = self.k[where.row : where.row + B], self.v[where.row : where.row + B]
        if where.start is not None:
            keys[:, :, where.start : where.start + T] = k
            values[:, :, where.start : where.start + T] = v
        else:
            index = input_pos.view(B, 1, -1, 1).expand_as(k)
            keys.scatter_(2, index, k.to(keys.dtype))
            values.scatter_(2, index, v.to(values.dtype))
        return keys[:, :, : where.kv_len], values[:, :, : where.kv_len]
