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
        self, input_pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v (B, n_kv_heads, T, head_dim) at positions input_pos (B, T); return the cache.

        Only the first B rows of the cache are used, so one cache serves any batch up to
        its size.
        """
        B = k.shape[0]
        index = input_pos.view(B, 1, -1, 1).expand_as(k)
        self.k[:B].scatter_(2, index, k.to(self.k.dtype))
        self.v[:B].scatter_(2, index, v.to(self.v.dtype))
        return self.k[:B], self.v[:B]
