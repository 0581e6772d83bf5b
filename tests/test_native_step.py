"""The whole decode step in one native call (``kernels/decode_path.py``'s ``NativeStep``).

It runs the same maths as the model's blocks on the same vnni matrices; only the order of
float rounding differs, and with int8 activations a last-bit difference can move an
activation to the next int8 step. So against the blocks it is held to the float32
model: its KL from float32 must be as small as the blocks' own. Rows of a batch are
computed independently of each other, so a batch equals single steps bit for bit.

Every test runs on each instruction-set build this CPU runs (``LLAMALAB_ISA``'s choices).
"""

import pytest
import torch
import torch.nn.functional as F

from llamalab import load_model
from llamalab.kernels.cpu import ISAS, isa_runs
from llamalab.kv_cache import cache_view


@pytest.fixture(scope="module")
def loaded(smollm2_path):
    from llamalab.kernels.native import vnni_available

    if not vnni_available():
        pytest.skip("no kernel build runs here, or no C++ compiler for llamalab's kernels")
    model = load_model(smollm2_path, packed=True)
    assert model.decode_path.native_step is not None, "every block of SmolLM2 is on the vnni kernel"
    return model


@pytest.fixture(scope="module", params=[isa for isa in ISAS if isa_runs(isa)])
def packed(loaded, request):
    """The model with its step on each build that runs here: the packed weights are the
    same bytes for all of them, so one load serves every build."""
    from llamalab.kernels.decode_path import NativeStep

    path = loaded.decode_path
    step = path.native_step
    path.native_step = NativeStep.for_model(loaded, isa=request.param)
    assert path.native_step is not None
    yield loaded
    path.native_step = step


@pytest.fixture(scope="module")
def ids(smollm2_tokenizer) -> list[int]:
    text = (
        "The llama is a domesticated South American camelid, widely used as a meat and "
        "pack animal by Andean cultures since the pre-Columbian era. Llamas are social "
        "animals and live with others as a herd. Their wool is soft and contains only a "
        "small amount of lanolin. Llamas can learn simple tasks after a few repetitions. "
    ) * 3
    return smollm2_tokenizer.encode(text, add_bos=False)[:160]


def _teacher_forced(model, ids: list[int], prompt: int) -> torch.Tensor:
    """Logits of positions prompt.. of ids, each fed alone through the KV cache."""
    model.setup_cache(1, 256)
    rows = []
    with torch.inference_mode():
        model(torch.tensor([ids[:prompt]]), cache_view(torch.arange(prompt), last_only=True))
        for pos in range(prompt, len(ids)):
            view = cache_view(torch.tensor([pos]))
            rows.append(model(torch.tensor([[ids[pos]]]), cache=view)[0, -1].float())
    model.clear_cache()
    return torch.stack(rows)


def _kl(log_p: torch.Tensor, log_q: torch.Tensor) -> float:
    """Mean KL(p || q) over rows."""
    return float((log_p.exp() * (log_p - log_q)).sum(-1).mean())


def test_native_step_is_as_close_to_float32_as_the_blocks(packed, smollm2_path, ids) -> None:
    prompt = 100
    with torch.inference_mode():
        exact = load_model(smollm2_path)(torch.tensor([ids]))[0, prompt:].float().log_softmax(-1)
    native = _teacher_forced(packed, ids, prompt).log_softmax(-1)
    path = packed.decode_path
    step, path.native_step = path.native_step, None
    try:
        blocks = _teacher_forced(packed, ids, prompt).log_softmax(-1)
    finally:
        path.native_step = step
    kl_native, kl_blocks = _kl(exact, native), _kl(exact, blocks)
    # Measured: 1.8e-3 for both over 150 positions of README text. A wrong rotation,
    # cache slot or norm gives KL above 1.
    assert kl_native < 1.25 * kl_blocks + 1e-4, (kl_native, kl_blocks)
    assert kl_native < 1e-2, kl_native
    top2 = exact.topk(2, dim=-1).values
    clear = (top2[:, 0] - top2[:, 1]) >= 1.0
    assert torch.equal(native.argmax(-1)[clear], exact.argmax(-1)[clear])


