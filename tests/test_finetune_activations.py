"""``activations``: what backward's saved activations are kept in.

bfloat16 halves their memory and leaves the forward pass alone; the gradients then see
bfloat16's rounding of the saved inputs, and nothing more (the reference is the same run
keeping them in float32, whose gradients tests/test_lora.py holds to PEFT's)."""

from __future__ import annotations

import pytest
import torch
from test_finetune import LORA, losses, run_here

from llamalab.train import finetune as ft


def _grads(x: torch.Tensor, w: torch.Tensor, hooks) -> tuple[torch.Tensor, list]:
    """Gradients of a small network in which one tensor is saved by three products."""
    w = w.clone().requires_grad_(True)
    x = x.clone().requires_grad_(True)
    saved = []
    with hooks:
        h = torch.nn.functional.silu(x @ w)  # silu saves its input; @ saves x and w
        y = (h * h).sum() + (h @ w.T).sum() + (h.exp() * 1e-3).sum()
        if isinstance(hooks, ft.BFloat16Activations):
            saved = [copy.dtype for _, (copy,) in hooks._copies.values()]
    y.backward()
    return torch.cat([x.grad.flatten(), w.grad.flatten()]), saved


def test_saved_activations_in_bfloat16_give_the_gradients_within_its_rounding() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(512, 256, generator=g)
    w = torch.randn(256, 256, generator=g) / 16
    exact, _ = _grads(x, w, torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t))
    compact, saved = _grads(x, w, ft.BFloat16Activations())
    # x @ w, silu(x @ w) and h: each converted once although h is saved three times;
    # the weight (a leaf that trains) and anything small stay float32.
    assert saved == [torch.bfloat16] * len(saved) and 2 <= len(saved) <= 4
    error = (compact - exact).norm() / exact.norm()
    assert 1e-5 < error < 1e-2  # bfloat16 keeps 8 bits: a relative error of about 2^-9


def test_a_tensor_saved_in_bfloat16_already_comes_back_as_it_was(monkeypatch) -> None:
    """Under bfloat16 autocast (``precision = "bf16"``) products save bfloat16 inputs:
    backward gets them back in bfloat16, as without the hooks, not widened to float32."""
    monkeypatch.setattr(ft, "COMPACT_MIN_NUMEL", 1)
    g = torch.Generator().manual_seed(0)
    x0, w0 = torch.randn(64, 64, generator=g), torch.randn(64, 64, generator=g) / 8

    def grads(hooks):
        x, w = x0.clone().requires_grad_(True), w0.clone().requires_grad_(True)
        with torch.autocast("cpu", dtype=torch.bfloat16), hooks:
            y = (torch.relu(x @ w) @ w).float().square().sum()
        y.backward()
        return torch.cat([x.grad.flatten(), w.grad.flatten()])

    plain = grads(torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t))
    torch.testing.assert_close(grads(ft.BFloat16Activations()), plain)


def test_adapter_gradients_on_a_packed_base_stay_within_bfloat16(tiny_gguf, monkeypatch):
    """One forward and backward of the packed model with LoRA on every target: the loss is
    the same bits, the adapters' gradients within bfloat16's rounding of float32's."""
    from llamalab import load_model
    from llamalab.train.lora import apply_lora, lora_adapters

    _, gguf_file, _ = tiny_gguf
    monkeypatch.setattr(ft, "COMPACT_MIN_NUMEL", 1)  # the tiny model's tensors count too
    model = load_model(gguf_file, dtype=torch.float32, packed=True)
    apply_lora(model, 4, 8, 0.0, targets=["wq", "wk", "wv", "wo", "w1", "w2", "w3"], seed=0)
    adapters = lora_adapters(model)
    with torch.no_grad():  # B starts at zero: perturb it so that every gradient flows
        for a in adapters.values():
            a.lora_B.normal_(0, 0.02, generator=torch.Generator().manual_seed(1))
    model.train()
    ids = torch.randint(0, model.config.vocab_size, (4, 48), generator=torch.Generator())

    def grads(hooks):
        model.zero_grad(set_to_none=True)
        with hooks:
            loss = model(ids[:, :-1], targets=ids[:, 1:])
        loss.backward()
        flat = [p.grad.flatten() for a in adapters.values() for p in (a.lora_A, a.lora_B)]
        return float(loss), torch.cat(flat)

    exact_loss, exact = grads(torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t))
    compact_loss, compact = grads(ft.BFloat16Activations())
    assert compact_loss == exact_loss
    error = (compact - exact).norm() / exact.norm()
    assert 1e-5 < error < 2e-2


def test_a_run_with_bfloat16_activations_learns_as_one_with_float32(tiny_gguf, tmp_path):
    _, gguf_file, data = tiny_gguf
    more = ["max_steps=3", "eval_every=0", "lr=5e-3", 'targets=["wq","w1","w2"]']
    runs = {}
    for kept in ("float32", "bfloat16"):
        out = tmp_path / kept
        run_here(LORA, gguf_file, data, out, *more, f"activations={kept}")
        runs[kept] = losses(out)
    assert runs["bfloat16"][0] == runs["float32"][0]  # the first forward pass is the same
    torch.testing.assert_close(runs["bfloat16"], runs["float32"], atol=0, rtol=1e-2)


@pytest.mark.parametrize(("setting", "packed", "bf16", "expected"), [
    ("auto", True, True, True), ("auto", True, False, False), ("auto", False, True, False),
    ("bfloat16", False, False, True), ("float32", True, True, False),
])  # fmt: skip
def test_auto_keeps_bfloat16_on_a_packed_base_with_bfloat16_arithmetic(
    monkeypatch, setting, packed, bf16, expected
):
    from llamalab.kernels import cpu

    monkeypatch.setattr(cpu, "has_native_bf16", lambda flags=None: bf16)

    class Config:
        activations = setting

    assert ft._compact_activations(Config(), packed) is expected
