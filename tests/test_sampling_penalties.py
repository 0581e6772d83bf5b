"""OpenAI's presence_penalty, frequency_penalty and logit_bias: the pure functions, their
validation, their order in the sampler, and their effect through the engine."""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from test_engine_batching import TOKENIZER, prompt, tiny_model

from llamalab.errors import LlamalabError
from llamalab.generation import Engine, Request, SamplingParams
from llamalab.generation.sampling import (
    apply_logit_bias,
    apply_presence_frequency_penalty,
    sample,
    top_logprobs,
)
from llamalab.model import Transformer

LOGITS = torch.log(torch.tensor([0.5, 0.25, 0.15, 0.07, 0.03]))
# Every filter off, so that a draw can land on any token the logits allow.
PLAIN = {"temperature": 1.0, "top_k": 0, "top_p": 1.0, "min_p": 0.0}


def draws(logits: torch.Tensor, params: SamplingParams, n: int = 200) -> list[int]:
    return [sample(logits, params, torch.Generator().manual_seed(s)) for s in range(n)]


# ---------------------------------------------------------------------- the pure functions
def test_presence_and_frequency_change_exactly_the_counted_logits():
    logits = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0])
    out = apply_presence_frequency_penalty(logits, {1: 1, 3: 3}, presence=0.5, frequency=0.25)
    # By hand: token 1 loses 0.25 * 1 + 0.5, token 3 loses 0.25 * 3 + 0.5; others stay.
    assert out.tolist() == [1.0, 1.25, 3.0, 2.75, 5.0]
    assert logits.tolist() == [1.0, 2.0, 3.0, 4.0, 5.0]  # pure: the input is untouched
    # Each penalty alone, and negative values (which favour repetition).
    assert apply_presence_frequency_penalty(logits, {0: 2}, 0.0, 1.5).tolist() == [
        -2.0, 2.0, 3.0, 4.0, 5.0,
    ]  # fmt: skip
    assert apply_presence_frequency_penalty(logits, {0: 2, 4: 1}, -1.0, 0.0).tolist() == [
        2.0, 2.0, 3.0, 4.0, 6.0,
    ]  # fmt: skip


def test_logit_bias_adds_to_exactly_the_listed_logits():
    logits = torch.tensor([1.0, 2.0, 3.0])
    assert apply_logit_bias(logits, ((0, -0.5), (2, 4.0))).tolist() == [0.5, 2.0, 7.0]
    assert logits.tolist() == [1.0, 2.0, 3.0]


def test_penalties_change_the_greedy_choice():
    logits = torch.tensor([3.0, 2.875, 0.0])
    for params in (
        SamplingParams(temperature=0, frequency_penalty=0.25),
        SamplingParams(temperature=0, presence_penalty=0.25),
    ):
        assert sample(logits, params) == 0  # no counts: nothing generated yet
        assert sample(logits, params, counts={}) == 0
        assert sample(logits, params, counts={0: 1}) == 1  # 3 - 0.25 < 2.875
    # The frequency penalty grows with the count; the presence penalty does not.
    logits = torch.tensor([3.0, 2.0])
    frequency = SamplingParams(temperature=0, frequency_penalty=0.75)
    presence = SamplingParams(temperature=0, presence_penalty=0.75)
    assert sample(logits, frequency, counts={0: 1}) == 0  # 2.25 > 2
    assert sample(logits, frequency, counts={0: 2}) == 1  # 1.5 < 2
    assert sample(logits, presence, counts={0: 5}) == 0  # 2.25 > 2 however many


def test_logit_bias_forces_a_token_greedy_and_sampled():
    # Token 4 is the least likely (0.03); +100 makes it the only one that can come.
    assert sample(LOGITS, SamplingParams(temperature=0)) == 0
    assert sample(LOGITS, SamplingParams(temperature=0, logit_bias={4: 100})) == 4
    assert set(draws(LOGITS, SamplingParams(logit_bias={4: 100}))) == {4}  # default filters
    assert set(draws(LOGITS, SamplingParams(**PLAIN, logit_bias={4: 100}))) == {4}


def test_logit_bias_minus_100_bans_a_token():
    assert 0 in draws(LOGITS, SamplingParams(**PLAIN))  # the most likely token, unbiased
    banned = draws(LOGITS, SamplingParams(**PLAIN, logit_bias={0: -100}))
    assert 0 not in banned and set(banned) >= {1, 2}
    assert sample(LOGITS, SamplingParams(temperature=0, logit_bias={0: -100})) == 1


