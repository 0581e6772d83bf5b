"""What this CPU can run, read once from ``/proc/cpuinfo``, and which kernel path follows.

Every part of llamalab that asks about the CPU (the kernels' instruction set, torch's
int4 kernel, bfloat16 training, the thread count) reads it here, without torch.

The native kernels (``csrc/kernels.cpp``) come in three builds of one source:

* ``avx512``: 512-bit vectors, ``vpdpbusd`` (AVX-512 F/BW/VL with VNNI);
* ``avxvnni``: 256-bit vectors, ``vpdpbusd`` (AVX-VNNI, Alder Lake and later; on a CPU
  with AVX-512 VL and VNNI the same instructions run in their EVEX encoding);
* ``avx2``: 256-bit vectors, ``vpmaddubsw`` + ``vpmaddwd`` (Haswell and Zen 1-3).

:func:`chosen_isa` picks the best one the CPU runs, or the one ``$LLAMALAB_ISA`` names
(``avx512``, ``avxvnni``, ``avx2`` or ``torch``); ``$LLAMALAB_VNNI=0`` is the older way
of saying ``torch``.
"""

from __future__ import annotations

import functools
import os
from typing import NamedTuple

from llamalab.errors import LlamalabError

# Best first: the one chosen where the CPU runs several.
ISAS = ("avx512", "avxvnni", "avx2")
ISA_CHOICES = (*ISAS, "torch")

_COMMON = frozenset({"avx2", "fma", "f16c"})
_AVX512_VNNI = frozenset({"avx512f", "avx512bw", "avx512vl", "avx512_vnni"})
_BF16 = frozenset({"avx512_bf16", "amx_bf16"})


class CpuInfo(NamedTuple):
    """The parts of ``/proc/cpuinfo`` llamalab uses."""

    flags: frozenset[str]  # the first processor's feature flags
    cores: dict[int, tuple[str, str]]  # processor number -> (physical id, core id)


def parse_cpuinfo(text: str) -> CpuInfo:
    """The flags and the core of every processor in ``/proc/cpuinfo``'s text."""
    flags: frozenset[str] | None = None
    cores: dict[int, tuple[str, str]] = {}
    cpu: int | None = None
    physical = core = None
    for line in [*text.splitlines(), ""]:
        key, _, value = line.partition(":")
        key, value = key.strip(), value.strip()
        if key == "processor":
            try:
                cpu = int(value)
            except ValueError:
                cpu = None
        elif key == "physical id":
            physical = value
        elif key == "core id":
            core = value
        elif key == "flags" and flags is None:
            flags = frozenset(value.split())
        elif not key:  # a blank line ends one processor's block
            if cpu is not None and core is not None:
                cores[cpu] = (physical or "0", core)
            cpu = physical = core = None
    return CpuInfo(flags or frozenset(), cores)


@functools.cache
def cpu_info() -> CpuInfo:
    """This machine's :class:`CpuInfo` (empty where there is no ``/proc/cpuinfo``)."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            return parse_cpuinfo(f.read())
    except OSError:
        return CpuInfo(frozenset(), {})


def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags (empty where ``/proc/cpuinfo`` does not say)."""
    return cpu_info().flags


def has_native_bf16(flags: frozenset[str] | None = None) -> bool:
    """Whether the CPU has bfloat16 arithmetic instructions (AVX-512 BF16 or AMX)."""
    return bool((cpu_flags() if flags is None else flags) & _BF16)


def isa_runs(isa: str, flags: frozenset[str] | None = None) -> bool:
    """Whether a CPU with these flags (default: this one) runs the kernels' ``isa`` build."""
    flags = cpu_flags() if flags is None else flags
    if not _COMMON <= flags:
        return False
    if isa == "avx512":
        return _AVX512_VNNI <= flags
    if isa == "avxvnni":  # VEX (AVX-VNNI) or EVEX (AVX-512 VL + VNNI): the same operation
        return "avx_vnni" in flags or _AVX512_VNNI <= flags
    return isa == "avx2"


def chosen_isa(flags: frozenset[str] | None = None, environ: dict[str, str] | None = None) -> str:
    """The kernel path for this process: ``avx512``, ``avxvnni``, ``avx2`` or ``torch``.

    ``$LLAMALAB_ISA`` forces one; a path this CPU cannot run, or a name that is none of
    them, is an error rather than a crash at the first instruction. Unset, it is the best
    the CPU runs, or ``torch`` where it runs none or ``$LLAMALAB_VNNI=0``.
    """
    flags = cpu_flags() if flags is None else flags
    environ = os.environ if environ is None else environ
    forced = environ.get("LLAMALAB_ISA", "").strip().lower()
    if forced:
        if forced not in ISA_CHOICES:
            raise LlamalabError(
                f"LLAMALAB_ISA={forced!r} is not a kernel path: give one of "
                f"{', '.join(ISA_CHOICES)}"
            )
        if forced != "torch" and not isa_runs(forced, flags):
            runs = [isa for isa in ISAS if isa_runs(isa, flags)] or ["none of them"]
            raise LlamalabError(
                f"LLAMALAB_ISA={forced}: this CPU cannot run that path "
                f"(it runs {', '.join(runs)}; torch always)"
            )
        return forced
    if environ.get("LLAMALAB_VNNI", "1") == "0":
        return "torch"
    return next((isa for isa in ISAS if isa_runs(isa, flags)), "torch")


def compile_flags(isa: str, flags: frozenset[str] | None = None) -> list[str]:
    """The compiler's instruction-set flags for the kernels' ``isa`` build on this CPU."""
    flags = cpu_flags() if flags is None else flags
    base = ["-mavx2", "-mfma", "-mf16c"]
    if isa == "avx512":
        return [*base, "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512vnni",
                "-DLLAMALAB_ISA_AVX512"]  # fmt: skip
    if isa == "avxvnni":
        # The VEX form where the CPU has it; otherwise the EVEX form of the same 256-bit
        # instruction, kept to 256-bit vectors so the build stays what it stands for.
        vnni = ["-mavxvnni"] if "avx_vnni" in flags else [
            "-mavx512vl", "-mavx512vnni", "-mprefer-vector-width=256"
        ]  # fmt: skip
        return [*base, *vnni, "-DLLAMALAB_ISA_AVXVNNI"]
    if isa == "avx2":
        return [*base, "-DLLAMALAB_ISA_AVX2"]
    raise ValueError(f"no native build for {isa!r}")
