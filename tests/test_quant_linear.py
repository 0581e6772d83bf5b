"""QuantizedLinear: packed GGUF weights give F.linear's answer on the dequantized weights.

The fp16 kernel's only approximation is rounding each dequantized weight to float16
(round to nearest: at most 2**-11 of its magnitude) before float32 arithmetic, so
for every output element

    |y - F.linear(x, W)| <= 2**-11 * (|x| @ |W|.T) + float32 accumulation error,

which is the bound the layer tests check (with a small float32 allowance).  On top,
the packed weights must be *exactly* ``W`` rounded to float16.

The int4 kernel (4-bit GGUF types, on CPUs with AVX-512 BF16; from 64 rows a bfloat16
GEMM on the unpacked weight) rounds the activations,
each group's scale and zero, and the outputs to bfloat16 (unit roundoff u = 2**-8). The
bound checked is ``|y - F.linear(x, W)| <= 4 u (|x| @ (|W| + |q - 8| |s| + |z|).T) + u |y|``,
with room for the order of the kernel's internal roundings (measured: under 0.2 u of
the first term).
"""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from gguf.constants import GGMLQuantizationType as T

from llamalab.gguf.dequant import affine_groups, dequantize, int4_groups
from llamalab.kernels.native import vnni_available
from llamalab.quant.linear import (
    GGUFWeight,
    PackedEmbedding,
    QuantizedLinear,
    fp16_kernel_available,
    int4_kernel_available,
    quantizable_linears,
    quantize_model,
)

needs_fp16 = pytest.mark.skipif(
    not fp16_kernel_available(), reason="no fbgemm fp16 kernel in this torch build"
)
needs_int4 = pytest.mark.skipif(
    not int4_kernel_available(), reason="this CPU has no fast bfloat16 (AVX-512 BF16)"
)
needs_vnni = pytest.mark.skipif(
    not vnni_available(), reason="no AVX-512 VNNI or no C++ compiler for llamalab's kernel"
)


def _check_close(layer: QuantizedLinear, weight: torch.Tensor, x: torch.Tensor) -> None:
    """The output bound of the module docstring, for float32 ``weight`` and input ``x``."""
    y = layer(x)
    ref = F.linear(x, weight)
    assert y.shape == ref.shape and y.dtype == torch.float32
    magnitude = F.linear(x.abs(), weight.abs())
    rounding = 2.0**-11 if layer.kernel == "fp16" else 0.0
    # float32 accumulation over K terms, either order: a few K * 2**-24 of the magnitude.
    accumulation = 2.0**-24 * x.shape[-1] * magnitude
    excess = (y - ref).abs() - (rounding * magnitude + accumulation + 1e-30)
    assert float(excess.max()) <= 0.0, f"max excess over the bound {float(excess.max())}"


def _quantized(qtype: T, shape: tuple[int, int], seed: int) -> GGUFWeight:
    rng = np.random.default_rng(seed)
    w = (rng.standard_normal(shape) * 0.05).astype(np.float32)
    w[:, :32] += 0.3  # blocks with an offset, so Q4_1's minimum matters
    return GGUFWeight(gguf.quants.quantize(w, qtype), qtype, shape)


@needs_fp16
@pytest.mark.parametrize("qtype", [T.Q4_1, T.Q8_0])
@pytest.mark.parametrize("shape", [(192, 576), (96, 1536)])
def test_gguf_layer_matches_dequantized_linear(qtype: T, shape: tuple[int, int]) -> None:
    src = _quantized(qtype, shape, seed=shape[1])
    weight = dequantize(src.data, qtype, shape)
    layer = QuantizedLinear.from_gguf(*src, kernel="fp16")
    assert layer.kernel == "fp16" and layer.source_type == qtype.name
    assert torch.equal(layer.dequantized_weight(), weight.half().float())
    torch.manual_seed(0)
    for batch in [(1,), (7,), (2, 5)]:  # decode, prefill, and a leading batch dimension
        _check_close(layer, weight, torch.randn(*batch, shape[1]))


