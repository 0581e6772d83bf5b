"""The engine on a tiny random model: chunked prefill, failure isolation, vocabulary, RoPE.

A random float32 model and a byte-level tokenizer keep these tests fast; what they check
(token-for-token equality, which rows fail) does not depend on the weights being trained.
"""

from __future__ import annotations

import pytest
import torch

from llamalab.config import ModelConfig
from llamalab.errors import LlamalabError
from llamalab.generation import GREEDY, Engine, Generation, GenerationEvent, Request, SamplingParams
from llamalab.kv_cache import cache_view
from llamalab.model import Transformer, rope_cache
from llamalab.tokenizer.base import SpecialTokens, Tokenizer

N_CONTROL = 2  # <s> and </s>, before the 256 byte tokens


class ByteTokenizer(Tokenizer):
    """Ids 0 and 1 are BOS and EOS; id b + 2 is the byte b."""

    kind = "bytes"

    def __init__(self) -> None:
        super().__init__(
            source="test-bytes",
            pieces=["<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)],
            token_bytes=[b"", b""] + [bytes([b]) for b in range(256)],
            control_ids=[0, 1],
            special_tokens=SpecialTokens(),
            bos_id=0,
            eos_id=1,
            add_bos=True,
            add_eos=False,
        )

    def _encode_text(self, text: str) -> list[int]:
        return [b + N_CONTROL for b in text.encode()]


TOKENIZER = ByteTokenizer()


def tiny_model(
    vocab_size: int = TOKENIZER.vocab_size, context_length: int = 512, seed: int = 0
) -> Transformer:
    config = ModelConfig(
        dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=vocab_size, ffn_hidden_dim=160,
        context_length=context_length,
    )  # fmt: skip
    torch.manual_seed(seed)
    model = Transformer(config)
    model.reset_parameters(std=0.2)  # large enough weights for varied logits
    return model.eval()


@pytest.fixture(scope="module")
def model() -> Transformer:
    return tiny_model()


def prompt(n: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(N_CONTROL, TOKENIZER.vocab_size, (n,), generator=g).tolist()


def greedy(prompt_ids: list[int], n: int) -> Request:
    return Request(prompt_ids, max_tokens=n, sampling=GREEDY, ignore_eos=True)


def solo_ids(model: Transformer, request: Request) -> list[int]:
    """What the request generates alone, prefilled at once, in a fresh engine."""
    engine = Engine(model, TOKENIZER, max_batch=1, max_seq_len=256)
    return [e.token_id for e in engine.generate(request)]


def run_until_done(
    engine: Engine, seqs: list[Generation]
) -> dict[Generation, list[GenerationEvent]]:
    events: dict[Generation, list[GenerationEvent]] = {s: [] for s in seqs}
    for _ in range(1000):
        if all(s.finished for s in seqs):
            return events
        for seq, event in engine.step():
            events.setdefault(seq, []).append(event)
    raise AssertionError("the sequences did not finish")


def test_chunked_prefill_equals_submit_and_keeps_decoders_going(model):
    long, short = greedy(prompt(100, 1), 10), greedy(prompt(5, 2), 40)
    expected_long, expected_short = solo_ids(model, long), solo_ids(model, short)
    engine = Engine(
        model, TOKENIZER, max_batch=2, max_seq_len=256, prefill_chunk=8, prefill_share=None
    )
    decoding = engine.add(short)
    while decoding.prefilling:
        engine.step()
    late = engine.add(long)
    assert late.prefilling and engine.free_rows == 0  # added returns at once, row reserved
    steps_prefilling = 0
    while late.prefilling:
        events = engine.step()
        steps_prefilling += 1
        # The decoding sequence gets a token in every step while the long prompt prefills.
        assert decoding in [seq for seq, _ in events]
    assert steps_prefilling == 100 // 8 + 1  # 8 tokens per step while another decodes
    assert late.ids and late.timing.prefill_tokens == 100
    run_until_done(engine, [decoding, late])
    assert late.ids == expected_long
    assert decoding.ids == expected_short
    assert engine.free_rows == 2


def test_add_prefills_in_step_when_nothing_else_runs(model):
    request = greedy(prompt(40, 3), 6)
    engine = Engine(model, TOKENIZER, max_batch=1, max_seq_len=256, prefill_chunk=4)
    seq = engine.add(request)
    first = engine.step()  # nobody decodes: the whole prompt goes in one chunk
    assert [(s, e.token_id) for s, e in first] == [(seq, seq.ids[0])]
    run_until_done(engine, [seq])
    assert seq.ids == solo_ids(model, request)


def test_add_reuses_a_rows_cached_prefix(model):
    first = greedy(prompt(30, 4), 8)
    engine = Engine(
        model, TOKENIZER, max_batch=2, max_seq_len=256, prefill_chunk=8, prefill_share=None
    )
    turn1 = engine.add(first)
    run_until_done(engine, [turn1])
    follow = greedy([*first.prompt_ids, *turn1.ids, *prompt(12, 5)], 8)
    turn2 = engine.add(follow)
    assert turn2.row == turn1.row
    run_until_done(engine, [turn2])
    # Only what the row's cache lacked was computed: the last reply token and the new text.
    assert turn2.timing.prefill_tokens == 1 + 12
    assert turn2.ids == solo_ids(model, follow)


@pytest.mark.parametrize(
    ("request_", "match"),
    [
        (Request([], max_tokens=4), "empty"),
        (Request([5] * 300, max_tokens=4), "context"),
        (Request([5, 6], max_tokens=0), "max_tokens"),
        (Request([5, 258], max_tokens=4), "not a token id"),
        (Request([-1, 5], max_tokens=4), "not a token id"),
    ],
)
def test_add_validates_at_once(model, request_, match):
    engine = Engine(model, TOKENIZER, max_batch=2, max_seq_len=256)
    with pytest.raises(LlamalabError, match=match):
        engine.add(request_)
    assert engine.free_rows == 2


def nan_sampling() -> SamplingParams:
    """Settings that make the distribution NaN; validation would refuse them, so the
    test forges them the way a bug elsewhere might."""
    params = SamplingParams(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, seed=0)
    object.__setattr__(params, "temperature", float("nan"))
    return params


def test_a_nan_request_fails_alone(model):
    good = [greedy(prompt(9, 6), 12), greedy(prompt(17, 7), 12)]
    expected = [solo_ids(model, r) for r in good]
    bad = Request(prompt(13, 8), max_tokens=12, sampling=nan_sampling())
    engine = Engine(model, TOKENIZER, max_batch=3, max_seq_len=256)
    seqs = [engine.add(good[0]), engine.add(bad), engine.add(good[1])]
    events = run_until_done(engine, seqs)
    failed = seqs[1]
    assert failed.finish_reason == "error" and failed.ids == []
    (last,) = events[failed]
    assert last.finish_reason == "error" and last.token_id is None
    assert "sampling failed" in last.error and "Traceback" not in last.error
    assert [seqs[0].ids, seqs[2].ids] == expected
    assert engine.free_rows == 3


def test_a_failure_while_detokenizing_ends_that_row_only(model):
    requests = [greedy(prompt(9, 9), 10), greedy(prompt(11, 10), 10), greedy(prompt(7, 11), 10)]
    expected = [solo_ids(model, r) for r in requests]
    engine = Engine(model, TOKENIZER, max_batch=3, max_seq_len=256)
    seqs = [engine.submit(r)[0] for r in requests]
    feed = seqs[1]._decoder.feed
    calls = []

    def broken_feed(token_id: int) -> str:
        calls.append(token_id)
        if len(calls) == 4:
            raise RuntimeError("decoder state corrupted")
        return feed(token_id)

    seqs[1]._decoder.feed = broken_feed
    events = run_until_done(engine, seqs)
    assert seqs[1].finish_reason == "error"
    assert [e.finish_reason for e in events[seqs[1]]] == [None, None, None, "error"]
    assert events[seqs[1]][-1].error == "internal error during sampling: decoder state corrupted"
    assert [seqs[0].ids, seqs[2].ids] == [expected[0], expected[2]]


def test_a_failing_forward_pass_fails_its_batch_and_the_engine_recovers(model, monkeypatch):
    requests = [greedy(prompt(9, 12), 6), greedy(prompt(10, 13), 6)]
    engine = Engine(model, TOKENIZER, max_batch=2, max_seq_len=256)
    seqs = [engine.submit(r)[0] for r in requests]
    forward = type(model).forward

    def failing(self, tokens, cache=None, *, targets=None):
        raise RuntimeError("device lost")

    monkeypatch.setattr(type(model), "forward", failing)
    events = engine.step()
    monkeypatch.setattr(type(model), "forward", forward)
    assert [(s, e.finish_reason) for s, e in events] == [(seqs[0], "error"), (seqs[1], "error")]
    assert all(e.error == "internal error during decode: device lost" for _, e in events)
    assert engine.free_rows == 2
    # Usable afterwards, and a row's cached prefix is still sound.
    assert [e.token_id for e in engine.generate(requests[0])] == solo_ids(model, requests[0])


def test_a_failing_prefill_chunk_fails_only_its_sequence(model, monkeypatch):
    decoding_request = greedy(prompt(6, 14), 20)
    expected = solo_ids(model, decoding_request)
    engine = Engine(
        model, TOKENIZER, max_batch=2, max_seq_len=256, prefill_chunk=8, prefill_share=None
    )
    decoding, _ = engine.submit(decoding_request)
    forward = type(model).forward

    def failing_prefill(self, tokens, cache=None, *, targets=None):
        if tokens.shape[1] > 1:
            raise RuntimeError("out of memory")
        return forward(self, tokens, cache, targets=targets)

    monkeypatch.setattr(type(model), "forward", failing_prefill)
    doomed = engine.add(greedy(prompt(50, 15), 5))
    events = engine.step()
    monkeypatch.setattr(type(model), "forward", forward)
    assert (doomed, "error") in [(s, e.finish_reason) for s, e in events]
    assert decoding in [s for s, _ in events] and not decoding.finished
    run_until_done(engine, [decoding])
    assert decoding.ids == expected


def test_padded_vocabulary_is_never_sampled():
    model = tiny_model(vocab_size=320)  # an embedding padded past the tokenizer's 258 ids
    n = TOKENIZER.vocab_size
    with torch.no_grad():
        # Every real id scores 0 and the padding rows score high: unmasked, greedy and
        # sampling alike would choose padding.
        model.output.weight[:n] = 0.0
        model.output.weight[n:] = model.norm(torch.ones(64)) * 5
    engine = Engine(model, TOKENIZER, max_batch=2, max_seq_len=64)
    sampled = SamplingParams(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, seed=3)
    seqs = engine.generate_batch(
        [
            Request(prompt(5, 16), max_tokens=20, sampling=GREEDY, ignore_eos=True, logprobs=5),
            Request(prompt(5, 17), max_tokens=20, sampling=sampled, ignore_eos=True),
        ]
    )
    assert all(len(s.ids) == 20 and max(s.ids) < n for s in seqs)
    events = list(
        engine.generate(
            Request(prompt(5, 18), max_tokens=3, sampling=GREEDY, logprobs=4, ignore_eos=True)
        )
    )
    for e in events:
        assert all(i < n for i, _ in e.top_logprobs)
        # The distribution is over the tokenizer's ids only: uniform here.
        assert e.logprob == pytest.approx(-torch.log(torch.tensor(float(n))).item(), abs=1e-4)


def test_rope_table_is_sized_to_what_is_used():
    config = ModelConfig(dim=64, n_layers=1, n_heads=4, vocab_size=32, ffn_hidden_dim=96)
    # A forged file's claim, past what config validation lets through: the model itself
    # must not trust context_length with an allocation either.
    object.__setattr__(config, "context_length", 2**40)
    with torch.device("meta"):
        Transformer(config)  # a table of 2**40 rows would need 8.8 TB, even on meta
    model = Transformer(config).eval()
    assert model.rope.shape[0] == 0
    tokens = torch.randint(0, 32, (1, 10))
    with torch.no_grad():
        full = model(tokens)
        assert model.rope.shape[0] == 10
        model.setup_cache(1, 48)
        assert model.rope.shape[0] == 48
        cached = model(tokens, cache=cache_view(torch.arange(10)))
    # Grown, not recomputed differently: bit-identical to a table built at full length.
    assert torch.equal(model.rope, rope_cache(config, 48))
    assert torch.equal(model.rope[:10], rope_cache(config, 10))
    torch.testing.assert_close(cached, full, atol=1e-5, rtol=0)
    half = Transformer(config).to(torch.bfloat16)
    assert half.rope.dtype == torch.float32 and half.rope.shape[0] == 0


def test_grown_rope_table_can_be_trained_through():
    model = tiny_model(context_length=64)
    model.setup_cache(1, 16)
    with torch.inference_mode():  # the table is first built here, by generation
        model(torch.tensor([[3, 4, 5]]), cache=cache_view(torch.arange(3)))
    tokens = torch.randint(0, 258, (2, 33))
    model.train()
    loss = model(tokens[:, :-1], targets=tokens[:, 1:])  # grows the table to 32 under autograd
    loss.backward()
    assert model.tok_embeddings.weight.grad is not None


def test_chunk_budget_follows_the_measured_step_times(model):
    engine = Engine(model, TOKENIZER, max_batch=2, max_seq_len=256, prefill_chunk=100)
    assert engine.chunk_budget() == 16  # nothing measured yet: a small probe
    engine._decode_step_s, engine._prefill_token_s = 0.040, 0.002
    assert engine.chunk_budget() == 12  # a chunk adds PREFILL_SHARE (0.6) of a decode step
    engine._prefill_token_s = 0.0001
    assert engine.chunk_budget() == 100  # never more than prefill_chunk
    engine._prefill_token_s = 0.5
    assert engine.chunk_budget() == 4  # nor so few that a prompt never gets in
    engine._prefill_token_s = 0.0  # a chunk that cost nothing measurable (a noisy step)
    assert engine.chunk_budget() == 100
    engine.prefill_share = None
    assert engine.chunk_budget() == 100


def test_interleaved_chunks_stay_within_the_budget_bounds(model):
    engine = Engine(model, TOKENIZER, max_batch=2, max_seq_len=256, prefill_chunk=64)
    decoding = engine.add(greedy(prompt(5, 19), 200))
    engine.step()
    late = engine.add(greedy(prompt(200, 20), 4))
    chunks = []
    while late.prefilling:
        done = late.prefilled
        engine.step()
        chunks.append(late.prefilled - done)
        assert engine._prefill_token_s is not None and engine._decode_step_s is not None
    assert chunks[0] == 16  # the probe, before any prefill was timed
    assert all(4 <= c <= 64 for c in chunks[:-1]) and sum(chunks) == 200
    assert not decoding.finished
