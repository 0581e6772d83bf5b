"""The fused output-projection cross-entropy against torch's own F.cross_entropy."""

import pytest
import torch
import torch.nn.functional as F

from llamalab import loss as loss_module
from llamalab.loss import linear_cross_entropy


def _reference(h, w, t):
    return F.cross_entropy((h @ w.T).float().flatten(0, -2), t.flatten(), ignore_index=-100)


def _case(seed=0, vocab=1000):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(3, 100, 64, generator=g).requires_grad_()
    w = (torch.randn(vocab, 64, generator=g) * 0.1).requires_grad_()
    t = torch.randint(0, vocab, (3, 100), generator=g)
    t[0, :7] = -100
    t[2, -3:] = -100
    return h, w, t


@pytest.mark.parametrize("chunk_values", [1 << 21, 64 * 1000])  # one chunk; five chunks
def test_float32_loss_and_gradients_equal_cross_entropy(monkeypatch, chunk_values):
    monkeypatch.setattr(loss_module, "_CHUNK_VALUES", chunk_values)
    h, w, t = _case()
    ref = _reference(h, w, t)
    ref_h, ref_w = torch.autograd.grad(ref * 2.5, (h, w))
    out = linear_cross_entropy(h, w, t)
    out_h, out_w = torch.autograd.grad(out * 2.5, (h, w))
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(out_h, ref_h, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(out_w, ref_w, rtol=1e-5, atol=1e-7)


def test_bf16_autocast_matches_within_bf16_rounding():
    h, w, t = _case(1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = _reference(h, w, t)
        out = linear_cross_entropy(h, w, t)
    ref_h, ref_w = torch.autograd.grad(ref, (h, w))
    out_h, out_w = torch.autograd.grad(out, (h, w))
    assert out.dtype == torch.float32 and out_h.dtype == h.dtype and out_w.dtype == w.dtype
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)  # same bf16 logits, f32 softmax
    for got, want in ((out_h, ref_h), (out_w, ref_w)):  # gradients rounded to bf16 on each path
        assert (got - want).norm() / want.norm() < 2**-7


def test_without_grad_and_all_ignored():
    h, w, t = _case(2)
    with torch.no_grad():
        torch.testing.assert_close(linear_cross_entropy(h, w, t), _reference(h, w, t))
    ignored = torch.full_like(t, -100)
    assert torch.isnan(_reference(h, w, ignored)) and torch.isnan(
        linear_cross_entropy(h, w, ignored)
    )


def test_model_loss_uses_it_and_equals_the_logits_path():
    from llamalab.config import ModelConfig
    from llamalab.model import Transformer

    torch.manual_seed(0)
    cfg = ModelConfig(
        dim=64, n_layers=2, n_heads=4, vocab_size=500, ffn_hidden_dim=128, context_length=32
    )
    model = Transformer(cfg)
    tokens = torch.randint(0, 500, (2, 17))
    loss = model(tokens[:, :-1], targets=tokens[:, 1:])
    logits = model(tokens[:, :-1])
    torch.testing.assert_close(loss, F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten()))
    loss.backward()
    assert (
        model.output.weight.grad is not None
        and model.layers[0].attention.wq.weight.grad is not None
    )


def test_a_target_far_below_the_top_logit_keeps_a_finite_exact_loss():
    # The target's probability underflows float32 (a logit 150 below the top): the loss
    # still equals torch's, which works from the logits.
    h = torch.zeros(2, 4)
    h[:, 0] = 1.0
    w = torch.zeros(6, 4)
    w[0, 0] = 150.0
    t = torch.tensor([3, 0])
    loss = linear_cross_entropy(h.requires_grad_(), w.requires_grad_(), t)
    ref = _reference(h, w, t)
    assert torch.isfinite(loss) and ref.item() > 70
    torch.testing.assert_close(loss, ref)
