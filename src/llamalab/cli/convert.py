"""``llamalab convert``: write a checkpoint as a Hugging Face folder, a GGUF file or a Meta folder."""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from llamalab.gguf import QUANT_TYPES, WRITE_TYPES

DESCRIPTION = (
    "Convert a checkpoint to a Hugging Face folder, a GGUF file or a Meta folder, tensor by "
    "tensor, with LoRA adapters merged in if --lora is given. The destination must not "
    "exist; nothing is ever overwritten."
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "src", help="source checkpoint, or a `llamalab train` run folder (its newest checkpoint)"
    )
    p.add_argument("dst", help="destination path (folder for hf/meta, file for gguf)")
    p.add_argument("--to", required=True, choices=["hf", "gguf", "meta"], help="target format")
    p.add_argument(
        "--dtype",
        default=None,
        choices=WRITE_TYPES,
        help="tensor type to write (default: f32 for quantized sources, else the source's float "
        f"type; {', '.join(QUANT_TYPES)} are GGUF only)",
    )
    p.add_argument(
        "--shards", type=int, default=1, help="number of model-parallel shards (meta only)"
    )
    p.add_argument(
        "--lora",
        action="append",
        default=[],
        metavar="PATH[:SCALE]",
        help="merge this LoRA adapter (a PEFT folder or a GGUF adapter, as `llamalab finetune` "
        "writes), its update times SCALE (default 1); repeatable",
    )


def run(args: argparse.Namespace) -> int:
    from llamalab.checkpoint.convert import convert
    from llamalab.cli.options import lora_from_args

    adapters = lora_from_args(args)  # each one is a path to an adapter, before any work

    def write(src: str) -> Path:
        return convert(
            src,
            args.dst,
            to=args.to,
            dtype=args.dtype,
            shards=args.shards,
            progress=sys.stderr.isatty(),
            lora=adapters,
        )

    from llamalab.train.export import export_run, is_run_folder

    if is_run_folder(Path(args.src)):
        # A training run: its newest whole checkpoint, written out as a Meta folder first.
        with tempfile.TemporaryDirectory(prefix="llamalab-run-") as tmp:
            out = write(str(export_run(Path(args.src), Path(tmp))))
    else:
        out = write(args.src)
    print(f"wrote {out}", file=sys.stderr)
    return 0