@needs_fp16
@pytest.mark.parametrize("gguf_name", ["blk.0.attn_q.weight", "blk.3.ffn_down.weight"])
def test_real_smollm2_tensor(smollm2_path, gguf_name: str) -> None:
    reader = gguf.GGUFReader(smollm2_path, "r")
    tensor = next(t for t in reader.tensors if t.name == gguf_name)
    shape = tuple(int(s) for s in reversed(tensor.shape))
    weight = dequantize(tensor.data, tensor.tensor_type, shape)
    layer = QuantizedLinear.from_gguf(tensor.data, tensor.tensor_type, shape, kernel="fp16")
    assert layer.source_type == "Q4_1"
    torch.manual_seed(1)
    for m in (1, 9):
        _check_close(layer, weight, torch.randn(m, shape[1]))


def _q4_k_bytes(shape: tuple[int, int], seed: int) -> GGUFWeight:
    """Random Q4_K blocks (gguf-py cannot quantize to it) with sane float16 d and dmin."""
    rng = np.random.default_rng(seed)
    n_blocks = shape[0] * shape[1] // 256
    raw = rng.integers(0, 256, (n_blocks, 144), dtype=np.uint8)
    for field in (0, 2):  # d, dmin
        raw[:, field : field + 2] = (
            (rng.random(n_blocks) * 0.002).astype(np.float16).view(np.uint8).reshape(-1, 2)
        )
    return GGUFWeight(raw, T.Q4_K, shape)


def _int4_source(qtype: T, shape: tuple[int, int], seed: int) -> GGUFWeight:
    return _q4_k_bytes(shape, seed) if qtype == T.Q4_K else _quantized(qtype, shape, seed)


@needs_int4
@pytest.mark.parametrize("qtype", [T.Q4_0, T.Q4_1, T.Q4_K])
@pytest.mark.parametrize("shape", [(192, 512), (4096 + 64, 256)])  # the second spans two bands
def test_int4_layer_within_bfloat16_bound(qtype: T, shape: tuple[int, int]) -> None:
    src = _int4_source(qtype, shape, seed=shape[0])
    layer = QuantizedLinear.from_gguf(*src, kernel="int4")
    assert layer.kernel == "int4" and layer.source_type == qtype.name
    weight = dequantize(src.data, qtype, shape)
    groups = int4_groups(src.data, qtype, shape)
    # Rounding room per weight: |q - 8| |s| + |z|, plus 8 |s| for the unpacked GEMM path's
    # offset z - 8 s.
    spread = ((groups.q.float() - 8).abs() + 8) * groups.scale.abs().repeat_interleave(32, 1)
    spread += groups.zero.abs().repeat_interleave(32, 1)
    u = 2.0**-8
    torch.manual_seed(0)
    # One row (decode), a few, a leading batch dimension, and enough rows for the path
    # that unpacks to bfloat16 for a GEMM (prefill).
    for batch in [(1,), (7,), (2, 5), (3, 40)]:
        x = torch.randn(*batch, shape[1])
        y, ref = layer(x), F.linear(x, weight)
        assert y.shape == ref.shape and y.dtype == torch.float32
        bound = 4 * u * F.linear(x.abs(), weight.abs() + spread) + u * ref.abs() + 1e-6
        excess = (y - ref).abs() - bound
        assert float(excess.max()) <= 0.0, f"max excess over the bound {float(excess.max())}"
        assert (
            float((y - ref).abs().max()) > 0.0 or qtype == T.Q4_0
        )  # the bound is not vacuous: bf16 shows


def test_int4_dispatch_names_exactly_the_types_dequant_can_group() -> None:
    from llamalab.gguf.dequant import INT4_GROUP_TYPES
    from llamalab.quant.plan import INT4_TYPES

    assert {t.name for t in INT4_GROUP_TYPES} == INT4_TYPES


