"""Pretrain a LLaMA model from a TOML config.

    llamalab train configs/train/debug.toml --set data=data/tiny --set out_dir=runs/debug
    torchrun --nnodes 1 --nproc_per_node 8 -m llamalab train configs/train/llama-7b.toml

The same command runs one CPU process or every rank of a torchrun job (FSDP2 when there
is more than one). Running it again with the same out_dir resumes from the newest whole
checkpoint there: model, optimiser, schedule, data position and random state. SIGINT or
SIGTERM saves a checkpoint and stops. A newest checkpoint that does not load is passed
over for the next older one, with a line naming both. A finished run run again trains
nothing and says so; to train further, raise max_steps. The learning rate is a function
of the step and the config: a resume with another max_steps follows the new schedule
from the saved step, and says so (keep total_tokens as it was to keep the old one).
out_dir gets metrics.jsonl, loss.png, checkpoints/ and, at the end, export/: a Meta
checkpoint with the tokenizer and SHA256SUMS, which `llamalab generate --model
OUT_DIR/export` runs. With several nodes, data and out_dir must be on a filesystem
that every node sees.

--set KEY=VALUE overrides a config key: data, out_dir, max_steps, seed,
checkpoint_every, lr, batch_tokens, precision (auto|bf16|fp32), model.dim,
weights.SOURCE ... (any key of the file; values are TOML: 3e-4, true, "text").
Paths in the config are relative to the current folder.
"""

from __future__ import annotations

import argparse

DESCRIPTION = __doc__


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_run_arguments(p, "training config")


def add_run_arguments(p: argparse.ArgumentParser, config_help: str) -> None:
    """What `llamalab train` and `llamalab finetune` take: a config, ``--set``, ``--progress``."""
    p.add_argument("config", metavar="CONFIG.toml", help=config_help)
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config key (repeatable)",
    )
    p.add_argument(
        "--progress",
        choices=("auto", "bar", "lines"),
        default="auto",
        help="progress bar, or one line every log_every steps (default: bar on a terminal)",
    )


def progress_from_args(args: argparse.Namespace) -> bool | None:
    """``--progress`` as the run's ``progress`` argument (None: a bar on a terminal)."""
    return {"auto": None, "bar": True, "lines": False}[args.progress]


def report_stopped(command: str, summary: dict) -> int:
    """Say that a signal stopped the run (after saving); the exit status a signal gives."""
    import signal
    import sys

    print(
        f"llamalab {command}: stopped by {summary['stopped_by']} at step {summary['step']}; "
        "checkpoint saved, run the same command to resume",
        file=sys.stderr,
    )
    return 128 + int(getattr(signal, summary["stopped_by"]))


def run(args: argparse.Namespace) -> int:
    import signal
    import sys

    from llamalab.train.config import load_config

    cfg = load_config(args.config, args.overrides)
    from llamalab.train.loop import train

    summary = train(cfg, progress=progress_from_args(args))
    if summary["rank"] != 0:  # under torchrun, rank 0 speaks for the job
        return 128 + int(getattr(signal, summary["stopped_by"])) if summary["stopped_by"] else 0
    if summary["already_finished"]:
        exported = f"; its model is in {summary['export']}" if summary["export"] else ""
        print(
            f"llamalab train: {cfg.out_dir} already finished: its newest checkpoint is step "
            f"{summary['step']} and max_steps is {summary['stop_step']}{exported}. "
            f"To train further, run again with --set max_steps=N (N > {summary['step']})",
            file=sys.stderr,
        )
        return 0
    if summary["stopped_by"]:
        return report_stopped("train", summary)
    epochs = ", ".join(f"{name} {e:.3g}" for name, e in summary["epochs"].items())
    print(
        f"llamalab train: step {summary['step']}, loss {summary['loss']:.4f}, "
        f"{summary['tokens_per_s']:,.0f} tokens/s; epochs seen: {epochs}"
        + (f"; model exported to {summary['export']}" if summary["export"] else ""),
        file=sys.stderr,
    )
    return 0
