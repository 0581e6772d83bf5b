"""llamalab's own CPU kernels (``csrc/kernels.cpp``), compiled on first use and cached.

One source, built once per instruction set (:data:`llamalab.kernels.cpu.ISAS`: AVX-512
VNNI, AVX-VNNI, AVX2) with a C++ compiler (the one ``torch.compile`` uses), into
``$LLAMALAB_CACHE`` (default ``~/.cache/llamalab``)``/kernels/``; a build takes about
10 s, later processes load the cached library. Each build registers its operators under
its own namespace (``torch.ops.llamalab_avx2`` ...), so several can be loaded and
compared in one process; the one the process runs on (:func:`~llamalab.kernels.cpu.chosen_isa`)
also claims ``torch.ops.llamalab``, which the packed layers (``quant/linear.py``) and
the decode path (``decode_path.py``) call. The packed weights are the same bytes for
every build. Where no build runs, no compiler is found, the build
fails, ``$LLAMALAB_ISA=torch`` or ``$LLAMALAB_VNNI=0``, :func:`vnni_available` says no
and the packed layers use torch's kernels instead.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import hashlib
import os
import subprocess
import sys
import tempfile
import threading
import warnings
from collections.abc import Iterator
from pathlib import Path

import torch

from llamalab.errors import LlamalabError
from llamalab.kernels import _loaded as _default
from llamalab.kernels import compiler
from llamalab.kernels.cpu import ISAS, chosen_isa, compile_flags, isa_runs

_SOURCE = Path(__file__).parent / "csrc" / "kernels.cpp"
_FLAGS = ["-O3", "-std=c++20", "-shared", "-fPIC", "-fopenmp", "-fvisibility=hidden"]
_BUILD_TIMEOUT_S = 300
_lock = threading.Lock()


def _cache_dir() -> Path:
    root = os.environ.get("LLAMALAB_CACHE") or Path.home() / ".cache" / "llamalab"
    return Path(root) / "kernels"


def _build(compiler: str, isa: str) -> Path:
    torch_dir = Path(torch.__file__).parent
    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    includes = [torch_dir / "include", torch_dir / "include" / "torch" / "csrc" / "api" / "include"]
    command = [
        compiler, *_FLAGS, *compile_flags(isa), f"-DLLAMALAB_NS=llamalab_{isa}",
        f"-D_GLIBCXX_USE_CXX11_ABI={abi}", *(f"-I{p}" for p in includes), str(_SOURCE),
        f"-L{torch_dir / 'lib'}", "-lc10", "-ltorch_cpu", f"-Wl,-rpath,{torch_dir / 'lib'}",
    ]  # fmt: skip
    key = hashlib.sha256(
        _SOURCE.read_bytes() + " ".join(command).encode() + torch.__version__.encode()
    ).hexdigest()[:16]
    target = _cache_dir() / f"kernels-{isa}-{key}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    if sys.stderr.isatty():
        print(f"llamalab: building the {isa} kernels (once, about 10 s)", file=sys.stderr)
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
def _library(isa: str) -> Path | None:
    """The loaded library of ``isa``'s build (built first where not cached), or None with
    a warning where it cannot be built or loaded."""
    found = compiler()
    if found is None:
        return None
    try:
        path = _build(found, isa)
        torch.ops.load_library(str(path))
    except (OSError, RuntimeError, subprocess.SubprocessError) as exc:
        detail = getattr(exc, "stderr", b"") or b""
        warnings.warn(
            f"llamalab's {isa} kernels could not be built ({exc}); using torch's kernels. "
            f"{detail.decode(errors='replace')[-500:]}",
            stacklevel=3,
        )
        return None
    return path


def load(isa: str) -> bool:
    """Build (once) and load ``isa``'s kernels, whose operators are then
    ``torch.ops.llamalab_<isa>``; False where they cannot be built. Refuses a build this
    CPU cannot run: its first instruction would kill the process."""
    if isa not in ISAS:
        raise LlamalabError(f"no native kernels for {isa!r}: give one of {', '.join(ISAS)}")
    if not isa_runs(isa):
        raise LlamalabError(f"this CPU cannot run llamalab's {isa} kernels")
    with _lock:
        return _library(isa) is not None


def ops(isa: str | None = None):
    """The operators of ``isa``'s build (loaded first), or of the process's own path
    (``torch.ops.llamalab``) where ``isa`` is None."""
    if isa is None:
        if not vnni_available():
            raise LlamalabError("llamalab's kernels do not run here (see llamalab.kernels)")
        return torch.ops.llamalab
    if not load(isa):
        raise LlamalabError(f"llamalab's {isa} kernels could not be built here")
    return getattr(torch.ops, f"llamalab_{isa}")


@functools.cache
def vnni_available() -> bool:
    """Whether ``torch.ops.llamalab`` (the packed matrix products, decode attention and
    the decode step) runs here, on the path :func:`~llamalab.kernels.cpu.chosen_isa`
    picks; built and loaded on the first call. Raises where ``$LLAMALAB_ISA`` forces a
    path this CPU cannot run."""
    isa = chosen_isa()
    if isa == "torch" or not load(isa):
        return False
    with _lock:
        if not _default:
            # The build's exported hook registers its operators under "llamalab" too.
            if ctypes.CDLL(str(_library(isa))).llamalab_claim_default() != 0:
                warnings.warn(
                    "torch.ops.llamalab is taken by another library; using torch's kernels",
                    stacklevel=2,
                )
                return False
            _register_fake()
            _default.append(isa)
    return _default[0] == isa


def set_activation_passes(passes: int, isa: str | None = None) -> int:
    """Set how many int8 passes activations get in ``isa``'s build (default: the one behind
    ``torch.ops.llamalab``); returns the previous setting (1 where no build runs here).

    1 (the default) quantizes each block of 16 activations once. 2 quantizes the rounding
    residual too and multiplies it as well: about 250 times less activation error for
    twice the multiply work. Evaluation uses 2, where near ties between choices must be
    decided as float32 decides them. The setting holds for the whole process."""
    if passes not in (1, 2):
        raise LlamalabError(f"activation passes must be 1 or 2, not {passes!r}")
    if isa is None:
        if not vnni_available():
            return 1
        isa = _default[0]
    elif not load(isa):
        return 1
    with _lock:
        return ctypes.CDLL(str(_library(isa))).llamalab_set_activation_passes(passes)


@contextlib.contextmanager
def activation_passes(passes: int, isa: str | None = None) -> Iterator[None]:
    """``set_activation_passes(passes, isa)`` for the ``with`` block, then the setting
    before it."""
    previous = set_activation_passes(passes, isa)
    try:
        yield
    finally:
        set_activation_passes(previous, isa)


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
