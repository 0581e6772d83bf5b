"""Tensor parallelism: one model's weights split across the ranks of a 1-D device mesh.

The split is Megatron's, written with DTensor (``torch.distributed.tensor.parallel``):

- ``wq``, ``wk``, ``wv``, ``w1`` and ``w3`` are split by columns (their output features):
  each rank computes its own heads and its own slice of the feed-forward hidden layer,
  with no communication;
- ``wo`` and ``w2`` are split by rows (their input features): each rank's product is a
  partial sum, and one all-reduce per module (two per block) makes it whole;
- the embedding and the output layer are split along the vocabulary: a token's row is
  looked up on the rank that holds it (an all-reduce joins them) and the logits are
  all-gathered at the output, where sampling needs all of them.

Attention then runs on each rank's heads only: :func:`apply_tp` sets each
``Attention``'s ``n_heads`` and ``n_kv_heads`` to the local counts, and the KV cache
that ``Transformer.setup_cache`` allocates holds only those heads.

With grouped-query attention and fewer KV heads than ranks, the KV heads are
replicated, as Meta's reference code did: each rank holds the one KV head its query heads
read (``wk`` and ``wv`` are then plain local slices, since no rank needs another's).

Which slice of every full tensor a rank holds is said once, by :func:`shard_spec`; the
same table serves a model already in memory (:func:`apply_tp`) and a checkpoint read
slice by slice (``parallel/loading.py``).

The exact split (``exact=True``, ``--tp-exact``) cuts ``wo`` and ``w2`` by rows of
their output instead, and gathers their input first: every dot product then sums all its
terms on one rank, in one process's order, so the ranks' float logits equal one
process's bit for bit. The row split's partial sums, added by an all-reduce, round
differently (SmolLM2 on 3 ranks: up to 5.5e-5 in the logits, as far from the exact
result as one process). The price is two all-gathers per module instead of one
all-reduce: four collectives per block instead of two.

Packed (quantized) layers split the same way, without DTensor, which cannot wrap them:
:func:`wire_packed` keeps each rank's column-split layers as plain local modules and
wraps the row-split ones (:class:`RowParallel`), the embedding
(:class:`VocabParallelEmbedding`) and the output (:class:`VocabParallelOutput`) with the
same collectives, called explicitly.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from llamalab.config import ModelConfig
from llamalab.errors import LlamalabError

# Module suffix → the dimension of its weight that is split (0: output features, 1: input).
_COLUMN = ("attention.wq", "attention.wk", "attention.wv", "feed_forward.w1", "feed_forward.w3")
_ROW = ("attention.wo", "feed_forward.w2")


@dataclass(frozen=True)
class Slice:
    """The part of a full tensor one rank holds: rows or columns ``start .. stop`` of ``dim``.

    ``dtensor`` says whether the part is one shard of a DTensor (each rank a disjoint,
    ordered piece) or a plain local tensor (replicated KV heads, which several ranks share).
    """

    dim: int
    start: int
    stop: int
    dtensor: bool = True


def check_degree(config: ModelConfig, world: int) -> None:
    """Refuse, with one clear error, a tensor-parallel degree the model cannot be split by.

    The exact split's cut of the width needs nothing more: the width is the query heads
    times the head size, so a degree that divides the heads divides it."""
    if world < 1:
        raise LlamalabError(f"tensor-parallel degree must be at least 1, got {world}")
    problems = []
    if config.n_heads % world:
        problems.append(f"its {config.n_heads} attention heads")
    kv = config.n_kv_heads
    if kv % world and world % kv:
        problems.append(
            f"its {kv} key/value heads (the degree must divide them, or be a multiple of "
            "them so that each KV head is replicated on whole ranks)"
        )
    if config.ffn_hidden_dim % world:
        problems.append(f"its feed-forward hidden size {config.ffn_hidden_dim}")
    if problems:
        raise LlamalabError(
            f"tensor-parallel degree {world} does not divide {' or '.join(problems)}"
            f" of the model {config.name or ''}".rstrip()
        )


def local_heads(config: ModelConfig, world: int, rank: int) -> tuple[int, int, int]:
    """(query heads, KV heads, first KV head) that ``rank`` of ``world`` computes."""
    heads = config.n_heads // world
    if config.n_kv_heads >= world:
        kv = config.n_kv_heads // world
        return heads, kv, rank * kv
    # Fewer KV heads than ranks: this rank's query heads all read one KV head.
    group = config.n_heads // config.n_kv_heads
    return heads, 1, rank * heads // group


def _even(size: int, world: int, rank: int) -> tuple[int, int]:
    """torch.chunk's split, which DTensor's Shard uses: ceil(size/world) each, the last less."""
    step = -(-size // world)
    start = min(rank * step, size)
    return start, min(start + step, size)


def shard_spec(
    config: ModelConfig, world: int, rank: int, exact: bool = False
) -> dict[str, Slice | None]:
    """Canonical parameter name → the :class:`Slice` ``rank`` holds (``None``: replicated);
    ``exact``: ``wo`` and ``w2`` by rows of their output (see the module)."""
    check_degree(config, world)
    heads, kv, first_kv = local_heads(config, world, rank)
    D = config.head_dim
    replicated_kv = config.n_kv_heads < world
    spec: dict[str, Slice | None] = {}
    vocab = Slice(0, *_even(config.vocab_size, world, rank))
    spec["tok_embeddings.weight"] = vocab
    spec["norm.weight"] = None
    spec["output.weight"] = vocab
    hidden = config.ffn_hidden_dim // world
    width = config.dim // world
    out_rows = Slice(0, rank * width, (rank + 1) * width)  # wo and w2 in the exact split
    for i in range(config.n_layers):
        p = f"layers.{i}."
        spec[p + "attention.wq.weight"] = Slice(0, rank * heads * D, (rank + 1) * heads * D)
        for name in ("attention.wk.weight", "attention.wv.weight"):
            spec[p + name] = Slice(0, first_kv * D, (first_kv + kv) * D, not replicated_kv)
        wo = Slice(1, rank * heads * D, (rank + 1) * heads * D)
        spec[p + "attention.wo.weight"] = out_rows if exact else wo
        spec[p + "feed_forward.w1.weight"] = Slice(0, rank * hidden, (rank + 1) * hidden)
        spec[p + "feed_forward.w3.weight"] = Slice(0, rank * hidden, (rank + 1) * hidden)
        w2 = Slice(1, rank * hidden, (rank + 1) * hidden)
        spec[p + "feed_forward.w2.weight"] = out_rows if exact else w2
        spec[p + "attention_norm.weight"] = None
        spec[p + "ffn_norm.weight"] = None
    return spec


def _refuse_unsupported(model: nn.Module) -> None:
    from llamalab.model import Transformer

    if not isinstance(model, Transformer):
        raise LlamalabError(f"tensor parallelism splits a llamalab Transformer, not {type(model)}")
    packed = [
        name
        for name, module in model.named_modules()
        if type(module).__module__.startswith("llamalab.quant")
    ]
    if packed or model.decode_path is not None:
        raise LlamalabError(
            "apply_tp splits float models only, eager: load the model unpacked, or load "
            "packed layers already split with llamalab.parallel.loading.load_sharded"
            + (f" ({packed[0]} is packed)" if packed else "")
        )


def _place(
    module: nn.Module, attr: str, local: torch.Tensor, full: torch.Size, cut: Slice | None, mesh
) -> None:
    """Register ``local`` as ``module.attr``: a DTensor shard, or a plain tensor."""
    from torch.distributed.tensor import DTensor, Shard

    if cut is not None and cut.dtensor:
        stride = torch.empty(full, device="meta").stride()
        local = DTensor.from_local(
            local, mesh, [Shard(cut.dim)], run_check=False, shape=full, stride=stride
        )
    module.register_parameter(attr, nn.Parameter(local, requires_grad=False))


def shard_parameters(model: nn.Module, mesh, read, exact: bool = False) -> None:
    """Replace every parameter of ``model`` by this rank's part, as :func:`shard_spec` says.

    ``read(name, slice_or_None)`` returns the local tensor: the whole tensor for ``None``.
    """
    config: ModelConfig = model.config
    world, rank = mesh.size(), mesh.get_local_rank()
    spec = shard_spec(config, world, rank, exact)
    for name, cut in spec.items():
        if name == "output.weight" and config.tie_embeddings:
            continue  # tied below to the embedding's shard
        owner, attr = name.rsplit(".", 1)
        module = model.get_submodule(owner)
        full = getattr(module, attr).shape
        _place(module, attr, read(name, cut), full, cut, mesh)
    if config.tie_embeddings:
        model.output.weight = model.tok_embeddings.weight


def apply_tp(model: nn.Module, mesh, exact: bool = False) -> nn.Module:
    """Split ``model`` (a float :class:`~llamalab.model.Transformer`) across ``mesh``, in place.

    ``mesh`` is a 1-D :class:`~torch.distributed.device_mesh.DeviceMesh` over the
    tensor-parallel ranks. A model whose parameters are still whole tensors keeps only this
    rank's slices of them (no communication: every rank must hold the same weights); one
    whose parameters were already placed by :func:`shard_parameters` is only wired. Its
    forward pass then returns the full logits on every rank. ``exact``: the exact split
    (see the module). Returns ``model``.
    """
    from torch.distributed.tensor import DTensor

    _refuse_unsupported(model)
    config: ModelConfig = model.config
    world, rank = mesh.size(), mesh.get_local_rank()
    check_degree(config, world)
    if not any(isinstance(p, DTensor) for p in model.parameters()):
        full = dict(model.named_parameters(remove_duplicate=False))

        def read(name: str, cut: Slice | None) -> torch.Tensor:
            tensor = full[name].detach()
            if cut is None:
                return tensor
            return tensor.narrow(cut.dim, cut.start, cut.stop - cut.start).clone()

        shard_parameters(model, mesh, read, exact)
    _wire(model, mesh, exact)
    heads, kv, _ = local_heads(config, world, rank)
    for layer in model.layers:
        layer.attention.n_heads, layer.attention.n_kv_heads = heads, kv
    model.tp_mesh = mesh
    return model


def _wire(model: nn.Module, mesh, exact: bool) -> None:
    """Install DTensor's input/output redistribution around the split modules."""
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        RowwiseParallel,
        parallelize_module,
    )

    replicated_kv = model.config.n_kv_heads < mesh.size()
    plan = {
        # The vocabulary split: each rank looks up the tokens it holds (the others give
        # zeros) and an all-reduce joins them; the logits are all-gathered.
        "tok_embeddings": RowwiseParallel(input_layouts=Replicate()),
        "output": ColwiseParallel(output_layouts=Replicate()),
    }
    for i in range(len(model.layers)):
        p = f"layers.{i}."
        plan[p + "attention.wq"] = ColwiseParallel()
        if not replicated_kv:  # replicated KV heads are plain local layers: nothing to wire
            plan[p + "attention.wk"] = ColwiseParallel()
            plan[p + "attention.wv"] = ColwiseParallel()
        if exact:  # the input gathered, this rank's output features, those gathered
            gathered = ColwiseParallel(input_layouts=Shard(-1), output_layouts=Replicate())
            plan[p + "attention.wo"] = gathered
            plan[p + "feed_forward.w2"] = gathered
        else:
            plan[p + "attention.wo"] = RowwiseParallel()  # the all-reduce after attention
            plan[p + "feed_forward.w2"] = RowwiseParallel()  # the all-reduce after the FFN
        plan[p + "feed_forward.w1"] = ColwiseParallel()
        plan[p + "feed_forward.w3"] = ColwiseParallel()
    parallelize_module(model, mesh, plan)
    # The gathered logits come back as a collective still in flight (a tensor subclass that
    # waits when first used); the caller gets a plain tensor, as from one process.
    model.output.register_forward_hook(_wait_for_logits)
    if model.config.tie_embeddings:
        model.output.weight = model.tok_embeddings.weight


