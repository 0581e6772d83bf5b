"""Tensor names and layouts: llamalab's canonical (Meta) names ↔ each format's names.

Every format but Meta's needs exactly one table here. The one subtle layout change —
Hugging Face's q/k row permutation for its rotate-half RoPE — is owned by
:func:`hf_to_meta_qk` and its inverse.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

from llamalab.errors import LlamalabError

if TYPE_CHECKING:  # torch is only needed by the layout functions, never to read names
    import torch

    from llamalab.config import ModelConfig

# Per-layer tensors: canonical suffix → (Hugging Face suffix, GGUF suffix).
_LAYER_NAMES: dict[str, tuple[str, str]] = {
    "attention.wq.weight": ("self_attn.q_proj.weight", "attn_q.weight"),
    "attention.wk.weight": ("self_attn.k_proj.weight", "attn_k.weight"),
    "attention.wv.weight": ("self_attn.v_proj.weight", "attn_v.weight"),
    "attention.wo.weight": ("self_attn.o_proj.weight", "attn_output.weight"),
    "feed_forward.w1.weight": ("mlp.gate_proj.weight", "ffn_gate.weight"),
    "feed_forward.w2.weight": ("mlp.down_proj.weight", "ffn_down.weight"),
    "feed_forward.w3.weight": ("mlp.up_proj.weight", "ffn_up.weight"),
    "attention_norm.weight": ("input_layernorm.weight", "attn_norm.weight"),
    "ffn_norm.weight": ("post_attention_layernorm.weight", "ffn_norm.weight"),
}

# Whole-model tensors: canonical → (Hugging Face, GGUF).
_GLOBAL_NAMES: dict[str, tuple[str, str]] = {
    "tok_embeddings.weight": ("model.embed_tokens.weight", "token_embd.weight"),
    "norm.weight": ("model.norm.weight", "output_norm.weight"),
    "output.weight": ("lm_head.weight", "output.weight"),
}

_FORMATS = {"hf": 0, "gguf": 1}
_LAYER_PREFIX = {"hf": "model.layers.{}.", "gguf": "blk.{}."}
_CANONICAL_LAYER = re.compile(r"^layers\.(\d+)\.(.+)$")


def to_format(name: str, fmt: str) -> str:
    """Map a canonical tensor name to the name ``fmt`` ("hf" or "gguf") uses."""
    column = _FORMATS[fmt]
    if name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[name][column]
    match = _CANONICAL_LAYER.match(name)
    if match and match.group(2) in _LAYER_NAMES:
        return _LAYER_PREFIX[fmt].format(match.group(1)) + _LAYER_NAMES[match.group(2)][column]
    raise LlamalabError(f"no {fmt} name for tensor {name!r}")


def _reverse_table(fmt: str) -> tuple[dict[str, str], re.Pattern[str], dict[str, str]]:
    column = _FORMATS[fmt]
    global_map = {names[column]: canonical for canonical, names in _GLOBAL_NAMES.items()}
    layer_map = {names[column]: canonical for canonical, names in _LAYER_NAMES.items()}
    prefix = re.escape(_LAYER_PREFIX[fmt]).replace(r"\{\}", r"(\d+)")
    return global_map, re.compile(f"^{prefix}(.+)$"), layer_map


_REVERSE = {fmt: _reverse_table(fmt) for fmt in _FORMATS}


def from_format(name: str, fmt: str) -> str | None:
    """Map a ``fmt`` tensor name to its canonical name; None for tensors we do not use."""
    global_map, layer_pattern, layer_map = _REVERSE[fmt]
    if name in global_map:
        return global_map[name]
    match = layer_pattern.match(name)
    if match and match.group(2) in layer_map:
        return f"layers.{match.group(1)}.{layer_map[match.group(2)]}"
    return None


def is_query_or_key(name: str) -> bool:
    return name.endswith(("attention.wq.weight", "attention.wk.weight"))


def hf_to_meta_qk(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Undo Hugging Face's q/k row permutation (rotate-half → Meta's adjacent pairs).

    Within each head, HF stores the first halves of all rotary pairs, then all second
    halves; Meta interleaves them. ``n_heads`` is the number of heads of this projection
    (n_kv_heads for k).
    """
    rows, cols = weight.shape
    head_dim = rows // n_heads
    return weight.view(n_heads, 2, head_dim // 2, cols).transpose(1, 2).reshape(rows, cols)


def meta_to_hf_qk(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Apply Hugging Face's q/k row permutation (Meta's adjacent pairs → rotate-half)."""
    rows, cols = weight.shape
    head_dim = rows // n_heads
    return weight.view(n_heads, head_dim // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


def expected_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """The shape of every tensor a checkpoint of ``config`` holds (PyTorch order).

    Written out from the architecture rather than read off a model, so that a checkpoint
    can be checked without building one (and without loading torch).
    """
    q_rows, kv_rows = config.n_heads * config.head_dim, config.n_kv_heads * config.head_dim
    per_layer = {
        "attention.wq.weight": (q_rows, config.dim),
        "attention.wk.weight": (kv_rows, config.dim),
        "attention.wv.weight": (kv_rows, config.dim),
        "attention.wo.weight": (config.dim, q_rows),
        "feed_forward.w1.weight": (config.ffn_hidden_dim, config.dim),
        "feed_forward.w2.weight": (config.dim, config.ffn_hidden_dim),
        "feed_forward.w3.weight": (config.ffn_hidden_dim, config.dim),
        "attention_norm.weight": (config.dim,),
        "ffn_norm.weight": (config.dim,),
    }
    shapes: dict[str, tuple[int, ...]] = {}
    for name in canonical_names(config.n_layers, config.tie_embeddings):
        if name.startswith("layers."):
            shapes[name] = per_layer[name.split(".", 2)[2]]
        elif name == "norm.weight":
            shapes[name] = (config.dim,)
        else:  # tok_embeddings, output
            shapes[name] = (config.vocab_size, config.dim)
    return shapes


def canonical_names(n_layers: int, tie_embeddings: bool) -> list[str]:
    """All tensor names a checkpoint of this shape must hold, in a stable order."""
    names = ["tok_embeddings.weight"]
    for i in range(n_layers):
        names.extend(f"layers.{i}.{suffix}" for suffix in _LAYER_NAMES)
    names.append("norm.weight")
    if not tie_embeddings:
        names.append("output.weight")
    return names
