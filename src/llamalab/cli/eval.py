"""``llamalab eval``: score a model on a benchmark, a perplexity corpus or your own JSONL.

Tasks: mmlu (5-shot; --subjects), siqa (zero-shot), gsm8k (8-shot greedy), humaneval
(pass@k; --samples), perplexity (--data FILE_OR_DIR ...), or the path of a JSONL file
with multiple-choice lines {"context", "choices", "label"} or generation lines
{"prompt", "answer"}. Multiple-choice items are scored by likelihood: raw, normalised by
the completion's characters, or (--norm answer) by its likelihood after "Answer:".
"""

from __future__ import annotations

import argparse
import json
import math
import sys

from llamalab.cli.distributed import add_distributed_options, shared_scorer
from llamalab.cli.options import (
    add_lookup_options,
    add_lora_option,
    add_runtime_options,
    draft_from_args,
    finite_float,
    load_runtime_from_args,
    lookup_from_args,
    lora_from_args,
    positive_int,
    seed_int,
)
from llamalab.errors import LlamalabError

DESCRIPTION = (
    "Score a model on a benchmark, a perplexity corpus or your own JSONL file.\n\n"
    + (__doc__.split("\n\n", 1)[1])
)
NORM_CHOICES = ("raw", "char", "answer")
_LOOKUP_FLAGS = (
    ("--lookup/--no-lookup", "lookup"), ("--lookup-ngram", "lookup_ngram"),
    ("--draft-max", "draft_max"), ("--draft", "draft"),
)  # fmt: skip
DEFAULT_CTX = 2048  # the window when --ctx is not given, if the model's context is longer
GENERATE_BATCH = 4  # --batch-size for generation tasks
# Cache rows for multiple choice: 8 items of a 5-shot MMLU subject per pass. The cache is
# as long as the longest item: 8 rows of 1,024 slots hold 377 MB of SmolLM2's float32 KV.
CHOICE_ROWS = 8


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--task",
        required=True,
        metavar="NAME",
        help="mmlu, siqa, gsm8k, humaneval, perplexity, or a .jsonl file of your own",
    )
    add_runtime_options(p)
    add_distributed_options(p)
    add_lora_option(p)
    add_lookup_options(p)  # generation tasks: the same replies, sooner where they quote
    # No fixed default: the window is the model's context, capped (see used_context).
    p.set_defaults(ctx=None)
    for action in p._actions:
        if action.dest == "ctx":
            action.help = (
                f"context size in tokens (default: the model's context, at most {DEFAULT_CTX})"
            )
    p.add_argument("--limit", type=positive_int, default=None, help="score the first N items "
                   "(per subject for mmlu)")  # fmt: skip
    p.add_argument(
        "--num-fewshot",
        type=int,
        default=None,
        metavar="K",
        help="exemplars in each prompt (default: the paper's: mmlu 5, gsm8k 8, others 0); "
        "mmlu with 0 scores every item, with 1 to 5 all but the five exemplars",
    )
    p.add_argument(
        "--batch-size",
        type=positive_int,
        default=None,
        help="sequences generated together (gsm8k, humaneval, generation files; default "
        f"{GENERATE_BATCH}), or cache rows scored together: one per item of one-token "
        f"choices, one per choice of several tokens (multiple choice; default {CHOICE_ROWS})",
    )
    p.add_argument(
        "--subjects", default=None, help="mmlu: comma-separated subjects (default: all 57)"
    )
    p.add_argument(
        "--norm",
        choices=NORM_CHOICES,
        default=None,
        help="multiple choice: the headline normalisation (default: the task's; char for files)",
    )
    p.add_argument("--data", nargs="+", default=None, metavar="FILE_OR_DIR",
                   help="perplexity: text files, or folders of them")  # fmt: skip
    p.add_argument("--stride", type=positive_int, default=None,
                   help="perplexity: tokens between windows (default: half of the window)")  # fmt: skip
    p.add_argument("--samples", type=positive_int, default=1,
                   help="humaneval: replies per problem, for pass@k up to k = samples")  # fmt: skip
    p.add_argument("--temperature", type=finite_float, default=0.1,
                   help="humaneval: sampling temperature (default: %(default)s)")  # fmt: skip
    p.add_argument("--max-tokens", type=positive_int, default=None,
                   help="generation tasks: most tokens per reply (default: the task's)")  # fmt: skip
    p.add_argument("--stop", action="append", default=None, metavar="STR",
                   help="generation files: stop at this text (repeatable; default: newline)")  # fmt: skip
    p.add_argument("--seed", type=seed_int, default=None, help="humaneval: sampling seed")
    p.add_argument("--json", action="store_true",
                   help="print one JSON object: task, metric, value, stderr, n (and more)")  # fmt: skip
    p.add_argument("--output", default=None, metavar="FILE.jsonl",
                   help="write one JSON line per item: id, prediction, label, correct ... "
                   "(a new file: an existing one is never replaced)")  # fmt: skip


