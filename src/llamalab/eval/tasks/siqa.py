"""Social IQa (Sap et al., 2019), zero-shot as in the LLaMA paper's Table 3.

The labelled items come from the ``evals`` wheel's SIQA test file (2,224 items; the paper
reports the 1,954-item dev split, so scores are close to, not equal to, the paper's).
Each line holds one string "context question A: a; B: b; C: c." and the ``ideal``
letter; the text is split at the last " A: ", "; B: " and "; C: ", and the final period
that the file's formatting adds after the last answer is removed.

The prompt is lm-eval's ``social_iqa`` one: "Q: {context} {question}\\nA:", each answer
scored after a space; the headline figure is accuracy with per-character normalisation.
"""

from __future__ import annotations

from llamalab.errors import LlamalabError
from llamalab.eval.data import read_verified
from llamalab.eval.items import ChoiceItem, Task
from llamalab.eval.tasks.jsonl import iter_jsonl

LETTERS = ("A", "B", "C")


def split_question(text: str) -> tuple[str, tuple[str, str, str]]:
    """ "context question A: a; B: b; C: c." → ("context question", (a, b, c))."""
    c_at = text.rfind("; C: ")
    b_at = text.rfind("; B: ", 0, c_at)
    a_at = text.rfind(" A: ", 0, b_at)
    if min(a_at, b_at, c_at) < 0:
        raise ValueError("no 'A: ...; B: ...; C: ...' answers")
    last = text[c_at + 5 :].strip()
    last = last.removesuffix(".")
    answers = (text[a_at + 4 : b_at].strip(), text[b_at + 5 : c_at].strip(), last)
    return text[:a_at].strip(), answers


def prompt(question: str) -> str:
    """The context a SIQA item's answers are scored after."""
    return f"Q: {question}\nA:"


def load(*, num_fewshot: int = 0, limit: int | None = None) -> Task:
    """The SIQA task; with ``num_fewshot`` K the first K items are exemplars, not scored."""
    rows = []
    for number, obj in iter_jsonl(read_verified("siqa"), "socialiqa/test.jsonl"):
        try:
            question, answers = split_question(obj["input"][0]["content"])
            label = LETTERS.index(obj["ideal"])
        except (KeyError, IndexError, TypeError, ValueError) as exc:
            raise LlamalabError(
                f"socialiqa/test.jsonl:{number + 1}: unexpected item ({exc})"
            ) from None
        rows.append((number, question, answers, label))
    if not 0 <= num_fewshot <= 25:
        raise LlamalabError("--num-fewshot for siqa must be 0 to 25")
    shots = "".join(
        f"{prompt(q)} {answers[label]}\n\n" for _, q, answers, label in rows[:num_fewshot]
    )
    scored = rows[num_fewshot:]
    if limit is not None:
        scored = scored[:limit]
    items = tuple(ChoiceItem(n, shots + prompt(q), a, label) for n, q, a, label in scored)
    return Task(name="siqa", kind="choice", items=items, norm="char", num_fewshot=num_fewshot)