@pytest.mark.parametrize("rows", [3, 6])
def test_batched_rows_equal_single_steps(packed, ids, rows) -> None:
    """Rows at different positions, cache rows 1.., in one step: each as if alone."""
    lengths = [40 + 7 * r for r in range(rows)]
    packed.setup_cache(rows + 1, 128)
    try:
        with torch.inference_mode():
            for r, n in enumerate(lengths):
                view = cache_view(torch.arange(n), row=r + 1, last_only=True)
                packed(torch.tensor([ids[:n]]), view)
            pos = torch.tensor([[n] for n in lengths])
            tokens = torch.tensor([[ids[n]] for n in lengths])
            batch = packed(tokens, cache_view(pos, row=1))[:, -1]
            singles = []
            for r, n in enumerate(lengths):
                # The batch wrote each row's slot n; writing it again changes nothing.
                view = cache_view(torch.tensor([[n]]), row=r + 1)
                singles.append(packed(tokens[r : r + 1], view)[0, -1])
    finally:
        packed.clear_cache()
    assert torch.equal(batch, torch.stack(singles))


def test_bad_calls_are_refused(packed) -> None:
    step = packed.decode_path.native_step
    packed.setup_cache(1, 16)
    try:
        h = torch.zeros(1, packed.config.dim)
        with pytest.raises(RuntimeError, match="outside the cache"):
            step(h, torch.tensor([0]), torch.tensor([16]))
        with pytest.raises(RuntimeError, match="cache row 1 does not exist"):
            step(h, torch.tensor([1]), torch.tensor([3]))
        layout, step._layout = step._layout, step._layout[:-1]
        try:
            with pytest.raises(RuntimeError, match="layout"):
                step(h, torch.tensor([0]), torch.tensor([3]))
        finally:
            step._layout = layout
    finally:
        packed.clear_cache()


def test_models_off_the_vnni_kernel_get_no_native_step(smollm2_path) -> None:
    from conftest import without_vnni

    with without_vnni():
        model = load_model(smollm2_path, packed=True)
    path = model.decode_path.describe()  # the blocks, on torch's kernels and attention
    assert (path["step"], path["attention"], path["isa"]) == ("blocks", "torch", "torch")
    assert load_model(smollm2_path).decode_path is None
    # The blocks still decode: one step runs.
    model.setup_cache(1, 8)
    with torch.inference_mode():
        logits = model(torch.tensor([[1]]), cache_view(torch.tensor([0])))
    assert torch.isfinite(F.log_softmax(logits, -1)).all()


def test_a_prompt_chunk_equals_its_tokens_one_at_a_time(packed, ids) -> None:
    """The tokens of one chunk write their keys and values before any attends, and each
    sees only the slots up to its own position: the chunk is exactly causal."""
    n = 40  # under NativeStep.MAX_TOKENS: one native call
    packed.setup_cache(2, 64)
    try:
        with torch.inference_mode():
            chunk = packed(torch.tensor([ids[:n]]), cache_view(torch.arange(n), row=0))[0]
            singles = torch.stack(
                [
                    packed(torch.tensor([[ids[p]]]), cache_view(torch.tensor([p]), row=1))[0, -1]
                    for p in range(n)
                ]
            )
        caches = [layer.attention.kv_cache for layer in packed.layers]
        assert torch.equal(chunk, singles)
        for c in caches:
            assert torch.equal(c.k[0, :, :n], c.k[1, :, :n])
            assert torch.equal(c.v[0, :, :n], c.v[1, :, :n])
    finally:
        packed.clear_cache()


def test_a_packed_pass_equals_its_views_apart(packed, ids) -> None:
    """Decode rows beside a prompt chunk (the engine's packed pass) in one native call."""
    from llamalab.kv_cache import Segments

    lengths = (30, 37)

    def prefill(row: int, n: int) -> None:
        packed(torch.tensor([ids[:n]]), cache_view(torch.arange(n), row=row, last_only=True))

    packed.setup_cache(3, 96)
    try:
        with torch.inference_mode():
            for r, n in enumerate(lengths):
                prefill(r, n)
            decode = cache_view(torch.tensor([[n] for n in lengths]), row=0)
            chunk = cache_view(torch.arange(10, 20).unsqueeze(0), row=2, last_only=True)
            prefill(2, 10)
            tokens = torch.tensor([[ids[30], ids[37], *ids[10:20]]])
            together = packed(tokens, cache=Segments((decode, chunk), ((2, 1), (1, 10))))
            apart = [
                packed(torch.tensor([[ids[30]], [ids[37]]]), decode),
                packed(torch.tensor([ids[10:20]]), chunk),
            ]
    finally:
        packed.clear_cache()
    for a, b in zip(together, apart, strict=True):
        assert torch.equal(a, b)
