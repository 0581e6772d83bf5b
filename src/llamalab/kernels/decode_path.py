"""Which code runs a model's cached passes: chosen once, when the model is loaded, here.

``model.py`` is the reference maths; everything about how a cached pass (a decode step, a
prompt chunk, the engine's decode rows beside a chunk) gets run lives here. A loaded
model may carry a :class:`DecodePath` (``model.decode_path``, set by :func:`choose`),
which takes the cached passes that something faster runs with the same maths:

* ``native``: every block of a pass of fewer than ``NativeStep.MAX_TOKENS`` tokens in
  one call of ``csrc/kernels.cpp``'s ``decode_step`` (:class:`NativeStep`), for a packed
  model whose every block matrix is on llamalab's kernels;
* ``compiled``: one-row, one-token steps through one ``torch.compile``'d block, where
  asked (``llamalab serve``) and the native step does not run;
* ``blocks``: the model's own blocks, for every other pass. Their attention over the
  cache is :func:`cached_attention`, or on a packed model whose kernels are loaded
  :func:`native_attention` (``csrc/kernels.cpp``'s ``decode_attention`` for one token).

:func:`packed_pass` runs several cache views' tokens in one pass (``model(tokens,
cache=Segments(...))``). Within the blocks, each linear layer's kernel (llamalab's,
torch's int4, fbgemm's float16 or float32) was chosen for its weight when the layer was
built (``quant/linear.py``, by ``quant/plan.py``'s rules); :meth:`DecodePath.describe`
lists every part, and :attr:`DecodePath.isa` the instruction set that ``info --json``
and ``generate --json`` report as ``isa``.

Nothing here imports ``model.py`` (which imports this module): the model is used
through its attributes.
"""

from __future__ import annotations

import warnings
from collections import Counter
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from llamalab.kernels import UNPACK_ROWS, isa_in_use, native
from llamalab.kv_cache import CacheView, Segments

__all__ = [
    "DecodePath", "NativeStep", "cached_attention", "choose", "grouped_attention",
    "native_attention", "native_pass_tokens", "packed_pass",
]  # fmt: skip


