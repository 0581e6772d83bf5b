"""Processes, devices and parallelism, applied to a built model as separate steps.

The same code runs as one CPU process and under ``torchrun --nnodes N --nproc_per_node G``:
torchrun sets ``RANK``/``WORLD_SIZE``/``LOCAL_RANK``, and then a process group is made
(gloo on CPUs, NCCL on GPUs) and the model is sharded with FSDP2.

Like torchtitan, each transform is its own function applied in a fixed order to the
plain model: activation checkpointing, then compilation, then FSDP (`fully_shard` on
every block, then on the root, so each block's parameters are gathered just before it
runs and freed after). None of them renames a parameter, so checkpoints do not depend
on which were applied.
"""

from __future__ import annotations

import functools
import hashlib
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from llamalab.errors import LlamalabError


@dataclass(frozen=True)
class World:
    """This process's place: rank, world size and device."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_world(device: str = "auto") -> World:
    """Join the process group torchrun describes (if any) and pick this rank's device."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device == "cuda" and not torch.cuda.is_available():
        raise LlamalabError("device = cuda, but torch sees no CUDA device")
    use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if use_cuda:
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device("cpu")
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(
            backend="nccl" if use_cuda else "gloo",
            device_id=dev if use_cuda else None,
        )
    return World(rank, world_size, local_rank, dev)


def close_world(world: World) -> None:
    """Leave the process group (a no-op for one process)."""
    if world.distributed and dist.is_initialized():
        dist.destroy_process_group()


def barrier(world: World) -> None:
    if world.distributed:
        dist.barrier()


def all_reduce_mean(value: torch.Tensor, world: World) -> torch.Tensor:
    """The mean of a tensor over ranks (the tensor itself with one process)."""
    if world.distributed:
        value = value.clone()
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
        value /= world.world_size
    return value


def any_rank(flag: bool, world: World) -> bool:
    """Whether ``flag`` is true on any rank (every rank gets the same answer)."""
    if not world.distributed:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=world.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def apply_ac(model: nn.Module) -> None:
    """Recompute each block's activations in the backward pass instead of storing them.

    The block's ``forward`` is wrapped in place (an instance attribute), so parameter
    names stay as they are. Non-reentrant checkpointing composes with FSDP2 and compile.
    """
    from torch.utils.checkpoint import checkpoint

    for block in model.layers:
        inner = block.forward

        @functools.wraps(inner)
        def forward(*args, _inner=inner, **kwargs):
            return checkpoint(_inner, *args, use_reentrant=False, **kwargs)

        block.forward = forward


def apply_compile(model: nn.Module) -> None:
    """Compile each block separately (blocks are alike: one compilation serves them all)."""
    for block in model.layers:
        block.compile()


def apply_fsdp(model: nn.Module, param_dtype: torch.dtype | None) -> None:
    """Shard parameters, gradients and optimiser state over every rank (FSDP2).

    With ``param_dtype`` (bf16) the parameters are gathered and computed in that type
    while the sharded masters and the gradient reduction stay in float32.
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    n = len(model.layers)
    for i, block in enumerate(model.layers):
        # The last block's parameters are needed again first in backward: keep them.
        fully_shard(block, mp_policy=mp, reshard_after_forward=i < n - 1)
    fully_shard(model, mp_policy=mp)


def _param_seed(seed: int, name: str) -> int:
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


@torch.no_grad()
def init_weights(model: nn.Module, seed: int, std: float = 0.02) -> None:
    """Initialise for training from scratch: normal(0, std) matrices, unit norm gains.

    Each parameter draws from its own generator, seeded by ``seed`` and its name, and is
    drawn whole on the CPU, then this rank keeps its shard. So the weights are the same
    whatever the world size and sharding (a 64-rank run starts where a 1-process run
    does), and the model can be built on the ``meta`` device: only one full parameter at
    a time ever exists in memory.
    """
    from torch.distributed.tensor import DTensor, distribute_tensor

    for name, param in model.named_parameters():
        full = torch.empty(param.shape, dtype=torch.float32)
        if name.endswith("norm.weight"):
            full.fill_(1.0)
        else:
            full.normal_(0.0, std, generator=torch.Generator().manual_seed(_param_seed(seed, name)))
        if isinstance(param, DTensor):
            # Every rank drew the same full tensor: each slices out its own shard locally.
            local = distribute_tensor(
                full, param.device_mesh, param.placements, src_data_rank=None
            ).to_local()
            param.to_local().copy_(local)
        else:
            param.copy_(full)