@needs_int4
def test_int4_refuses_what_it_cannot_hold(monkeypatch) -> None:
    from llamalab.errors import LlamalabError

    monkeypatch.setattr("llamalab.quant.linear.vnni_available", lambda: False)

    # Q8_0 is not 4-bit: the default kernel is the next one down; forcing int4 is an error.
    src = _quantized(T.Q8_0, (64, 128), seed=5)
    assert QuantizedLinear.from_gguf(*src).kernel != "int4"
    with pytest.raises(LlamalabError, match="int4"):
        QuantizedLinear.from_gguf(*src, kernel="int4")
    # 40 output rows are not whole tiles of 16.
    odd = _quantized(T.Q4_0, (40, 128), seed=6)
    assert QuantizedLinear.from_gguf(*odd).kernel != "int4"


@pytest.mark.parametrize("qtype", [T.Q8_0, T.Q4_1, T.F16])
def test_packed_embedding_rows_equal_dequantized(qtype: T) -> None:
    shape = (300, 64)
    if qtype == T.F16:
        values = np.random.default_rng(7).standard_normal(shape).astype(np.float16)
        src = GGUFWeight(values.view(np.uint8), qtype, shape)
    else:
        src = _quantized(qtype, shape, seed=7)
    table = dequantize(src.data, qtype, shape)
    embedding = PackedEmbedding(src)
    tokens = torch.tensor([[0, 299, 5], [5, 17, 0]])
    assert torch.equal(embedding(tokens), table[tokens])
    with pytest.raises(IndexError):
        embedding(torch.tensor([[300]]))


def test_float32_kernel_is_f_linear() -> None:
    src = _quantized(T.Q4_1, (64, 128), seed=3)
    layer = QuantizedLinear.from_gguf(*src, kernel="float32")
    weight = dequantize(src.data, src.qtype, src.shape)
    x = torch.randn(3, 4, 128)
    assert layer.kernel == "float32"
    assert torch.equal(layer(x), F.linear(x, weight))


@needs_fp16
def test_from_float_and_dtype_handling() -> None:
    torch.manual_seed(2)
    weight = torch.randn(40, 64)
    layer = QuantizedLinear.from_float(weight)
    assert layer.kernel == "fp16"
    x = torch.randn(2, 64)
    _check_close(layer, weight.half().float(), x)
    # Other activation dtypes are computed in float32 and returned in their dtype.
    y = layer(x.to(torch.bfloat16))
    assert y.dtype == torch.bfloat16
    # A weight beyond float16's range keeps float32 rather than saturating.
    big = weight.clone()
    big[0, 0] = 1e6
    assert QuantizedLinear.from_float(big).kernel == "float32"


def test_bad_inputs() -> None:
    from llamalab.errors import LlamalabError

    src = _quantized(T.Q8_0, (8, 64), seed=4)
    with pytest.raises(LlamalabError):
        QuantizedLinear.from_gguf(src.data, src.qtype, (8, 32))  # wrong byte count
    with pytest.raises(LlamalabError):
        QuantizedLinear.from_gguf(src.data.reshape(-1)[:100], src.qtype, (8, 64))  # truncated


def _gguf_weights(path) -> dict[str, GGUFWeight]:
    from llamalab.checkpoint.names import from_format

    reader = gguf.GGUFReader(path, "r")
    out = {}
    for t in reader.tensors:
        name = from_format(t.name, "gguf")
        if name is not None:
            out[name] = GGUFWeight(t.data, t.tensor_type, tuple(int(s) for s in reversed(t.shape)))
    return out


# Logit bounds against the float32 model (logits reach |30..45|). Measured: fp16 max
# 0.033, RMS 0.006; int4 (bfloat16 activations and outputs) max 0.42, RMS 0.05.
# vnni (int8 activations per block of 16) measured with blocks of 32: max 1.40, RMS 0.28.
_MODEL_BOUNDS = {"fp16": (0.1, 0.02), "int4": (1.0, 0.15), "vnni": (2.0, 0.4)}