class NativeStep:
    """A packed model's decode steps and short prompt chunks through
    ``torch.ops.llamalab.decode_step``.

    That op runs every transformer block of a pass in one call (``csrc/kernels.cpp``), so
    the few thousand floats of norms, rotations and residual adds between the matrix
    products cost no per-operation dispatch. It takes fewer than ``MAX_TOKENS`` tokens a
    pass: its attention handles one query token at a time, where a long prompt chunk
    is better served by torch's blocked kernel. It serves models whose every block matrix is
    on the vnni kernel, in float32 with head_dim 64 or 128; :meth:`for_model` returns None
    for any other. The embedding, the final norm and the output layer stay in the model.
    """

    MAX_TOKENS = UNPACK_ROWS

    def __init__(
        self,
        model: nn.Module,
        layout: list[int],
        weights: list[torch.Tensor],
        norms: list[torch.Tensor],
        isa: str | None = None,
    ):
        self._model = model
        self._op = native.ops(isa).decode_step
        self._layout = layout
        self._weights = weights
        self._norms = norms  # each block's attention and FFN norm weights

    @classmethod
    def for_model(cls, model: nn.Module, isa: str | None = None) -> NativeStep | None:
        """The step for ``model``, or None where some part of it is not on the vnni kernel.

        ``isa`` runs it on that build's kernels (:func:`~llamalab.kernels.native.load`)
        instead of the process's own: the packed weights are the same bytes for every build.
        """
        config = model.config
        if (
            not native.vnni_available()
            or (isa is not None and not native.load(isa))
            or model.dtype != torch.float32
            or config.head_dim not in (64, 128)
            or config.n_heads * config.head_dim != config.dim
        ):
            return None
        layout: list[int] = []
        weights: list[torch.Tensor] = []
        norms: list[torch.Tensor] = []
        for layer in model.layers:
            attention, ffn = layer.attention, layer.feed_forward
            qkv = [attention.wqkv] if attention.wqkv is not None else [
                attention.wq, attention.wk, attention.wv
            ]  # fmt: skip
            gate_up = [ffn.w13] if ffn.w13 is not None else [ffn.w1, ffn.w3]
            parts = [*qkv, attention.wo, *gate_up, ffn.w2]
            vnni = [getattr(part, "_vnni", None) for part in parts]
            if any(v is None for v in vnni):
                return None
            block_norms = (layer.attention_norm.weight, layer.ffn_norm.weight)
            if any(n.dtype != torch.float32 or not n.is_contiguous() for n in block_norms):
                return None
            norms += block_norms
            layout += [len(qkv), len(gate_up)]
            for part, (buffer, kind) in zip(parts, vnni, strict=True):
                layout += [part.out_features, *kind]
                weights.append(buffer)
        return cls(model, layout, weights, norms, isa)

    def __call__(
        self, h: torch.Tensor, rows: torch.Tensor, positions: torch.Tensor
    ) -> torch.Tensor:
        """The blocks' output (N, dim) for N embedded new tokens h (N, dim), token i in
        cache row ``rows[i]`` at position ``positions[i]`` (int64 (N,) each)."""
        model = self._model
        config = model.config
        k_caches, v_caches = self._cache_tensors()
        return self._op(
            h.contiguous(), rows, positions, model.rope, self._norms, self._weights,
            self._layout, k_caches, v_caches, config.n_heads, config.n_kv_heads,
            config.norm_eps,
        )  # fmt: skip

    def _cache_tensors(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        # Looked up each pass (microseconds), not kept: a kept list would hold the memory
        # of caches that clear_cache() has let go.
        caches = [layer.attention.kv_cache for layer in self._model.layers]
        if any(c is None for c in caches):
            raise RuntimeError("a cache view given but no KV cache: call model.setup_cache() first")
        return [c.k for c in caches], [c.v for c in caches]


def grouped_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor
) -> torch.Tensor:
    """Masked attention of new queries q (B, H, T, D) over cached k, v (B, KVH, S, D).

    The same maths as scaled_dot_product_attention with the additive mask ``bias``
    (B or 1, 1, T, S), written as two matmuls with the query heads grouped by the
    key/value head they share. On the CPU the fused kernel with a mask falls back to a
    path that first copies K and V once per query head in the group; for a few new
    tokens against a long cache that copy cost more than the arithmetic (measured: an
    8-token chunk at position 2,000 took 48 ms against 23 ms at position 0).
    """
    B, H, T, D = q.shape
    kv_heads, S = k.shape[1], k.shape[2]
    group = H // kv_heads
    q = q.reshape(B, kv_heads, group * T, D)  # (B, KVH, group·T, D)
    scores = torch.matmul(q, k.transpose(-1, -2)).mul_(D**-0.5)  # (B, KVH, group·T, S)
    scores = scores.view(B, kv_heads, group, T, S).add_(bias.unsqueeze(1))
    if scores.dtype == torch.float32:
        probs = torch.softmax(scores, dim=-1)
    else:
        probs = torch.softmax(scores.float(), dim=-1).to(v.dtype)
    out = torch.matmul(probs.view(B, kv_heads, group * T, S), v)  # (B, KVH, group·T, D)
    return out.view(B, H, T, D)


def cached_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None
) -> torch.Tensor:
    """Attention of new queries q (B, H, T, D) over cached k, v (B, KVH, S, D).

    Without a mask (one query that sees every slot) the fused kernel; with a mask,
    grouped matmuls, which never copy K/V per query head.
    """
    if mask is None:
        return F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
    return grouped_attention(q, k, v, mask)


def native_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None
) -> torch.Tensor:
    """:func:`cached_attention`, with llamalab's ``decode_attention`` for
    one float32 query token that sees every slot (head_dim 64 or 128).

    That kernel reads each cached key and value once for all the query heads that share
    it, where torch's fused kernel reads them once per query head (3-4x faster at 600
    positions).
    """
    if mask is None and q.shape[2] == 1 and q.dtype == torch.float32 and q.shape[3] in (64, 128):
        return torch.ops.llamalab.decode_attention(q, k, v)
    return cached_attention(q, k, v, mask)


