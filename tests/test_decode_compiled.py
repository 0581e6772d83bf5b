"""The compiled decode step (``kernels/decode_path.py``'s ``DecodePath.compile``) against
the eager one.

Both run the same packed SmolLM2 model; only the block's code differs (inductor fuses the
norms, rotations and casts around the same matmul kernels), so they agree to rounding.
With torch's int4 kernel (bfloat16 activations) that rounding stays small. llamalab's
VNNI kernel rounds activations to int8 per block of 16, and a last-bit difference
upstream can move an activation to the next int8 step: the two paths are then two draws
of that quantization noise (max logit difference about 2, as each is from float32), so
they are held to a looser bound, and replies to their first tokens.
"""

import contextlib
import shutil

import pytest
import torch
from conftest import without_vnni

from llamalab.generation import GREEDY, Engine, Request
from llamalab.kv_cache import cache_view
from llamalab.runtime import load_runtime

pytestmark = pytest.mark.skipif(shutil.which("g++") is None, reason="inductor needs a C++ compiler")


@pytest.fixture(scope="module", params=["int4", "vnni"])
def runtime(request, smollm2_path):
    from llamalab.kernels.native import vnni_available

    if request.param == "vnni" and not vnni_available():
        pytest.skip("no AVX-512 VNNI or no C++ compiler for llamalab's kernels")
    with without_vnni() if request.param == "int4" else contextlib.nullcontext():
        model, tokenizer = load_runtime(str(smollm2_path), "auto", progress=False, compile=False)
    # The compiled block on the vnni kernel serves models the whole native step does not
    # take (tests/test_native_step.py holds that one): here it is switched off.
    model.decode_path.native_step = None
    return model, tokenizer, request.param


def _teacher_forced(model, ids: list[int]) -> torch.Tensor:
    """Logits of every position, fed one token at a time through the KV cache."""
    model.setup_cache(1, 128)
    rows = []
    with torch.inference_mode():
        for pos, token in enumerate(ids):
            view = cache_view(torch.tensor([pos]), kv_len=pos + 1)
            rows.append(model(torch.tensor([[token]]), cache=view)[0, -1].float())
    model.clear_cache()
    return torch.stack(rows)


def test_compiled_steps_match_eager(runtime) -> None:
    model, tokenizer, kernel = runtime
    ids = tokenizer.encode(
        "The llama is a domesticated South American camelid. It lives", add_bos=False
    )
    eager = _teacher_forced(model, ids)
    model.decode_path.compile()
    try:
        compiled = _teacher_forced(model, ids)
        assert model.decode_path.compiles, "compiling failed: the steps ran eagerly"
    finally:
        model.decode_path.compiled_block = None
    log_p, log_q = eager.log_softmax(-1), compiled.log_softmax(-1)
    kl = float((log_p.exp() * (log_p - log_q)).sum(-1).max())
    # Measured: ~1e-4 with the int4 kernel, ~1e-9 with fp16, 0.014 with vnni.
    assert kl < (1e-3 if kernel == "int4" else 0.05), kl
    top2 = eager.topk(2, dim=-1).values
    clear = (top2[:, 0] - top2[:, 1]) >= (0.5 if kernel == "int4" else 3.0)
    assert torch.equal(compiled.argmax(-1)[clear], eager.argmax(-1)[clear])


def test_compiled_engine_batches_and_single(runtime) -> None:
    """One row runs compiled, rows of different lengths eagerly: the replies are the same."""
    model, tokenizer, kernel = runtime
    prompts = [
        tokenizer.encode(t, add_bos=False) for t in ("Once upon a time", "The capital of France is")
    ]
    requests = lambda: [
        Request(p, max_tokens=12, sampling=GREEDY, ignore_eos=True) for p in prompts
    ]

    def run() -> list[list[int]]:
        engine = Engine(model, tokenizer, max_batch=2, max_seq_len=128)
        single = [e.token_id for e in engine.generate(requests()[0])]
        seqs = [engine.submit(r)[0] for r in requests()]
        while not all(s.finished for s in seqs):
            engine.step()
        return [single, *[list(s.ids) for s in seqs]]

    eager = run()
    model.decode_path.compile()
    try:
        Engine(model, tokenizer, max_batch=2, max_seq_len=128).warm_up()  # what serve does
        compiled = run()
        assert model.decode_path.compiles
    finally:
        model.decode_path.compiled_block = None
    # Greedy replies agree token for token except after a near tie; 12 tokens of these
    # prompts have none with the int4 kernel (measured), so they must be equal. With vnni
    # the compiled reply is another draw of the int8 rounding (see the top), and so is a
    # batch that reuses its prompt's cached keys and values.
    if kernel == "int4":
        assert compiled == eager
    else:
        assert [r[:4] for r in compiled] == [r[:4] for r in eager]


def test_compile_failure_falls_back_to_eager(runtime, monkeypatch) -> None:
    model, tokenizer, _ = runtime
    ids = tokenizer.encode("Hello there", add_bos=False)
    eager = _teacher_forced(model, ids)

    def broken(*args, **kwargs):
        raise torch._dynamo.exc.TorchRuntimeError("no compiler here")

    model.decode_path.compiled_block = broken
    with pytest.warns(UserWarning, match="compiling the decode step failed"):
        fallback = _teacher_forced(model, ids)
    assert not model.decode_path.compiles
    assert torch.equal(fallback, eager)
