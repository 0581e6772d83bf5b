"""Upper bounds on a run's sizes, checked before anything is allocated.

A size that cannot work (a micro-batch whose activations alone exceed the memory, a
batch larger than the data) is one error naming the config key, instead of a run that
swaps, is killed, or never finishes a step.

The memory figure is a floor, not a prediction: it counts only the tensors a training
step cannot do without (fp32 weights, gradients and AdamW's two moments; the
activations that backward must keep for each block), so a run it refuses would not
have fitted, whatever the allocator does.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from llamalab.errors import LlamalabError

# Bytes per parameter that a step holds: fp32 master weight, gradient, AdamW exp_avg
# and exp_avg_sq.
STATE_BYTES_PER_PARAM = 16
# The share of the available memory a run may plan to fill: the rest is headroom for
# the allocator's slack, the memory-mapped data, Python and the libraries.
USABLE = 0.9


def gib(n: float) -> str:
    """``n`` bytes as a short human figure."""
    if n < 1024:
        return f"{n:.0f} B"
    for unit in ("KiB", "MiB", "GiB", "TiB"):
        n /= 1024
        if n < 1024:
            break
    return f"{n:,.1f} {unit}"


def _meminfo_available(path: Path = Path("/proc/meminfo")) -> int | None:
    try:
        for line in path.read_text(encoding="ascii", errors="replace").splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024  # the file counts kB
    except (OSError, ValueError, IndexError):
        pass
    return None


def _cgroup_room(root: Path = Path("/sys/fs/cgroup")) -> int | None:
    """Memory left under this container's cgroup v2 limit, if it has one."""
    try:
        limit = (root / "memory.max").read_text().strip()
        if limit == "max":
            return None
        return max(0, int(limit) - int((root / "memory.current").read_text()))
    except (OSError, ValueError):
        return None


def available_memory(device: torch.device) -> int | None:
    """Bytes this process could still allocate on ``device`` (``None``: unknown).

    CUDA: the device's free memory. CPU: the kernel's MemAvailable estimate (memory
    free plus caches it can drop), or the free pages from sysconf where /proc is
    missing, capped by a cgroup v2 limit.
    """
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    room = _meminfo_available()
    if room is None:
        try:
            room = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):
            room = None
    cgroup = _cgroup_room()
    if cgroup is not None:
        room = cgroup if room is None else min(room, cgroup)
    return room


def ranks_on_this_host() -> int:
    """Processes of this job on this machine (torchrun's LOCAL_WORLD_SIZE; 1 alone)."""
    try:
        return max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    except ValueError:
        return 1


def activation_bytes(
    *,
    dim: int,
    kv_dim: int,
    ffn_hidden_dim: int,
    n_layers: int,
    tokens: int,
    element_bytes: int,
    checkpointing: bool,
) -> int:
    """The least memory backward needs for the activations of ``tokens`` tokens.

    Per token and block, the tensors saved for backward: the block's input and its
    normed copy, queries, keys and values, the attention output, the residual sum and
    its normed copy (``6·dim + 2·kv_dim``), and SwiGLU's three hidden-width tensors
    (``3·ffn_hidden_dim``); plus the embedding output, the final norm and the loss's
    gradient outside the blocks (``3·dim``). With activation checkpointing, each block
    keeps only its input, and one block at a time is recomputed in full.
    """
    per_block = 6 * dim + 2 * kv_dim + 3 * ffn_hidden_dim
    kept = n_layers * dim + per_block if checkpointing else n_layers * per_block
    return tokens * (kept + 3 * dim) * element_bytes


def check_memory(
    *,
    n_params: int,
    shards: int,
    ranks_here: int,
    activations: int,
    available: int | None,
    micro_batch_size: int,
    seq_len: int,
) -> None:
    """Refuse a run whose floor of memory per process exceeds what is available.

    Args:
        n_params: parameters of the whole model.
        shards: how many ranks share the weights and optimiser state (FSDP).
        ranks_here: processes sharing this memory (ranks on one host's RAM; 1 per GPU).
        activations: :func:`activation_bytes` of one micro-batch.
        available: :func:`available_memory`; ``None`` skips the check.
    """
    if available is None:
        return
    state = n_params * STATE_BYTES_PER_PARAM // shards * ranks_here
    budget = int(available * USABLE)
    where = f"{gib(available)} available" + (
        f", shared by {ranks_here} ranks" if ranks_here > 1 else ""
    )
    if state > budget:
        raise LlamalabError(
            f"config: model: {n_params / 1e6:,.1f}M parameters need at least {gib(state)} for "
            f"weights, gradients and AdamW state, but {where}; choose a smaller model "
            "or shard it over more ranks"
        )
    need = state + activations * ranks_here
    if need > budget:
        raise LlamalabError(
            f"config: micro_batch_size {micro_batch_size} (× seq_len {seq_len}) needs at "
            f"least {gib(activations * ranks_here)} of activations on top of "
            f"{gib(state)} for the model and optimiser, but {where}; lower "
            "micro_batch_size (more micro-batches per step keep batch_tokens)"
        )


def check_data(batch_tokens: int, train_tokens: int, data: str) -> None:
    """Refuse a batch larger than every training window of the sampled sources together."""
    if batch_tokens > train_tokens:
        raise LlamalabError(
            f"config: batch_tokens {batch_tokens:,} is more than the {train_tokens:,} "
            f"training tokens in {data}: one step would go over the data more than once; "
            "lower batch_tokens or add data"
        )
