"""Model configuration: one validated dataclass and a registry of presets.

The field names follow Meta's ``ModelArgs`` where one exists. Presets are frozen; derive a
variant with ``dataclasses.replace`` (which re-runs validation).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from llamalab.errors import LlamalabError

ROPE_SCALING_KINDS = ("linear", "llama3", "factors")

# Upper bounds on a config's sizes. They are far above any released LLaMA-family model
# (the largest has dim 16384, 126 layers, a 128k vocabulary and a 128k context) and exist
# so that a corrupt or forged checkpoint is refused with a clear message instead of making
# the loader build, or allocate, something proportional to an absurd number.
MAX_DIM = 1 << 17  # 131072, also the bound on the FFN width
MAX_FFN_HIDDEN_DIM = 1 << 20
MAX_LAYERS = 4096
MAX_HEADS = 1 << 14
MAX_VOCAB_SIZE = 1 << 24  # 16.7M tokens
# 16.7M positions: 128 times Llama 3.1's 128k. A rotary table or KV cache that long is
# already tens of gigabytes, so this refuses only values that could never be run.
MAX_CONTEXT_LENGTH = 1 << 24


def _check_int(what: str, value: Any, maximum: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or not 0 < value <= maximum:
        raise LlamalabError(f"config: {what} must be an integer from 1 to {maximum}, got {value!r}")


def _check_float(what: str, value: Any, *, below: float = math.inf) -> None:
    """A finite real number in (0, ``below``): NaN, infinities, strings and bools are refused."""
    ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or not 0 < value < below:
        bound = "" if below == math.inf else f" below {below:g}"
        raise LlamalabError(f"config: {what} must be a finite number above 0{bound}, got {value!r}")


@dataclass(frozen=True)
class RopeScaling:
    """How rotary frequencies are stretched for longer contexts.

    - ``linear``: every position is divided by ``factor`` (position interpolation).
    - ``llama3``: Llama 3.1's per-frequency rule: long wavelengths are divided by ``factor``,
      short ones are kept, and the band between ``original_context_length / low_freq_factor``
      and ``original_context_length / high_freq_factor`` is interpolated smoothly.
    - ``factors``: an explicit divisor per frequency, as GGUF stores it (``rope_freqs``).
    """

    kind: str
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_context_length: int = 8192
    factors: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        if self.kind not in ROPE_SCALING_KINDS:
            raise LlamalabError(
                f"unknown RoPE scaling {self.kind!r}; "
                f"expected one of {', '.join(ROPE_SCALING_KINDS)}"
            )
        if self.kind == "factors":
            if not self.factors:
                raise LlamalabError("RoPE scaling 'factors' needs the list of factors")
            for x in self.factors:
                _check_float("every RoPE scaling factor", x)
        _check_float("RoPE scaling factor", self.factor)
        if self.kind == "llama3":
            _check_float("RoPE low_freq_factor", self.low_freq_factor)
            _check_float("RoPE high_freq_factor", self.high_freq_factor)
            # Llama 3.1's rule interpolates between the two; equal ones divide by zero.
            if self.high_freq_factor <= self.low_freq_factor:
                raise LlamalabError(
                    f"config: RoPE high_freq_factor {self.high_freq_factor} must exceed "
                    f"low_freq_factor {self.low_freq_factor}"
                )
            _check_int(
                "RoPE original_context_length", self.original_context_length, MAX_CONTEXT_LENGTH
            )


# Llama 3.1's published values; Meta's params.json only says "use_scaled_rope": true.
LLAMA3_ROPE_SCALING = RopeScaling(
    kind="llama3",
    factor=8.0,
    low_freq_factor=1.0,
    high_freq_factor=4.0,
    original_context_length=8192,
)


def ffn_hidden_dim(
    dim: int, multiple_of: int = 256, ffn_dim_multiplier: float | None = None
) -> int:
    """Meta's rule for the SwiGLU hidden size: 2/3 of 4·dim, scaled, rounded up to a multiple."""
    hidden = int(2 * (4 * dim) / 3)
    if ffn_dim_multiplier is not None:
        hidden = int(ffn_dim_multiplier * hidden)
    return multiple_of * math.ceil(hidden / multiple_of)