def test_order_is_bias_then_repetition_then_presence_frequency():
    # Bias before the repetition penalty: (2 + 2) / 2 = 2 < 2.5, so token 1 wins; the
    # other order would give 2 / 2 + 2 = 3 and token 0.
    params = SamplingParams(temperature=0, repeat_penalty=2.0, logit_bias={0: 2.0})
    assert sample(torch.tensor([2.0, 2.5]), params, recent_ids=torch.tensor([0])) == 1
    # Repetition before presence: 4 / 2 - 1 = 1 < 1.25, token 1; the other order would
    # give (4 - 1) / 2 = 1.5 and token 0.
    params = SamplingParams(temperature=0, repeat_penalty=2.0, presence_penalty=1.0)
    logits = torch.tensor([4.0, 1.25])
    assert sample(logits, params, recent_ids=torch.tensor([0]), counts={0: 1}) == 1


def test_defaults_leave_sampling_unchanged():
    defaults = SamplingParams()
    assert (defaults.presence_penalty, defaults.frequency_penalty) == (0.0, 0.0)
    assert defaults.logit_bias == ()
    # Off, the functions hand back the very tensor they were given.
    assert apply_logit_bias(LOGITS, ()) is LOGITS
    assert apply_presence_frequency_penalty(LOGITS, {0: 3}, 0.0, 0.0) is LOGITS
    params = SamplingParams(**PLAIN)
    assert draws(LOGITS, params) == [
        sample(LOGITS, params, torch.Generator().manual_seed(s), counts={0: 3}) for s in range(200)
    ]


def test_logprobs_stay_the_models():
    # The chosen token was forced by the bias; its logprob is still log(0.03).
    params = SamplingParams(temperature=0, logit_bias={4: 100}, frequency_penalty=2.0)
    token = sample(LOGITS, params, counts={4: 3})
    chosen, alternatives = top_logprobs(LOGITS, token, 1)
    assert token == 4
    assert chosen == pytest.approx(float(torch.log(torch.tensor(0.03))), abs=1e-6)
    assert [i for i, _ in alternatives] == [0]


# ---------------------------------------------------------------------- validation
@pytest.mark.parametrize("field", ["presence_penalty", "frequency_penalty"])
@pytest.mark.parametrize(
    "value",
    [float("nan"), float("inf"), -float("inf"), 2.5, -3, -2.001, 10**400, "1", None, True],
)
def test_invalid_penalties_are_errors_naming_the_field(field, value):
    with pytest.raises(LlamalabError, match=field):
        SamplingParams(**{field: value})


@pytest.mark.parametrize(
    "value",
    [
        {0: 101}, {0: -101}, {0: 100.5}, {0: float("nan")}, {0: float("inf")}, {0: "1"},
        {0: None}, {0: 10**400}, {i: 1.0 for i in range(301)},
        tuple((i, 1.0) for i in range(301)), {-1: 1.0}, {"5": 1.0}, {1.5: 1.0},
        {True: 1.0}, ((1, 1.0), (1, 2.0)), ((1, 2.0, 3.0),), (5,), "abc", 7, None,
    ],
)  # fmt: skip
def test_invalid_logit_bias_is_an_error_naming_the_field(value):
    with pytest.raises(LlamalabError, match="logit_bias"):
        SamplingParams(logit_bias=value)


def test_extreme_valid_values_are_accepted_and_normalized():
    for value in (-2, 2, -2.0, 2.0, 0):
        SamplingParams(presence_penalty=value, frequency_penalty=value)
    full = SamplingParams(logit_bias={i: (-100 if i % 2 else 100) for i in range(300)})
    assert len(full.logit_bias) == 300 and full.logit_bias[:2] == ((0, 100.0), (1, -100.0))
    # A mapping and (id, bias) pairs give equal, hashable objects, sorted by id.
    from_map = SamplingParams(logit_bias={3: 1, 1: -2.5})
    from_pairs = SamplingParams(logit_bias=((1, -2.5), (3, 1.0)))
    assert from_map.logit_bias == ((1, -2.5), (3, 1.0))
    assert from_map == from_pairs and hash(from_map) == hash(from_pairs)
    assert all(type(b) is float for _, b in from_map.logit_bias)


