"""llamalab's decode attention kernel (kernels/csrc/kernels.cpp) against torch's SDPA."""

import pytest
import torch
import torch.nn.functional as F

from llamalab.kernels.native import vnni_available

pytestmark = pytest.mark.skipif(
    not vnni_available(), reason="no AVX-512 VNNI or no C++ compiler for llamalab's kernels"
)


@pytest.mark.parametrize("heads", [(4, 4), (9, 3), (32, 8), (16, 2)])  # groups of 1, 3, 4, 8
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("length", [1, 17, 600])
def test_decode_attention_equals_sdpa(heads, head_dim, length) -> None:
    n_heads, n_kv = heads
    torch.manual_seed(length)
    q = torch.randn(2, n_heads, 1, head_dim) * 2
    # Slices of a longer cache, as the KV cache hands them over (rows strided by its size).
    k = (torch.randn(2, n_kv, 1024, head_dim) * 2)[:, :, :length]
    v = torch.randn(2, n_kv, 1024, head_dim)[:, :, :length]
    out = torch.ops.llamalab.decode_attention(q, k, v)
    ref = F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
    # Sums of up to 600 terms in another order than torch's: a few float32 ulps of |v|.
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_decode_attention_refuses_what_it_cannot_take() -> None:
    q = torch.randn(1, 4, 1, 32)
    k = torch.randn(1, 2, 10, 32)
    with pytest.raises(RuntimeError, match="head_dim"):
        torch.ops.llamalab.decode_attention(q, k, k)
    with pytest.raises(RuntimeError, match="shapes"):
        torch.ops.llamalab.decode_attention(torch.randn(1, 4, 2, 64), k, k)
