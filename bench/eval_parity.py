"""llamalab's MMLU and SIQA scoring against lm-eval 0.4.13's ``hf`` model, item by item.

Both run the default model in float32 on the same items and prompts: the GGUF is
converted to a Hugging Face folder that transformers loads for lm-eval, and lm-eval reads
task files (``dataset_path: json``) written from llamalab's own items
(``llamalab.eval.lm_eval_tasks``). Prints, per task, how often the two pick the same
choice (raw and per-character), both accuracies, the largest log-likelihood difference,
and the time each took. Expect 10-20 minutes on 2 idle cores.

    .venv/bin/python bench/eval_parity.py [--subjects a,b,c,d,e] [--siqa 500] [--backend]

``--backend`` also runs lm-eval with ``--model llamalab`` and compares it with ``hf``.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

# No OMP_WAIT_POLICY here: lm-eval runs in this process and must run at its own defaults.
os.environ["HF_DATASETS_OFFLINE"] = "1"

# One subject per category, and a fifth, with prompts of moderate length.
DEFAULT_SUBJECTS = "abstract_algebra,world_religions,us_foreign_policy,management,global_facts"


def lm_eval_run(model: str, model_args: str, files, batch_size: int) -> dict[str, dict]:
    import lm_eval
    from lm_eval.tasks import TaskManager

    from llamalab.eval.lm_eval_tasks import lm_eval_picks

    results = lm_eval.simple_evaluate(
        model=model,
        model_args=model_args,
        tasks=list(files.tasks),
        task_manager=TaskManager(include_path=str(files.folder)),
        log_samples=True,
        batch_size=batch_size,
        device="cpu",
    )
    return {name: lm_eval_picks(results["samples"][name]) for name in files.tasks}


def compare(name: str, records: list[dict], theirs: dict[int, dict]) -> dict[str, float]:
    """Agreement and accuracies of llamalab's records against lm-eval's picks."""
    n = len(records)
    out = {"n": n}
    for norm in ("raw", "char"):
        out[f"agree_{norm}"] = (
            sum(r["predictions"][norm] == theirs[r["id"]][norm] for r in records) / n
        )
        out[f"ours_{norm}"] = sum(r["predictions"][norm] == r["label"] for r in records) / n
        out[f"theirs_{norm}"] = sum(theirs[r["id"]][norm] == r["label"] for r in records) / n
    out["max_logprob_diff"] = max(
        abs(a - b)
        for r in records
        for a, b in zip(r["logprobs"], theirs[r["id"]]["logprobs"], strict=True)
    )
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="GGUF file (default: the embedded SmolLM2)")
    p.add_argument("--subjects", default=DEFAULT_SUBJECTS)
    p.add_argument("--siqa", type=int, default=500, help="SIQA items (default: %(default)s)")
    p.add_argument("--mmlu-limit", type=int, default=None, help="items per subject (default: all)")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--backend", action="store_true", help="also run lm-eval --model llamalab")
    args = p.parse_args()

    import torch

    from llamalab.checkpoint.convert import convert
    from llamalab.eval import runner
    from llamalab.eval.likelihood import LikelihoodScorer
    from llamalab.eval.lm_eval_tasks import SIQA_TASK, mmlu_task_name, write_tasks
    from llamalab.eval.tasks import load_task
    from llamalab.eval.tasks.mmlu import parse_subjects
    from llamalab.runtime import load_runtime, resolve_model_ref

    subjects = parse_subjects(args.subjects)
    model_path = resolve_model_ref(args.model)
    with tempfile.TemporaryDirectory(prefix="eval-parity-") as tmp:
        tmp = Path(tmp)
        os.environ.setdefault("HF_DATASETS_CACHE", str(tmp / "datasets"))
        hf = convert(model_path, tmp / "hf", to="hf", dtype="f32")
        files = write_tasks(
            tmp / "tasks", mmlu_subjects=subjects, mmlu_limit=args.mmlu_limit, siqa_limit=args.siqa
        )
        if args.threads:
            torch.set_num_threads(args.threads)

        start = time.perf_counter()
        theirs = lm_eval_run("hf", f"pretrained={hf},dtype=float32", files, args.batch_size)
        hf_s = time.perf_counter() - start

        model, tokenizer = load_runtime(
            str(model_path), "float32", device="cpu", threads=args.threads
        )
        scorer = LikelihoodScorer(model, max_seq_len=2048, max_rows=args.batch_size)
        start = time.perf_counter()
        mmlu = runner.run_choice(
            load_task("mmlu", subjects=subjects, limit=args.mmlu_limit), scorer, tokenizer,
            progress=sys.stderr.isatty(),
        )  # fmt: skip
        siqa = runner.run_choice(
            load_task("siqa", limit=args.siqa), scorer, tokenizer, progress=sys.stderr.isatty()
        )
        ours_s = time.perf_counter() - start

        merged: dict[int, dict] = {}
        for s in subjects:
            merged.update(theirs[mmlu_task_name(s)])
        rows = {"mmlu": compare("mmlu", mmlu.records, merged)}
        rows["siqa"] = compare("siqa", siqa.records, theirs[SIQA_TASK])
        # Item contexts: lm-eval's prompt for each item must be llamalab's, character for character.
        items = {i.id: i for i in load_task("mmlu", subjects=subjects, limit=args.mmlu_limit).items}
        items.update({i.id: i for i in load_task("siqa", limit=args.siqa).items})
        same = [
            theirs_item["context"] == items[i].context
            for table in (merged, theirs[SIQA_TASK])
            for i, theirs_item in table.items()
        ]

        print(f"model {model_path.name} (float32), subjects: {', '.join(subjects)}")
        print(f"identical prompts: {sum(same)}/{len(same)}")
        header = f"{'task':6} {'n':>5} {'agree raw':>10} {'agree char':>11} {'llamalab acc':>13} {'lm-eval acc':>12} {'llamalab acc_norm':>18} {'lm-eval acc_norm':>17} {'max |dlogp|':>12}"
        print(header)
        for name, r in rows.items():
            print(
                f"{name:6} {r['n']:5d} {100 * r['agree_raw']:9.2f}% {100 * r['agree_char']:10.2f}% "
                f"{100 * r['ours_raw']:12.2f}% {100 * r['theirs_raw']:11.2f}% "
                f"{100 * r['ours_char']:17.2f}% {100 * r['theirs_char']:16.2f}% "
                f"{r['max_logprob_diff']:12.2e}"
            )
        print(f"MMLU macro-average (llamalab): {100 * mmlu.value:.2f}%")
        n_items = rows["mmlu"]["n"] + rows["siqa"]["n"]
        print(
            f"time (one process, OpenMP defaults for both): lm-eval hf {hf_s:.0f}s ({n_items / hf_s:.2f} items/s), "
            f"llamalab {ours_s:.0f}s ({n_items / ours_s:.2f} items/s)"
        )
        if args.backend:
            from llamalab.eval.lm_eval_backend import register

            register()
            start = time.perf_counter()
            backend = lm_eval_run(
                "llamalab", f"model={model_path},dtype=float32", files, args.batch_size
            )
            took = time.perf_counter() - start
            agree = total = 0
            for name in files.tasks:
                for i, picks in backend[name].items():
                    total += 1
                    agree += (picks["raw"], picks["char"]) == (
                        theirs[name][i]["raw"],
                        theirs[name][i]["char"],
                    )
            print(f"lm-eval --model llamalab vs hf: {agree}/{total} items agree ({took:.0f}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
