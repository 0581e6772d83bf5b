"""``llamalab eval`` against lm-eval 0.4.13's ``--model hf`` (transformers): whole commands.

Each run is a fresh process timed from start to result (imports, model load, data,
scoring, output), with its peak RSS. Runs are interleaved round by round (the order
rotates each round), so every command sees the same machine noise; the table gives the
median items per second with the min-max range, and the ratio of medians.

Each side runs as its users run it, with nothing of ours in lm-eval's environment
(no ``OMP_*`` or ``LLAMALAB_*`` variable):

* ``llamalab eval`` at its defaults (the packed-weight kernel where the CPU has it), and
  with ``--dtype float32``;
* ``lm-eval run --model hf --model_args pretrained=FOLDER``: FOLDER is the same GGUF
  converted to a float32 Hugging Face folder (``llamalab convert --to hf --dtype f32``),
  so lm-eval's default dtype ("auto": the checkpoint's) is float32 and its default run
  is also its float32 run. Its tasks are llamalab's shipped ones (``llamalab_mmlu_<subject>``,
  ``llamalab_siqa``, ``llamalab_gsm8k``: the same items and prompts), read offline.

Per-item agreement with lm-eval is computed from both sides' per-item output (the
headline pick: MMLU raw, SIQA per character; GSM8K: the same items right).

    .venv/bin/python bench/bench_eval.py                      # ~15 min on 2 idle cores
    .venv/bin/python bench/bench_eval.py --mmlu-limit 40 --siqa 300 --rounds 5 --gsm8k-rounds 3
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# One subject per category and a fifth, with prompts of moderate length.
DEFAULT_SUBJECTS = "abstract_algebra,world_religions,us_foreign_policy,management,global_facts"
OURS_ENV = ("OMP_", "KMP_", "LLAMALAB_", "MKL_")  # variable prefixes lm-eval must not see


def plain_env() -> dict[str, str]:
    """This environment without our tuning variables, offline for the datasets."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(OURS_ENV)}
    env.update(HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    return env


def timed(cmd: list[str], env: dict[str, str], log: Path) -> dict:
    """Run ``cmd``; wall seconds, peak RSS (MB) and the load average around it."""
    load = os.getloadavg()[0]
    start = time.perf_counter()
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        tail = log.read_text(errors="replace")[-3000:]
        raise SystemExit(f"command failed ({code}): {' '.join(cmd)}\n{tail}")
    return {"s": wall, "rss_mb": usage.ru_maxrss / 1024, "load": (load + os.getloadavg()[0]) / 2}


def llamalab_cmd(task: str, args, out: Path, dtype: str | None) -> list[str]:
    cmd = [sys.executable, "-m", "llamalab", "eval", "--task", task, "--output", str(out)]
    cmd += ["--json"] + (["-m", args.model] if args.model else [])
    if task == "mmlu":
        cmd += ["--subjects", args.subjects, "--limit", str(args.mmlu_limit)]
    else:
        cmd += ["--limit", str(args.siqa if task == "siqa" else args.gsm8k)]
    return cmd + (["--dtype", dtype] if dtype else [])


def lm_eval_cmd(task: str, args, hf: Path, out: Path) -> list[str]:
    from llamalab.eval.lm_eval_tasks import TASKS_FOLDER, mmlu_task_name

    if task == "mmlu":
        tasks = ",".join(mmlu_task_name(s) for s in args.subjects.split(","))
        limit = args.mmlu_limit
    else:
        tasks, limit = f"llamalab_{task}", args.siqa if task == "siqa" else args.gsm8k
    lm_eval = shutil.which("lm-eval", path=str(Path(sys.executable).parent)) or "lm-eval"
    return [
        lm_eval, "run", "--model", "hf", "--model_args", f"pretrained={hf}",
        "--tasks", tasks, "--include_path", str(TASKS_FOLDER), "--limit", str(limit),
        "--device", "cpu", "--output_path", str(out), "--log_samples",
    ]  # fmt: skip


def read_ours(path: Path) -> dict[int, dict]:
    return {r["id"]: r for r in map(json.loads, path.read_text().splitlines())}


def read_theirs(folder: Path, task: str) -> dict[int, dict]:
    """lm-eval's logged samples by item id: picks (choice tasks) or right/wrong (gsm8k)."""
    from llamalab.eval.lm_eval_tasks import lm_eval_picks

    out: dict[int, dict] = {}
    for name in glob.glob(str(folder / "**" / "samples_*.jsonl"), recursive=True):
        samples = [json.loads(line) for line in Path(name).read_text().splitlines()]
        if task == "gsm8k":
            for s in samples:
                if s.get("filter") == "flexible-extract":
                    out[int(s["doc"]["id"])] = {"correct": bool(s["exact_match"])}
        else:
            out.update(lm_eval_picks(samples))
    return out


def agreement(task: str, ours: dict[int, dict], theirs: dict[int, dict]) -> tuple[int, int]:
    """(items on which both agree, items compared)."""
    same = 0
    for i, r in ours.items():
        if task == "gsm8k":
            same += r["correct"] == theirs[i]["correct"]
        else:
            norm = "raw" if task == "mmlu" else "char"
            same += r["predictions"][norm] == theirs[i][norm]
    return same, len(ours)


def spread(values: list[float], fmt: str = "{:.2f}") -> str:
    med = statistics.median(values)
    return f"{fmt.format(med)} [{fmt.format(min(values))}-{fmt.format(max(values))}]"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="GGUF file (default: the embedded SmolLM2)")
    p.add_argument("--hf", default=None, help="its float32 HF folder (default: converted here)")
    p.add_argument("--tasks", default="mmlu,siqa,gsm8k")
    p.add_argument("--subjects", default=DEFAULT_SUBJECTS, help="MMLU subjects (at least 5)")
    p.add_argument("--mmlu-limit", type=int, default=4, help="items per subject (default 4)")
    p.add_argument("--siqa", type=int, default=30, help="SIQA items (default 30)")
    p.add_argument("--gsm8k", type=int, default=20, help="GSM8K items (default 20)")
    p.add_argument("--rounds", type=int, default=3, help="rounds for MMLU and SIQA (default 3)")
    p.add_argument("--gsm8k-rounds", type=int, default=1, help="rounds for GSM8K (default 1)")
    p.add_argument("--json", default=None, help="also write every run to this file")
    args = p.parse_args()

    from llamalab.eval.tasks.mmlu import parse_subjects
    from llamalab.runtime import resolve_model_ref

    args.subjects = ",".join(parse_subjects(args.subjects))
    model = resolve_model_ref(args.model)
    tasks = [t for t in args.tasks.split(",") if t]
    work = Path(tempfile.mkdtemp(prefix="bench-eval-"))
    hf = Path(args.hf) if args.hf else work / "hf"
    if not args.hf:
        from llamalab.checkpoint.convert import convert

        convert(model, hf, to="hf", dtype="f32")
    ours_env = dict(os.environ)  # llamalab at its defaults: whatever the user's shell has
    theirs_env = plain_env()
    sides = {
        "llamalab": lambda t, out: (llamalab_cmd(t, args, out, None), ours_env),
        "llamalab f32": lambda t, out: (llamalab_cmd(t, args, out, "float32"), ours_env),
        "lm-eval hf": lambda t, out: (lm_eval_cmd(t, args, hf, out), theirs_env),
    }
    names = list(sides)
    runs: dict[tuple[str, str], list[dict]] = {}
    agree: dict[tuple[str, str], tuple[int, int]] = {}
    n_items: dict[str, int] = {}
    started = time.strftime("%H:%M:%S")
    uptime_start = Path("/proc/loadavg").read_text().split()[:3]
    for task in tasks:
        rounds = args.gsm8k_rounds if task == "gsm8k" else args.rounds
        for r in range(rounds):
            order = names[r % len(names) :] + names[: r % len(names)]
            outputs: dict[str, Path] = {}
            for name in order:
                out = work / f"{task}-{r}-{name.replace(' ', '_')}"
                out = out.with_suffix(".jsonl") if name.startswith("llamalab") else out
                cmd, env = sides[name](task, out)
                result = timed(cmd, env, work / f"{out.name}.log")
                runs.setdefault((task, name), []).append(result)
                outputs[name] = out
                print(f"{task} round {r + 1}/{rounds} {name}: {result['s']:.1f}s "
                      f"{result['rss_mb']:.0f} MB load {result['load']:.1f}", file=sys.stderr)  # fmt: skip
            theirs = read_theirs(outputs["lm-eval hf"], task)
            for name in ("llamalab", "llamalab f32"):
                ours = read_ours(outputs[name])
                n_items[task] = len(ours)
                if set(ours) != set(theirs):
                    raise SystemExit(f"{task}: llamalab and lm-eval scored different items")
                agree[task, name] = agreement(task, ours, theirs)
    uptime_end = Path("/proc/loadavg").read_text().split()[:3]

    print(f"\n{Path(model).name}; {os.cpu_count()} CPUs; started {started}, load average "
          f"{' '.join(uptime_start)} at the start, {' '.join(uptime_end)} at the end")  # fmt: skip
    print(f"MMLU 5-shot: {args.subjects}, {args.mmlu_limit} items each")
    print("items/s and peak RSS: median [min-max] of the rounds; speed-up: ratio of medians\n")
    header = (f"{'task':7}{'command':14}{'items':>6}{'rounds':>7}{'items/s':>22}"
              f"{'vs lm-eval':>11}{'peak RSS MB':>22}{'load':>6}{'agree':>14}")  # fmt: skip
    print(header)
    table = []
    for task in tasks:
        base = statistics.median(n_items[task] / x["s"] for x in runs[task, "lm-eval hf"])
        for name in names:
            rs = runs[task, name]
            rate = [n_items[task] / x["s"] for x in rs]
            same = agree.get((task, name))
            row = {
                "task": task, "command": name, "items": n_items[task], "rounds": len(rs),
                "items_per_s": rate, "speedup": statistics.median(rate) / base,
                "rss_mb": [x["rss_mb"] for x in rs], "load": [x["load"] for x in rs],
                "agree": same,
            }  # fmt: skip
            table.append(row)
            agreed = f"{same[0]:>7}/{same[1]:<3} {100 * same[0] / same[1]:.0f}%" if same else ""
            print(
                f"{task:7}{name:14}{n_items[task]:6d}{len(rs):7d}{spread(rate, '{:.3f}'):>22}"
                f"{row['speedup']:10.2f}x{spread(row['rss_mb'], '{:.0f}'):>22}"
                f"{statistics.median(row['load']):6.1f}{agreed:>14}"
            )
    if args.json:
        Path(args.json).write_text(json.dumps(table, indent=1))
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
