"""Dequantize GGUF tensors in torch, bit for bit equal to ``gguf.quants.dequantize``.

A GGUF tensor is stored as a flat run of fixed-size *blocks*: each block holds
``block_size`` consecutive elements of one row (the innermost, PyTorch-order
dimension) packed into ``type_size`` bytes.  The (block_size, type_size) pair of
every type comes from ``gguf.constants.GGML_QUANT_SIZES``; only the byte layout
*inside* a block is spelled out here, one ``_unpack_*`` function per layout.

Every ``_unpack_*`` function takes the blocks as a ``(n_blocks, type_size)``
uint8 tensor and returns the block's scales (float32, already combined with the
sub-block scales where the format has them) and its small integer quants (uint8,
or int8 where the format subtracts an offset), shaped so that they broadcast
against each other.  The final multiply lives in the
matching ``_dequant_*`` function.  Keeping the two apart lets kernels that work
on packed weights reuse the unpacking without materialising float weights.

Bit-exactness with the reference (``gguf/quants.py``, the ``dequantize_blocks``
methods) depends on doing the *same* float32 operations in the same order:

* float16 fields are widened to float32 first (exact), and every product the
  reference rounds separately (e.g. ``d * sub_scale`` in the K-quants) is rounded
  separately here too, never fused;
* integer quants become float32 exactly, so ``scale * q`` equals ``q * scale``;
* ``(d * q) + m`` and ``(d * q) - m`` are kept as a multiply followed by a
  separate add / subtract (``a - b`` is not rewritten as ``a + (-b)``, which
  would flip the sign bit of a NaN ``b``).

Everything is vectorised over blocks; no Python loop runs per block or per row.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from typing import NamedTuple

import numpy as np
import torch
from gguf.constants import GGML_QUANT_SIZES, QK_K, GGMLQuantizationType
from gguf.quants import quantize as _gguf_quantize

from llamalab.errors import LlamalabError

__all__ = [
    "BLOCK_LAYOUTS",
    "INT4_GROUP_TYPES",
    "SUPPORTED_TYPES",
    "BlockLayout",
    "Int4Groups",
    "dequantize",
    "int4_groups",
    "quantize_q8_0",
]

_T = GGMLQuantizationType


class BlockLayout(NamedTuple):
    """Size of one storage block of a GGUF tensor type."""

    block_size: int  # elements per block (along the innermost dimension)
    type_size: int  # bytes per block


# ---------------------------------------------------------------------------
# Small bit-twiddling helpers shared by the layouts.
# ---------------------------------------------------------------------------


def _widen_f16(half: torch.Tensor) -> torch.Tensor:
    """float16 bit patterns (an int16 tensor) -> float32, exactly as numpy widens them.

    Numbers widen exactly either way, but NaNs do not: numpy keeps sign and payload
    (a signalling NaN stays signalling), while torch quiets them -- or, in its
    scalar path, returns one canonical NaN.  So NaNs are rebuilt the numpy way:
    sign, all-ones exponent, mantissa << 13.  Real weights have no NaNs, so the
    fix-up touches only the NaN positions instead of rewriting the whole tensor.
    """
    out = half.view(torch.float16).to(torch.float32)
    # A float32 sum of float16 values cannot overflow, so a finite sum proves there is
    # no NaN (or inf) without allocating a mask as large as the tensor.
    if bool(torch.isfinite(out.sum())):
        return out
    nan = torch.isnan(out)
    if bool(nan.any()):
        bits = half[nan].to(torch.int32)
        out.view(torch.int32)[nan] = ((bits & 0x8000) << 16) | 0x7F800000 | ((bits & 0x03FF) << 13)
    return out


def _f16(field: torch.Tensor) -> torch.Tensor:
    """``(n, 2)`` little-endian float16 bytes (a block's scale field) -> ``(n, 1)`` float32.

    Viewing the two bytes in place as one int16 (every field offset and block size
    is even) reads the column with a stride instead of copying it first.
    """
    return _widen_f16(field.view(torch.int16))


def _split(blocks: torch.Tensor, *widths: int) -> list[torch.Tensor]:
    """Cut ``(n, type_size)`` blocks into consecutive byte fields of the given widths.

    The widths of each layout must add up to the block's byte size from
    ``GGML_QUANT_SIZES``: a mismatch means the layout below is wrong, not the input.
    """
    assert sum(widths) == blocks.shape[1], (widths, blocks.shape)
    return list(torch.split(blocks, widths, dim=1))


def _unpack_bits(packed: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """Split every byte into ``8 // bits`` fields of ``bits`` bits, lowest bits first.

    The fields are stacked on a new axis inserted at ``dim`` (as for ``unsqueeze``),
    which is how all GGML layouts interleave them: field ``j`` of a run of bytes
    holds the ``j``-th group of consecutive elements.
    """
    shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=packed.device)
    shape = [1] * (packed.dim() + 1)
    shape[dim] = -1
    fields = packed.unsqueeze(dim) >> shifts.view(shape)
    fields &= (1 << bits) - 1
    return fields


def _nibbles(packed: torch.Tensor, dim: int) -> torch.Tensor:
    """``_unpack_bits(packed, 4, dim)``, written into one buffer (the hot path of most types)."""
    if dim < 0:
        dim += packed.dim() + 1
    out = torch.empty(
        (*packed.shape[:dim], 2, *packed.shape[dim:]), dtype=torch.uint8, device=packed.device
    )
    torch.bitwise_and(packed, 0x0F, out=out.select(dim, 0))
    torch.bitwise_right_shift(packed, 4, out=out.select(dim, 1))
    return out


def _times(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``float32(q) * scale``, computed in one freshly allocated float32 buffer."""
    out = q.to(torch.float32)
    out.mul_(scale)
    return out


# ---------------------------------------------------------------------------
# Plain float types: a "block" is one element.
# ---------------------------------------------------------------------------


def _dequant_f32(blocks: torch.Tensor) -> torch.Tensor:
    # Copy, so the result never aliases the (possibly read-only, memory-mapped) input.
    return blocks.reshape(-1).view(torch.float32).clone()


def _dequant_f16(blocks: torch.Tensor) -> torch.Tensor:
    return _widen_f16(blocks.reshape(-1).view(torch.int16))


def _dequant_bf16(blocks: torch.Tensor) -> torch.Tensor:
    # bfloat16 is the top half of a float32: shifting the bits is exact, NaNs included.
    return (blocks.reshape(-1).view(torch.int16).to(torch.int32) << 16).view(torch.float32)


# ---------------------------------------------------------------------------
# 32-element blocks (Q8_0, Q4_0, Q4_1, Q5_0, Q5_1).
# In the 4/5-bit types, byte j holds element j in its low nibble and element
# j + 16 in its high nibble.
# ---------------------------------------------------------------------------


def _unpack_q8_0(blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q8_0, 34 bytes: d (f16) | 32 x int8 quant.  Value = q * d."""
    d, qs = _split(blocks, 2, 32)
    return _f16(d), qs.view(torch.int8)


def _unpack_q4_0(blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_0, 18 bytes: d (f16) | 16 bytes of nibbles.  Value = d * (q - 8)."""
    d, qs = _split(blocks, 2, 16)
    q = _nibbles(qs, dim=1).view(-1, 32).view(torch.int8)  # values 0..15, so the view is safe
    return _f16(d), q - 8


def _unpack_q4_1(blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Q4_1, 20 bytes: d (f16) | m (f16) | 16 bytes of nibbles.  Value = d * q + m."""
    d, m, qs = _split(blocks, 2, 2, 16)
    return _f16(d), _f16(m), _nibbles(qs, dim=1).view(-1, 32)


def _q5_quants(qh: torch.Tensor, qs: torch.Tensor) -> torch.Tensor:
    """5-bit quants of Q5_0/Q5_1: low nibbles as in Q4_*, plus one high bit each.

    ``qh`` is a little-endian uint32 whose bit i is bit 4 of element i, i.e.
    byte i // 8, bit i % 8 -- so it unpacks byte by byte, independent of host order.
    """
    high = _unpack_bits(qh, 1, dim=2).view(-1, 32)  # (n, 4 bytes, 8 bits) -> element order
    q = _nibbles(qs, dim=1).view(-1, 32)
    q |= high << 4
    return q


def _unpack_q5_0(blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q5_0, 22 bytes: d (f16) | qh (4 bytes) | 16 bytes of nibbles.  Value = d * (q - 16)."""
    d, qh, qs = _split(blocks, 2, 4, 16)
    return _f16(d), _q5_quants(qh, qs).view(torch.int8) - 16


def _unpack_q5_1(blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Q5_1, 24 bytes: d (f16) | m (f16) | qh (4 bytes) | 16 bytes of nibbles.

    Value = d * q + m.
    """
    d, m, qh, qs = _split(blocks, 2, 2, 4, 16)
    return _f16(d), _f16(m), _q5_quants(qh, qs)


def _dequant_q8_0(blocks: torch.Tensor) -> torch.Tensor:
    d, q = _unpack_q8_0(blocks)
    return _times(q, d)


def _dequant_q4_0(blocks: torch.Tensor) -> torch.Tensor:
    d, q = _unpack_q4_0(blocks)
    return _times(q, d)


def _dequant_q4_1(blocks: torch.Tensor) -> torch.Tensor:
    d, m, q = _unpack_q4_1(blocks)
    return _times(q, d).add_(m)


def _dequant_q5_0(blocks: torch.Tensor) -> torch.Tensor:
    d, q = _unpack_q5_0(blocks)
    return _times(q, d)


def _dequant_q5_1(blocks: torch.Tensor) -> torch.Tensor:
    d, m, q = _unpack_q5_1(blocks)
    return _times(q, d).add_(m)


# ---------------------------------------------------------------------------
# K-quants: 256-element super-blocks (QK_K) split into 16 sub-blocks of 16 or
# 8 sub-blocks of 32, each with its own small integer scale (and min) that is
# multiplied by the super-block's float16 d (dmin) -- one rounding, kept as is.
# Quants are stored as bit planes: a run of R bytes holds 8 // bits groups of
# R consecutive elements, field j of byte l being element R * j + l (this is
# what _unpack_bits produces); each layout below says how long its runs are.
# ---------------------------------------------------------------------------

_K_SCALE_SIZE = 12  # bytes of packed 6-bit scales and mins in Q4_K / Q5_K


def _unpack_q2_k(blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Q2_K, 84 bytes: scales (16) | qs (64, 2-bit) | d (f16) | dmin (f16).

    Scale byte i: low nibble = scale, high nibble = min of 16-element sub-block i.
    Value = (d * scale) * q - (dmin * min).  Returns (n, 16, 1) scales and mins and
    (n, 16, 16) quants.
    """
    scales, qs, d, dmin = _split(blocks, QK_K // 16, QK_K // 4, 2, 2)
    sub_d = _f16(d) * (scales & 0x0F).to(torch.float32)
    sub_m = _f16(dmin) * (scales >> 4).to(torch.float32)
    q = _unpack_bits(qs.view(-1, 2, 32), 2, dim=2)  # (n, half, field, 32)
    return sub_d.unsqueeze(-1), sub_m.unsqueeze(-1), q.view(-1, QK_K // 16, 16)


def _q3_k_scales(packed: torch.Tensor) -> torch.Tensor:
    """The 16 signed 6-bit scales of Q3_K from their 12 packed bytes.

    Bytes 0..7 give the low 4 bits (scale i < 8: low nibble of byte i; i >= 8:
    high nibble of byte i - 8).  Bytes 8..11 give the high 2 bits (scale i: bits
    2 * (i // 4) of byte 8 + i % 4).  Stored with an offset of 32.
    """
    low, high = _split(packed, 8, 4)
    low = _unpack_bits(low, 4, dim=1).view(-1, 16)
    high = _unpack_bits(high, 2, dim=1).view(-1, 16)
    return (low | (high << 4)).view(torch.int8) - 32


def _unpack_q3_k(blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q3_K, 110 bytes: hmask (32) | qs (64, 2-bit) | scales (12) | d (f16).

    A quant is its 2 low bits from ``qs`` minus 4 unless its bit in ``hmask`` is
    set (hmask bit j of byte l belongs to element 32 * j + l).
    Value = (d * scale) * q.  Returns (n, 16, 1) scales and (n, 16, 16) quants.
    """
    hmask, qs, scales, d = _split(blocks, QK_K // 8, QK_K // 4, _K_SCALE_SIZE, 2)
    sub_d = _f16(d) * _q3_k_scales(scales).to(torch.float32)
    low = _unpack_bits(qs.view(-1, 2, 32), 2, dim=2).view(-1, QK_K // 16, 16)
    high = _unpack_bits(hmask, 1, dim=1).view(-1, QK_K // 16, 16)
    q = low.view(torch.int8) - ((high ^ 1) << 2).view(torch.int8)  # values -4..3
    return sub_d.unsqueeze(-1), q


def _k_scales_mins(packed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The 8 six-bit scales and 8 six-bit mins of Q4_K / Q5_K from 12 packed bytes.

    Rows of 4 bytes: row 0 holds scales 0..3 in bits 0..5 and the top 2 bits of
    scales 4..7 in bits 6..7; row 1 the same for mins; row 2 holds the low
    4 bits of scales 4..7 (low nibble) and of mins 4..7 (high nibble).
    """
    rows = packed.reshape(-1, 3, 4)
    sc_row, min_row, low_row = rows[:, 0], rows[:, 1], rows[:, 2]
    scales = torch.cat([sc_row & 0x3F, (low_row & 0x0F) | ((sc_row >> 2) & 0x30)], dim=1)
    mins = torch.cat([min_row & 0x3F, (low_row >> 4) | ((min_row >> 2) & 0x30)], dim=1)
    return scales, mins


def _k_sub_scales(
    d: torch.Tensor, dmin: torch.Tensor, packed: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(d * scale, dmin * min)`` per 32-element sub-block of Q4_K / Q5_K, as (n, 8, 1)."""
    scales, mins = _k_scales_mins(packed)
    sub_d = _f16(d) * scales.to(torch.float32)
    sub_m = _f16(dmin) * mins.to(torch.float32)
    return sub_d.unsqueeze(-1), sub_m.unsqueeze(-1)


def _unpack_q4_k(blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Q4_K, 144 bytes: d (f16) | dmin (f16) | scales (12) | qs (128 bytes of nibbles).

    Each 32 bytes of ``qs`` hold two sub-blocks: low nibbles, then high nibbles.
    Value = (d * scale) * q - (dmin * min).  Returns (n, 8, 1) scales and mins and
    (n, 8, 32) quants.
    """
    d, dmin, scales, qs = _split(blocks, 2, 2, _K_SCALE_SIZE, QK_K // 2)
    sub_d, sub_m = _k_sub_scales(d, dmin, scales)
    q = _nibbles(qs.view(-1, 4, 32), dim=2).view(-1, 8, 32)
    return sub_d, sub_m, q


def _unpack_q5_k(blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Q5_K, 176 bytes: d (f16) | dmin (f16) | scales (12) | qh (32) | qs (128 nibbles).

    Low 4 bits as in Q4_K; bit j of ``qh`` byte l is bit 4 of element 32 * j + l.
    Value = (d * scale) * q - (dmin * min).  Returns (n, 8, 1) scales and mins and
    (n, 8, 32) quants.
    """
    d, dmin, scales, qh, qs = _split(blocks, 2, 2, _K_SCALE_SIZE, QK_K // 8, QK_K // 2)
    sub_d, sub_m = _k_sub_scales(d, dmin, scales)
    q = _nibbles(qs.view(-1, 4, 32), dim=2).view(-1, 8, 32)
    q |= _unpack_bits(qh, 1, dim=1) << 4
    return sub_d, sub_m, q


def _unpack_q6_k(blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q6_K, 210 bytes: ql (128 nibbles) | qh (64, 2-bit) | scales (16 x int8) | d (f16).

    Per 128-element half: nibble k of ``ql`` byte l (l < 64) is the low 4 bits
    of element 64 * k + l; 2-bit field j of ``qh`` byte l (l < 32) is bits 4..5 of
    element 32 * j + l.  Stored with an offset of 32.
    Value = (d * scale) * q.  Returns (n, 16, 1) scales and (n, 16, 16) quants.
    """
    ql, qh, scales, d = _split(blocks, QK_K // 2, QK_K // 4, QK_K // 16, 2)
    sub_d = _f16(d) * scales.view(torch.int8).to(torch.float32)
    q = _nibbles(ql.view(-1, 2, 64), dim=2).view(-1, 8, 32)
    q |= _unpack_bits(qh.view(-1, 2, 32), 2, dim=2).view(-1, 8, 32) << 4
    q = q.view(torch.int8) - 32  # values 0..63 before the offset, so the view is safe
    return sub_d.unsqueeze(-1), q.view(-1, QK_K // 16, 16)


def _dequant_q2_k(blocks: torch.Tensor) -> torch.Tensor:
    sub_d, sub_m, q = _unpack_q2_k(blocks)
    return _times(q, sub_d).sub_(sub_m)


def _dequant_q3_k(blocks: torch.Tensor) -> torch.Tensor:
    sub_d, q = _unpack_q3_k(blocks)
    return _times(q, sub_d)


def _dequant_q4_k(blocks: torch.Tensor) -> torch.Tensor:
    sub_d, sub_m, q = _unpack_q4_k(blocks)
    return _times(q, sub_d).sub_(sub_m)


def _dequant_q5_k(blocks: torch.Tensor) -> torch.Tensor:
    sub_d, sub_m, q = _unpack_q5_k(blocks)
    return _times(q, sub_d).sub_(sub_m)


def _dequant_q6_k(blocks: torch.Tensor) -> torch.Tensor:
    sub_d, q = _unpack_q6_k(blocks)
    return _times(q, sub_d)


# ---------------------------------------------------------------------------
# Tables and the public API.
# ---------------------------------------------------------------------------

# Each function maps (n_blocks, type_size) uint8 blocks to their float32 values,
# in any shape whose row-major order is block after block.
_DEQUANTIZERS: dict[GGMLQuantizationType, Callable[[torch.Tensor], torch.Tensor]] = {
    _T.F32: _dequant_f32,
    _T.F16: _dequant_f16,
    _T.BF16: _dequant_bf16,
    _T.Q8_0: _dequant_q8_0,
    _T.Q4_0: _dequant_q4_0,
    _T.Q4_1: _dequant_q4_1,
    _T.Q5_0: _dequant_q5_0,
    _T.Q5_1: _dequant_q5_1,
    _T.Q2_K: _dequant_q2_k,
    _T.Q3_K: _dequant_q3_k,
    _T.Q4_K: _dequant_q4_k,
    _T.Q5_K: _dequant_q5_k,
    _T.Q6_K: _dequant_q6_k,
}

SUPPORTED_TYPES: frozenset[GGMLQuantizationType] = frozenset(_DEQUANTIZERS)
"""The GGUF tensor types :func:`dequantize` understands."""

BLOCK_LAYOUTS: dict[GGMLQuantizationType, BlockLayout] = {
    qtype: BlockLayout(*GGML_QUANT_SIZES[qtype]) for qtype in _DEQUANTIZERS
}
"""(elements, bytes) per block for each supported type, from ``GGML_QUANT_SIZES``."""


def _as_bytes(raw: torch.Tensor | np.ndarray) -> torch.Tensor:
    """The raw data as a flat uint8 tensor, without copying where possible.

    The layouts view 2- and 4-byte fields in place (float16 scales, F32 data),
    which torch only allows at offsets that are a multiple of the field size, so
    data that does not start 4-byte aligned is copied once.
    """
    if isinstance(raw, np.ndarray):
        if not raw.dtype.isnative:  # a typed big-endian array: its values, in GGUF's byte order
            raw = raw.astype(raw.dtype.newbyteorder("="))
        flat = np.ascontiguousarray(raw).reshape(-1).view(np.uint8)
        if flat.ctypes.data % 4:
            flat = flat.copy()
        with warnings.catch_warnings():
            # GGUFReader hands out read-only memory maps.  Nothing below writes
            # into the input (every step makes a new tensor), so sharing is safe
            # and saves a copy of the whole tensor.
            warnings.filterwarnings("ignore", message=".*not writable.*", category=UserWarning)
            return torch.from_numpy(flat)
    if isinstance(raw, torch.Tensor):
        data = raw.contiguous().reshape(-1).view(torch.uint8)
        return data.clone() if data.storage_offset() % 4 else data
    raise LlamalabError(
        f"raw GGUF tensor data must be a numpy array or a torch tensor, not {type(raw).__name__}"
    )


def dequantize(
    raw: torch.Tensor | np.ndarray, qtype: GGMLQuantizationType, shape: Sequence[int]
) -> torch.Tensor:
    """Decode a GGUF tensor's stored bytes into a float32 tensor of ``shape``.

    Args:
        raw: the tensor's data as stored in the file: uint8 bytes, or for F32 /
            F16 / BF16 possibly a typed array; only its bytes are used, in
            row-major order.  A numpy array (e.g. ``GGUFReader``'s memory map)
            or a torch tensor on any device.
        qtype: the GGUF tensor type.
        shape: the logical shape in PyTorch order, e.g. ``(out_features,
            in_features)``; GGUF lists dimensions the other way round.  The last
            dimension is the one that is split into blocks.

    Returns:
        A new float32 tensor of ``shape`` on ``raw``'s device, bit for bit equal
        to what ``gguf.quants.dequantize`` returns for the same bytes.

    Raises:
        LlamalabError: an unsupported type, a last dimension that is not a
            whole number of blocks, or a byte count that does not match ``shape``.
    """
    try:
        qtype = GGMLQuantizationType(qtype)  # also accepts the plain integer code
    except ValueError:
        raise LlamalabError(f"unknown GGUF tensor type {qtype!r}") from None
    if qtype not in _DEQUANTIZERS:
        supported = ", ".join(sorted(t.name for t in SUPPORTED_TYPES))
        raise LlamalabError(
            f"cannot dequantize GGUF tensor type {qtype.name}: not supported "
            f"(supported types: {supported})"
        )
    shape = tuple(int(dim) for dim in shape)
    if any(dim < 0 for dim in shape):
        raise LlamalabError(f"invalid tensor shape {shape}")
    block_size, type_size = BLOCK_LAYOUTS[qtype]
    row = shape[-1] if shape else 1
    if row % block_size:
        raise LlamalabError(
            f"{qtype.name} tensor of shape {shape}: the last dimension ({row}) is not a "
            f"multiple of the block size {block_size}"
        )
    n_blocks = int(np.prod(shape, dtype=np.int64)) // block_size
    data = _as_bytes(raw)
    if data.numel() != n_blocks * type_size:
        raise LlamalabError(
            f"{qtype.name} tensor of shape {shape} needs {n_blocks * type_size} bytes, "
            f"got {data.numel()}"
        )
    values = _DEQUANTIZERS[qtype](data.view(n_blocks, type_size))
    return values.reshape(shape)


class AffineGroups(NamedTuple):
    """A tensor as groups of ``group`` weights along its rows: ``value = q * scale + zero``.

    ``q`` is (rows, cols) uint8, unsigned (0..15 for 4-bit types, up to 255 for Q8_0);
    ``scale`` and ``zero`` are (rows, cols / group) float32.
    """

    q: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor
    group: int


def _affine_q4_0(blocks: torch.Tensor):
    d, qs = _split(blocks, 2, 16)
    scale = _f16(d)  # d * (q - 8)
    return _nibbles(qs, dim=1).view(-1, 32), scale, -8 * scale


def _affine_q4_1(blocks: torch.Tensor):
    d, m, q = _unpack_q4_1(blocks)  # d * q + m
    return q, d, m


def _affine_q5_0(blocks: torch.Tensor):
    d, qh, qs = _split(blocks, 2, 4, 16)
    scale = _f16(d)  # d * (q - 16)
    return _q5_quants(qh, qs), scale, -16 * scale


def _affine_q5_1(blocks: torch.Tensor):
    d, m, q = _unpack_q5_1(blocks)  # d * q + m
    return q, d, m


def _affine_q8_0(blocks: torch.Tensor):
    d, q = _unpack_q8_0(blocks)  # d * q = d * (q + 128) - 128 d
    return (q.to(torch.int16) + 128).to(torch.uint8), d, -128 * d


def _affine_k(unpack: Callable):
    def affine(blocks: torch.Tensor):
        sub_d, sub_m, q = unpack(blocks)  # sub_d * q - sub_m, per sub-block of 32
        return q.reshape(-1, 32), sub_d.reshape(-1, 1), -sub_m.reshape(-1, 1)

    return affine


def _affine_q6_k(blocks: torch.Tensor):
    sub_d, q = _unpack_q6_k(blocks)  # sub_d * (q + 32) - 32 sub_d, per sub-block of 16
    sub_d = sub_d.reshape(-1, 1)
    return (q.reshape(-1, 16).to(torch.int16) + 32).to(torch.uint8), sub_d, -32 * sub_d


_AFFINE: dict[GGMLQuantizationType, tuple[Callable, int]] = {
    _T.Q4_0: (_affine_q4_0, 32),
    _T.Q4_1: (_affine_q4_1, 32),
    _T.Q4_K: (_affine_k(_unpack_q4_k), 32),
    _T.Q5_0: (_affine_q5_0, 32),
    _T.Q5_1: (_affine_q5_1, 32),
    _T.Q5_K: (_affine_k(_unpack_q5_k), 32),
    _T.Q8_0: (_affine_q8_0, 32),
    _T.Q6_K: (_affine_q6_k, 16),
}

AFFINE_TYPES: frozenset[GGMLQuantizationType] = frozenset(_AFFINE)
"""The GGUF types that are exactly ``q * scale + zero`` per group (see :func:`affine_groups`)."""

INT4_GROUP_TYPES: frozenset[GGMLQuantizationType] = frozenset({_T.Q4_0, _T.Q4_1, _T.Q4_K})
"""The GGUF types that are exactly 4-bit groups of 32 with a scale and an offset."""


def affine_groups(
    raw: torch.Tensor | np.ndarray, qtype: GGMLQuantizationType, shape: Sequence[int]
) -> AffineGroups:
    """Unpack a 2-D tensor of an :data:`AFFINE_TYPES` type into :class:`AffineGroups`,
    without expanding it to float values. ``q * scale + zero`` computed in float64 equals
    :func:`dequantize` to float32 rounding (the offsets are recombined, not the quants).
    """
    qtype = GGMLQuantizationType(qtype)
    if qtype not in _AFFINE:
        raise LlamalabError(f"{qtype.name} is not a type of groups with a scale and an offset")
    rows, cols = (int(s) for s in shape)
    block_size, type_size = BLOCK_LAYOUTS[qtype]
    if cols % block_size:
        raise LlamalabError(
            f"{qtype.name} tensor of shape {tuple(shape)}: {cols} is not a multiple of {block_size}"
        )
    data = _as_bytes(raw)
    n_blocks = rows * cols // block_size
    if data.numel() != n_blocks * type_size:
        raise LlamalabError(
            f"{qtype.name} tensor of shape {tuple(shape)} needs {n_blocks * type_size} bytes, "
            f"got {data.numel()}"
        )
    unpack, group = _AFFINE[qtype]
    q, scale, zero = unpack(data.view(n_blocks, type_size))
    groups = cols // group
    return AffineGroups(
        q.reshape(rows, cols), scale.reshape(rows, groups), zero.reshape(rows, groups), group
    )


class Int4Groups(NamedTuple):
    """A 4-bit tensor as groups of 32: ``value = (q - 8) * scale + zero``.

    ``q`` is (rows, cols) uint8 in 0..15; ``scale`` and ``zero`` are (rows, cols / 32)
    float32. This is the form of torch's packed int4 matmul (``_weight_int4pack_mm*``).
    """

    q: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor


def int4_groups(
    raw: torch.Tensor | np.ndarray, qtype: GGMLQuantizationType, shape: Sequence[int]
) -> Int4Groups:
    """A 2-D Q4_0, Q4_1 or Q4_K tensor as :class:`Int4Groups`: its :func:`affine_groups`
    with the zero moved by 8 scales (exactly 0 for Q4_0)."""
    qtype = GGMLQuantizationType(qtype)
    if qtype not in INT4_GROUP_TYPES:
        raise LlamalabError(f"{qtype.name} is not a 4-bit type with groups of 32")
    groups = affine_groups(raw, qtype, shape)
    return Int4Groups(groups.q, groups.scale, groups.zero + 8 * groups.scale)


def quantize_q8_0(x: torch.Tensor) -> np.ndarray:
    """Quantize ``x`` to Q8_0 with ``gguf``'s own quantizer, for writing a GGUF file.

    Returns the uint8 bytes shaped ``(*x.shape[:-1], x.shape[-1] // 32 * 34)``,
    which ``GGUFWriter.add_tensor(..., raw_dtype=GGMLQuantizationType.Q8_0)``
    accepts as is.  ``x``'s last dimension must be a multiple of 32.
    """
    block_size = BLOCK_LAYOUTS[_T.Q8_0].block_size
    if x.dim() == 0 or x.shape[-1] % block_size:
        raise LlamalabError(
            f"cannot quantize a tensor of shape {tuple(x.shape)} to Q8_0: the last "
            f"dimension must be a multiple of {block_size}"
        )
    array = x.detach().to(device="cpu", dtype=torch.float32).contiguous().numpy()
    return _gguf_quantize(array, _T.Q8_0)
