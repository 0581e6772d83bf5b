"""The learning-rate schedule of the paper (§2.2): linear warmup, then cosine decay to 10%.

The rate depends on the step and the config only, never on a run's history: a run
resumed with another schedule length (``max_steps``, or ``total_tokens``) follows the
new curve from its saved step, as torchtitan and LitGPT do (see
``llamalab.train.loop.schedule_change``).
"""

from __future__ import annotations

import math


def lr_at(
    step: int, *, peak: float, warmup_steps: int, total_steps: int, min_ratio: float = 0.1
) -> float:
    """The learning rate of optimiser step ``step`` (counted from 0).

    Warmup rises linearly to ``peak`` over ``warmup_steps`` steps (step 0 already gets
    ``peak / warmup_steps``, never 0, so no step is wasted); a cosine then decays it to
    ``min_ratio · peak`` at ``total_steps``, where it stays.
    """
    if step < warmup_steps:
        return peak * (step + 1) / warmup_steps
    if step >= total_steps:
        return peak * min_ratio
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return peak * (min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress)))