# ---------------------------------------------------------------------- through the engine
@pytest.fixture(scope="module")
def model() -> Transformer:
    return tiny_model()


def reference_greedy(
    model: Transformer,
    prompt_ids: list[int],
    n: int,
    presence: float = 0.0,
    frequency: float = 0.0,
    bias: dict[int, float] | None = None,
) -> list[int]:
    """Greedy decoding written out by hand: the whole sequence through the model each
    step (no cache), OpenAI's rule applied token by token over the generated ids."""
    ids: list[int] = []
    for _ in range(n):
        with torch.inference_mode():
            logits = model(torch.tensor([prompt_ids + ids]))[0, -1, : TOKENIZER.vocab_size]
        logits = logits.float().clone()
        for token, b in (bias or {}).items():
            logits[token] += b
        for token, count in Counter(ids).items():
            logits[token] -= frequency * count + presence
        ids.append(int(torch.argmax(logits)))
    return ids


def generate(model: Transformer, request: Request) -> list[int | None]:
    engine = Engine(model, TOKENIZER, max_batch=2, max_seq_len=256)
    return [e.token_id for e in engine.generate(request)]


def test_frequency_penalty_through_the_engine_stops_repeats(model):
    p = prompt(12, 21)
    plain = generate(model, Request(p, max_tokens=40, sampling=SamplingParams(temperature=0)))
    assert max(Counter(plain).values()) > 1  # unpenalized, this model repeats itself
    for params in (
        SamplingParams(temperature=0, frequency_penalty=2.0),
        SamplingParams(temperature=0, presence_penalty=2.0),
    ):
        penalized = generate(model, Request(p, max_tokens=40, sampling=params, ignore_eos=True))
        assert len(penalized) == len(set(penalized)) == 40  # no token twice
        expected = reference_greedy(
            model, p, 40, presence=params.presence_penalty, frequency=params.frequency_penalty
        )
        assert penalized == expected


def test_the_prompt_is_not_counted(model):
    # Biasing every prompt token up and penalizing presence: were the prompt counted, the
    # penalty would cancel the bias at once. OpenAI counts only the completion.
    p = prompt(6, 22)
    bias = {t: 1.5 for t in p}
    params = SamplingParams(temperature=0, presence_penalty=2.0, logit_bias=bias)
    ids = generate(model, Request(p, max_tokens=12, sampling=params, ignore_eos=True))
    assert ids == reference_greedy(model, p, 12, presence=2.0, bias=bias)


def test_logit_bias_through_the_engine_keeps_the_models_logprobs(model):
    p = prompt(10, 23)
    params = SamplingParams(temperature=0, logit_bias={77: 100})
    engine = Engine(model, TOKENIZER, max_batch=1, max_seq_len=256)
    request = Request(p, max_tokens=5, sampling=params, logprobs=1, ignore_eos=True)
    events = list(engine.generate(request))
    assert [e.token_id for e in events] == [77] * 5
    with torch.inference_mode():
        logits = model(torch.tensor([p]))[0, -1, : TOKENIZER.vocab_size].float()
    expected = float(torch.log_softmax(logits, -1)[77])
    assert expected < -1.0  # not the model's choice: the bias made it
    assert events[0].logprob == pytest.approx(expected, abs=1e-4)


@pytest.mark.parametrize("method", ["add", "submit"])
def test_logit_bias_outside_the_vocabulary_is_refused_at_admission(method):
    # The embedding is padded past the tokenizer's 258 ids: those are never sampled either.
    model = tiny_model(vocab_size=320)
    engine = Engine(model, TOKENIZER, max_batch=1, max_seq_len=64)
    for bad in (TOKENIZER.vocab_size, 319, 10**9):
        request = Request([5, 6], max_tokens=2, sampling=SamplingParams(logit_bias={bad: 1}))
        with pytest.raises(LlamalabError, match="logit_bias"):
            getattr(engine, method)(request)
        assert engine.free_rows == 1
    ok = SamplingParams(temperature=0, logit_bias={TOKENIZER.vocab_size - 1: 100})
    seq = engine.add(Request([5, 6], max_tokens=2, sampling=ok, ignore_eos=True))
    while not seq.finished:
        engine.step()
    assert seq.ids == [TOKENIZER.vocab_size - 1] * 2
