"""llamalab's own CPU kernel (``csrc/vnni.cpp``), compiled on first use and cached.

The kernel needs AVX-512 with VNNI and a C++ compiler (the one ``torch.compile`` uses).
It is built once per source, torch version and compiler into
``$LLAMALAB_CACHE`` (default ``~/.cache/llamalab``)``/kernels/``, which takes about 10 s;
later processes load the cached library. Where the CPU lacks the instructions, no
compiler is found, the build fails or ``$LLAMALAB_VNNI=0``, :func:`vnni_available`
says no and the packed layers use torch's kernels instead.
"""

from __future__ import annotations

import functools
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

import torch

from llamalab.quant.plan import UNPACK_ROWS, cpu_runs_vnni

_SOURCE = Path(__file__).parent / "csrc" / "vnni.cpp"
_FLAGS = [
    "-O3", "-std=c++20", "-shared", "-fPIC", "-fopenmp",
    "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512vnni", "-mf16c", "-mfma",
]  # fmt: skip
_BUILD_TIMEOUT_S = 300


def _cache_dir() -> Path:
    root = os.environ.get("LLAMALAB_CACHE") or Path.home() / ".cache" / "llamalab"
    return Path(root) / "kernels"


def _compiler() -> str | None:
    return shutil.which(os.environ.get("CXX", "g++")) or shutil.which("c++")


def _build(compiler: str) -> Path:
    torch_dir = Path(torch.__file__).parent
    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    includes = [torch_dir / "include", torch_dir / "include" / "torch" / "csrc" / "api" / "include"]
    command = [
        compiler, *_FLAGS, f"-D_GLIBCXX_USE_CXX11_ABI={abi}",
        *(f"-I{p}" for p in includes), str(_SOURCE),
        f"-L{torch_dir / 'lib'}", "-lc10", "-ltorch_cpu", f"-Wl,-rpath,{torch_dir / 'lib'}",
    ]  # fmt: skip
    key = hashlib.sha256(
        _SOURCE.read_bytes() + " ".join(command).encode() + torch.__version__.encode()
    ).hexdigest()[:16]
    target = _cache_dir() / f"vnni-{key}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    if sys.stderr.isatty():
        print("llamalab: building the VNNI kernel (once, about 10 s)", file=sys.stderr)
    # Built under a temporary name and renamed: a concurrent process never loads half a file.
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        subprocess.run(
            [*command, "-o", tmp], check=True, capture_output=True, timeout=_BUILD_TIMEOUT_S
        )
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


@functools.cache
def vnni_available() -> bool:
    """Whether ``torch.ops.llamalab.vnni_linear`` runs here (built and loaded on first call)."""
    if not cpu_runs_vnni():
        return False
    compiler = _compiler()
    if compiler is None:
        return False
    try:
        torch.ops.load_library(str(_build(compiler)))
        _register_fake()
    except (OSError, RuntimeError, subprocess.SubprocessError) as exc:
        detail = getattr(exc, "stderr", b"") or b""
        warnings.warn(
            f"llamalab's VNNI kernel could not be built ({exc}); using torch's kernels. "
            f"{detail.decode(errors='replace')[-500:]}",
            stacklevel=2,
        )
        return False
    return True


def _register_fake() -> None:
    # Shapes for torch.compile's tracing: (M, K) in, (M, out_features) float32 out.
    @torch.library.register_fake("llamalab::vnni_linear")
    def _(x, w, out_features, bits, group, offset):
        return x.new_empty((x.shape[0], out_features))

    @torch.library.register_fake("llamalab::decode_attention")
    def _(q, k, v):
        return q.new_empty(q.shape)

    @torch.library.register_fake("llamalab::decode_step")
    def _(
        x, rows, positions, rope, norms, weights, layout, k_caches, v_caches, heads, kv_heads, eps
    ):
        return x.new_empty(x.shape)


class NativeStep:
    """A packed model's decode steps and short prompt chunks through
    ``torch.ops.llamalab.decode_step``.

    That op runs every transformer block of a pass in one call (``csrc/vnni.cpp``), so
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
        model: torch.nn.Module,
        layout: list[int],
        weights: list[torch.Tensor],
        norms: list[torch.Tensor],
    ):
        self._model = model
        self._layout = layout
        self._weights = weights
        self._norms = norms  # each block's attention and FFN norm weights

    @classmethod
    def for_model(cls, model: torch.nn.Module) -> NativeStep | None:
        """The step for ``model``, or None where some part of it is not on the vnni kernel."""
        config = model.config
        if (
            not vnni_available()
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
        return cls(model, layout, weights, norms)

    def __call__(
        self, h: torch.Tensor, rows: torch.Tensor, positions: torch.Tensor
    ) -> torch.Tensor:
        """The blocks' output (N, dim) for N embedded new tokens h (N, dim), token i in
        cache row ``rows[i]`` at position ``positions[i]`` (int64 (N,) each)."""
        model = self._model
        config = model.config
        k_caches, v_caches = self._cache_tensors()
        return torch.ops.llamalab.decode_step(
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