def _wait_for_logits(module: nn.Module, args, out: torch.Tensor) -> torch.Tensor:
    from torch.distributed._functional_collectives import AsyncCollectiveTensor

    return out.wait() if isinstance(out, AsyncCollectiveTensor) else out


# ---------------------------------------------------------------- packed layers, no DTensor


# The modules below keep the mesh and look its process group up at each call: holding
# the group object would keep it alive past ``destroy_process_group``, and gloo aborts
# the process ("terminate called without an active exception") when it is freed at exit.


class RowParallel(nn.Module):
    """A linear split by rows (``wo``, ``w2``) as a plain local module: this rank's input
    columns give a partial product, and one all-reduce makes the sum on every rank."""

    def __init__(self, inner: nn.Module, mesh) -> None:
        super().__init__()
        self.inner = inner
        self.mesh = mesh

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        import torch.distributed as dist

        y = self.inner(x).contiguous()
        dist.all_reduce(y, group=self.mesh.get_group())
        return y


def _gather_last(x: torch.Tensor, mesh) -> torch.Tensor:
    """Every rank's equal part of the last dimension, joined in rank order."""
    import torch.distributed as dist

    x = x.contiguous()
    parts = [torch.empty_like(x) for _ in range(mesh.size())]
    dist.all_gather(parts, x, group=mesh.get_group())
    return torch.cat(parts, dim=-1)