def check_arguments(args: argparse.Namespace) -> None:
    """Refuse option combinations that mean nothing, before the slow model load."""
    from llamalab.eval.tasks import TASK_NAMES, is_user_task

    task = args.task
    if task not in TASK_NAMES and not is_user_task(task):
        raise LlamalabError(
            f"unknown task {task!r}; expected one of {', '.join(TASK_NAMES)} or a .jsonl file"
        )
    if (task == "perplexity") != (args.data is not None):
        raise LlamalabError(
            "--data goes with --task perplexity, which needs it"
            if task == "perplexity"
            else "--data applies to --task perplexity only"
        )
    if args.num_fewshot is not None and args.num_fewshot < 0:
        raise LlamalabError(f"--num-fewshot must be at least 0, got {args.num_fewshot}")
    if args.stride is not None and task != "perplexity":
        raise LlamalabError("--stride applies to --task perplexity only")
    if args.samples != 1 and task != "humaneval":
        raise LlamalabError("--samples applies to --task humaneval only")
    if not 0 <= args.temperature <= 2:
        raise LlamalabError(f"--temperature must be in [0, 2], got {args.temperature}")
    if args.ctx is not None and args.ctx < 2:
        raise LlamalabError(f"--ctx must be at least 2, got {args.ctx}")
    if args.output is not None:
        check_output(args.output)


def check_output(name: str) -> None:
    """Refuse an --output that exists (a user's data, perhaps the task file itself) or
    whose folder does not, before any work starts."""
    import os
    from pathlib import Path

    path = Path(name)
    if os.path.lexists(path):  # a dangling link is in the way too
        raise LlamalabError(
            f"--output {path}: already exists; choose a new file (nothing was overwritten)"
        )
    if not path.parent.is_dir():
        raise LlamalabError(f"--output {path}: the folder {path.parent} does not exist")