@dataclass(frozen=True)
class ModelConfig:
    """The shape of a LLaMA-family transformer."""

    dim: int
    n_layers: int
    n_heads: int
    vocab_size: int
    ffn_hidden_dim: int
    n_kv_heads: int | None = None  # None: as many as n_heads (plain multi-head attention)
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    context_length: int = 2048
    tie_embeddings: bool = False
    name: str = field(default="", compare=False)

    def __post_init__(self) -> None:
        # Every loader (GGUF, Hugging Face, Meta, presets) comes through here, so every
        # format gets the same range checks before anything is sized from these values.
        for key, maximum in (
            ("dim", MAX_DIM),
            ("n_layers", MAX_LAYERS),
            ("n_heads", MAX_HEADS),
            ("vocab_size", MAX_VOCAB_SIZE),
            ("ffn_hidden_dim", MAX_FFN_HIDDEN_DIM),
            ("context_length", MAX_CONTEXT_LENGTH),
        ):
            _check_int(key, getattr(self, key), maximum)
        if self.n_kv_heads is None:
            object.__setattr__(self, "n_kv_heads", self.n_heads)
        _check_int("n_kv_heads", self.n_kv_heads, MAX_HEADS)
        if self.dim % self.n_heads:
            raise LlamalabError(
                f"config: dim {self.dim} is not divisible by n_heads {self.n_heads}"
            )
        if self.n_heads % self.n_kv_heads:
            raise LlamalabError(
                f"config: n_heads {self.n_heads} is not a multiple of n_kv_heads {self.n_kv_heads}"
            )
        if self.head_dim % 2:
            raise LlamalabError(
                f"config: head dimension {self.head_dim} must be even for rotary embeddings"
            )
        _check_float("norm_eps", self.norm_eps, below=1.0)
        _check_float("rope_theta", self.rope_theta)
        if not isinstance(self.tie_embeddings, bool):
            raise LlamalabError(
                f"config: tie_embeddings must be true or false, got {self.tie_embeddings!r}"
            )
        if isinstance(self.rope_scaling, dict):
            object.__setattr__(self, "rope_scaling", rope_scaling_from_dict(self.rope_scaling))
        scaling = self.rope_scaling
        if scaling is not None and not isinstance(scaling, RopeScaling):
            raise LlamalabError(f"config: rope_scaling must be a mapping, got {scaling!r}")
        if (
            scaling is not None
            and scaling.kind == "factors"
            and len(scaling.factors) != self.head_dim // 2
        ):
            raise LlamalabError(
                f"config: {len(scaling.factors)} RoPE factors given, "
                f"the head needs {self.head_dim // 2}"
            )

    @property
    def head_dim(self) -> int:
        """The width of one attention head."""
        return self.dim // self.n_heads

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        """Build a config from a plain dict; unknown keys are an error, not silently dropped."""
        _reject_unknown_keys(cls, data, "config")
        return cls(**data)

    def to_dict(self) -> dict[str, Any]:
        """A plain dict that :meth:`from_dict` reads back."""
        return dataclasses.asdict(self)

    def num_parameters(self) -> int:
        """Exact parameter count, computed from the shapes (tied output counted once)."""
        kv_dim = self.n_kv_heads * self.head_dim
        attention = self.dim * self.dim * 2 + self.dim * kv_dim * 2  # wq, wo, wk, wv
        feed_forward = 3 * self.dim * self.ffn_hidden_dim
        per_layer = attention + feed_forward + 2 * self.dim  # two RMSNorm weights
        embeddings = self.vocab_size * self.dim * (1 if self.tie_embeddings else 2)
        return embeddings + self.n_layers * per_layer + self.dim