class GatheredColumn(nn.Module):
    """The exact split of ``wo`` or ``w2`` as a plain local module: the input gathered
    from every rank, this rank's output features computed from all of it, and those
    gathered: each output sums all its terms here, as in one process."""

    def __init__(self, inner: nn.Module, mesh) -> None:
        super().__init__()
        self.inner = inner
        self.mesh = mesh

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _gather_last(self.inner(_gather_last(x, self.mesh)), self.mesh)


class VocabParallelEmbedding(nn.Module):
    """The embedding split along the vocabulary: this rank looks up the tokens in its rows
    ``start .. stop``, gives zeros for the others, and an all-reduce joins them (exactly:
    every token's row comes from one rank, the others add zeros)."""

    def __init__(self, inner: nn.Module, start: int, stop: int, mesh) -> None:
        super().__init__()
        self.inner = inner
        self.start, self.stop = start, stop
        self.mesh = mesh

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        import torch.distributed as dist

        local = tokens - self.start
        outside = (local < 0) | (local >= self.stop - self.start)
        rows = self.inner(local.masked_fill(outside, 0))
        rows = rows.masked_fill(outside.unsqueeze(-1), 0.0).contiguous()
        dist.all_reduce(rows, group=self.mesh.get_group())
        return rows


class VocabParallelOutput(nn.Module):
    """The output layer split along the vocabulary: this rank's logits, all-gathered into
    the full row on every rank (the last rank's part padded where the split is uneven)."""

    def __init__(self, inner: nn.Module, vocab_size: int, mesh) -> None:
        super().__init__()
        self.inner = inner
        self.vocab_size = vocab_size
        self.step = -(-vocab_size // mesh.size())  # torch.chunk's split, as shard_spec's
        self.mesh = mesh

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.inner(x)
        if y.shape[-1] < self.step:  # gloo and NCCL gather equal parts
            y = torch.nn.functional.pad(y, (0, self.step - y.shape[-1]))
        return _gather_last(y, self.mesh)[..., : self.vocab_size]


def wire_packed(model: nn.Module, mesh, exact: bool = False) -> nn.Module:
    """Wire a model whose modules already hold this rank's slices as plain local modules
    (packed layers built by ``parallel/loading.py``): row-split linears (or, ``exact``,
    the gathered ``wo`` and ``w2``), the embedding and the output get their collectives,
    and attention runs on the local heads. Returns ``model``; its forward pass gives the
    full logits on every rank."""
    config: ModelConfig = model.config
    world, rank = mesh.size(), mesh.get_local_rank()
    check_degree(config, world)
    vocab = shard_spec(config, world, rank)["tok_embeddings.weight"]
    model.tok_embeddings = VocabParallelEmbedding(
        model.tok_embeddings, vocab.start, vocab.stop, mesh
    )
    model.output = VocabParallelOutput(model.output, config.vocab_size, mesh)
    heads, kv, _ = local_heads(config, world, rank)
    for layer in model.layers:
        attention, ffn = layer.attention, layer.feed_forward
        # The collectives after attention and after the feed-forward.
        split = GatheredColumn if exact else RowParallel
        attention.wo = split(attention.wo, mesh)
        ffn.w2 = split(ffn.w2, mesh)
        attention.n_heads, attention.n_kv_heads = heads, kv
    model.tp_mesh = mesh
    return model
