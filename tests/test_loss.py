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


# -- the model's loss: trained positions only, any output head ---------------------------


class _Counting(torch.nn.Module):
    """A head (a LoRA-wrapped one, say) that records how many rows it multiplies."""

    def __init__(self, weight):
        super().__init__()
        self.weight = torch.nn.Parameter(weight.detach().clone())
        self.rows = []

    def forward(self, x):
        self.rows.append(x.flatten(0, -2).shape[0])
        return x @ self.weight.T


def test_output_loss_skips_untrained_positions_for_any_head():
    from llamalab.loss import output_cross_entropy

    h, w, t = _case(3)
    head = _Counting(w)
    ref = F.cross_entropy(head(h).flatten(0, 1), t.flatten(), ignore_index=-100)
    ref_h, ref_w = torch.autograd.grad(ref * 1.5, (h, head.weight))
    head.rows.clear()
    out = output_cross_entropy(h, head, t)
    out_h, out_w = torch.autograd.grad(out * 1.5, (h, head.weight))
    assert head.rows == [int((t != -100).sum())]  # 290 of 300: the head never sees the rest
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(out_h, ref_h, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(out_w, ref_w, rtol=1e-5, atol=1e-7)
    with torch.no_grad():
        assert torch.isnan(output_cross_entropy(h, head, torch.full_like(t, -100)))


@pytest.mark.parametrize("kernel", ["float32", "fp16", "vnni"])
def test_output_loss_on_a_packed_head_never_runs_it_on_every_position(monkeypatch, kernel):
    """A packed head (a GGUF base's output layer) gives torch's loss and hidden-state
    gradient of its own weight, without producing logits for every position: its forward
    is never called."""
    from llamalab.loss import output_cross_entropy
    from llamalab.quant.linear import QuantizedLinear, fp16_kernel_available, vnni_available

    available = {"float32": True, "fp16": fp16_kernel_available(), "vnni": vnni_available()}
    if not available[kernel]:
        pytest.skip(f"no {kernel} kernel here")
    h, w, t = _case(4, vocab=1024)
    if kernel == "vnni":
        import numpy as np
        from gguf import GGMLQuantizationType, quants

        raw = quants.quantize(w.detach().numpy().astype(np.float32), GGMLQuantizationType.Q8_0)
        head = QuantizedLinear.from_gguf(raw, GGMLQuantizationType.Q8_0, (1024, 64), kernel="vnni")
    else:
        head = QuantizedLinear.from_float(w, kernel=kernel)
    weight = head.dequantized_weight()
    ref = _reference(h, weight, t)
    (ref_h,) = torch.autograd.grad(ref, (h,))

    def refuse(self, x):
        raise AssertionError("the packed head ran on every position")

    monkeypatch.setattr(QuantizedLinear, "forward", refuse)
    out = output_cross_entropy(h, head, t)
    (out_h,) = torch.autograd.grad(out, (h,))
    # vnni: the weight in bfloat16 (where the CPU has it), as that layer's backward uses it.
    exact = head.dequantized_weight_for_grad().dtype == torch.float32
    tol = 1e-5 if exact else 2**-7
    torch.testing.assert_close(out, ref, rtol=tol, atol=tol)
    assert (out_h - ref_h).norm() / ref_h.norm() < (1e-5 if exact else 2**-7)


def test_model_loss_runs_its_head_on_trained_positions_only():
    """The model's loss (a packed or LoRA-wrapped head included) multiplies the hidden
    states of trained positions alone by the vocabulary-sized head."""
    from llamalab.config import ModelConfig
    from llamalab.model import Transformer

    torch.manual_seed(1)
    cfg = ModelConfig(
        dim=64, n_layers=2, n_heads=4, vocab_size=500, ffn_hidden_dim=128, context_length=32
    )
    model = Transformer(cfg)
    tokens = torch.randint(0, 500, (2, 17))
    targets = tokens[:, 1:].clone()
    targets[:, :10] = -100  # a prompt: 12 of 32 positions trained
    with torch.no_grad():
        logits = model(tokens[:, :-1])
    ref = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-100)
    model.output = _Counting(model.output.weight)
    loss = model(tokens[:, :-1], targets=targets)
    assert model.output.rows == [12]
    torch.testing.assert_close(loss, ref)
    loss.backward()
    assert model.output.weight.grad is not None
