"""Choice normalisations, pass@k, answer extraction and perplexity windows: pure functions."""

from __future__ import annotations

import math

import pytest

from llamalab.eval.items import ChoiceItem, Task
from llamalab.eval.passk import mean_pass_at_k, pass_at_k
from llamalab.eval.perplexity import windows
from llamalab.eval.runner import run_choice
from llamalab.eval.scoring import mean_and_stderr, pick_choices
from llamalab.eval.tasks.gsm8k import extract_answer, reference_answer
from llamalab.eval.tasks.siqa import split_question


class CharTokenizer:
    """One token per character: what the stub scorer needs to read texts back."""

    bos_id = None
    eos_id = 0

    def encode(self, text, *, add_bos=None, special=True):
        return [ord(c) for c in text]


class TableScorer:
    """Log-likelihoods from a table keyed by (context, continuation) text."""

    def __init__(self, table):
        self.table = table
        self.calls = []

    def score(self, context, continuations):
        ctx = "".join(map(chr, context))
        self.calls.append((ctx, len(continuations)))
        return [(self.table[ctx, "".join(map(chr, c))], False) for c in continuations]


CONTEXT = "Which one?"
# Lengths 1, 10, 5: raw favours A; per character B (-1.0 per char); given "Answer:" as the
# neutral context C is by far the most lifted (-6 + 10 = +4 against -0.5 and -2).
TABLE = {
    (CONTEXT, " A"): -2.0,
    (CONTEXT, " BBBBBBBBBB"): -10.0,
    (CONTEXT, " CCCCC"): -6.0,
    ("Answer:", " A"): -1.5,
    ("Answer:", " BBBBBBBBBB"): -8.0,
    ("Answer:", " CCCCC"): -10.0,
}


def test_each_normalisation_picks_as_its_definition_demands():
    picks = pick_choices([-2.0, -10.0, -6.0], ["A", "BBBBBBBBBB", "CCCCC"], [-1.5, -8.0, -10.0])
    assert (picks.raw, picks.char, picks.answer) == (0, 1, 2)
    # raw: the largest log P; char: log P / characters; answer: log P - log P(· | "Answer:")
    assert max(range(3), key=[-2.0 / 1, -10.0 / 10, -6.0 / 5].__getitem__) == 1


@pytest.mark.parametrize(("norm", "expected"), [("raw", 0), ("char", 1), ("answer", 2)])
def test_run_choice_scores_handmade_items_three_ways(norm, expected):
    item = ChoiceItem(7, CONTEXT, ("A", "BBBBBBBBBB", "CCCCC"), label=expected)
    task = Task("handmade", "choice", (item,), norm=norm, answer_normalised=True)
    scorer = TableScorer(TABLE)
    result = run_choice(task, scorer, CharTokenizer())
    record = result.records[0]
    assert record["predictions"] == {"raw": 0, "char": 1, "answer": 2}
    assert record["prediction"] == expected and record["correct"] is True
    assert result.metrics == {
        "acc": float(expected == 0), "acc_stderr": None,
        "acc_char": float(expected == 1), "acc_char_stderr": None,
        "acc_answer": float(expected == 2), "acc_answer_stderr": None,
    }  # fmt: skip
    # The choices of an item are scored together, once with the context, once after "Answer:".
    assert scorer.calls == [(CONTEXT, 3), ("Answer:", 3)]


def test_ties_pick_the_first_choice_and_stderr_is_the_sample_one():
    assert pick_choices([-1.0, -1.0], ["a", "b"]).raw == 0
    mean, stderr = mean_and_stderr([1.0, 0.0, 1.0, 1.0])
    assert mean == 0.75 and stderr == pytest.approx(math.sqrt(0.25 / 4))


@pytest.mark.parametrize(
    ("n", "c", "k", "expected"),
    [
        (1, 1, 1, 1.0),
        (1, 0, 1, 0.0),
        (10, 3, 1, 0.3),  # pass@1 is the fraction correct
        (5, 2, 2, 1 - (3 * 2) / (5 * 4)),  # 1 - C(3,2)/C(5,2) = 1 - 3/10
        (10, 2, 5, 1 - 56 / 252),  # 1 - C(8,5)/C(10,5)
        (4, 3, 2, 1.0),  # n - c < k: every pair holds a correct sample
        (200, 1, 100, 0.5),  # 1 - C(199,100)/C(200,100) = 1 - 100/200
    ],
)
def test_pass_at_k_matches_hand_computed_values(n, c, k, expected):
    assert pass_at_k(n, c, k) == pytest.approx(expected, rel=1e-12)


def test_pass_at_k_refuses_impossible_counts_and_averages():
    with pytest.raises(ValueError):
        pass_at_k(3, 4, 1)
    with pytest.raises(ValueError):
        pass_at_k(3, 1, 4)
    assert mean_pass_at_k([(2, 1), (2, 2)], 1) == pytest.approx(0.75)


def test_gsm8k_answers_compare_by_final_number():
    assert reference_answer("so 3 + 4 = 7\n#### 1,234") == "1234"
    assert extract_answer("He has 5 + 4 = 9 toys. The answer is 9.") == "9"
    assert extract_answer("It costs $1,200.00 in all. The answer is $1,200.") == "1200"
    assert extract_answer("First 3, then 12 more, 15 in all") == "15"
    assert extract_answer("no number here") is None


def test_siqa_lines_split_into_question_and_answers():
    q, answers = split_question(
        "Alex found a ring. What will Alex want to do next? A: keep it; B: find the owner; C: sell it."
    )
    assert q == "Alex found a ring. What will Alex want to do next?"
    assert answers == ("keep it", "find the owner", "sell it")


def test_perplexity_windows_score_every_token_once_with_context():
    for n, window, stride in [(10, 4, 2), (10, 4, 3), (300, 256, 128), (5, 8, 4), (2, 2, 1)]:
        spans = windows(n, window, stride)
        scored = [t for _, end, first in spans for t in range(first, end)]
        assert scored == list(range(1, n))  # every token but the start, once, in order
        for begin, end, first in spans:
            assert end - begin <= window and begin < first  # each sees a token before it
    assert windows(300, 256, 128) == [(0, 256, 1), (44, 300, 256)]
    with pytest.raises(Exception, match="stride"):
        windows(10, 4, 4)
