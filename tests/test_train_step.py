"""One llamalab training step equals a hand-written step on transformers' LlamaForCausalLM.

Same weights, same batch: the reference computes the next-token loss from HF logits,
clips with torch's clip_grad_norm_ and updates with torch.optim.AdamW set up as the paper
says; llamalab runs `train_step` (two accumulated micro-batches) with `build_optimizer`.
Loss and every updated weight must agree. Weights are compared after converting the HF
model back through llamalab's loader (which undoes the HF q/k row permutation; AdamW is
elementwise, so the permutation commutes with the update).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import make_hf_model

import llamalab
from llamalab.train.config import TrainConfig
from llamalab.train.loop import train_step
from llamalab.train.optim import build_optimizer
from llamalab.train.schedule import lr_at

pytest.importorskip("transformers")


def _twin_models(folder, seed: int):
    """A random transformers model in training mode, and llamalab's load of its saved copy."""
    hf = make_hf_model("grouped-query", seed=seed).train()
    hf.save_pretrained(folder)
    ours = llamalab.load_model(folder, dtype="float32").train()
    for p in ours.parameters():
        p.requires_grad_(True)
    return hf, ours


def test_one_step_matches_transformers_and_torch_adamw(tmp_path):
    hf, ours = _twin_models(tmp_path / "before", seed=3)

    # eps 1e-6 rather than 1e-8: Adam's first update is g / (|g| + eps), which for the few
    # gradients near 1e-8 turns float rounding differences between the two models (1e-7
    # absolute) into visible weight differences; a larger eps keeps the comparison tight.
    cfg = TrainConfig(
        model="debug",
        data="-",
        out_dir="-",
        max_steps=10,
        lr=1e-2,
        warmup_steps=2,
        grad_clip=0.5,
        eps=1e-6,
    )
    lr = lr_at(3, peak=cfg.lr, warmup_steps=2, total_steps=10, min_ratio=cfg.min_lr_ratio)
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, hf.config.vocab_size, (4, 33), generator=gen)
    x, y = tokens[:, :-1], tokens[:, 1:]

    # The reference: plain torch on the transformers model.
    decay = [p for n, p in hf.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in hf.named_parameters() if p.ndim < 2]
    ref_opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
        lr=lr,
        betas=(0.9, 0.95),
        eps=1e-6,
    )
    logits = hf(input_ids=x).logits
    ref_loss = F.cross_entropy(logits.flatten(0, 1).float(), y.flatten())
    ref_loss.backward()
    ref_norm = torch.nn.utils.clip_grad_norm_(hf.parameters(), 0.5)
    ref_opt.step()
    assert ref_norm > 0.5  # clipping was active

    # llamalab: two micro-batches of two sequences.
    opt = build_optimizer(ours, cfg)
    micro = [(x[:2], y[:2]), (x[2:], y[2:])]
    loss, norm = train_step(ours, opt, iter(micro), accum=2, lr=lr, grad_clip=cfg.grad_clip)
    torch.testing.assert_close(loss, ref_loss.detach(), atol=1e-5, rtol=0)
    torch.testing.assert_close(norm, ref_norm, atol=1e-5, rtol=1e-5)

    hf.save_pretrained(tmp_path / "after")
    expected = llamalab.load_model(tmp_path / "after", dtype="float32").state_dict()
    got = ours.state_dict()
    assert expected.keys() == got.keys()
    moved = 0.0
    before = llamalab.load_model(tmp_path / "before", dtype="float32").state_dict()
    for name in expected:
        # Adam's first update is lr·g/(|g|+eps): where |g| is near eps, the two models'
        # float rounding (gradients agree to ~3e-7) moves it by up to ~0.5% of lr. Bound
        # the worst element by that and the typical one far tighter.
        diff = (got[name] - expected[name]).abs()
        assert diff.max() <= 5e-3 * lr, (name, diff.max().item())
        assert diff.mean() <= 1e-5 * lr, (name, diff.mean().item())
        moved = max(moved, (got[name] - before[name]).abs().max().item())
    assert moved > 1e-3  # the step really changed the weights


def test_twenty_losses_match_a_plain_transformers_loop(tmp_path):
    hf, ours = _twin_models(tmp_path / "start", seed=5)
    steps, peak, warmup = 20, 3e-3, 4
    cfg = TrainConfig(
        model="debug", data="-", out_dir="-", max_steps=steps, lr=peak,
        warmup_steps=warmup, grad_clip=1.0, eps=1e-6,
    )  # fmt: skip
    gen = torch.Generator().manual_seed(1)
    batches = [torch.randint(0, hf.config.vocab_size, (4, 33), generator=gen) for _ in range(steps)]

    def reference_lr(step: int) -> float:
        # Written out here, apart from llamalab's schedule (steps count from 0): linear
        # warm-up over `warmup` steps, then a cosine from the peak to a tenth of it.
        if step < warmup:
            return peak * (step + 1) / warmup
        progress = (step - warmup) / (steps - warmup)
        return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))

    decay = [p for p in hf.parameters() if p.ndim >= 2]
    rest = [p for p in hf.parameters() if p.ndim < 2]
    ref_opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}],
        lr=peak, betas=(0.9, 0.95), eps=1e-6,
    )  # fmt: skip
    opt = build_optimizer(ours, cfg)
    theirs, mine = [], []
    for step, tokens in enumerate(batches):
        x, y = tokens[:, :-1], tokens[:, 1:]
        for group in ref_opt.param_groups:
            group["lr"] = reference_lr(step)
        loss = F.cross_entropy(hf(input_ids=x).logits.flatten(0, 1), y.flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(hf.parameters(), 1.0)
        ref_opt.step()
        ref_opt.zero_grad(set_to_none=True)
        theirs.append(loss.item())

        lr = lr_at(step, peak=peak, warmup_steps=warmup, total_steps=steps, min_ratio=0.1)
        assert lr == pytest.approx(reference_lr(step), rel=1e-12)
        micro = [(x[:2], y[:2]), (x[2:], y[2:])]
        got, _ = train_step(ours, opt, iter(micro), accum=2, lr=lr, grad_clip=1.0)
        mine.append(got.item())
    assert theirs[-1] < theirs[0] - 0.1  # it learned something
    assert max(abs(a - b) for a, b in zip(theirs, mine, strict=True)) <= 1e-4
