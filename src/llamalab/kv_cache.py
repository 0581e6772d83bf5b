"""A preallocated key/value cache addressed by tensor positions.

Positions arrive as a tensor, not a Python int, and the cache never changes shape, so a
decode step is the same graph at every position and ``torch.compile`` can capture it.
"""

from __future__ import annotations

import torch
from torch import nn


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
        self,
        input_pos: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        row: int = 0,
        kv_len: int | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v (B, n_kv_heads, T, head_dim) at positions input_pos (B, T) of rows
        ``row .. row+B``; return those rows' keys and values for slots ``0 .. kv_len``.

        Every row is an independent sequence with its own positions, so one cache serves a
        batch whose members started at different times and have different lengths. Rows
        and slots are contiguous slices: views, never copies.
        """
        B = k.shape[0]
        kv_len = kv_len or self.k.shape[2]
        keys, values = self.k[row : row + B], self.v[row : row + B]
        index = input_pos.view(B, 1, -1, 1).expand_as(k)
        keys.scatter_(2, index, k.to(keys.dtype))
        values.scatter_(2, index, v.to(values.dtype))
        return keys[:, :, :kv_len], values[:, :, :kv_len]