def rope_scaling_from_dict(data: dict[str, Any]) -> RopeScaling:
    """A :class:`RopeScaling` from a dict (as ``to_dict`` writes it); unknown keys are an error."""
    if not isinstance(data, dict):
        raise LlamalabError(f"config: rope_scaling must be a mapping, got {data!r}")
    data = dict(data)
    if "factors" in data and data["factors"] is not None:
        factors = data["factors"]
        if not isinstance(factors, list | tuple) or any(
            isinstance(x, bool) or not isinstance(x, int | float) for x in factors
        ):
            raise LlamalabError("config: rope_scaling factors must be a list of numbers")
        data["factors"] = tuple(float(x) for x in factors)
    _reject_unknown_keys(RopeScaling, data, "config: rope_scaling")
    return RopeScaling(**data)


def _reject_unknown_keys(cls: type, data: dict[str, Any], what: str) -> None:
    unknown = sorted(set(data) - {f.name for f in dataclasses.fields(cls)})
    if unknown:
        raise LlamalabError(f"{what}: unknown keys {', '.join(unknown)}")


def _llama1(name: str, dim: int, n_heads: int, n_layers: int) -> ModelConfig:
    return ModelConfig(
        name=name,
        dim=dim,
        n_layers=n_layers,
        n_heads=n_heads,
        vocab_size=32000,
        ffn_hidden_dim=ffn_hidden_dim(dim),
        norm_eps=1e-6,
        context_length=2048,
    )


def _llama2(name: str, dim: int, n_heads: int, n_layers: int, **kw: Any) -> ModelConfig:
    multiplier = kw.pop("ffn_dim_multiplier", None)
    multiple_of = kw.pop("multiple_of", 256)
    return ModelConfig(
        name=name,
        dim=dim,
        n_layers=n_layers,
        n_heads=n_heads,
        vocab_size=32000,
        ffn_hidden_dim=ffn_hidden_dim(dim, multiple_of, multiplier),
        norm_eps=1e-5,
        context_length=4096,
        **kw,
    )


def _llama3_8b(name: str, **kw: Any) -> ModelConfig:
    return ModelConfig(
        name=name,
        dim=4096,
        n_layers=32,
        n_heads=32,
        n_kv_heads=8,
        vocab_size=128256,
        ffn_hidden_dim=ffn_hidden_dim(4096, 1024, 1.3),  # 14336
        norm_eps=1e-5,
        rope_theta=500000.0,
        **kw,
    )


PRESETS: dict[str, ModelConfig] = {
    c.name: c
    for c in (
        _llama1("llama-7b", 4096, 32, 32),
        _llama1("llama-13b", 5120, 40, 40),
        _llama1("llama-33b", 6656, 52, 60),
        _llama1("llama-65b", 8192, 64, 80),
        _llama2("llama2-7b", 4096, 32, 32),
        _llama2("llama2-13b", 5120, 40, 40),
        _llama2("llama2-70b", 8192, 64, 80, n_kv_heads=8, ffn_dim_multiplier=1.3, multiple_of=4096),
        _llama3_8b("llama3-8b", context_length=8192),
        _llama3_8b("llama3.1-8b", context_length=131072, rope_scaling=LLAMA3_ROPE_SCALING),
        ModelConfig(
            name="debug",
            dim=64,
            n_layers=2,
            n_heads=4,
            n_kv_heads=2,
            vocab_size=256,
            ffn_hidden_dim=ffn_hidden_dim(64, 32),
            context_length=128,
        ),
    )
}


def get_preset(name: str) -> ModelConfig:
    """Return a preset by name (presets are frozen: use ``dataclasses.replace`` to vary one)."""
    try:
        return PRESETS[name]
    except KeyError:
        raise LlamalabError(
            f"unknown preset {name!r}; known presets: {', '.join(PRESETS)}"
        ) from None
