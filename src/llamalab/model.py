"""The LLaMA transformer, as the paper and Meta's reference code define it.

One module trains and infers: ``model(tokens)`` runs full causal sequences (training,
evaluation); after ``model.setup_cache(...)``, ``model(tokens, cache=view)`` runs the new
tokens against a preallocated key/value cache (generation), where ``view`` — a
:class:`~llamalab.kv_cache.CacheView` built by :func:`~llamalab.kv_cache.cache_view` —
says which cache rows and positions the tokens take.

Parameter names follow Meta's checkpoints (``tok_embeddings``, ``layers.N.attention.wq``,
``feed_forward.w1``, ``attention_norm`` ...), so Meta weights load without a name table.
Rotary embeddings rotate *adjacent* pairs of each head's channels, Meta's convention;
Hugging Face checkpoints are converted to it on load (``checkpoint/names.py``).
What runs a cached pass faster (llamalab's kernels, a compiled block) and the attention
over the cache are chosen and wired by ``kernels/decode_path.py``, not here.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from llamalab.config import ModelConfig
from llamalab.kernels.decode_path import cached_attention, packed_pass
from llamalab.kv_cache import CacheView, KVCache, Segments
from llamalab.loss import output_cross_entropy
from llamalab.rope import rope_cache


class RMSNorm(nn.Module):
    """Root-mean-square norm, computed in float32 whatever the input dtype (as Meta does)."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32 and self.weight.dtype == torch.float32:
            return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)  # one fused call
        normed = F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps)
        return normed.type_as(x) * self.weight


def apply_rope(x: torch.Tensor, rotation: torch.Tensor) -> torch.Tensor:
    """Rotate adjacent channel pairs of x (B, T, H, D) by rotation (B or 1, T, 1, D/2, 2).

    Each pair (x[2j], x[2j+1]) is the complex number x[2j] + i·x[2j+1], multiplied by
    e^(i·angle) = cos + i·sin as in Meta's reference code. The product is written out
    in real arithmetic, which ``torch.compile`` fuses into one kernel (it does not
    generate code for complex tensors). ``rotation`` comes from :func:`rope_rotation`;
    its head axis broadcasts over every head.
    """
    x32 = x if x.dtype == torch.float32 else x.float()
    pairs = x32.unflatten(-1, (-1, 2))  # (B, T, H, D/2, 2)
    real, imag = pairs[..., 0], pairs[..., 1]
    cos, sin = rotation[..., 0], rotation[..., 1]
    rotated = torch.stack((real * cos - imag * sin, real * sin + imag * cos), dim=-1).flatten(-2)
    return rotated if x.dtype == torch.float32 else rotated.to(x.dtype)


def rope_rotation(rope: torch.Tensor) -> torch.Tensor:
    """The (B, T, D/2, 2) table of (cos, sin) as (B, T, 1, D/2, 2), ready for :func:`apply_rope`."""
    return rope.unsqueeze(2)


