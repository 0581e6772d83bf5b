"""Which kernel a packed weight gets, and how many bytes it then holds, decided without torch.

``quant/linear.py`` builds the layers by these rules; ``llamalab info`` sizes a model's
memory by them without loading torch.
"""

from __future__ import annotations

import functools
import os

INT4_TYPES = frozenset({"Q4_0", "Q4_1", "Q4_K"})  # exactly groups of 32 with a scale and a zero
INT4_GROUP = 32


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags from ``/proc/cpuinfo`` (empty where there is none)."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.partition(":")[2].split())
    except OSError:
        pass
    return frozenset()


def cpu_runs_int4_fast() -> bool:
    """Whether this CPU runs torch's int4 kernel fast (its bfloat16 path needs AVX-512 BF16
    or AMX), and ``$LLAMALAB_INT4`` does not turn it off."""
    if os.environ.get("LLAMALAB_INT4", "1") == "0":
        return False
    return bool(cpu_flags() & {"avx512_bf16", "amx_bf16"})


def int4_takes(stored_type: str, shape: tuple[int, ...]) -> bool:
    """Whether the int4 kernel can hold this weight: a 4-bit type whose (out, in) shape
    fits the packed layout, which tiles output rows by 16 and input columns by 32."""
    out_features, in_features = shape
    return stored_type in INT4_TYPES and out_features % 16 == 0 and in_features % INT4_GROUP == 0


def packed_linear_bytes(stored_type: str, shape: tuple[int, ...]) -> int:
    """Bytes a packed linear layer of this stored type and (out, in) shape holds."""
    out_features, in_features = shape
    if cpu_runs_int4_fast() and int4_takes(stored_type, shape):
        # Two weights a byte, and a bfloat16 scale and zero per group.
        return out_features * in_features // 2 + out_features * (in_features // INT4_GROUP) * 4
    return 2 * out_features * in_features  # float16
