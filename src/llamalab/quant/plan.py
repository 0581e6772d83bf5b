"""Which kernel a packed weight gets, and how many bytes it then holds, decided without torch.

``quant/linear.py`` builds the layers by these rules; ``llamalab info`` sizes a model's
memory by them without loading torch.
"""

from __future__ import annotations

import functools
import os

INT4_TYPES = frozenset({"Q4_0", "Q4_1", "Q4_K"})  # exactly groups of 32 with a scale and a zero
INT4_GROUP = 32
# The types llamalab's VNNI kernel holds, as (bits per quant, weights per group): each is
# exactly value = q * scale + zero per group (``gguf.dequant.affine_groups``).
VNNI_LAYOUTS = {
    "Q4_0": (4, 32), "Q4_1": (4, 32), "Q4_K": (4, 32),
    "Q5_0": (8, 32), "Q5_1": (8, 32), "Q5_K": (8, 32), "Q8_0": (8, 32), "Q6_K": (8, 16),
}  # fmt: skip
# From this many rows per call a packed layer unpacks to bfloat16 for one GEMM instead
# (measured break-even on a 576 x 3072 weight: about 55 rows), and a pass leaves the
# native step (quant/native.py) for the model's blocks.
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
        # The quants, and a float16 scale and zero per group.
        bits, group = VNNI_LAYOUTS[stored_type]
        return out_features * in_features * bits // 8 + out_features * (in_features // group) * 4
    if cpu_runs_int4_fast() and int4_takes(stored_type, shape):
        # Two weights a byte, and a bfloat16 scale and zero per group.
        return out_features * in_features // 2 + out_features * (in_features // INT4_GROUP) * 4
    return 2 * out_features * in_features  # float16
