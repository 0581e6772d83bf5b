"""QuantizedLinear: packed GGUF weights give F.linear's answer on the dequantized weights.

The fp16 kernel's only approximation is rounding each dequantized weight to float16
(round to nearest: at most 2**-11 of its magnitude) before float32 arithmetic, so
for every output element

    |y - F.linear(x, W)| <= 2**-11 * (|x| @ |W|.T) + float32 accumulation error,

which is the bound the layer tests check (with a small float32 allowance).  On top,
the packed weights must be *exactly* ``W`` rounded to float16.
"""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from gguf.constants import GGMLQuantizationType as T

from llamalab.gguf.dequant import dequantize
from llamalab.quant.linear import (
    GGUFWeight,
    QuantizedLinear,
    fp16_kernel_available,
    quantizable_linears,
    quantize_model,
)

needs_fp16 = pytest.mark.skipif(
    not fp16_kernel_available(), reason="no fbgemm fp16 kernel in this torch build"
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
    layer = QuantizedLinear.from_gguf(*src)
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
    layer = QuantizedLinear.from_gguf(tensor.data, tensor.tensor_type, shape)
    assert layer.source_type == "Q4_1"
    torch.manual_seed(1)
    for m in (1, 9):
        _check_close(layer, weight, torch.randn(m, shape[1]))


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


@needs_fp16
@torch.inference_mode()
def test_smollm2_quantized_model_matches_float32(smollm2_path, smollm2_reference) -> None:
    """Every linear packed from the file's bytes: logits stay within 0.1 of the float32
    model's (they reach |30..45|; measured: max 0.033, RMS 0.006) and the greedy
    token is the same at the last position of every prompt."""
    import llamalab

    model = llamalab.load_model(smollm2_path)
    records = smollm2_reference["records"]
    prompts = [r["prompt_token_ids"] for r in records if len(r["prompt_token_ids"]) <= 64][:4]
    reference = [model(torch.tensor([ids]))[0] for ids in prompts]

    replaced = quantize_model(model, _gguf_weights(smollm2_path))
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
        # Nearly every position agrees too (a near-tie may flip).
        assert (got.argmax(-1) == ref.argmax(-1)).float().mean() >= 0.95
    assert worst < 0.1 and rms < 0.02, (worst, rms)