class DecodePath:
    """The code that runs a model's cached passes, as :func:`choose` picked it.

    Called by the model with a cached pass's embedded tokens, it returns the blocks'
    output where it takes the pass, or None where the model's own blocks run it.
    """

    def __init__(
        self, model: nn.Module, native_step: NativeStep | None, attends_natively: bool
    ) -> None:
        self._model = model
        self.native_step = native_step  # None: no pass runs natively (an adapter needs its modules)
        self.attends_natively = attends_natively  # the blocks' attention is native_attention
        self.compiled_block: Any = None  # set by compile(); None again if compiling fails

    @property
    def step(self) -> str:
        """What runs a one-token step: ``native``, ``compiled`` or ``blocks``."""
        if self.native_step is not None:
            return "native"
        return "compiled" if self.compiled_block is not None else "blocks"

    @property
    def compiles(self) -> bool:
        """Whether one-row, one-token steps go through the compiled block."""
        return self.compiled_block is not None

    @property
    def isa(self) -> str:
        """The instruction set this model runs on (see :func:`~llamalab.kernels.isa_in_use`)."""
        return isa_in_use(self._model)

    @property
    def native_tokens(self) -> int:
        """The most tokens a cached pass may hold and run on the native step (0: none)."""
        return 0 if self.native_step is None else self.native_step.MAX_TOKENS - 1

    def runs_natively(self, n_tokens: int) -> bool:
        """Whether a cached pass of ``n_tokens`` tokens runs on the native step."""
        return self.native_step is not None and n_tokens <= self.native_tokens

    def compile(self) -> None:
        """Run one-row, one-token steps through a compiled transformer block (``torch.compile``).

        A decode step is hundreds of small operations whose dispatch costs more than their
        arithmetic; inductor fuses the norms, rotations, residual adds and casts around
        the matmuls and runs them from generated code. One graph, traced with dynamic
        sizes, serves every layer and position. Batches, prefill and training stay eager.
        It compiles at the first step (seconds; inductor caches the code on disk, so later
        runs start faster). If compiling fails (no C++ compiler, say) the model warns once
        and stays eager.
        """
        # One small graph: compiling it in worker processes only adds their start-up.
        self.compiled_block = torch.compile(
            _run_block, dynamic=True, options={"compile_threads": 1}
        )

    def describe(self) -> dict[str, Any]:
        """Every part of the path: the instruction set, what runs a one-token step, the
        attention over the cache, and how many linear layers each kernel holds."""
        kernels = Counter(
            kernel
            for module in self._model.modules()
            if isinstance(kernel := getattr(module, "kernel", None), str)
        )
        return {
            "isa": self.isa,
            "step": self.step,
            "attention": "native" if self.attends_natively else "torch",
            "linear": dict(sorted(kernels.items())),
        }

    def __call__(
        self,
        h: torch.Tensor,
        rope: torch.Tensor | list[torch.Tensor],
        cache: CacheView | Segments,
        mask: torch.Tensor | list[torch.Tensor | None] | None,
    ) -> torch.Tensor | None:
        """The blocks' output for a cached pass's embedded tokens h (B, T, dim), or None
        where the model's blocks run the pass (``rope`` and ``mask`` are theirs)."""
        B, T, _ = h.shape
        if self.runs_natively(B * T):
            rows, positions = _pass_slots(cache, B, T)
            return self.native_step(h.view(B * T, -1), rows, positions).view(B, T, -1)
        # The compiled block takes one row only: for a batch, inductor's code for the
        # masked attention and the scattered cache writes ran slower than eager
        # (measured: 53 against 33 ms for 8 SmolLM2 rows).
        if self.compiled_block is not None and isinstance(cache, CacheView) and B == T == 1:
            return self._compiled_layers(h, rope, cache, mask)  # None if compiling failed
        return None

    def _compiled_layers(
        self, h: torch.Tensor, rope: torch.Tensor, cache: CacheView, mask: torch.Tensor | None
    ) -> torch.Tensor | None:
        try:
            for layer in self._model.layers:
                h = self.compiled_block(layer, h, rope, cache, mask)
        except Exception as exc:
            if not type(exc).__module__.startswith(("torch._dynamo", "torch._inductor")):
                raise
            # The compiler could not build the step; the inputs are fine. The eager rerun
            # rewrites the same cache slots with the same values.
            warnings.warn(f"compiling the decode step failed; running eagerly: {exc}", stacklevel=2)
            self.compiled_block = None
            return None
        return h


