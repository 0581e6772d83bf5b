"""Which kernel a packed weight gets, and how many bytes it then holds, decided without torch.

``quant/linear.py`` builds the layers by these rules; ``llamalab info`` sizes a model's
memory by them without loading torch.
"""

from __future__ import annotations

import os
from typing import NamedTuple

from llamalab.kernels import UNPACK_ROWS, planned_isa
from llamalab.kernels.cpu import has_native_bf16

INT4_TYPES = frozenset({"Q4_0", "Q4_1", "Q4_K"})  # exactly groups of 32 with a scale and a zero
INT4_GROUP = 32


class VnniLayout(NamedTuple):
    """How llamalab's kernels hold a weight type (``kernels/csrc/kernels.cpp``'s header).

    One layout for every instruction set: the packed bytes do not depend on the CPU."""

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
__all__ = [
    "INT4_GROUP", "INT4_TYPES", "UNPACK_ROWS", "VNNI_LAYOUTS", "VnniLayout",
    "cpu_runs_int4_fast", "cpu_runs_vnni", "int4_takes", "packed_linear_bytes", "vnni_takes",
]  # fmt: skip


def cpu_runs_int4_fast() -> bool:
    """Whether this CPU runs torch's int4 kernel fast (its bfloat16 path needs AVX-512 BF16
    or AMX), and ``$LLAMALAB_INT4`` does not turn it off."""
    if os.environ.get("LLAMALAB_INT4", "1") == "0":
        return False
    return has_native_bf16()


def cpu_runs_vnni() -> bool:
    """Whether packed weights go to llamalab's own kernels here: one of their builds
    (AVX-512 VNNI, AVX-VNNI or AVX2) runs on this CPU, a compiler can build it, and
    neither ``$LLAMALAB_ISA=torch`` nor ``$LLAMALAB_VNNI=0`` turns them off."""
    return planned_isa() != "torch"


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
