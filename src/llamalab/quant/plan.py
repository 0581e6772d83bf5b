"""Which kernel a packed weight gets, and how many bytes it then holds, decided without torch.

``quant/linear.py`` builds the layers by these rules; ``llamalab info`` sizes a model's
memory by them without loading torch.
"""

from __future__ import annotations

import functools
import os
from typing import NamedTuple

INT4_TYPES = frozenset({"Q4_0", "Q4_1", "Q4_K"})  # exactly groups of 32 with a scale and a zero
INT4_GROUP = 32


class VnniLayout(NamedTuple):
    """How llamalab's VNNI kernel holds a weight type (``csrc/vnni.cpp``'s header)."""

    bits: int  # per quant: 4, 6 or 8
    group: int  # weights per scale
    offset: int  # symmetric types: zero = -offset * scale, not stored; 0: zeros stored

    def nbytes(self, out_features: int, in_features: int) -> int:
        """Bytes of an (out, in) weight: the quants, a float16 scale and zero per group."""
        per_group = 2 if self.offset else 4
        return (
            out_features * in_features * self.bits // 8
            + out_features * (in_features // self.group) * per_group
        )


# The types the kernel holds: each is exactly value = q * scale + zero per group
# (``gguf.dequant.affine_groups``), with q stored in the fewest bits the kernel has.
VNNI_LAYOUTS = {
    "Q4_0": VnniLayout(4, 32, 8), "Q4_1": VnniLayout(4, 32, 0), "Q4_K": VnniLayout(4, 32, 0),
    "Q5_0": VnniLayout(6, 32, 16), "Q5_1": VnniLayout(6, 32, 0), "Q5_K": VnniLayout(6, 32, 0),
    "Q6_K": VnniLayout(6, 16, 32), "Q8_0": VnniLayout(8, 32, 128),
}  # fmt: skip
# From this many rows per call an int4 layer unpacks to bfloat16 for one GEMM instead
# (measured break-even on a 576 x 3072 weight: about 55 rows), and a pass leaves the
# native step (quant/native.py) for the model's blocks, whose attention is torch's
# blocked kernel.
UNPACK_ROWS = 64
_VNNI_FLAGS = frozenset({"avx512f", "avx512bw", "avx512vl", "avx512_vnni", "f16c", "fma"})


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


def cpu_runs_vnni() -> bool:
    """Whether this CPU has what llamalab's VNNI kernel needs (AVX-512 F/BW/VL with VNNI,
    F16C, FMA) and ``$LLAMALAB_VNNI`` does not turn it off."""
    if os.environ.get("LLAMALAB_VNNI", "1") == "0":
        return False
    return _VNNI_FLAGS <= cpu_flags()


def vnni_takes(stored_type: str, shape: tuple[int, ...]) -> bool:
    """Whether the VNNI kernel can hold this weight: a type it knows whose output rows are
    a multiple of 16 (its tiles) and whose input columns are a multiple of 32."""
    out_features, in_features = shape
    return stored_type in VNNI_LAYOUTS and out_features % 16 == 0 and in_features % 32 == 0


def int4_takes(stored_type: str, shape: tuple[int, ...]) -> bool:
    """Whether the int4 kernel can hold this weight: a 4-bit type whose (out, in) shape
    fits the packed layout, which tiles output rows by 16 and input columns by 32."""
    out_features, in_features = shape
    return stored_type in INT4_TYPES and out_features % 16 == 0 and in_features % INT4_GROUP == 0


def packed_linear_bytes(stored_type: str, shape: tuple[int, ...]) -> int:
    """Bytes a packed linear layer of this stored type and (out, in) shape holds."""
    out_features, in_features = shape
    if cpu_runs_vnni() and vnni_takes(stored_type, shape):
        return VNNI_LAYOUTS[stored_type].nbytes(out_features, in_features)
    if cpu_runs_int4_fast() and int4_takes(stored_type, shape):
        # Two weights a byte, and a bfloat16 scale and zero per group.
        return out_features * in_features // 2 + out_features * (in_features // INT4_GROUP) * 4
    return 2 * out_features * in_features  # float16