def used_context(requested: int | None, model_context: int) -> int:
    """The window in tokens: ``--ctx`` (default 2048), never more than the model's context."""
    return min(requested or DEFAULT_CTX, model_context)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from llamalab.eval import runner
    from llamalab.eval.tasks import load_task
    from llamalab.eval.tasks.mmlu import parse_subjects

    check_arguments(args)
    adapters = lora_from_args(args)
    lookup = lookup_from_args(args)
    progress = sys.stderr.isatty()
    output = Path(args.output) if args.output else None
    task = files = None
    if args.task == "perplexity":
        from llamalab.eval.perplexity import document_files

        files = document_files(args.data)
        if args.ctx is not None and args.stride is not None and args.stride >= args.ctx:
            # Refused before the model loads where the numbers alone decide it.
            raise LlamalabError(
                f"--stride must be 1 to {args.ctx - 1} (less than --ctx {args.ctx})"
            )
    else:
        # Data and prompts are checked before the model loads: a bad file fails fast.
        task = load_task(
            args.task,
            num_fewshot=args.num_fewshot,
            limit=args.limit,
            subjects=parse_subjects(args.subjects),
            norm=args.norm,
            stop=tuple(args.stop) if args.stop is not None else None,
            max_tokens=args.max_tokens,
        )
        if not task.items:
            raise LlamalabError(f"task {task.name}: no items to score")
    given = [flag for flag, attr in _LOOKUP_FLAGS if getattr(args, attr) is not None]
    if given and (task is None or task.kind == "choice"):
        # Likelihood scoring generates nothing, so nothing is drafted.
        raise LlamalabError(f"{given[0]} applies to generation tasks only")
    model, tokenizer = load_runtime_from_args(args)
    if adapters:
        from llamalab.train.lora import load_adapters

        load_adapters(model, adapters)
    ctx = used_context(args.ctx, model.config.context_length)
    with runner.scoring_kernels(model):
        if task is None:
            window = ctx
            stride = args.stride or max(1, window // 2)
            if not 1 <= stride < window:
                raise LlamalabError(
                    f"--stride must be 1 to {window - 1} (less than the window of {window} tokens)"
                )
            scorer = shared_scorer(model, max_seq_len=window, max_rows=1)
            result = runner.run_perplexity(
                files, scorer, tokenizer, window=window, stride=stride, progress=progress
            )
        elif task.kind == "choice":
            scorer = shared_scorer(model, max_seq_len=ctx, max_rows=args.batch_size or CHOICE_ROWS)
            result = runner.run_choice(task, scorer, tokenizer, progress=progress)
            cut = sum(1 for r in result.records if r.get("context_tokens_dropped"))
            if cut:  # lm-eval does this silently; a user should know the prompts were cut
                print(
                    f"llamalab: note: {cut} of {result.n} prompts lost their oldest tokens to fit "
                    f"the window of {ctx} tokens (--ctx)",
                    file=sys.stderr,
                )
        else:
            from llamalab.generation import Engine

            args.batch_size = args.batch_size or GENERATE_BATCH
            draft, draft_tokenizer = draft_from_args(args, lookup)
            engine = Engine(
                model, tokenizer, max_batch=args.batch_size, max_seq_len=ctx, draft=draft,
                draft_tokenizer=draft_tokenizer,
            )  # fmt: skip
            if task.kind == "code":
                result = runner.run_code(
                    task, engine, tokenizer, samples=args.samples, temperature=args.temperature,
                    batch_size=args.batch_size, seed=args.seed, progress=progress, lookup=lookup,
                )  # fmt: skip
            else:
                extract = None
                if task.name == "gsm8k":
                    from llamalab.eval.tasks.gsm8k import extract_answer as extract
                result = runner.run_generate(
                    task, engine, tokenizer, batch_size=args.batch_size, progress=progress,
                    extract=extract, lookup=lookup,
                )  # fmt: skip
    if output is not None:
        write_records(output, result.records)
    if args.json:
        print(json.dumps(result.summary(), ensure_ascii=False))
    else:
        print(format_table(result))
    return 0


def write_records(path, records) -> None:
    """One JSON line per item, in file order, written to a temporary file beside ``path``
    and then renamed onto it only if nothing is there: an existing file is never replaced,
    and an interrupted run leaves no half-written one."""
    import os
    import tempfile
    from pathlib import Path

    from llamalab.checkpoint.convert import rename_noreplace

    path = Path(path)
    try:
        fd, temp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        raise LlamalabError(f"--output {path}: cannot write: {exc.strerror or exc}") from None
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
            f.flush()
            os.fsync(f.fileno())
        rename_noreplace(Path(temp), path)
    except FileExistsError:
        raise LlamalabError(
            f"--output {path}: appeared while evaluating; nothing was overwritten"
        ) from None
    except OSError as exc:
        raise LlamalabError(f"--output {path}: cannot write: {exc.strerror or exc}") from None
    finally:
        if os.path.lexists(temp):
            os.unlink(temp)


def _fmt(value, percent: bool) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    return f"{100 * value:.2f}" if percent else f"{value:.4f}"


def format_table(result) -> str:
    """The terminal table: the headline, the other metrics, then per-group rows."""
    percent = result.metric not in ("perplexity",)
    rows = [("task", "metric", "value", "stderr", "n")]
    rows.append(
        (result.task, result.metric, _fmt(result.value, percent), _fmt(result.stderr, percent),
         str(result.n))
    )  # fmt: skip
    for name, value in result.metrics.items():
        if name == result.metric or name.endswith("_stderr"):
            continue
        is_rate = name.startswith(("acc", "pass@", "exact"))
        stderr = result.metrics.get(f"{name}_stderr")
        text = _fmt(value, True) if is_rate else (f"{value:.6g}" if value is not None else "-")
        rows.append(("", name, text, _fmt(stderr, True) if is_rate else "", ""))
    for group, values in result.groups.items():
        for name, value in values.items():
            if name == "n":
                continue
            n = values.get("n")
            rows.append((f"  {group}", name, _fmt(value, True), "", str(n) if n else ""))
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    lines = []
    for r in rows:
        lines.append("  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in
                               enumerate(zip(r, widths, strict=True))).rstrip())  # fmt: skip
    if percent:
        lines.append("(accuracies in %)")
    return "\n".join(lines)
