"""``llamalab.gguf.dequant`` against the ``gguf`` package's numpy dequantizer.

Equality is checked on bit patterns, not values: a dequantized weight must be the
very float32 that ``gguf.quants.dequantize`` produces.  The only latitude is in
NaN payloads where two *different* NaNs meet in one operation (IEEE 754 leaves the
choice of result to the implementation, and numpy is not even consistent between
its SIMD and scalar loops), so arithmetic types compare NaNs as NaNs.
"""

from __future__ import annotations

from pathlib import Path

import gguf
import gguf.quants
import numpy as np
import pytest
import torch
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

from llamalab.errors import LlamalabError
from llamalab.gguf.dequant import (
    BLOCK_LAYOUTS,
    SUPPORTED_TYPES,
    dequantize,
    quantize_q8_0,
)

T = GGMLQuantizationType

ALL_TYPES = sorted(SUPPORTED_TYPES, key=lambda t: t.value)
FLOAT_TYPES = [T.F32, T.F16, T.BF16]
QUANT_TYPES = [t for t in ALL_TYPES if t not in FLOAT_TYPES]

# Byte offsets of the float16 scale fields (d, dmin / m) inside one block, from
# ggml's block structs.  Used to make random blocks meaningful: with finite
# scales, every dequantized value is finite, so no comparison hides behind NaN.
F16_FIELD_OFFSETS: dict[GGMLQuantizationType, tuple[int, ...]] = {
    T.Q8_0: (0,),
    T.Q4_0: (0,),
    T.Q4_1: (0, 2),
    T.Q5_0: (0,),
    T.Q5_1: (0, 2),
    T.Q2_K: (80, 82),
    T.Q3_K: (108,),
    T.Q4_K: (0, 2),
    T.Q5_K: (0, 2),
    T.Q6_K: (208,),
}

# (rows..., blocks per row): every shape has more than one row, one has three dims.
SHAPES_IN_BLOCKS = [(2, 1), (5, 3), (4, 3, 2), (33, 2)]


def _logical_shape(
    qtype: GGMLQuantizationType, shape_in_blocks: tuple[int, ...]
) -> tuple[int, ...]:
    block_size = GGML_QUANT_SIZES[qtype][0]
    return (*shape_in_blocks[:-1], shape_in_blocks[-1] * block_size)