@pytest.mark.parametrize(
    "kernel",
    [
        pytest.param("fp16", marks=needs_fp16),
        pytest.param("int4", marks=needs_int4),
        pytest.param("vnni", marks=needs_vnni),
    ],
)
@torch.inference_mode()
def test_smollm2_quantized_model_matches_float32(
    smollm2_path, smollm2_reference, kernel, monkeypatch
) -> None:
    """Every linear packed from the file's bytes: logits stay close to the float32 model's
    and the greedy token is the same at the last position of every prompt."""
    import llamalab

    model = llamalab.load_model(smollm2_path)
    records = smollm2_reference["records"]
    prompts = [r["prompt_token_ids"] for r in records if len(r["prompt_token_ids"]) <= 64][:4]
    reference = [model(torch.tensor([ids]))[0] for ids in prompts]

    weights = _gguf_weights(smollm2_path)
    # The output layer is Q8_0 (the tied embedding): vnni takes it, int4 leaves it to fp16.
    kernels = {
        k: kernel if w.qtype == T.Q4_1 or kernel == "vnni" else "fp16" for k, w in weights.items()
    }
    if kernel == "int4":  # the default, where vnni is not available
        monkeypatch.setattr("llamalab.quant.linear.vnni_available", lambda: False)
    replaced = quantize_model(model, weights, kernel="fp16" if kernel == "fp16" else None)
    assert {model.get_submodule(name).kernel for name in replaced} == set(kernels.values())
    assert len(replaced) == 7 * model.config.n_layers + 1 and "output" in replaced
    assert quantizable_linears(model) == []  # nothing left as nn.Linear
    assert isinstance(model.tok_embeddings.weight, torch.nn.Parameter)  # lookup stays float32
    assert "output.weight" not in model.state_dict()

    worst = rms = 0.0
    for ids, ref in zip(prompts, reference, strict=True):
        got = model(torch.tensor([ids]))[0]
        worst = max(worst, float((got - ref).abs().max()))
        rms = max(rms, float((got - ref).pow(2).mean().sqrt()))
        assert int(got[-1].argmax()) == int(ref[-1].argmax())
        # Every position agrees where the float32 model's top two are 0.5 apart (a near
        # tie may flip).
        top2 = ref.topk(2, dim=-1).values
        clear = (top2[:, 0] - top2[:, 1]) >= 0.5
        assert torch.equal(got.argmax(-1)[clear], ref.argmax(-1)[clear])
    max_bound, rms_bound = _MODEL_BOUNDS[kernel]
    assert worst < max_bound and rms < rms_bound, (worst, rms)


# ---------------------------------------------------------------------------- vnni kernel


def _random_blocks(qtype: T, shape: tuple[int, int], seed: int) -> GGUFWeight:
    """Random K-quant blocks (gguf-py cannot quantize to them) with sane float16 scales."""
    rng = np.random.default_rng(seed)
    block_size, type_size = gguf.GGML_QUANT_SIZES[qtype]
    n_blocks = shape[0] * shape[1] // block_size
    raw = rng.integers(0, 256, (n_blocks, type_size), dtype=np.uint8)
    fields = {T.Q4_K: (0, 2), T.Q5_K: (0, 2), T.Q6_K: (type_size - 2,)}[qtype]
    for field in fields:
        raw[:, field : field + 2] = (
            (rng.random(n_blocks) * 0.002).astype(np.float16).view(np.uint8).reshape(-1, 2)
        )
    return GGUFWeight(raw, qtype, shape)


_AFFINE_CASES = [T.Q4_0, T.Q4_1, T.Q4_K, T.Q5_0, T.Q5_1, T.Q5_K, T.Q8_0, T.Q6_K]


def _affine_source(qtype: T, shape: tuple[int, int], seed: int) -> GGUFWeight:
    if qtype in (T.Q4_K, T.Q5_K, T.Q6_K):
        return _random_blocks(qtype, shape, seed)
    return _quantized(qtype, shape, seed)


