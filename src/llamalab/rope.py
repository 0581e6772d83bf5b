"""The rotary embedding's tables: each frequency (with the scalings LLaMA variants use),
and e^(i·angle) for every position. ``model.py`` rotates queries and keys by them.

Kept apart from the model as Hugging Face keeps its ``modeling_rope_utils.py``: the GGUF
writer derives llama.cpp's ``rope_freqs`` from the same frequencies without a model.
"""

from __future__ import annotations

import math

import torch

from llamalab.config import ModelConfig, RopeScaling

__all__ = ["rope_cache", "rope_frequencies"]


def rope_frequencies(head_dim: int, theta: float, scaling: RopeScaling | None) -> torch.Tensor:
    """Inverse frequencies of the rotary embedding, one per pair of channels: (head_dim/2,)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    if scaling is None:
        return inv_freq
    if scaling.kind == "linear":
        return inv_freq / scaling.factor
    if scaling.kind == "factors":
        return inv_freq / torch.tensor(scaling.factors, dtype=torch.float64)
    # llama3: keep high frequencies, divide low ones by `factor`, blend the band between.
    low_wavelen = scaling.original_context_length / scaling.low_freq_factor
    high_wavelen = scaling.original_context_length / scaling.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    smooth = (scaling.original_context_length / wavelen - scaling.low_freq_factor) / (
        scaling.high_freq_factor - scaling.low_freq_factor
    )
    blended = (1 - smooth) * inv_freq / scaling.factor + smooth * inv_freq
    out = torch.where(wavelen > low_wavelen, inv_freq / scaling.factor, blended)
    return torch.where(wavelen < high_wavelen, inv_freq, out)


def rope_cache(
    config: ModelConfig, length: int, device: torch.device | str | None = None
) -> torch.Tensor:
    """e^(i·angle) for every (position, frequency) as (real, imag): (length, head_dim/2, 2).

    Angles are computed in float64 and rounded once to float32. Each row depends only on
    its own position, so a longer table starts with exactly the rows of a shorter one:
    the table can grow without changing any result.
    """
    inv_freq = rope_frequencies(config.head_dim, config.rope_theta, config.rope_scaling)
    positions = torch.arange(length, dtype=torch.float64)
    angles = torch.outer(positions, inv_freq).float()
    return torch.view_as_real(torch.polar(torch.ones_like(angles), angles)).to(device)
