"""The input gradient through a frozen packed layer (LoRA on a packed base): exact for
float32 and fp16 layers; in bfloat16, as fine as their forward, for vnni and int4 ones."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, quants

from llamalab.kernels.cpu import has_native_bf16
from llamalab.quant.linear import QuantizedLinear, int4_kernel_available, vnni_available


def _layer(kernel: str) -> QuantizedLinear:
    g = torch.Generator().manual_seed(0)
    w = torch.randn(128, 256, generator=g) * 0.05
    raw = quants.quantize(w.numpy().astype(np.float32), GGMLQuantizationType.Q4_0)
    return QuantizedLinear.from_gguf(raw, GGMLQuantizationType.Q4_0, (128, 256), kernel=kernel)


@pytest.mark.parametrize("kernel", ["float32", "vnni", "int4"])
def test_input_gradient_through_a_packed_layer(kernel):
    if (
        kernel == "vnni"
        and not vnni_available()
        or kernel == "int4"
        and not (int4_kernel_available())
    ):
        pytest.skip(f"no {kernel} kernel here")
    layer = _layer(kernel)
    weight = layer.dequantized_weight()  # what the forward kernel multiplies by
    x = torch.randn(3, 5, 256, requires_grad=True)
    grad_out = torch.randn(3, 5, 128)
    layer(x).backward(grad_out)
    want = grad_out @ weight  # torch's float32 product, the reference
    used = layer.dequantized_weight_for_grad()
    if kernel == "float32" or not has_native_bf16():
        assert used.dtype == torch.float32
        torch.testing.assert_close(x.grad, want, rtol=1e-5, atol=1e-6)
    else:
        # bfloat16 operands, float32 sums: a relative error of a few 2**-9.
        assert used.dtype == torch.bfloat16
        torch.testing.assert_close(used.float(), weight, rtol=2**-8, atol=0)
        assert float((x.grad - want).norm() / want.norm()) < 2**-7