@pytest.mark.parametrize("qtype", _AFFINE_CASES)
def test_affine_groups_recombine_to_the_dequantized_values(qtype: T) -> None:
    src = _affine_source(qtype, (32, 512), seed=3)
    groups = affine_groups(src.data, qtype, src.shape)
    rows, cols = src.shape
    values = groups.q.double().view(rows, -1, groups.group) * groups.scale.double()[..., None]
    values = (values + groups.zero.double()[..., None]).view(rows, cols)
    assert torch.equal(values.float(), dequantize(src.data, qtype, src.shape))


def test_vnni_dispatch_names_exactly_the_affine_types() -> None:
    from llamalab.gguf.dequant import AFFINE_TYPES
    from llamalab.quant.plan import VNNI_LAYOUTS

    assert {t.name for t in AFFINE_TYPES} == set(VNNI_LAYOUTS)
    for qtype in AFFINE_TYPES:
        src = _affine_source(qtype, (16, 256), seed=1)
        assert affine_groups(src.data, qtype, src.shape).group == VNNI_LAYOUTS[qtype.name][1]


@needs_vnni
@pytest.mark.parametrize("qtype", _AFFINE_CASES)
@pytest.mark.parametrize("shape", [(192, 512), (4096 + 64, 256)])  # the second spans two bands
def test_vnni_layer_within_its_activation_quantization_bound(qtype: T, shape) -> None:
    src = _affine_source(qtype, shape, seed=shape[0])
    layer = QuantizedLinear.from_gguf(*src)
    assert layer.kernel == "vnni" and layer.source_type == qtype.name
    # The weight it multiplies by: the GGUF values with scale and zero rounded to float16.
    groups = affine_groups(src.data, qtype, shape)
    g = groups.group
    scale = groups.scale.half().float().repeat_interleave(g, 1)
    zero = groups.zero.half().float().repeat_interleave(g, 1)
    weight = torch.addcmul(zero, groups.q.float(), scale)
    assert torch.equal(layer.dequantized_weight(), weight)
    spread = (groups.q.float() * scale).abs() + zero.abs()  # what the sums are made of
    torch.manual_seed(0)
    # One row, several, a leading dim, a prefill chunk (blocks of four rows and a tail).
    for batch in [(1,), (5,), (2, 3), (70,)]:
        x = torch.randn(*batch, shape[1])
        y, ref = layer(x), F.linear(x, weight)
        assert y.shape == ref.shape and y.dtype == torch.float32
        # Each activation is rounded to its block's (16) step d = max|x| / 127, so it moves by
        # at most d / 2; the float arithmetic adds a few ulps of the sums' magnitudes.
        step = x.abs().unflatten(-1, (-1, 16)).amax(-1, keepdim=True) / 127
        moved = (step / 2).expand(*step.shape[:-1], 16).flatten(-2)
        bound = F.linear(moved, weight.abs()) + 1e-5 * F.linear(x.abs(), spread) + 1e-6
        excess = (y - ref).abs() - bound
        assert float(excess.max()) <= 0.0, f"max excess over the bound {float(excess.max())}"
        assert float((y - ref).abs().max()) > 0.0  # int8 activations show: not vacuous


@needs_vnni
def test_vnni_fuses_and_refuses() -> None:
    from llamalab.errors import LlamalabError
    from llamalab.quant.linear import _concat

    parts = [QuantizedLinear.from_gguf(*_quantized(T.Q4_0, (n, 256), seed=n)) for n in (64, 32)]
    fused = _concat(parts)
    assert fused is not None and fused.kernel == "vnni"
    x = torch.randn(3, 256)
    assert torch.equal(fused(x), torch.cat([p(x) for p in parts], dim=-1))
    mixed = _concat([parts[0], QuantizedLinear.from_gguf(*_quantized(T.Q8_0, (32, 256), seed=2))])
    assert mixed is None  # 4-bit and 8-bit layouts do not join
    odd = _quantized(T.Q8_0, (40, 128), seed=6)  # 40 rows are not whole tiles of 16
    assert QuantizedLinear.from_gguf(*odd).kernel != "vnni"
    with pytest.raises(LlamalabError, match="vnni"):
        QuantizedLinear.from_gguf(*odd, kernel="vnni")