def choose(model: nn.Module, *, packed: bool, compile: bool = False) -> DecodePath | None:
    """Choose what runs ``model``'s cached passes, and set it as ``model.decode_path``.

    ``packed``: the model's layers were built packed for the CPU (``load_model(packed=True)``);
    where llamalab's kernels run, its steps and short chunks then run natively where every
    block allows it, and its attention for one new token on the native kernel.
    ``compile``: where no native step runs, one-row steps go through a compiled block.
    A packed model always gets a path (which names its kernels, torch's included); a float
    one only to compile, and None (set too) where its own blocks run every pass.
    """
    native_attn = packed and native.vnni_available()
    native_step = NativeStep.for_model(model) if packed else None
    path: DecodePath | None = None
    if packed or compile:
        path = DecodePath(model, native_step, native_attn)
        if compile and native_step is None:
            path.compile()
    # The model's attention is llamalab's kernel or torch's, per this choice.
    for layer in model.layers:
        layer.attention.attend = native_attention if native_attn else cached_attention
    model.decode_path = path
    return path


def native_pass_tokens(model: nn.Module) -> int:
    """The most tokens a cached pass of ``model`` may hold and run on the native step, which
    computes every token of a pass bit for bit as one-token steps would (0: none may)."""
    path = getattr(model, "decode_path", None)
    return 0 if path is None else path.native_tokens


def _token_slots(view: CacheView, B: int, T: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The cache row and position of each of a view's B·T new tokens, row by row: (B·T,) each."""
    rows = torch.arange(view.row, view.row + B).repeat_interleave(T)
    # Rows that share one (1, T) run of positions expand it; for T == 1 the reshape of that
    # expansion is a stride-0 view, and the native step reads plain contiguous int64 arrays.
    return rows, view.input_pos.expand(B, T).reshape(-1).long().contiguous()


def _pass_slots(cache: CacheView | Segments, B: int, T: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Every token's cache row and position for a pass of B·T tokens: one view's, or the
    packed views' of :class:`~llamalab.kv_cache.Segments` one after another."""
    if isinstance(cache, CacheView):
        return _token_slots(cache, B, T)
    slots = [_token_slots(v, b, t) for v, (b, t) in zip(cache.views, cache.shapes, strict=True)]
    rows, positions = (torch.cat(parts) for parts in zip(*slots, strict=True))
    return rows, positions


def _run_block(
    layer: nn.Module,
    h: torch.Tensor,
    rope: torch.Tensor,
    cache: CacheView,
    mask: torch.Tensor | None,
) -> torch.Tensor:
    return layer(h, rope, cache, mask)


def packed_pass(model: nn.Module, tokens: torch.Tensor, segments: Segments) -> list[torch.Tensor]:
    """Several views' tokens in one pass of ``model``: ``tokens`` (1, N) packed as
    ``segments`` says (the engine's decode rows beside a prompt chunk).

    Returns each view's logits, (B, T, vocab), or (B, 1, vocab) for a ``last_only``
    view. The result equals one forward pass per view: only the batching differs.
    """
    ropes, masks = [], []
    keep: list[int] = []  # packed positions whose logits are wanted
    for (a, _), (B, T), view in zip(
        segments.bounds(), segments.shapes, segments.views, strict=True
    ):
        rope, mask = model.rope_and_mask(view, T)
        ropes.append(rope)
        masks.append(mask)
        if view.last_only:  # each row's last token
            keep.extend(range(a + T - 1, a + B * T, T))
        else:
            keep.extend(range(a, a + B * T))
    h = model.run_blocks(model.tok_embeddings(tokens), ropes, segments, masks)  # (1, N, dim)
    logits = model.output(model.norm(h[:, keep]))  # (1, K, vocab)
    out, at = [], 0
    for (B, T), view in zip(segments.shapes, segments.views, strict=True):
        n = B if view.last_only else B * T
        out.append(logits[0, at : at + n].view(B, n // B, -1))
        at += n
    return out
