"""Training data: text sources → token shards + manifest, and the mixture sampler.

- `prepare` (``llamalab data prepare``): named sources (files, folders, globs) tokenized
  in parallel into one memory-mapped ``NAME.bin`` per source and a ``manifest.json``.
- `TokenShards`: reads that folder back (memory-mapped, validated against the manifest).
- `MixtureSampler`: the deterministic, rank-sliced, resumable order of training windows.

Nothing in the model, tokenizer or checkpoint code imports this package.
"""

from __future__ import annotations

from llamalab.data.prepare import prepare, token_dtype
from llamalab.data.sampler import MixtureSampler
from llamalab.data.shards import TokenShards
from llamalab.data.sources import parse_sources

__all__ = ["MixtureSampler", "TokenShards", "parse_sources", "prepare", "token_dtype"]
