"""Load what a command needs to run a model: the weights in the chosen form, and the tokenizer.

Nothing here imports torch at module level: the CLI builds its parser from these names.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from llamalab.errors import LlamalabError
from llamalab.startup import import_torch_in_background, paused_gc

DTYPE_CHOICES = ("auto", "float32")
DEVICE_CHOICES = ("auto", "cpu", "cuda")
# Threads beyond the CPUs only take turns on them; far beyond, creating them fails
# (torch's OpenMP pool crashes the process at 100,000). Four per CPU leaves room for
# experiments; 1024 is also SentencePiece's own limit.
THREADS_PER_CPU = 4
MAX_THREADS = 1024


def max_threads() -> int:
    """The most threads (or worker processes) llamalab accepts on this machine."""
    return min(MAX_THREADS, THREADS_PER_CPU * (os.cpu_count() or 1))


def check_threads(threads: int | None, option: str = "--threads") -> None:
    """Refuse a thread count below 1 or above :func:`max_threads` (None: the default)."""
    if threads is None:
        return
    if threads < 1:
        raise LlamalabError(f"{option} must be at least 1, got {threads}")
    if threads > max_threads():
        raise LlamalabError(
            f"{option} must be at most {max_threads()} ({THREADS_PER_CPU} per CPU, "
            f"{os.cpu_count() or 1} CPUs here), got {threads}"
        )


def resolve_model_ref(ref: str | None) -> Path:
    """The model to run: the given path, else ``$LLAMALAB_MODEL``, else the embedded default."""
    from llamalab.default_model import resolve_model_path
    from llamalab.files import refuse_special

    path = resolve_model_path(ref or None)
    refuse_special(path)  # a FIFO or a device: say so, rather than "not a model"
    return path


def physical_cores() -> int:
    """Physical cores this process may run on (hyper-threads share one core's arithmetic).

    What llama.cpp and Ollama default to: a second thread on the same core only contends
    for the same floating-point units. Falls back to the logical count where the kernel
    does not say.
    """
    allowed = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else None
    logical = len(allowed) if allowed else (os.cpu_count() or 1)
    from llamalab.kernels.cpu import cpu_info

    cores = {core for cpu, core in cpu_info().cores.items() if allowed is None or cpu in allowed}
    return min(len(cores), logical) if cores else logical


def resolve_device(device: str | None):
    """``"auto"`` (or None) picks CUDA when torch sees a GPU, else the CPU."""
    import torch

    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device not in DEVICE_CHOICES:
        raise LlamalabError(
            f"unknown --device {device!r}; expected one of {', '.join(DEVICE_CHOICES)}"
        )
    if device == "cuda" and not torch.cuda.is_available():
        raise LlamalabError("--device cuda: this torch build sees no CUDA device")
    return torch.device(device)


def describe_checkpoint(path: Path) -> str:
    """One line naming a checkpoint before it loads: file, format, stored types, size."""
    from llamalab.checkpoint.load import open_checkpoint

    reader = open_checkpoint(path)
    try:
        config = reader.config
        types = reader.stored_types()
        main_type = max(types, key=types.__getitem__) if types else "?"
        params = config.num_parameters()
    finally:
        reader.close()
    size = f"{params / 1e9:.1f}B" if params >= 1e9 else f"{params / 1e6:.0f}M"
    return f"{path.name} ({reader.format}, {main_type}, {size} parameters) from {path.resolve()}"


def load_runtime(
    ref: str | None,
    dtype: str = "auto",
    *,
    device: str | None = None,
    threads: int | None = None,
    ctx: int | None = None,
    progress: bool | None = None,
    compile: bool = False,
    announce: bool = False,
):
    """Return ``(model, tokenizer)`` for a checkpoint.

    ``dtype="float32"`` dequantizes every weight: the exact reference maths.
    ``dtype="auto"`` runs the fastest form the kernels allow on the device: packed linear
    layers on the CPU, bfloat16 on CUDA. ``threads`` sets torch's CPU threads (default:
    the physical cores). ``compile`` compiles the CPU decode step
    (:meth:`~llamalab.kernels.decode_path.DecodePath.compile`): seconds at the first step, for
    about 20% faster steps after, which pays off in a long-running server.
    ``announce`` prints one line on stderr, before the slow part,
    naming what is loaded (``ctx`` is only reported there).
    """
    from llamalab.parallel.launch import current

    if dtype not in DTYPE_CHOICES:
        raise LlamalabError(
            f"unknown --dtype {dtype!r}; expected one of {', '.join(DTYPE_CHOICES)}"
        )
    check_threads(threads)
    session = current()
    if session is not None:  # a tensor-parallel rank under torchrun: every rank loads a slice
        path = resolve_model_ref(ref)
        return session.load_runtime(path, dtype, threads=threads, announce=announce)
    # torch takes most of a second to import: it imports in the background while this
    # thread does what needs no torch (the tokenizer, the model file's header, the check
    # of its packed-weight cache file). The start-up builds hundreds of thousands of
    # objects, torch's among them, none of them garbage: each full collection in it would
    # walk them all (about 70 ms once torch is imported).
    importing = import_torch_in_background()
    with paused_gc():
        return _load(
            ref, dtype, importing, device=device, threads=threads, ctx=ctx,
            progress=progress, compile=compile, announce=announce,
        )  # fmt: skip


def _load(ref, dtype, importing, *, device, threads, ctx, progress, compile, announce):
    from llamalab.checkpoint.load import load_model
    from llamalab.tokenizer import load_tokenizer

    try:
        path = resolve_model_ref(ref)
        tokenizer = load_tokenizer(path)
        if dtype == "auto" and device in (None, "auto", "cpu"):
            _prefetch_packed_weights(path)
    finally:
        if importing is not None:
            importing.join()
    import torch

    torch_device = resolve_device(device)
    n_threads = threads or physical_cores()
    if torch.get_num_threads() != n_threads:
        torch.set_num_threads(n_threads)
    if progress is None:
        progress = sys.stderr.isatty()
    if announce:
        where = "cuda" if torch_device.type == "cuda" else f"cpu, {n_threads} threads"
        context = f", context {ctx}" if ctx else ""
        print(f"loading {describe_checkpoint(path)} on {where}{context}", file=sys.stderr)
    if torch_device.type == "cuda":
        model_dtype = torch.float32 if dtype == "float32" else torch.bfloat16
        packed = False
    else:
        model_dtype = torch.float32
        packed = dtype == "auto" and packed_kernels_available()
    model = load_model(
        path, dtype=model_dtype, device=torch_device, progress=progress, packed=packed
    )
    # A model whose blocks all run on llamalab's kernels steps in one native call, which
    # leaves a compiled block nothing to do: the decode path compiles only where it does not.
    if compile and torch_device.type == "cpu":
        from llamalab.kernels.decode_path import choose

        choose(model, packed=packed, compile=True)
    return model, tokenizer


def _prefetch_packed_weights(path: Path) -> None:
    """Check a GGUF file's packed-weight cache file now (no torch needed), for the load."""
    from llamalab.kernels import planned_isa

    if planned_isa() == "torch" or not path.is_file():
        return
    from llamalab.checkpoint.load import open_checkpoint
    from llamalab.quant import packed_cache

    try:
        reader = open_checkpoint(path)
        try:
            if reader.format == "gguf":
                packed_cache.prefetch(path, reader.data_start)
        finally:
            reader.close()
    except (LlamalabError, OSError):
        pass  # the load reports what is wrong with the file


def packed_kernels_available() -> bool:
    """Whether this torch build has the CPU kernels that packed linear layers run on."""
    from llamalab.quant.linear import fp16_kernel_available

    return fp16_kernel_available()
