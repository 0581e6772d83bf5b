"""``llamalab convert``: write a checkpoint as a Hugging Face folder, a GGUF file or a Meta folder."""

from __future__ import annotations

import argparse
import sys

from llamalab.gguf import QUANT_TYPES, WRITE_TYPES

DESCRIPTION = (
    "Convert a checkpoint to a Hugging Face folder, a GGUF file or a Meta folder, tensor by "
    "tensor. The destination must not exist; nothing is ever overwritten."
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("src", help="source checkpoint")
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


def run(args: argparse.Namespace) -> int:
    from llamalab.checkpoint.convert import convert

    out = convert(
        args.src,
        args.dst,
        to=args.to,
        dtype=args.dtype,
        shards=args.shards,
        progress=sys.stderr.isatty(),
    )
    print(f"wrote {out}", file=sys.stderr)
    return 0
