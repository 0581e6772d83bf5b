"""LoRA fine-tuning speed and memory: `llamalab finetune` against peft + transformers.

The same model (SmolLM2-135M-Instruct: its Q4_1 GGUF file, which llamalab trains on
packed, and the float32 Hugging Face copy that ``llamalab convert --to hf`` makes of it,
which both llamalab and peft train on), the same items, LoRA rank, alpha, targets,
sequence length, rows per step and AdamW. Each item takes a padded row of its own on both
sides (llamalab with ``packing = false``), so both compute the same rows; ``--steps`` ×
rows items are taken, and llamalab sees each once (``val_fraction = 0``, one epoch, in its
seeded order), peft in file order. The reference is the loop a peft user writes: eager
(no ``torch.compile``), SDPA attention, ``loss.backward()`` per micro-batch,
``clip_grad_norm_``, ``optimizer.step()``.

Each run is a fresh process; the sides alternate within each round (llamalab packed,
packed with ``recompute = true``, llamalab float, peft), rounds repeat ``--runs`` times
per thread count. A run's speed is its median tokens/s (rows × ``seq_len`` per step over the step's time, as ``metrics.jsonl``
counts them) over the steps after ``--warmup``; its memory is the process's peak RSS.
Reported: median [min, max] over runs, and the ratios of medians.

    .venv/bin/python bench/bench_finetune.py [--data train.jsonl] [--runs 3] [--steps 8]
        [--threads 1 2] [--rank 16] [--targets wq wk wv wo w1 w2 w3] [--seq-len 256]
        [--sides packed packed-recompute float float-recompute peft]

Without ``--data`` it builds the Debian changelog task (scripts/changelog_task.py) from
/usr/share/doc into a temporary folder.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import in_fresh_process

from llamalab.checkpoint.lora_files import HF_MODULES  # target name -> transformers module

REPO = Path(__file__).resolve().parents[1]
LR = 1e-3
SIDES = ("packed", "packed-recompute", "float", "float-recompute", "peft")


def peak_rss_mb() -> float:
    """This process's peak resident set size, in MB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# ---------------------------------------------------------------------------- workers
