"""Packed fine-tuning rows: how items are packed, and that an item packed beside others
gives the loss and gradients it gives alone (attention kept inside each document)."""

from __future__ import annotations

import math
import random

import pytest
import torch
import torch.nn.functional as F
from test_finetune import make_tiny_chat_model, write_items

from llamalab.data.instruct import (
    IGNORE,
    Example,
    load_instruct,
    pack_examples,
    to_packed_rows,
    trained_tokens,
)
from llamalab.errors import LlamalabError


def example(n_tokens: int, line: int, seed: int = 0, vocab: int = 400) -> Example:
    """An item of ``n_tokens`` random tokens whose second half is trained."""
    r = random.Random(seed * 7919 + line)
    tokens = [r.randrange(1, vocab) for _ in range(n_tokens)]
    trained = [i >= n_tokens // 2 for i in range(n_tokens)]
    return Example(tokens, trained, line)


def test_best_fit_decreasing_fills_rows_a_hand_count_gives():
    # Positions (tokens - 1) of 64, 54, 40, 34, 30, 24 and 10 into rows of 64: by hand,
    # 64 alone; 54 + 10; 40 + 24; 34 + 30. Four rows, the fewest 256 positions can take.
    sizes = [41, 25, 31, 35, 65, 11, 55]
    items = [example(n, i) for i, n in enumerate(sizes)]
    rows = pack_examples(items, 64)
    assert len(rows) == 4 == math.ceil(sum(n - 1 for n in sizes) / 64)
    assert sorted(sorted(sizes[i] - 1 for i in row) for row in rows) == [
        [10, 54],
        [24, 40],
        [30, 34],
        [64],
    ]
    assert sorted(i for row in rows for i in row) == list(range(len(items)))
    # Every item once, no row over seq_len, for many random lengths; and the same
    # answer every time (a resume and every rank must see the same rows).
    r = random.Random(3)
    many = [example(r.randint(2, 129), i) for i in range(500)]
    rows = pack_examples(many, 128)
    assert sorted(i for row in rows for i in row) == list(range(500))
    assert all(sum(len(many[i]) - 1 for i in row) <= 128 for row in rows)
    assert rows == pack_examples(many, 128)
    total = sum(len(e) - 1 for e in many)
    assert len(rows) <= math.ceil(total / 128) * 1.05 + 1  # dense: within 5% of the bound
    with pytest.raises(LlamalabError, match="does not fit a row of seq_len 64"):
        pack_examples([example(66, 9)], 64)


def test_packed_rows_carry_each_item_and_its_targets():
    items = [example(5, 1), example(4, 2)]
    x, y, documents = to_packed_rows([items], 10, pad_id=0)
    a, b = items
    assert x[0].tolist() == a.tokens[:-1] + b.tokens[:-1] + [0, 0, 0]
    # Targets: the next token of the same item where trained, never across the seam.
    expected = [IGNORE, a.tokens[2], a.tokens[3], a.tokens[4]]
    expected += [IGNORE, b.tokens[2], b.tokens[3]] + [IGNORE] * 3
    assert y[0].tolist() == expected
    assert documents[0].tolist() == [0, 0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert trained_tokens(items) == int((y != IGNORE).sum()) == 5


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory, smollm2_tokenizer):
    import llamalab

    folder = make_tiny_chat_model(tmp_path_factory.mktemp("packing") / "tiny", smollm2_tokenizer)
    return folder, llamalab.load_model(folder, dtype=torch.float32)


def per_token_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(
        logits.flatten(0, 1).double(), targets.flatten(), ignore_index=IGNORE, reduction="none"
    ).view(targets.shape)


def test_a_packed_row_gives_each_item_its_loss_alone(tiny_model, smollm2_tokenizer, tmp_path):
    from llamalab.train.documents import DocumentMasked

    _, model = tiny_model
    data = load_instruct(write_items(tmp_path / "items.jsonl", n=12), smollm2_tokenizer, 96)
    items = data.examples
    rows = pack_examples(items, 96)
    assert len(rows) < len(items)  # several items share a row
    groups = [[items[i] for i in row] for row in rows]
    x, y, documents = to_packed_rows(groups, 96)
    masked = DocumentMasked(model)
    try:
        with torch.no_grad():
            packed_logits = masked(torch.stack((x, documents), dim=1))
            plain_logits = model(x)  # the same rows with causal attention over the whole row
            packed_mean = masked(torch.stack((x, documents), dim=1), targets=y)
    finally:
        masked.remove()
    packed = per_token_loss(packed_logits, y)
    plain = per_token_loss(plain_logits, y)
    worst_gap = 0.0
    seen = 0
    for r, group in enumerate(groups):
        for d, item in enumerate(group):
            at = documents[r] == d
            alone_x = torch.tensor([item.tokens[:-1]])
            alone_y = torch.tensor([item.tokens[1:]])
            alone_y[0, ~torch.tensor(item.trained[1:])] = IGNORE
            with torch.no_grad():
                alone = per_token_loss(model(alone_x), alone_y)[0]
            got = packed[r, at]
            keep = alone_y[0] != IGNORE
            assert torch.equal(y[r, at] != IGNORE, keep)
            # float32 forward: every trained token's loss, and the item's mean, as alone
            assert (got[keep] - alone[keep]).abs().max() < 1e-5
            assert abs(got[keep].mean() - alone[keep].mean()) < 1e-5
            if d:  # an item after another in its row attends to it without the mask
                worst_gap = max(worst_gap, float((plain[r, at][keep] - alone[keep]).abs().max()))
            seen += 1
    assert seen == len(items)
    assert worst_gap > 1e-2
    # The wrapper's loss is the mean over the packed targets, as the model's own.
    trained = y != IGNORE
    assert abs(float(packed_mean) - float(packed[trained].mean())) < 1e-5
    # The hooks are gone: the model runs as before.
    with torch.no_grad():
        torch.testing.assert_close(model(x), plain_logits, rtol=0, atol=0)


def test_a_packed_row_gives_each_item_its_gradients_alone_on_a_packed_lora_base(
    tiny_model, smollm2_tokenizer, tmp_path
):
    """Through a packed Q8_0 base with LoRA, the adapters' gradients of two items packed
    together equal the sum of each item's alone."""
    import llamalab
    from llamalab.checkpoint.convert import convert
    from llamalab.train.documents import DocumentMasked
    from llamalab.train.lora import apply_lora, lora_adapters

    folder, _ = tiny_model
    gguf = convert(folder, tmp_path / "tiny.gguf", to="gguf", dtype="q8_0")
    model = llamalab.load_model(gguf, dtype=torch.float32, packed=True)
    apply_lora(model, 4, 8, 0.0, targets=["wq", "wv", "w2"], seed=0)
    params = [p for a in lora_adapters(model).values() for p in a.parameters()]
    with torch.no_grad():  # B non-zero, so A has a gradient too
        for p in params:
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * 0.05)
    data = load_instruct(write_items(tmp_path / "items.jsonl", n=2), smollm2_tokenizer, 96)
    a, b = data.examples

    def grads(loss: torch.Tensor) -> list[torch.Tensor]:
        return list(torch.autograd.grad(loss, params))

    masked = DocumentMasked(model)
    try:
        x, y, documents = to_packed_rows([[a, b]], 96)
        n = int((y != IGNORE).sum())
        together = grads(masked(torch.stack((x, documents), dim=1), targets=y) * n)
    finally:
        masked.remove()
    apart = None
    for item in (a, b):
        x, y, _ = to_packed_rows([[item]], len(item) - 1)
        g = grads(model(x, targets=y) * int((y != IGNORE).sum()))
        apart = g if apart is None else [s + t for s, t in zip(apart, g, strict=True)]
    for g1, g2 in zip(together, apart, strict=True):
        torch.testing.assert_close(g1, g2, atol=1e-5, rtol=1e-4)
