"""The pure sampling functions and the stop-string matcher."""

import math

import pytest
import torch

from llamalab.errors import LlamalabError
from llamalab.generation.params import MIN_TOP_P
from llamalab.generation.sampling import (
    SamplingParams,
    apply_repetition_penalty,
    logits_to_probs,
    sample,
    top_logprobs,
)
from llamalab.generation.stopping import StopStringMatcher

LOGITS = torch.log(torch.tensor([0.5, 0.25, 0.15, 0.07, 0.03]))


def test_temperature_one_without_filters_is_softmax():
    torch.testing.assert_close(
        logits_to_probs(LOGITS, 1.0), torch.tensor([0.5, 0.25, 0.15, 0.07, 0.03])
    )


def test_top_k_top_p_min_p():
    assert (logits_to_probs(LOGITS, 1.0, top_k=2) > 0).tolist() == [True, True, False, False, False]
    # top-p 0.8: 0.5 + 0.25 < 0.8, so the third token is still needed to reach it.
    assert (logits_to_probs(LOGITS, 1.0, top_p=0.8) > 0).tolist() == [
        True,
        True,
        True,
        False,
        False,
    ]
    # min-p 0.3: keep tokens with at least 0.3 × the top probability (0.15).
    assert (logits_to_probs(LOGITS, 1.0, min_p=0.3) > 0).tolist() == [
        True,
        True,
        True,
        False,
        False,
    ]
    probs = logits_to_probs(LOGITS, 1.0, top_k=2)
    assert probs.sum().item() == pytest.approx(1.0)
    torch.testing.assert_close(probs[:2], torch.tensor([2 / 3, 1 / 3]))


def test_low_temperature_sharpens():
    cold = logits_to_probs(LOGITS, 0.1)
    assert cold[0] > 0.99


def test_repetition_penalty_follows_the_sign():
    logits = torch.tensor([2.0, -2.0, 1.0])
    out = apply_repetition_penalty(logits, torch.tensor([0, 1]), 2.0)
    assert out.tolist() == [1.0, -4.0, 1.0]
    assert logits.tolist() == [2.0, -2.0, 1.0]  # pure: the input is untouched


def test_greedy_and_seeded_sampling():
    assert sample(LOGITS, SamplingParams(temperature=0)) == 0
    params = SamplingParams(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0)
    draws = [sample(LOGITS, params, torch.Generator().manual_seed(s)) for s in range(200)]
    assert set(draws) >= {0, 1, 2}
    again = [sample(LOGITS, params, torch.Generator().manual_seed(s)) for s in range(200)]
    assert draws == again


def test_logprobs():
    chosen, alternatives = top_logprobs(LOGITS, 1, 2)
    assert chosen == pytest.approx(math.log(0.25), abs=1e-6)
    assert [i for i, _ in alternatives] == [0, 1]


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("temperature", -1), ("temperature", float("nan")), ("temperature", float("inf")),
        ("temperature", "1"), ("top_p", 0), ("top_p", 1.5), ("top_p", float("nan")),
        ("min_p", -0.1), ("min_p", 2), ("min_p", float("nan")), ("top_k", -1), ("top_k", 1.5),
        ("top_k", True), ("repeat_penalty", 0), ("repeat_penalty", -1.0),
        ("repeat_penalty", 1e-40), ("repeat_penalty", 1e9), ("repeat_penalty", float("inf")),
        ("repeat_penalty", float("nan")), ("repeat_last_n", -1), ("seed", -1), ("seed", 2**64),
        ("seed", 1.5),
    ],
)  # fmt: skip
def test_invalid_params_are_errors_naming_the_field(field, value):
    with pytest.raises(LlamalabError, match=field):
        SamplingParams(**{field: value})


def test_extreme_valid_params_are_accepted():
    SamplingParams(
        temperature=0, top_p=MIN_TOP_P, min_p=1, top_k=0, repeat_penalty=100.0, seed=2**64 - 1
    )


def test_tiny_top_p_keeps_the_most_likely_token():
    # 1e-300 rounds to 0 in float32; the most likely token must still survive.
    assert logits_to_probs(LOGITS, 1.0, top_p=1e-300).tolist() == [1.0, 0.0, 0.0, 0.0, 0.0]


def test_overflowed_scores_take_the_mass_instead_of_making_nan():
    logits = torch.tensor([1.0, float("inf"), 3.0, float("inf")])
    assert logits_to_probs(logits, 1.0).tolist() == [0.0, 0.5, 0.0, 0.5]
    # A repetition penalty far past the allowed range (forged) overflows, but still samples.
    params = SamplingParams(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0)
    object.__setattr__(params, "repeat_penalty", 1e-40)
    assert (
        sample(
            torch.tensor([2.0, 5.0, -1.0]),
            params,
            torch.Generator().manual_seed(0),
            torch.tensor([0]),
        )
        == 0
    )


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_nan_scores_are_a_clear_error(temperature):
    params = SamplingParams(temperature=temperature, top_k=0, top_p=1.0, min_p=0.0)
    with pytest.raises(LlamalabError, match="sampling failed"):
        sample(torch.tensor([1.0, float("nan"), 0.5]), params, torch.Generator().manual_seed(0))
    with pytest.raises(LlamalabError, match="sampling failed"):
        logits_to_probs(torch.full((4,), float("-inf")), 1.0)


def test_stop_string_split_across_deltas():
    m = StopStringMatcher(["</s>", "STOP"])
    out = [m.feed(d) for d in ["Hello S", "TO", "P there"]]
    assert "".join(out) == "Hello "
    assert m.stopped and m.emitted == "Hello "


def test_held_text_is_released_when_it_is_not_a_stop():
    m = StopStringMatcher(["STOP"])
    assert m.feed("ST") == ""
    assert m.feed("ART") == "START"
    assert m.feed("S") == ""
    assert m.flush() == "S"
    assert not m.stopped


def test_earliest_stop_wins():
    m = StopStringMatcher(["b c", "a"])
    assert m.feed("xx b c a") == "xx "