class Attention(nn.Module):
    """Causal self-attention with grouped-query heads (n_kv_heads ≤ n_heads)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.n_heads = config.n_heads
        self.n_kv_heads = config.n_kv_heads
        self.head_dim = config.head_dim
        self.wq = nn.Linear(config.dim, self.n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(config.dim, self.n_kv_heads * self.head_dim, bias=False)
        self.wv = nn.Linear(config.dim, self.n_kv_heads * self.head_dim, bias=False)
        self.wo = nn.Linear(self.n_heads * self.head_dim, config.dim, bias=False)
        self.wqkv: nn.Module | None = None  # set when packed inference fuses wq, wk, wv
        self.kv_cache: KVCache | None = None
        # The attention over the cache; a model's decode path (kernels/decode_path.py) may
        # put llamalab's kernel here.
        self.attend = cached_attention

    def forward(
        self,
        x: torch.Tensor,
        rope: torch.Tensor | list[torch.Tensor],
        cache: CacheView | Segments | None = None,
        mask: torch.Tensor | list[torch.Tensor | None] | None = None,
    ) -> torch.Tensor:
        """x (B, T, dim) → (B, T, dim); with ``cache``, the new tokens also see the cached ones.

        ``mask`` is ``cache.mask`` already in the model's dtype (converted once per pass).
        With :class:`Segments`, x is the packed (1, N, dim) batch and ``rope``/``mask``
        hold one entry per view: the projections run once, attention once per view.
        """
        if isinstance(cache, Segments):
            return self._forward_segments(x, rope, cache, mask)  # type: ignore[arg-type]
        B, T, _ = x.shape
        H, KVH, D = self.n_heads, self.n_kv_heads, self.head_dim
        if self.wqkv is not None:
            qkv = self.wqkv(x).view(B, T, H + 2 * KVH, D)
            # Queries and keys side by side: one rotation call for both.
            q, k = apply_rope(qkv[:, :, : H + KVH], rope).split([H, KVH], dim=2)
            v = qkv[:, :, H + KVH :]
        else:
            q = apply_rope(self.wq(x).view(B, T, H, D), rope)
            k = apply_rope(self.wk(x).view(B, T, KVH, D), rope)
            v = self.wv(x).view(B, T, KVH, D)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, heads, T, head_dim)

        if cache is None:
            # Whole sequences: the fused causal kernel, which stores no attention weights.
            # A mask given here (packed documents kept apart, train/finetune.py) replaces
            # the causal one.
            out = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, is_causal=mask is None, enable_gqa=True
            )
        else:
            if self.kv_cache is None:
                raise RuntimeError(
                    "a cache view given but no KV cache: call model.setup_cache() first"
                )
            k, v = self.kv_cache.update(k, v, cache)  # (B, kv_heads, kv_len, head_dim)
            out = self.attend(q, k, v, mask)
        out = out.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim)
        return self.wo(out)

    def _project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q, k, v of x (B, T, dim), before rotation: (B, T, heads, head_dim) each."""
        B, T, _ = x.shape
        H, KVH, D = self.n_heads, self.n_kv_heads, self.head_dim
        if self.wqkv is not None:
            return self.wqkv(x).view(B, T, H + 2 * KVH, D).split([H, KVH, KVH], dim=2)
        return (
            self.wq(x).view(B, T, H, D),
            self.wk(x).view(B, T, KVH, D),
            self.wv(x).view(B, T, KVH, D),
        )

    def _forward_segments(
        self,
        x: torch.Tensor,
        ropes: list[torch.Tensor],
        segments: Segments,
        masks: list[torch.Tensor | None],
    ) -> torch.Tensor:
        if self.kv_cache is None:
            raise RuntimeError("a cache view given but no KV cache: call model.setup_cache() first")
        q_all, k_all, v_all = self._project(x)  # (1, N, heads, head_dim)
        outs = []
        for (a, b), (B, T), view, rope, mask in zip(
            segments.bounds(), segments.shapes, segments.views, ropes, masks, strict=True
        ):
            q = apply_rope(q_all[0, a:b].reshape(B, T, self.n_heads, self.head_dim), rope)
            k = apply_rope(k_all[0, a:b].reshape(B, T, self.n_kv_heads, self.head_dim), rope)
            v = v_all[0, a:b].reshape(B, T, self.n_kv_heads, self.head_dim)
            q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, heads, T, head_dim)
            k, v = self.kv_cache.update(k, v, view)
            out = self.attend(q, k, v, mask)  # (B, H, T, D)
            outs.append(out.transpose(1, 2).reshape(1, B * T, self.n_heads * self.head_dim))
        return self.wo(torch.cat(outs, dim=1))


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.w1 = nn.Linear(config.dim, config.ffn_hidden_dim, bias=False)
        self.w2 = nn.Linear(config.ffn_hidden_dim, config.dim, bias=False)
        self.w3 = nn.Linear(config.dim, config.ffn_hidden_dim, bias=False)
        self.w13: nn.Module | None = None  # set when packed inference fuses w1 and w3

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.w13 is not None:
            gate, up = self.w13(x).chunk(2, dim=-1)
            return self.w2(F.silu(gate) * up)
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class TransformerBlock(nn.Module):
    """Pre-norm residual block: x + attention(norm(x)), then + feed_forward(norm(x))."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.attention = Attention(config)
        self.feed_forward = FeedForward(config)
        self.attention_norm = RMSNorm(config.dim, config.norm_eps)
        self.ffn_norm = RMSNorm(config.dim, config.norm_eps)

    def forward(
        self,
        x: torch.Tensor,
        rope: torch.Tensor,
        cache: CacheView | None = None,
        mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        h = x + self.attention(self.attention_norm(x), rope, cache, mask)
        return h + self.feed_forward(self.ffn_norm(h))


class Transformer(nn.Module):
    """A LLaMA-family decoder-only transformer.

    ``forward(tokens)`` with tokens (batch, seq) returns logits (batch, seq, vocab); with
    ``targets`` it returns the mean next-token cross-entropy instead (targets equal to -100
    are ignored). With ``cache`` — a :class:`~llamalab.kv_cache.CacheView` — the tokens are
    new ones at the view's positions: they read and extend the KV cache set up by
    :meth:`setup_cache`.
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        table = torch.empty(config.vocab_size, config.dim)
        if table.is_meta:
            # A loader builds on the meta device and assigns the weights. Skip the
            # embedding's random init there: normal_ on meta runs torch's Python reference
            # ops, whose import (torch._dynamo) costs 1.5 s of every load.
            self.tok_embeddings = nn.Embedding(config.vocab_size, config.dim, _weight=table)
        else:
            self.tok_embeddings = nn.Embedding(config.vocab_size, config.dim)
        self.layers = nn.ModuleList(TransformerBlock(config) for _ in range(config.n_layers))
        self.norm = RMSNorm(config.dim, config.norm_eps)
        self.output = nn.Linear(config.dim, config.vocab_size, bias=False)
        self.tie_weights()
        # Rotary angles are derived, not learned: a non-persistent buffer. It starts empty
        # and grows to the longest length actually used (the cache's, or a sequence's):
        # sizing it to config.context_length up front would let a file that claims a huge
        # context allocate terabytes.
        self.register_buffer("rope", self._empty_rope(self.device), persistent=False)
        self.max_batch_size = 0
        self.max_seq_len = 0
        # What runs cached passes faster than the blocks below, chosen at load
        # (kernels/decode_path.py's DecodePath): called as (h, rope, cache, mask), it
        # returns the blocks' output, or None where the blocks run the pass.
        self.decode_path = None

    @property
    def device(self) -> torch.device:
        """Where the model's float tensors live (the final norm's weight is always one)."""
        return self.norm.weight.device

    @property
    def dtype(self) -> torch.dtype:
        """The activations' dtype: the final norm's (packed layers keep other forms inside)."""
        return self.norm.weight.dtype

    def _empty_rope(self, device: torch.device | str | None) -> torch.Tensor:
        return torch.empty(0, self.config.head_dim // 2, 2, dtype=torch.float32, device=device)

    def tie_weights(self) -> None:
        """Share the embedding matrix with the output projection when the config says so."""
        # A packed output layer (quant/linear.py) holds its own copy of the matrix.
        if (
            self.config.tie_embeddings
            and isinstance(self.output, nn.Linear)
            and isinstance(self.tok_embeddings, nn.Embedding)
        ):
            self.output.weight = self.tok_embeddings.weight

    def _apply(self, fn, recurse=True):
        # .to(dtype) would round the rotary table to half precision; it is derived data,
        # so rebuild it exactly in float32 instead.
        super()._apply(fn, recurse)
        if self.rope.dtype != torch.float32 and not self.rope.is_meta:
            self.init_buffers(self.rope.device)
        return self

    def init_buffers(self, device: torch.device | str | None = None) -> None:
        """(Re)build the rotary table on ``device`` (needed after building on ``meta``)."""
        device = device if device is not None else self.device
        length = self.rope.shape[0]
        self.rope = self._empty_rope(device)
        self.rope_table(length)

    def rope_table(self, length: int) -> torch.Tensor:
        """The rotary table with at least ``length`` rows, built or grown on first need."""
        if self.rope.shape[0] < length:
            if length > self.config.context_length:
                raise ValueError(
                    f"position {length - 1} is beyond the context length "
                    f"{self.config.context_length}"
                )
            # Built outside inference mode even when first needed inside it (generation),
            # so that a later training step may save it for backward.
            with torch.inference_mode(False):
                self.rope = rope_cache(self.config, length, self.rope.device)
        return self.rope

    def reset_parameters(self, std: float = 0.02) -> None:
        """Initialise weights for training from scratch: normal(0, std) matrices, unit norms."""
        for name, param in self.named_parameters():
            with torch.no_grad():
                if name.endswith("norm.weight"):
                    param.fill_(1.0)
                else:
                    param.normal_(0.0, std)

    def setup_cache(
        self, max_batch_size: int, max_seq_len: int, dtype: torch.dtype | None = None
    ) -> None:
        """Preallocate a KV cache in every layer: ``max_batch_size`` rows of ``max_seq_len``."""
        if max_seq_len > self.config.context_length:
            raise ValueError(
                f"max_seq_len {max_seq_len} exceeds the model's context length "
                f"{self.config.context_length}"
            )
        dtype = dtype or self.dtype
        device = self.device
        for layer in self.layers:
            layer.attention.kv_cache = KVCache(
                max_batch_size,
                layer.attention.n_kv_heads,  # this rank's heads under tensor parallelism
                max_seq_len,
                self.config.head_dim,
                dtype,
                device,
            )
        self.max_batch_size, self.max_seq_len = max_batch_size, max_seq_len
        self.rope_table(max_seq_len)  # every position the cache can hold, built once here

    def clear_cache(self) -> None:
        """Free every layer's KV cache."""
        for layer in self.layers:
            layer.attention.kv_cache = None
        self.max_batch_size = self.max_seq_len = 0

    def forward(
        self,
        tokens: torch.Tensor,
        cache: CacheView | None = None,
        *,
        targets: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits (B, T or 1, vocab) for tokens (B, T), or the loss when ``targets`` is given.

        Without ``cache`` the tokens are whole sequences from position 0 (causal
        attention among themselves). With it they are new tokens placed as the view says.
        """
        if isinstance(cache, Segments):
            return packed_pass(self, tokens, cache)  # type: ignore[return-value]
        T = tokens.shape[1]
        mask = None
        if cache is None:
            if T > self.config.context_length:
                raise ValueError(
                    f"sequence of {T} tokens exceeds the context length "
                    f"{self.config.context_length}"
                )
            rope = rope_rotation(self.rope_table(T)[:T].unsqueeze(0))  # (1, T, 1, head_dim/2, 2)
        else:
            rope, mask = self.rope_and_mask(cache, T)

        h = self.run_blocks(self.tok_embeddings(tokens), rope, cache, mask)  # (B, T, dim)
        if cache is not None and cache.last_only:  # a prefill needs only the next token's logits
            h = h[:, -1:]
        if targets is not None:
            # Training and evaluation: the loss at trained positions, never every logit.
            return output_cross_entropy(self.norm(h), self.output, targets)
        return self.output(self.norm(h))  # (B, T, vocab)

    def run_blocks(
        self,
        h: torch.Tensor,
        rope: torch.Tensor | list[torch.Tensor],
        cache: CacheView | Segments | None,
        mask: torch.Tensor | list[torch.Tensor | None] | None,
    ) -> torch.Tensor:
        """Every block over embedded tokens h; the decode path runs a cached pass instead
        where it takes it (``rope`` and ``mask`` per view for :class:`Segments`)."""
        if cache is not None and self.decode_path is not None:
            out = self.decode_path(h, rope, cache, mask)
            if out is not None:
                return out
        for layer in self.layers:
            h = layer(h, rope, cache, mask)
        return h

    def rope_and_mask(self, cache: CacheView, T: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The rotation (B or 1, T, 1, head_dim/2, 2) and the mask (model dtype) for a view."""
        table = self.rope_table(cache.kv_len)
        if cache.start is not None:  # consecutive positions: a slice, not a gather
            rope = rope_rotation(table[cache.start : cache.start + T].unsqueeze(0))
        else:
            rope = rope_rotation(table[cache.input_pos])  # (B or 1, T, 1, head_dim/2, 2)
        mask = cache.mask
        dtype = self.dtype
        if mask is not None and mask.dtype != dtype:
            mask = mask.to(dtype)  # once here rather than in every layer
        return rope, mask