def _byte_shape(qtype: GGMLQuantizationType, shape: tuple[int, ...]) -> tuple[int, ...]:
    block_size, type_size = GGML_QUANT_SIZES[qtype]
    return (*shape[:-1], shape[-1] // block_size * type_size)


def _reference(raw: np.ndarray, qtype: GGMLQuantizationType) -> np.ndarray:
    """``gguf``'s dequantization of ``raw`` (bytes shaped (*rows, bytes_per_row))."""
    with np.errstate(all="ignore"):  # random blocks may hold inf / NaN scales
        return gguf.quants.dequantize(raw, qtype)


def _gguf_can_quantize(qtype: GGMLQuantizationType) -> bool:
    block_size = GGML_QUANT_SIZES[qtype][0]
    try:
        gguf.quants.quantize(np.zeros((1, block_size), dtype=np.float32), qtype)
    except NotImplementedError:
        return False
    return True


def assert_bits_equal(ours: torch.Tensor, ref: np.ndarray, *, exact_nans: bool = False) -> None:
    """Assert ``ours`` is ``ref`` bit for bit; unless ``exact_nans``, any NaN matches any NaN."""
    assert ours.dtype == torch.float32
    assert ref.dtype == np.float32
    assert tuple(ours.shape) == ref.shape
    a = ours.detach().cpu().contiguous().numpy()
    b = np.ascontiguousarray(ref)
    same = a.view(np.uint32) == b.view(np.uint32)
    if not exact_nans:
        same |= np.isnan(a) & np.isnan(b)
    if not same.all():
        where = tuple(int(i[0]) for i in np.nonzero(~same))
        pytest.fail(
            f"{int((~same).sum())} of {same.size} elements differ; first at {where}: "
            f"ours {a[where]!r} (0x{int(a.view(np.uint32)[where]):08x}), "
            f"gguf {b[where]!r} (0x{int(b.view(np.uint32)[where]):08x})"
        )


def _random_blocks(
    qtype: GGMLQuantizationType, shape: tuple[int, ...], rng: np.random.Generator
) -> np.ndarray:
    """Random block bytes whose float16 scale fields hold random finite values."""
    n_blocks = int(np.prod(shape)) // GGML_QUANT_SIZES[qtype][0]
    type_size = GGML_QUANT_SIZES[qtype][1]
    blocks = rng.integers(0, 256, size=(n_blocks, type_size), dtype=np.uint8)
    for offset in F16_FIELD_OFFSETS[qtype]:
        # Random bit patterns with the exponent forced below all-ones: every
        # finite float16 (subnormals, zeros of both signs) can come up.
        bits = rng.integers(0, 1 << 16, size=n_blocks, dtype=np.uint16)
        bits = np.where((bits & 0x7C00) == 0x7C00, bits & ~np.uint16(0x4000), bits)
        blocks[:, offset : offset + 2] = bits.astype("<u2").view(np.uint8).reshape(n_blocks, 2)
    return blocks.reshape(_byte_shape(qtype, shape))


# --------------------------------------------------------------------------- layouts


def test_block_layouts_come_from_gguf() -> None:
    assert set(BLOCK_LAYOUTS) == SUPPORTED_TYPES
    for qtype, layout in BLOCK_LAYOUTS.items():
        assert (layout.block_size, layout.type_size) == GGML_QUANT_SIZES[qtype]
    assert isinstance(SUPPORTED_TYPES, frozenset)
    assert {t.name for t in SUPPORTED_TYPES} == {
        "F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1",
        "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K",
    }  # fmt: skip


# --------------------------------------------------------------------------- generated data


@pytest.mark.parametrize("shape_in_blocks", SHAPES_IN_BLOCKS, ids=str)
@pytest.mark.parametrize("qtype", ALL_TYPES, ids=lambda t: t.name)
def test_matches_gguf_on_generated_tensors(
    qtype: GGMLQuantizationType, shape_in_blocks: tuple[int, ...]
) -> None:
    shape = _logical_shape(qtype, shape_in_blocks)
    rng = np.random.default_rng([qtype.value, *shape])
    if _gguf_can_quantize(qtype):
        # Scaled and shifted so blocks have different scales, mins of both signs.
        per_row = shape[:-1] + (1,)
        data = rng.standard_normal(shape) * rng.uniform(0.01, 4.0, per_row)
        data = (data + rng.uniform(-1.0, 1.0, per_row)).astype(np.float32)
        raw = gguf.quants.quantize(data, qtype)
    else:  # K-quants: gguf only dequantizes them
        raw = _random_blocks(qtype, shape, rng)
    raw = np.ascontiguousarray(raw).view(np.uint8).reshape(_byte_shape(qtype, shape))

    ref = _reference(raw, qtype)
    assert np.isfinite(ref).all()  # otherwise the comparison below would prove less
    assert_bits_equal(dequantize(raw, qtype, shape), ref, exact_nans=True)


@pytest.mark.parametrize("qtype", QUANT_TYPES, ids=lambda t: t.name)
def test_matches_gguf_on_arbitrary_bytes(qtype: GGMLQuantizationType) -> None:
    """Fully random blocks: inf / NaN / subnormal scales and every quant bit pattern."""
    shape = _logical_shape(qtype, (64, 4))
    rng = np.random.default_rng(1000 + qtype.value)
    raw = rng.integers(0, 256, size=_byte_shape(qtype, shape), dtype=np.uint8)
    assert_bits_equal(dequantize(raw, qtype, shape), _reference(raw, qtype))


@pytest.mark.parametrize("qtype", [T.F16, T.BF16], ids=lambda t: t.name)
def test_16_bit_floats_every_bit_pattern(qtype: GGMLQuantizationType) -> None:
    """All 65536 patterns, NaN payloads and signalling NaNs included, bit for bit."""
    raw = np.arange(1 << 16, dtype=np.uint16).astype("<u2").view(np.uint8).reshape(256, 512)
    assert_bits_equal(dequantize(raw, qtype, (256, 256)), _reference(raw, qtype), exact_nans=True)


def test_f32_every_kind_of_pattern() -> None:
    rng = np.random.default_rng(32)
    bits = rng.integers(0, 1 << 32, size=(8, 96), dtype=np.uint32)
    bits[0, :8] = [0, 0x80000000, 1, 0x7F800000, 0xFF800000, 0x7F800001, 0xFFC00000, 0x7FFFFFFF]
    raw = bits.astype("<u4").view(np.uint8)
    out = dequantize(raw, T.F32, (8, 96))
    assert_bits_equal(out, _reference(raw, T.F32), exact_nans=True)


# --------------------------------------------------------------------------- input forms


def test_typed_float_inputs_numpy_and_torch() -> None:
    rng = np.random.default_rng(7)
    values = rng.standard_normal((3, 40)).astype(np.float32)

    # Typed numpy arrays, as GGUFReader returns them for float tensors.
    for array, qtype in [(values, T.F32), (values.astype(np.float16), T.F16)]:
        ref = _reference(array.view(np.uint8), qtype)
        assert_bits_equal(dequantize(array, qtype, (3, 40)), ref, exact_nans=True)
        assert_bits_equal(dequantize(torch.from_numpy(array), qtype, (3, 40)), ref, exact_nans=True)
    # A big-endian typed array means values, not bytes.
    assert_bits_equal(dequantize(values.astype(">f4"), T.F32, (3, 40)), values, exact_nans=True)
    # bfloat16 has no numpy dtype; a torch bfloat16 tensor must still work.
    bf16 = torch.from_numpy(values).to(torch.bfloat16)
    assert torch.equal(dequantize(bf16, T.BF16, (3, 40)), bf16.to(torch.float32))


def test_torch_uint8_input_and_no_aliasing() -> None:
    rng = np.random.default_rng(8)
    raw = gguf.quants.quantize(rng.standard_normal((4, 64)).astype(np.float32), T.Q8_0)
    ref = _reference(raw, T.Q8_0)
    as_tensor = torch.from_numpy(raw.copy())
    assert_bits_equal(dequantize(as_tensor, T.Q8_0, (4, 64)), ref, exact_nans=True)
    # Flat bytes, and bytes that start at an odd offset of a bigger tensor.
    assert_bits_equal(dequantize(as_tensor.reshape(-1), T.Q8_0, (4, 64)), ref, exact_nans=True)
    padded = torch.cat([torch.zeros(1, dtype=torch.uint8), as_tensor.reshape(-1)])
    assert_bits_equal(dequantize(padded[1:], T.Q8_0, (4, 64)), ref, exact_nans=True)

    # The result owns its memory: writing to it leaves the input alone.
    f32 = np.ones((2, 8), dtype=np.float32)
    out = dequantize(f32, T.F32, (2, 8))
    out.add_(1.0)
    assert (f32 == 1.0).all()


def test_zero_rows() -> None:
    out = dequantize(np.zeros(0, dtype=np.uint8), T.Q4_K, (0, 256))
    assert out.shape == (0, 256) and out.dtype == torch.float32


# --------------------------------------------------------------------------- quantize_q8_0


def test_quantize_q8_0_is_gguf_q8_0() -> None:
    x = torch.randn(6, 96, generator=torch.Generator().manual_seed(3))
    raw = quantize_q8_0(x)
    expected = gguf.quants.quantize(x.numpy(), T.Q8_0)
    assert raw.dtype == np.uint8 and raw.shape == (6, 96 // 32 * 34)
    assert np.array_equal(raw, expected)
    assert_bits_equal(dequantize(raw, T.Q8_0, (6, 96)), _reference(raw, T.Q8_0), exact_nans=True)
    # Round trip: within half a quantization step of the input, plus the error of
    # storing the step as float16 (relative 2**-11, times up to 127 steps).
    step = x.abs().reshape(6, 3, 32).amax(-1, keepdim=True) / 127
    error = (dequantize(raw, T.Q8_0, (6, 96)) - x).abs().reshape(6, 3, 32)
    assert bool((error <= step * (0.5 + 127 * 2**-11)).all())


def test_quantize_q8_0_rejects_partial_blocks() -> None:
    with pytest.raises(LlamalabError, match="multiple of 32"):
        quantize_q8_0(torch.zeros(2, 33))


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize("qtype", [T.IQ2_XXS, T.Q8_1, T.TQ1_0], ids=lambda t: t.name)
def test_unsupported_type_is_named(qtype: GGMLQuantizationType) -> None:
    block_size, type_size = GGML_QUANT_SIZES[qtype]
    with pytest.raises(LlamalabError, match=qtype.name):
        dequantize(np.zeros(type_size, dtype=np.uint8), qtype, (block_size,))


def test_unknown_type_code() -> None:
    with pytest.raises(LlamalabError, match="unknown GGUF tensor type"):
        dequantize(np.zeros(4, dtype=np.uint8), 12345, (1,))  # type: ignore[arg-type]


@pytest.mark.parametrize("qtype", [T.F32, T.Q4_0, T.Q6_K], ids=lambda t: t.name)
@pytest.mark.parametrize("delta", [-1, 1])
def test_wrong_byte_count(qtype: GGMLQuantizationType, delta: int) -> None:
    block_size, type_size = GGML_QUANT_SIZES[qtype]
    raw = np.zeros(3 * type_size + delta, dtype=np.uint8)
    with pytest.raises(LlamalabError, match="bytes"):
        dequantize(raw, qtype, (3, block_size))


def test_row_not_a_whole_number_of_blocks() -> None:
    with pytest.raises(LlamalabError, match="block size"):
        dequantize(np.zeros(2 * 18, dtype=np.uint8), T.Q4_0, (1, 48))


# --------------------------------------------------------------------------- a real model file


@pytest.fixture(scope="module")
def smollm2(smollm2_path: Path) -> gguf.GGUFReader:
    return gguf.GGUFReader(smollm2_path)


@pytest.mark.parametrize(
    "name",
    ["token_embd.weight", "blk.0.ffn_down.weight", "blk.29.attn_q.weight", "output_norm.weight"],
)
def test_matches_gguf_on_real_tensors(smollm2: gguf.GGUFReader, name: str) -> None:
    tensor = next(t for t in smollm2.tensors if t.name == name)
    # GGUF lists dimensions innermost first; PyTorch order is the reverse.
    shape = tuple(int(dim) for dim in reversed(tensor.shape.tolist()))
    ref = _reference(tensor.data, tensor.tensor_type)
    ours = dequantize(tensor.data, tensor.tensor_type, shape)
    assert ours.shape == shape
    assert_bits_equal(ours, ref.reshape(shape), exact_nans=True)


def test_real_file_has_the_types_we_test(smollm2: gguf.GGUFReader) -> None:
    types = {t.name: t.tensor_type for t in smollm2.tensors}
    assert types["token_embd.weight"] == T.Q8_0
    assert types["blk.0.ffn_down.weight"] == T.Q4_1
    assert types["output_norm.weight"] == T.F32