def worker_llamalab(model: str, data: str, out: str, settings: dict) -> dict:
    from llamalab.train.finetune import finetune, load_finetune_config

    s = settings
    sets = [
        f"model={model}", f"data={data}", f"out_dir={out}", "method=lora", "base=auto",
        f"rank={s['rank']}", f"alpha={2 * s['rank']}", "dropout=0",
        f"targets={json.dumps(s['targets'])}", f"lr={LR}", "warmup_steps=0",
        f"max_steps={s['steps']}", f"seq_len={s['seq_len']}",
        f"batch_tokens={s['rows'] * s['seq_len']}", f"micro_batch_size={s['micro']}",
        "packing=false", "overflow=drop", "val_fraction=0", f"threads={s['threads']}",
        "eval_every=0", "checkpoint_every=100000", "plot_every=0", "log_every=100000",
        f"recompute={'true' if s.get('recompute') else 'false'}",
    ]  # fmt: skip
    finetune(
        load_finetune_config(REPO / "configs" / "finetune" / "lora.toml", sets), progress=False
    )
    lines = (Path(out) / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    return {
        "tokens_per_s": [r["tokens_per_s"] for r in records if "tokens_per_s" in r],
        "loss": [r["loss"] for r in records if "loss" in r],
        "peak_rss_mb": peak_rss_mb(),
    }


def worker_peft(hf: str, rows_file: str, settings: dict) -> dict:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    s = settings
    torch.set_num_threads(s["threads"])
    rows = torch.load(rows_file)
    inputs, targets = rows["inputs"], rows["targets"]
    model = AutoModelForCausalLM.from_pretrained(
        hf, torch_dtype=torch.float32, attn_implementation="sdpa"
    )
    config = LoraConfig(
        r=s["rank"],
        lora_alpha=2 * s["rank"],
        lora_dropout=0.0,
        target_modules=[HF_MODULES[t] for t in s["targets"]],
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(model, config).train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=LR, weight_decay=0.0)
    per_step, micro = s["rows"], s["micro"]
    speeds, losses = [], []
    for step in range(s["steps"]):
        t0 = time.perf_counter()
        x_step = inputs[step * per_step : (step + 1) * per_step]
        y_step = targets[step * per_step : (step + 1) * per_step]
        n_trained = int((y_step != -100).sum())
        total = 0.0
        for at in range(0, per_step, micro):
            x, y = x_step[at : at + micro], y_step[at : at + micro]
            logits = model(input_ids=x).logits
            # The loss per trained token of the whole step, as llamalab's is.
            loss = torch.nn.functional.cross_entropy(
                logits.flatten(0, 1), y.flatten(), ignore_index=-100, reduction="sum"
            )
            (loss / n_trained).backward()
            total += float(loss)
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        speeds.append(per_step * s["seq_len"] / (time.perf_counter() - t0))
        losses.append(total / n_trained)
    return {"tokens_per_s": speeds, "loss": losses, "peak_rss_mb": peak_rss_mb()}


# ---------------------------------------------------------------------------- driver
def in_process(kind: str, *args: object):
    """Run one of this script's workers in a fresh interpreter (``_common.in_fresh_process``)."""
    return in_fresh_process("bench_finetune", kind, *args)


def prepare(tmp: Path, args: argparse.Namespace, model: str) -> tuple[Path, Path, Path]:
    """The items (a JSONL file of exactly steps × rows items that fit ``seq_len``), their
    padded rows for peft, and the float32 Hugging Face copy of the model."""
    from llamalab.data.instruct import load_instruct, to_rows

    source = Path(args.data) if args.data else None
    if source is None:
        sys.path.insert(0, str(REPO / "scripts"))
        import changelog_task

        train, _, _ = changelog_task.build(
            [p.resolve() for p in Path("/usr/share/doc").glob("*/changelog.Debian.gz")]
        )
        source = tmp / "all.jsonl"
        changelog_task.write_jsonl(source, train)
    hf = tmp / "hf"
    subprocess.run(
        [str(Path(sys.executable).parent / "llamalab"), "convert", model, str(hf), "--to", "hf"],
        check=True,
        stdout=subprocess.DEVNULL,
    )
    from llamalab.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(Path(model))
    lines = source.read_text(encoding="utf-8").splitlines()
    need = args.steps * args.rows
    # Keep the first items that fit a row, so that neither side drops one.
    data = load_instruct(source, tokenizer, args.seq_len, overflow="drop")
    fitting = [ex.line for ex in data.examples][:need]
    if len(fitting) < need:
        raise SystemExit(f"{source}: {len(fitting)} items fit seq_len {args.seq_len}; need {need}")
    items = tmp / "items.jsonl"
    items.write_text("".join(lines[n - 1] + "\n" for n in fitting), encoding="utf-8")
    import torch

    kept = load_instruct(items, tokenizer, args.seq_len, overflow="drop").examples
    inputs, targets = to_rows(kept, args.seq_len, pad_id=0)
    rows = tmp / "rows.pt"
    torch.save({"inputs": inputs, "targets": targets}, rows)
    return items, rows, hf


def summary(values: list[float], digits: int = 0) -> str:
    return (
        f"{statistics.median(values):.{digits}f} "
        f"[{min(values):.{digits}f}, {max(values):.{digits}f}]"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="GGUF file (default: llamalab's)")
    parser.add_argument("--data", default=None, help="instruction JSONL (default: changelogs)")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--targets", nargs="+", default=["wq", "wk", "wv", "wo", "w1", "w2", "w3"])
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--rows", type=int, default=8, help="rows (items) per step")
    parser.add_argument("--micro", type=int, default=8, help="rows per forward pass")
    parser.add_argument(
        "--sides",
        nargs="+",
        choices=SIDES,
        default=["packed", "packed-recompute", "float", "peft"],
        help="-recompute: llamalab with recompute = true (each block's activations "
        "recomputed in backward)",
    )
    parser.add_argument("--json", type=Path, help="also write every run's figures here")
    args = parser.parse_args()
    if args.warmup >= args.steps:
        raise SystemExit("--warmup must be below --steps")
    unknown = [t for t in args.targets if t not in HF_MODULES]
    if unknown:
        raise SystemExit(f"unknown target {unknown[0]!r}; choose among {' '.join(HF_MODULES)}")
    from llamalab.default_model import default_model_path

    model = str(Path(args.model) if args.model else default_model_path())
    print(f"load average before: {os.getloadavg()}")
    results: dict[str, dict[int, list[dict]]] = {s: {} for s in args.sides}
    with tempfile.TemporaryDirectory(prefix="bench-finetune-") as tmp_name:
        tmp = Path(tmp_name)
        items, rows, hf = prepare(tmp, args, model)
        print(
            f"model {Path(model).name}; {args.steps} steps of {args.rows} rows × {args.seq_len}, "
            f"rank {args.rank}, targets {' '.join(args.targets)}; {args.runs} rounds"
        )
        started = time.perf_counter()
        for run in range(args.runs):
            for threads in args.threads:
                settings = {
                    "rank": args.rank, "targets": args.targets, "steps": args.steps,
                    "seq_len": args.seq_len, "rows": args.rows, "micro": args.micro,
                    "threads": threads,
                }  # fmt: skip
                for side in args.sides:
                    if side == "peft":
                        got = in_process("peft", str(hf), str(rows), settings)
                    else:
                        out = str(tmp / f"run-{side}-{threads}-{run}")
                        ref = model if side.startswith("packed") else str(hf)
                        mine = {**settings, "recompute": side.endswith("-recompute")}
                        got = in_process("llamalab", ref, str(items), out, mine)
                    got["median_tokens_per_s"] = statistics.median(
                        got["tokens_per_s"][args.warmup :]
                    )
                    results[side].setdefault(threads, []).append(got)
                    print(
                        f"  round {run + 1}, {threads} thread(s), {side}: "
                        f"{got['median_tokens_per_s']:.0f} tok/s, "
                        f"peak RSS {got['peak_rss_mb']:.0f} MB",
                        flush=True,
                    )
        wall = time.perf_counter() - started
    print(f"wall time {wall:.0f} s; load average after: {os.getloadavg()}")
    for threads in args.threads:
        print(f"{threads} thread(s):")
        medians = {}
        for side in args.sides:
            runs = results[side][threads]
            speed = [r["median_tokens_per_s"] for r in runs]
            rss = [r["peak_rss_mb"] for r in runs]
            medians[side] = (statistics.median(speed), statistics.median(rss))
            print(f"  {side:16s} {summary(speed)} tok/s, peak RSS {summary(rss)} MB")
        if "peft" in medians:
            for side in args.sides:
                if side != "peft":
                    print(
                        f"  {side} / peft: speed {medians[side][0] / medians['peft'][0]:.2f}×, "
                        f"peak RSS {medians[side][1] / medians['peft'][1]:.2f}×"
                    )
    if args.json:
        args.json.write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
