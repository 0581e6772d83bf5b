"""llamalab's own CPU kernel (``csrc/vnni.cpp``), compiled on first use and cached.

The kernel needs AVX-512 with VNNI and a C++ compiler (the one ``torch.compile`` uses).
It is built once per source, torch version and compiler into
``$LLAMALAB_CACHE`` (default ``~/.cache/llamalab``)``/kernels/``, which takes about 7 s;
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

from llamalab.quant.plan import cpu_runs_vnni

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
        print("llamalab: building the VNNI kernel (once, about 7 s)", file=sys.stderr)
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
    def _(x, w, out_features, bits, group):
        return x.new_empty((x.shape[0], out_features))

    @torch.library.register_fake("llamalab::decode_attention")
    def _(q, k, v):
        return q.new_empty(q.shape)
